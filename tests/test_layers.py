"""The MLA module with DSA: equality with the dense path, gradients, the detached indexer,
one return type."""
import json

import pytest
import torch

from flashdsa.config import DSAConfig
from flashdsa.layers import MLA, MLAOutput, causal_ranges
from flashdsa.reference.rope import yarn_inv_freq
from tests.utils import OFFICIAL_671B, tiny_mla_config

LENS = [7, 13, 5]


def _packed(dtype=torch.float64):
    cu = torch.tensor([0, 7, 20, 25], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in LENS])
    x = torch.randn(sum(LENS), 64, dtype=dtype)
    return x, pos, cu


def test_dsa_equals_dense_when_topk_covers_sequence():
    m = MLA(tiny_mla_config(index_topk=16)).double()  # 16 >= the longest sequence (13)
    x, pos, cu = _packed()
    torch.testing.assert_close(m(x, pos, cu, "sparse").hidden, m(x, pos, cu, "dense").hidden, rtol=1e-10,
                               atol=1e-12)


def test_short_call_skips_the_indexer(monkeypatch):
    """At most index_topk tokens in the call: every query's top-k is its whole causal
    range, so the sparse call runs the dense path without the indexer, and equals it
    exactly; with the indexer loss (training) the sparse path still runs."""
    m = MLA(tiny_mla_config(index_topk=25)).double()
    x, pos, cu = _packed()                            # 25 tokens
    dense = m(x, pos, cu, "dense").hidden
    monkeypatch.setattr(m.indexer, "forward", lambda *a, **k: pytest.fail("indexer called"))
    assert torch.equal(m(x, pos, cu, "sparse").hidden, dense)
    monkeypatch.undo()
    calls = []
    real = m.indexer.select
    monkeypatch.setattr(m.indexer, "select", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = m(x, pos, cu, "sparse", indexer_loss=True)
    assert calls and out.indexer_loss is not None
    torch.testing.assert_close(out.hidden, dense, rtol=1e-10, atol=1e-12)


def test_dsa_differs_from_dense_when_topk_is_small():
    m = MLA(tiny_mla_config(index_topk=3)).double()
    x, pos, cu = _packed()
    diff = (m(x, pos, cu, "sparse").hidden - m(x, pos, cu, "dense").hidden).abs().amax(-1)
    # The first 3 tokens of each sequence see everything either way; later ones do not.
    first3 = torch.cat([torch.arange(3) + s for s in (0, 7, 20)])
    assert diff[first3].max() < 1e-10 and diff.max() > 1e-4


def test_indexer_selection_is_causal_and_per_sequence():
    m = MLA(tiny_mla_config(index_topk=4)).double()
    x, pos, cu = _packed()
    ks, ke = causal_ranges(cu, x.shape[0])
    from flashdsa.reference.rope import rope_cos_sin
    cos, sin = rope_cos_sin(pos, m.inv_freq)
    qr = m.q_a_layernorm(m.q_a_proj(x))
    idx = m.indexer(x, qr, cos, sin, ks, ke)
    assert idx.shape == (25, 4) and idx.dtype == torch.int32
    valid = idx >= 0
    assert (valid.sum(1) == torch.clamp(ke - ks, max=4)).all()
    assert ((idx >= ks[:, None]) & (idx < ke[:, None]))[valid].all()


def test_gradients_reach_main_weights_not_indexer():
    m = MLA(tiny_mla_config(index_topk=5)).double()
    x, pos, cu = _packed()
    x.requires_grad_(True)
    m(x, pos, cu, "sparse").hidden.square().sum().backward()
    for name, p in m.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is None, f"{name} got a gradient from the attention output"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert x.grad.abs().sum() > 0


def test_parameter_names_match_official_layout():
    names = set(MLA(tiny_mla_config()).state_dict())
    assert names == {
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight", "indexer.wq_b.weight",
        "indexer.wk.weight", "indexer.k_norm.weight", "indexer.k_norm.bias", "indexer.weights_proj.weight"}


def test_config_from_official_json_and_back():
    cfg = DSAConfig.from_hf_config(json.loads(json.dumps(OFFICIAL_671B)))
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.rope_factor) == (64, 128, 2048, 40.0)
    assert abs(cfg.softmax_scale - 0.13523) < 5e-6
    assert cfg.extra["num_key_value_heads"] == 128
    assert DSAConfig.from_hf_config(cfg.to_hf_config()) == cfg
    with torch.device("meta"):
        m = MLA(cfg)
    assert m.kv_b_proj.weight.shape == (128 * 256, 512) and m.indexer.wq_b.weight.shape == (64 * 128, 1536)
    with pytest.raises(ValueError, match="index_head_dim"):
        DSAConfig(index_head_dim=96)


