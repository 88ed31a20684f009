"""Paged sparse MLA decode (SPEC 4): Triton kernel vs the float64 reference over random
block tables, both cache formats, s_q 1 and 2, split-k on and off."""
import math

import pytest
import torch

import flashdsa.api as api
from flashdsa.ops.sparse_mla import choose_n_split, sparse_mla_decode
from flashdsa.reference import mla_cache as R
from flashdsa.reference.sparse_mla import sparse_mla_decode as ref_decode
from tests.ops.test_sparse_mla import bf16_torch_reference, poison_empty  # noqa: F401  (fixture)
from tests.utils import KERNEL_DEVICE, rel_err, requires_cuda

PAGE = 64


def paged_problem(b, s_q, h_q, topk, d_qk=576, max_ctx=300, q_dtype=torch.float32, device=KERNEL_DEVICE):
    """A shuffled paged cache and physical-slot indices that follow SPEC 4's causal rule
    (query j of a sequence of length n sees positions <= n - s_q + j)."""
    ctx = torch.randint(s_q, max_ctx + 1, (b,))
    n_logical = [math.ceil(int(n) / PAGE) for n in ctx]
    num_blocks = sum(n_logical) + 3  # spare pages nobody points to
    perm = torch.randperm(num_blocks)
    tables, start = [], 0
    for nl in n_logical:
        tables.append(perm[start:start + nl])
        start += nl
    idx = torch.full((b, s_q, topk), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(s_q):
            visible = int(ctx[i]) - s_q + j + 1
            pos = torch.randperm(visible)[:topk]
            slots = tables[i][pos // PAGE] * PAGE + pos % PAGE
            idx[i, j, : len(pos)] = slots.int()
            idx[i, j] = idx[i, j][torch.randperm(topk)]  # invalid entries anywhere
    idx[0, 0] = -1  # a query with nothing selected
    idx[-1, -1, 0] = num_blocks * PAGE + 7  # beyond the cache: skipped too
    cache = torch.randn(num_blocks, PAGE, 1, d_qk).to(torch.bfloat16)
    q = torch.randn(b, s_q, h_q, d_qk, dtype=q_dtype)
    return q.to(device), cache.to(device), idx.to(device)


def check_decode(q, cache, idx, sm_scale, d_v, kv_format, out, lse, floor=1e-5):
    o64, l64 = ref_decode(q, cache, idx, sm_scale, d_v, kv_format, compute_dtype=torch.float64)
    olo, llo = ref_decode(q, cache, idx, sm_scale, d_v, kv_format)
    for name, got, want, low in (("out", out, o64, olo), ("lse", lse, l64, llo)):
        assert not torch.isnan(got).any(), f"{name}: NaN"
        err, budget = rel_err(got, want), 2 * rel_err(low, want) + floor
        assert err <= budget, f"{name}: rel err {err:.3g} > {budget:.3g}"
    assert (out[0, 0].float() == 0).all().item() and (lse[0, 0] == math.inf).all().item()


@pytest.mark.parametrize("kv_format", ["bf16", "fp8_ds_mla"])
@pytest.mark.parametrize("s_q,n_split,int_decode", [(1, 1, False), (2, 3, True), (2, 2, False)])
def test_decode_matches_reference(poison_empty, kv_format, s_q, n_split, int_decode):  # noqa: F811
    """int_decode: the e4m3 bytes decoded with integer ops (the path of GPUs before sm_89)."""
    q, cache, idx = paged_problem(2, s_q, 16, 45)
    if kv_format == "fp8_ds_mla":
        cache = R.quantize_mla_cache(cache.cpu()).to(KERNEL_DEVICE)
    out, lse = sparse_mla_decode(q, cache, idx, 0.07, 512, kv_format, n_split=n_split,
                                 config=dict(BLOCK_K=16, INT_DECODE=int_decode))
    assert out.shape == (2, s_q, 16, 512) and lse.shape == (2, s_q, 16)
    check_decode(q, cache, idx, 0.07, 512, kv_format, out, lse)


def test_decode_bf16_small_head_dim_via_api(poison_empty):  # noqa: F811
    """The bf16 format takes any d_qk >= d_v; the public op dispatches to the kernel."""
    q, cache, idx = paged_problem(3, 2, 16, 30, d_qk=80, max_ctx=150)
    out, lse = api.sparse_mla_decode(q, cache, idx, 0.1, 64, "bf16", backend="triton")
    check_decode(q, cache, idx, 0.1, 64, "bf16", out, lse)
    ref_out, ref_lse = api.sparse_mla_decode(q, cache, idx, 0.1, 64, "bf16", backend="reference")
    assert rel_err(out, ref_out) < 1e-5


def test_decode_validation():
    q, cache, idx = paged_problem(1, 1, 16, 8, d_qk=80, max_ctx=70, device="cpu")
    with pytest.raises(ValueError, match="kv_format"):
        api.sparse_mla_decode(q, cache, idx, 0.1, 64, "fp16")
    with pytest.raises(ValueError, match="fp8_ds_mla"):
        api.sparse_mla_decode(q, cache.view(torch.uint8)[..., :656], idx, 0.1, 64, "fp8_ds_mla")
    with pytest.raises(ValueError, match="indices"):
        api.sparse_mla_decode(q, cache, idx[:, :, None], 0.1, 64, "bf16")


def test_choose_n_split():
    assert choose_n_split(512, 2048, 64, 132) == 1  # batch 128, s_q 2: grid already full
    assert choose_n_split(2, 2048, 64, 132) == 32  # batch 1: 2 steps a split would leave 100 SMs idle
    assert choose_n_split(8, 2048, 64, 132) == 16  # batch 4: capped at 2 steps a split
    assert choose_n_split(64, 2048, 64, 132) == 5


def test_one_query_config_dispatch(monkeypatch):
    """One query token over bf16 rows on Hopper gets 16 heads a program; more queries,
    more than ONE_QUERY_MAX_TOPK rows, fp8 rows, other GPUs and a caller's BLOCK_H keep
    theirs."""
    from flashdsa.ops.sparse_mla import decode as D
    monkeypatch.setattr(D, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda")
    assert D.one_query_config(dev, 1, 2048, False, None) == D.ONE_QUERY_SM90
    assert D.one_query_config(dev, 1, D.ONE_QUERY_MAX_TOPK, False, None) == D.ONE_QUERY_SM90
    assert D.one_query_config(dev, 1, D.ONE_QUERY_MAX_TOPK + 1, False, None) is None  # a dense decode of 16K+
    assert D.one_query_config(dev, 2, 2048, False, None) is None
    assert D.one_query_config(dev, 1, 2048, True, None) is None
    assert D.one_query_config(dev, 1, 2048, False, {"BLOCK_H": 64, "BLOCK_K": 32}) == dict(BLOCK_H=64, BLOCK_K=32,
                                                                                          num_warps=4)
    assert D.one_query_config(torch.device("cpu"), 1, 2048, False, None) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert D.one_query_config(dev, 1, 2048, False, None) is None


def test_pdl_launch_dispatch(monkeypatch):
    """The decode chain's kernels (indexer operands, scores, top-k selects, sparse decode,
    combine) launch with programmatic dependent launch where the GPU has it (sm_90 and
    later, compiled), and without it elsewhere; benchmarks/sm90_build compiles them so."""
    from flashdsa.ops import common
    assert common.pdl_launch(torch.device("cpu")) == dict(PDL=False)
    monkeypatch.setattr(common, "has_tma", lambda device: True)
    assert common.pdl_launch(torch.device("cuda")) == dict(PDL=True, launch_pdl=True)


@requires_cuda
@pytest.mark.parametrize("kv_format", ["bf16", "fp8_ds_mla"])
@pytest.mark.parametrize("b,s_q", [(4, 2), (1, 1)])
def test_decode_gpu_bf16_real_shape(kv_format, b, s_q):
    """bf16 queries at the real shape: the kernel's error vs float64 (of the same, possibly
    quantized, cache) is within 2x that of the bf16 PyTorch gather reference. One query
    token: the one-query blocks of Hopper (ONE_QUERY_SM90) under the default config."""
    torch.manual_seed(2)
    q, cache, idx = paged_problem(max(b, 2), s_q, 128, 2048, max_ctx=6000, q_dtype=torch.bfloat16, device="cuda")
    if b == 1:  # the second sequence's query (the first one selects nothing)
        q, idx = q[1:], idx[1:]
    first = 1 if b > 1 else 0  # the queries checked against the references
    if kv_format == "fp8_ds_mla":
        cache = api.quantize_mla_cache(cache)
    o64, l64 = ref_decode(q, cache, idx, 0.1352, 512, kv_format, compute_dtype=torch.float64)
    rows = R.cache_rows(cache, kv_format)  # bf16 (dequantized) rows
    o16, l16 = bf16_torch_reference(q.reshape(b * s_q, 128, 576), rows, idx.reshape(b * s_q, 1, -1), 0.1352, 512)
    # errors over the queries that select something (query 0 selects nothing: the bf16
    # reference gives NaN there, the kernel 0 and +inf, checked below)
    o64, l64 = o64.reshape(b * s_q, 128, 512)[first:], l64.reshape(b * s_q, 128)[first:]
    e_ref, el_ref = rel_err(o16[first:], o64), rel_err(l16[first:], l64)
    for n_split, cfg in ((None, None), (1, dict(BLOCK_K=64)), (4, dict(BLOCK_K=64))):
        out, lse = sparse_mla_decode(q, cache, idx, 0.1352, 512, kv_format, n_split=n_split, config=cfg)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        e = rel_err(out.reshape(b * s_q, 128, 512)[first:], o64)
        el = rel_err(lse.reshape(b * s_q, 128)[first:], l64)
        assert e <= 2 * e_ref, f"split {n_split}: out err {e:.3g} vs bf16 torch reference {e_ref:.3g}"
        assert el <= 2 * el_ref + 1e-6, f"split {n_split}: lse err {el:.3g} vs {el_ref:.3g}"
        if first:
            assert (out[0, 0] == 0).all() and (lse[0, 0] == math.inf).all()
