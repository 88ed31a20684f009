"""Checkpoints in the official HF format: round trip, a hand-written FP8 checkpoint with
weight_scale_inv, sharding, skipped MTP layers, and clear errors."""
import json
import sys

import pytest
import torch

from flashdsa.checkpoint import (
    dequantize_fp8_block,
    from_pretrained,
    quantize_fp8_block,
    save_pretrained,
)
from flashdsa.model import DSAForCausalLM
from tests.test_model import tiny_config

st = pytest.importorskip("safetensors.torch")



def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard", [False, True])
def test_round_trip(tmp_path, shard):
    model = DSAForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_()
    save_pretrained(model, tmp_path, max_shard_bytes=20_000 if shard else 2**30)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert ("model.safetensors.index.json" in files) == shard and "config.json" in files
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and cfg["index_topk"] == 4
    loaded = from_pretrained(tmp_path).eval()
    _same_state(model, loaded)
    ids = torch.randint(0, 67, (1, 9))
    assert torch.equal(model(ids, attention="dense").logits, loaded(ids, attention="dense").logits)


def test_fp8_block_quant_is_tilewise():
    w = torch.randn(200, 130)
    w[:128, :128] *= 1000       # one huge tile must not wreck the precision of the others
    w8, s = quantize_fp8_block(w)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (2, 2)
    back = dequantize_fp8_block(w8, s, torch.float32)
    for rows, cols in ((slice(0, 128), slice(0, 128)), (slice(128, 200), slice(128, 130))):
        err = (back[rows, cols] - w[rows, cols]).norm() / w[rows, cols].norm()
        assert err < 0.04           # e4m3 has 3 mantissa bits: ~2-3% relative error
    with pytest.raises(ValueError, match="weight_scale_inv"):
        dequantize_fp8_block(w8, s[:1])


def test_official_layout_with_fp8_weight_and_mtp_layer(tmp_path):
    """A checkpoint written here by hand, with the names and conventions of the release."""
    cfg = tiny_config(hidden_size=160, q_lora_rank=136)    # dims > 128: two FP8 blocks per axis
    ref = DSAForCausalLM(cfg)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    name = "model.layers.0.self_attn.q_a_proj.weight"       # [136, 160]
    w = torch.randn(136, 160)
    scale = torch.tensor([[0.5, 2.0], [0.25, 4.0]])         # fp32, one per 128 x 128 block
    w8 = (w / scale.repeat_interleave(128, 0)[:136].repeat_interleave(128, 1)[:, :160]).to(torch.float8_e4m3fn)
    tensors[name] = w8
    tensors[name.replace(".weight", ".weight_scale_inv")] = scale
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(4, 4)           # MTP layer: skipped
    tensors["model.layers.2.self_attn.q_a_proj.weight"] = torch.zeros(4, 4)
    st.save_file(tensors, str(tmp_path / "model.safetensors"))
    hf = cfg.to_hf_config()
    hf.update(torch_dtype="bfloat16", num_nextn_predict_layers=1,
              quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    (tmp_path / "config.json").write_text(json.dumps(hf))

    model = from_pretrained(tmp_path)
    got = model.model.layers[0].self_attn.q_a_proj.weight
    assert got.dtype == torch.bfloat16
    # block (i, j) of the weight is w8 * scale[i, j]: check two blocks by hand
    torch.testing.assert_close(got[:128, :128].float(), w8[:128, :128].float() * 0.5)
    torch.testing.assert_close(got[128:, 128:].float(), w8[128:, 128:].float() * 4.0)
    assert (got.float() - w).norm() / w.norm() < 0.05      # and it approximates the original weight
    other = "model.layers.1.self_attn.indexer.wq_b.weight"
    assert torch.equal(model.state_dict()[other], tensors[other])
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model(torch.randint(0, 67, (1, 6)), attention="sparse").logits.isfinite().all()


def test_fp8_save_load(tmp_path):
    model = DSAForCausalLM(tiny_config(hidden_size=160, q_lora_rank=136))
    save_pretrained(model, tmp_path, fp8=True)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as h:
        keys = set(h.keys())
        assert h.get_tensor("model.layers.0.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
        assert h.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in keys
    loaded = from_pretrained(tmp_path)
    a = model.model.layers[0].self_attn.kv_b_proj.weight
    b = loaded.model.layers[0].self_attn.kv_b_proj.weight
    assert 0 < (a - b).norm() / a.norm() < 0.05


def test_errors(tmp_path, monkeypatch):
    model = DSAForCausalLM(tiny_config())
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="q_a_proj.weight: checkpoint shape"):
        from_pretrained(tmp_path, config=tiny_config(q_lora_rank=12))
    with pytest.raises(KeyError, match="missing"):
        from_pretrained(tmp_path, config=tiny_config(num_hidden_layers=3))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        from_pretrained(tmp_path)


def test_tied_embeddings_round_trip(tmp_path):
    model = DSAForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as h:
        assert "lm_head.weight" not in set(h.keys())
        assert h.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