def test_module_rejects_bad_inputs():
    m = MLA(tiny_mla_config())
    x, pos, cu = _packed(torch.float32)
    with pytest.raises(ValueError, match="attention"):
        m(x, pos, cu, "dsa")
    with pytest.raises(TypeError, match="indexer_loss"):
        m(x, pos, cu, indexer_loss="warmup")
    with pytest.raises(ValueError, match=r"x: expected shape \[\*, 64\]"):
        m(x[:, :32], pos, cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x, pos, torch.tensor([0, 7, 20], dtype=torch.int32))


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_forward_returns_one_type(attention):
    """Every call returns an MLAOutput; the loss is None unless asked for."""
    m = MLA(tiny_mla_config(index_topk=4)).double()
    x, pos, cu = _packed()
    out = m(x, pos, cu, attention=attention, backend="reference")
    assert isinstance(out, MLAOutput) and out.hidden.shape == x.shape and out.indexer_loss is None
    hidden, loss = m(x, pos, cu, attention=attention, indexer_loss=True, backend="reference")
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() > 0
    torch.testing.assert_close(hidden, out.hidden)


@pytest.mark.parametrize("weights_fp32", [False, True])
def test_merged_projections_equal_separate_ones(weights_fp32):
    """merge_projections: one GEMM per input gives MLA's and the indexer's projections
    (up to the GEMM's summation order), the parameters stay the same values and
    trainable views, and a module moved afterwards falls back to separate GEMMs."""
    torch.manual_seed(0)
    attn = MLA(tiny_mla_config()).eval()
    if weights_fp32:   # a float32 weights_proj beside float64 weights stays out of the merge
        attn.double()
        attn.indexer.weights_proj.float()
    dt = attn.q_a_proj.weight.dtype
    x, pos = torch.randn(7, attn.cfg.hidden_size, dtype=dt), torch.arange(7)
    with torch.no_grad():
        want = attn.project(x, pos, indexer_raw=True)
        before = {n: p.clone() for n, p in attn.named_parameters()}
        attn.merge_projections()
        got = attn.project(x, pos, indexer_raw=True)
    assert attn._merged[2] == (3 if weights_fp32 else 4)
    assert attn.q_a_proj.weight.data_ptr() == attn._merged[0].data_ptr()
    assert attn.indexer.wq_b.weight.data_ptr() > attn._merged[1].data_ptr()   # a view into the merged tensor
    for n, p in attn.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad, n
    flat = lambda out: [t for o in out for t in (o if isinstance(o, tuple) else (o,))]   # noqa: E731
    for a, b in zip(flat(got), flat(want)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    other = torch.float64 if dt == torch.float32 else torch.float32
    moved = attn.to(other)
    with torch.no_grad():
        again = moved.project(x.to(other), pos, indexer_raw=True)
    assert moved.q_a_proj.weight.data_ptr() != moved._merged[0].data_ptr()
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5) for a, b in zip(flat(again), flat(want)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_engine_pieces_equal_project_and_absorb(dtype):
    """The engine's inference pieces give the module's operands: project_inputs + the
    latent rows (flashdsa.reference.mla_cache.latent_rows) = project's kv and k_pe, and
    absorbed_query (W_UK's product and the RoPE written into one buffer) = absorb's
    q_full, contiguous."""
    from flashdsa.reference.mla_cache import latent_rows
    torch.manual_seed(1)
    attn = MLA(tiny_mla_config()).to(dtype).eval()
    x, pos = torch.randn(9, attn.cfg.hidden_size, dtype=dtype), torch.randint(0, 5000, (9,))
    with torch.no_grad():
        qr, q_nope, q_pe, kv, k_pe, cos, sin = attn.project(x, pos)
        want_q, want_kv, want_uv = attn.absorb(q_nope, q_pe, kv, k_pe)
        qr2, q, kv_pe, raw = attn.project_inputs(x)
        got_q, got_uv = attn.absorbed_query(q, cos, sin)
        rows = latent_rows(kv_pe, attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, cos, sin)
    assert raw is None and torch.equal(qr2, qr)
    assert torch.equal(rows, want_kv[:, 0]) and torch.equal(got_uv, want_uv)
    assert got_q.is_contiguous() and got_q.shape == want_q.shape
    torch.testing.assert_close(got_q, want_q, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    """A bf16 model keeps its RoPE frequencies and angles in fp32: in bf16, positions past
    256 would share angles (1000 and 1001 would rotate alike)."""
    attn = MLA(tiny_mla_config()).to(torch.bfloat16)
    assert attn.inv_freq.dtype == torch.float32
    cos, sin = attn.rope_cos_sin(torch.tensor([1000, 1001, 131071]))
    assert cos.dtype == sin.dtype == torch.float32
    assert float((cos[0] - cos[1]).abs().max()) > 0.1
    want = yarn_inv_freq(*attn._rope_args)
    assert torch.equal(attn.inv_freq, want)


def test_dense_attention_gives_sdpa_4d_operands(monkeypatch):
    """torch's fused SDPA kernels (flash, memory-efficient, cuDNN) take 4-D operands only; 3-D
    ones run the math kernel, which materializes [H, L, L] scores. The dense path (training's
    dense stages) must hand SDPA [1, H, L, d] operands, and still give each sequence's output."""
    import flashdsa.layers as layers

    dims, sdpa = [], layers.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        dims.append((q.dim(), k.dim(), v.dim()))
        return sdpa(q, k, v, *args, **kwargs)

    m = MLA(tiny_mla_config(index_topk=4)).double()
    x, pos, cu = _packed()
    want = m(x, pos, cu, "dense").hidden
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    got = m(x, pos, cu, "dense").hidden
    assert dims == [(4, 4, 4)] * len(LENS)
    assert torch.equal(got, want)
