"""flashdsa against transformers' DeepseekV32 (the peer implementation): config.json in both
dialects, tiny random models saved by one and loaded by the other with the same logits
(float32, CPU), and the named errors and warnings for config values flashdsa cannot honor.
The tests that build transformers models skip when transformers is not installed."""
import json
import math
import warnings

import pytest
import torch

import flashdsa
from flashdsa.config import DSAConfig
from flashdsa.layers import LightningIndexer, causal_ranges
from flashdsa.model import DSAForCausalLM
from tests.utils import OFFICIAL_671B, rel_err

# YaRN with every parameter off its default, so that a field read wrong shows in the logits.
ROPE = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.6}
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2, index_head_dim=16, index_topk=4,
            max_position_embeddings=256, routed_scaling_factor=1.5)


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers", reason="the peer tests need transformers (pip install transformers)")


def _hf_model(hf, **kw):
    cfg = hf.DeepseekV32Config(**{**TINY, "num_key_value_heads": TINY["num_attention_heads"], **kw},
                               rope_parameters=dict(ROPE))
    torch.manual_seed(0)
    model = hf.DeepseekV32ForCausalLM(cfg).float().eval()
    with torch.no_grad():   # random router bias and norms: they must be read and used
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _ids():
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


def _set_hf_topk(model, k):
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = k


@pytest.mark.parametrize("top_k", [2, 1])
def test_transformers_model_loads_in_flashdsa_with_same_logits(hf, tmp_path, top_k):
    ref = _hf_model(hf, num_experts_per_tok=top_k)
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # transformers' config.json: every key known
        cfg = flashdsa.checkpoint.load_config(tmp_path)
    assert (cfg.rope_theta, cfg.rope_factor, cfg.original_max_position_embeddings) == (5000.0, 4.0, 32)
    assert (cfg.beta_fast, cfg.beta_slow, cfg.mscale, cfg.mscale_all_dim) == (16.0, 2.0, 0.8, 0.6)
    cfg.indexer_numerics = "exact"           # transformers' indexer does not quantize
    model = flashdsa.from_pretrained(tmp_path, config=cfg).eval()
    assert next(model.parameters()).dtype == torch.float32      # config.json's "dtype"
    ids = _ids()
    with torch.no_grad():
        want_sparse = ref(ids).logits
        got_sparse = model(ids, attention="sparse", backend="reference").logits
        _set_hf_topk(ref, 10**6)             # every causal key: transformers' attention turns dense
        want_dense = ref(ids).logits
        got_dense = model(ids, attention="dense", backend="reference").logits
    assert rel_err(want_sparse, want_dense) > 1e-2   # the top-k (4 of 12) does change the model
    assert rel_err(got_sparse, want_sparse) < 1e-4
    assert rel_err(got_dense, want_dense) < 1e-4


def test_flashdsa_model_loads_in_transformers_with_same_logits(hf, tmp_path):
    cfg = DSAConfig(**TINY, rope_theta=5000.0, rope_factor=4.0, original_max_position_embeddings=32, beta_fast=16.0,
                    beta_slow=2.0, mscale=0.8, mscale_all_dim=0.6, indexer_numerics="exact")
    torch.manual_seed(0)
    model = DSAForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    # use_kernels=False: transformers >= 5.25 otherwise asks for the optional `kernels` package.
    peer = hf.DeepseekV32ForCausalLM.from_pretrained(tmp_path, use_kernels=False).float().eval()
    ids = _ids()
    with torch.no_grad():
        got, want = peer(ids).logits, model(ids, attention="sparse", backend="reference").logits
    assert rel_err(got, want) < 1e-4


def test_flashdsa_config_reads_the_same_in_transformers(hf, tmp_path):
    cfg = DSAConfig(**TINY, rope_theta=5000.0, rope_factor=4.0, original_max_position_embeddings=32, beta_fast=16.0,
                    beta_slow=2.0, mscale=0.8, mscale_all_dim=0.6, rope_attention_factor=1.3)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    peer = hf.DeepseekV32Config.from_pretrained(tmp_path)
    for key, value in TINY.items():
        assert getattr(peer, key) == value, key
    rope = peer.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["attention_factor"] == 1.3
    for key in ("rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim"):
        assert rope[key] == ROPE[key], key
    assert DSAConfig.from_hf_config(cfg.to_hf_config()) == cfg
    # the softmax scale transformers' attention layer computes from that config
    from transformers.models.deepseek_v32 import modeling_deepseek_v32
    peer_scaling = modeling_deepseek_v32.DeepseekV32Attention(peer, layer_idx=0).scaling
    assert cfg.softmax_scale == pytest.approx(peer_scaling, rel=1e-12)


def test_both_dialects_give_the_same_config():
    official = DSAConfig.from_hf_config(OFFICIAL_671B)
    v5 = {k: v for k, v in OFFICIAL_671B.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1}
    v5["dtype"] = "bfloat16"
    assert DSAConfig.from_hf_config(v5) == official
    assert official.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert official.rope_scale == 1.0                # mscale == mscale_all_dim: cos/sin unscaled
    assert official.indexer_numerics == "fp8"        # no flashdsa key: DeepSeek's FP8 indexer


def test_rope_scale_follows_mscale_and_mscale_all_dim():
    def m(s):                                       # YaRN's mscale(factor 4, s)
        return 0.1 * s * math.log(4.0) + 1

    cfg = DSAConfig.from_hf_config({**TINY, "rope_parameters": ROPE})
    assert cfg.rope_scale == pytest.approx(m(0.8) / m(0.6))
    assert cfg.softmax_scale == pytest.approx(16 ** -0.5 * m(0.6) ** 2)
    bare = DSAConfig.from_hf_config({**TINY, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 32}})
    assert (bare.rope_scale, bare.softmax_scale) == (pytest.approx(m(1.0)), 16 ** -0.5)


@pytest.mark.parametrize("change, key", [
    ({"rope_parameters": {**ROPE, "rope_type": "llama3"}}, "rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
    ({"rope_parameters": {**ROPE, "low_freq_factor": 1.0}}, "low_freq_factor"),
    ({"rope_parameters": {**ROPE, "truncate": False}}, "truncate"),
    ({"rope_parameters": {**ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"rope_parameters": {**ROPE, "original_max_position_embeddings": 256}}, "factor"),
    ({"rope_parameters": ROPE, "rope_theta": 10000.0}, "rope_theta"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"mlp_layer_types": ["sparse", "sparse"]}, "mlp_layer_types"),
    ({"flashdsa_indexer_numerics": "bf16"}, "indexer_numerics"),
])
def test_values_flashdsa_cannot_honor_raise_by_name(change, key):
    with pytest.raises(ValueError, match=key):
        DSAConfig.from_hf_config({**TINY, "rope_parameters": ROPE, **change})


def test_unknown_keys_warn_by_name_and_are_kept():
    with pytest.warns(UserWarning, match="my_new_knob"):
        cfg = DSAConfig.from_hf_config({**TINY, "rope_parameters": ROPE, "my_new_knob": 3})
    assert cfg.to_hf_config()["my_new_knob"] == 3


def test_dtype_key_names_the_weights_dtype():
    cfg = DSAConfig.from_hf_config({**TINY, "rope_parameters": ROPE, "dtype": "bfloat16"})
    assert flashdsa.checkpoint._default_dtype(cfg) == torch.bfloat16
    cfg = DSAConfig.from_hf_config({**TINY, "rope_parameters": ROPE, "dtype": "int8"})
    with pytest.raises(ValueError, match="dtype"):
        flashdsa.checkpoint._default_dtype(cfg)


def _indexer_inputs(numerics):
    cfg = DSAConfig(**TINY, indexer_numerics=numerics, rope_factor=1.0)
    torch.manual_seed(3)
    indexer = LightningIndexer(cfg)
    t = 40
    q, k = torch.randn(t, cfg.index_n_heads, cfg.index_head_dim), torch.randn(t, cfg.index_head_dim)
    w = torch.randn(t, cfg.index_n_heads)
    ks, ke = causal_ranges(torch.tensor([0, t], dtype=torch.int32), t)
    return indexer, q, k, w, ks, ke


def test_exact_indexer_selects_the_float64_top_k():
    indexer, q, k, w, ks, ke = _indexer_inputs("exact")
    got = indexer.select(q, k, w, ks, ke)
    scores = torch.einsum("thd,sd->ths", q.double(), k.double()).relu() * indexer.head_dim ** -0.5
    logits = torch.einsum("th,ths->ts", w.double(), scores)
    want = flashdsa.reference.topk_indices(logits, ks, ke, indexer.topk)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    with pytest.raises(ValueError, match="backend"):
        indexer.select(q, k, w, ks, ke, backend="triton")


def test_fp8_indexer_selects_the_fp8_reference_top_k():
    indexer, q, k, w, ks, ke = _indexer_inputs("fp8")
    got = indexer.select(q, k, w, ks, ke, backend="reference")
    q8, q_scale = flashdsa.reference.act_quant(q, indexer.head_dim)
    k8, k_scale = flashdsa.reference.act_quant(k, indexer.head_dim)
    logits = flashdsa.reference.indexer_logits(q8, k8, k_scale[:, 0], w * q_scale[..., 0] * indexer.head_dim ** -0.5,
                                               ks, ke)
    want = flashdsa.reference.topk_indices(logits, ks, ke, indexer.topk)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    exact = _indexer_inputs("exact")[0].select(q, k, w, ks, ke)
    assert not torch.equal(got.sort(-1).values, exact.sort(-1).values)   # the two numerics do differ here


def test_engine_refuses_exact_indexer_numerics():
    from flashdsa.engine.llm import LLMEngine
    model = DSAForCausalLM(DSAConfig(**TINY, rope_factor=1.0, indexer_numerics="exact"))
    with pytest.raises(ValueError, match="indexer_numerics"):
        LLMEngine(model)
