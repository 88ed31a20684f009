"""Triton indexer logits and fused top-k vs the float64 reference (SPEC 1, 2).

On CPU the kernels run under the Triton interpreter with tiny block sizes (BLOCK_N 16,
CAP = next_pow2(topk + 16)), so small problems already cross many key tiles, several
buffer compactions and split merges. The threshold top-k is tested in both of its
candidate modes (per-column slots, atomic appends), alone (rows it flags are exact
or flagged) and with its streaming fallback; tiny top-k values make its sample
thresholds noisy, so the fallback runs here far more often than at real sizes.
"""
import importlib
import math
import pkgutil

import pytest
import torch
import triton
import triton.language as tl

from flashdsa import api
from flashdsa import reference as ref
from flashdsa.ops import indexer as ops
from flashdsa.ops.indexer import direct, scores, selection, threshold
from tests.utils import KERNEL_DEVICE, rel_err, requires_cuda

DEV = KERNEL_DEVICE


def poison_scratch(monkeypatch):
    """Fill the top-k methods' int32 scratch (all but the zeroed counters) with garbage in
    every module of flashdsa.ops.indexer that allocates it, so an entry a kernel fails to
    write (or reads before writing) cannot pass unnoticed."""
    real = selection.scratch

    def poisoned(*shape, device, fill=None):
        t = real(*shape, device=device, fill=fill)
        return t if fill == 0 else t.fill_(2 ** 31 - 7)

    users = []
    for info in pkgutil.iter_modules(ops.__path__):
        mod = importlib.import_module(f"{ops.__name__}.{info.name}")
        if mod is not selection and getattr(mod, "scratch", None) is real:
            monkeypatch.setattr(mod, "scratch", poisoned)
            users.append(info.name)
    assert {"streaming", "threshold"} <= set(users), users


def small_chunks(monkeypatch):
    """On CPU, the select kernels' second passes step through a few entries at a time,
    so that the tiny problems here cross chunk boundaries (running prefix sums, ties
    cut in a later chunk); the GPU tests keep the real chunk sizes."""
    if DEV == "cpu":
        monkeypatch.setattr(direct, "DIRECT_CHUNK", 32)
        monkeypatch.setattr(threshold, "SELECT_CHUNK", 64)
        monkeypatch.setattr(threshold, "SELECT_CHUNK_ATOMIC", 64)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_scratch(monkeypatch)
    small_chunks(monkeypatch)


def make_inputs(s, s_kv, h, d, dtype=torch.float8_e4m3fn, device=DEV, ranges="ragged"):
    """Fresh random fp8 (or float) indexer inputs with odd candidate ranges."""
    q = torch.randn(s, h, d, device=device) * 2
    k = torch.randn(s_kv, d, device=device) * 2
    q8, k8 = q.to(dtype), k.to(dtype)
    k_scale = torch.rand(s_kv, device=device) + 0.25
    weights = torch.randn(s, h, device=device)
    if ranges == "ragged":  # random ranges, some empty, some full, some one key wide
        a = torch.randint(0, s_kv + 1, (s,), device=device)
        b = torch.randint(0, s_kv + 1, (s,), device=device)
        ks, ke = torch.minimum(a, b), torch.maximum(a, b)
        ks[0], ke[0] = 0, s_kv
        if s > 1:
            ks[1], ke[1] = s_kv // 2, s_kv // 2
        if s > 2:
            ks[2], ke[2] = s_kv - 1, s_kv
    else:  # causal prefill: the last s of s_kv tokens of one sequence
        ke = torch.arange(s_kv - s + 1, s_kv + 1, device=device)
        ks = torch.zeros_like(ke)
    return q8, k8, k_scale, weights, ks.int(), ke.int()


def ref64(q8, k8, k_scale, weights, ks, ke):
    return ref.indexer_logits(q8.double().cpu(), k8.double().cpu(), k_scale.double().cpu(), weights.double().cpu(),
                              ks.cpu(), ke.cpu())


# Hopper's fp8 tensor-core MMA adds its products in a shortened accumulator (DeepGEMM
# notes about 14 bits), so on a GPU the e4m3 dot may be off by up to about 2^-14 of the
# sum of |products|; we allow 2^-12 of it. The interpreter and fp16/fp32 dots are exact
# up to fp32 summation order.
FP8_MMA_REL = 2.0 ** -12


def logits_budget(q8, k8, k_scale, weights, ks, ke, r64):
    """Allowed relative error: the fp32 reference's own error vs float64, times 4 (the
    kernel only sums in another order), floored at a few fp32 ulps; plus, for e4m3 dots
    on a GPU, FP8_MMA_REL times the norm of the absolute-value scores (the same formula
    on |q|, |k|, |w|: an elementwise bound on the sum of |products|)."""
    r32 = ref.indexer_logits(q8.float().cpu(), k8.float().cpu(), k_scale.float().cpu(), weights.float().cpu(),
                             ks.cpu(), ke.cpu())
    budget = max(4 * rel_err(r32, r64), 4e-7)
    if q8.is_cuda and q8.dtype == torch.float8_e4m3fn:
        fin = torch.isfinite(r64)
        mag = ref.indexer_logits(q8.double().abs().cpu(), k8.double().abs().cpu(), k_scale.double().cpu(),
                                 weights.double().abs().cpu(), ks.cpu(), ke.cpu())
        budget += FP8_MMA_REL * float(mag[fin].norm() / r64[fin].norm())
    return budget


@pytest.mark.parametrize("s,s_kv,h,d,dtype,ranges", [
    (7, 150, 4, 32, torch.float8_e4m3fn, "ragged"),
    (13, 97, 3, 48, torch.float8_e4m3fn, "causal"),   # odd heads and head dim (padded)
    (5, 61, 8, 32, torch.float16, "ragged"),          # fp16 dot path (the sm_80 fallback)
    (4, 45, 2, 16, torch.float32, "ragged"),          # fp32 inputs
])
def test_logits_match_reference(s, s_kv, h, d, dtype, ranges):
    inputs = make_inputs(s, s_kv, h, d, dtype, ranges=ranges)
    out = torch.full((s, s_kv), float("nan"), device=DEV)
    ops.indexer_logits(*inputs, out=out)
    r64 = ref64(*inputs)
    assert not out.isnan().any(), "some logits were never written"
    assert torch.equal(torch.isinf(out.cpu()), torch.isinf(r64)), "-inf mask differs from [ks, ke)"
    assert rel_err(out.cpu(), r64) <= logits_budget(*inputs, r64)


def test_logits_split_and_fp16_fallback_agree():
    """Key-axis splits and the fp16 dot of e4m3 tiles (sm_80 path) give the same scores."""
    inputs = make_inputs(6, 130, 4, 32)
    a = ops.indexer_logits(*inputs, n_split=1)
    b = ops.indexer_logits(*inputs, n_split=3)
    assert torch.equal(a, b)
    r64 = ref64(*inputs)
    assert rel_err(b.cpu(), r64) <= logits_budget(*inputs, r64)


def check_topk(idx, r64, ks, ke, topk, atol):
    """Exact up to ties: right count, no duplicates, inside the range, and the sorted
    selected reference scores equal the reference top-k scores."""
    idx, ks, ke = idx.cpu().long(), ks.cpu().long(), ke.cpu().long()
    assert idx.shape == (r64.shape[0], topk)
    for t in range(idx.shape[0]):
        want = min(topk, int(ke[t] - ks[t]))
        row = idx[t]
        assert bool((row[want:] == -1).all()), f"row {t}: expected -1 padding after {want} entries"
        sel_sorted = torch.sort(row).values[topk - want:]
        assert bool((sel_sorted >= ks[t]).all() and (sel_sorted < ke[t]).all()), f"row {t}: index out of range"
        assert sel_sorted.unique().numel() == want, f"row {t}: duplicate indices"
        got = torch.sort(r64[t, sel_sorted], descending=True).values
        best = torch.topk(r64[t, ks[t]:ke[t]], want).values if want else got
        assert torch.allclose(got, best, rtol=0, atol=atol), f"row {t}: selected scores differ"


METHODS = [("threshold", ops.SCORES_SLOTS), ("threshold", ops.SCORES_ATOMIC), ("streaming", None),
           ("direct", None)]


def run_topk(inputs, topk, n_split, method, mode, check_unflagged=None):
    """indexer top-k by one method; for the threshold method, first check the rows it
    does not flag (before the fallback) with ``check_unflagged(idx, rows)``."""
    p = ops.ragged_problem(*inputs)
    if method == "threshold" and check_unflagged is not None:
        out, fail = ops.threshold_topk(p, topk, 4 * p.cfg["BLOCK_N"], n_split, mode)
        ok = (fail == 0).nonzero()[:, 0].cpu()
        check_unflagged(out, ok)
    return ops.select_topk(p, topk, 4 * p.cfg["BLOCK_N"], n_split, method, mode)


@pytest.mark.parametrize("method,mode", METHODS)
@pytest.mark.parametrize("s,s_kv,h,d,topk,n_split,ranges", [
    (7, 300, 4, 32, 16, None, "ragged"),   # many compactions (CAP 32)
    (5, 200, 4, 32, 40, 3, "causal"),      # key axis split over 3 programs, merged
    (6, 37, 2, 32, 64, None, "ragged"),    # S_kv < topk: every row padded
    (3, 90, 3, 48, 1, None, "ragged"),     # topk 1, odd head count and dim
    (9, 1500, 4, 32, 24, 6, "causal"),     # long rows: real sample thresholds, 6 splits
])
def test_topk_matches_reference(s, s_kv, h, d, topk, n_split, ranges, method, mode):
    inputs = make_inputs(s, s_kv, h, d, ranges=ranges)
    r64 = ref64(*inputs)
    logits = ops.indexer_logits(*inputs).cpu()
    fin = torch.isfinite(r64)
    atol = 2 * float((logits[fin].double() - r64[fin]).abs().max()) + 1e-12
    ks, ke = inputs[4:]

    def check_rows(idx, rows):
        check_topk(idx[rows], r64[rows], ks[rows], ke[rows], topk, atol)

    idx = run_topk(inputs, topk, n_split, method, mode, check_rows)
    check_topk(idx, r64, ks, ke, topk, atol)


def test_threshold_flags_short_rows():
    """A threshold above every score leaves rows short: the select pass must flag exactly
    the rows with more than zero candidates, and the fallback must repair them."""
    inputs = make_inputs(5, 120, 4, 32, ranges="ragged")
    p = ops.ragged_problem(*inputs)
    thr = torch.full((5,), 2 ** 31 - 1, dtype=torch.int32, device=DEV)
    n = (p.ke - p.ks).clamp(min=0)
    for mode in (ops.SCORES_SLOTS, ops.SCORES_ATOMIC):
        n_slots = p.cfg["BLOCK_N"] if mode == ops.SCORES_SLOTS else 1
        cnt = torch.zeros(5 * n_slots, dtype=torch.int32, device=DEV)
        bkey = torch.empty(5 * n_slots * 8, dtype=torch.int32, device=DEV)
        bidx = torch.empty_like(bkey)
        ops.launch_scores(p, mode, (1, 128), thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=8)
        assert int(cnt.sum()) == 0
        out = torch.empty(5, 4, dtype=torch.int32, device=DEV)
        fail = torch.empty(5, dtype=torch.int32, device=DEV)
        ops.indexer_select_kernel[(5,)](bkey, bidx, cnt, thr, p.ks, p.ke, out, fail, n_slots, 8, 4, 1, p.n_pos,
                                        NS_PAD=n_slots, SC_PAD=8, CHUNK=max(n_slots, 8), TOPK_PAD=4, PAGED=False)
        assert fail.tolist() == (n > 0).int().tolist()
        assert bool((out == -1).all())


def test_topk_exact_ties_and_rising_scores():
    """Many exactly equal scores (duplicated keys) must still give exactly topk distinct
    indices; scores rising along the keys make every tile pass the threshold."""
    s, s_kv, h, d, topk = 4, 160, 2, 32, 24
    q8, k8, k_scale, weights, ks, ke = make_inputs(s, s_kv, h, d, ranges="causal")
    k8 = k8[torch.arange(s_kv, device=DEV) % 5].contiguous()       # 5 distinct keys: ties everywhere
    k_scale = torch.ones(s_kv, device=DEV)
    weights = weights.abs()
    r64 = ref64(q8, k8, k_scale, weights, ks, ke)
    rising = torch.linspace(0.5, 4.0, s_kv, device=DEV)               # later keys score higher
    r64r = ref64(q8, k8, rising, weights, ks, ke)
    for method, mode in METHODS:
        idx = run_topk((q8, k8, k_scale, weights, ks, ke), topk, None, method, mode)
        check_topk(idx, r64, ks, ke, topk, atol=1e-9 * float(r64[torch.isfinite(r64)].abs().max()))
        idx = run_topk((q8, k8, rising, weights, ks, ke), topk, None, method, mode)
        check_topk(idx, r64r, ks, ke, topk, atol=1e-5 * float(r64r[torch.isfinite(r64r)].abs().max()))


@triton.jit
def _kth_kernel(x_ptr, n_ptr, k_ptr, out_ptr, BLOCK: tl.constexpr):
    """Row r of x [rows, BLOCK] (its first n [r] entries): (T, count(keys >= T), entries
    above T when ties at T are cut, else 0) of selection.kth_search and kth_cut."""
    r = tl.program_id(0)
    e = tl.arange(0, BLOCK)
    n = tl.load(n_ptr + r)
    k = tl.load(k_ptr + r)
    v = tl.load(x_ptr + r * BLOCK + e)
    keys = tl.where(e < n, selection.score_key(v), selection.INT32_MIN_C)
    T, c_ge, rel, base = selection.kth_search(keys, n, selection.INT32_MIN_C, k)
    T2, n_gt, full, cut = selection.kth_cut(keys, n, selection.INT32_MIN_C, k)
    tl.store(out_ptr + r * 4, T)
    tl.store(out_ptr + r * 4 + 1, c_ge)
    tl.store(out_ptr + r * 4 + 2, n_gt)
    tl.store(out_ptr + r * 4 + 3, T2)


def test_kth_search_on_wide_and_tied_keys():
    """The search's k-th key, its count and the count above it when ties are cut, against
    torch, on rows whose keys span more than 2^31 (scores of both signs far apart: the
    search compares keys before it counts by sign), rows of one sign, heavy ties, -inf
    holes and rows shorter than k."""
    seed = int(torch.randint(0, 2 ** 31, (1,)))
    g = torch.Generator().manual_seed(seed)
    rows, block = 23, 512
    x = torch.randn(rows, block, generator=g, dtype=torch.float64)
    scale = 10.0 ** torch.randint(-3, 30, (rows, 1), generator=g)
    x = (x * scale).float()
    x[1::4] = x[1::4].abs()                                               # one sign
    x[2::4] = torch.round(x[2::4] / scale[2::4].float() * 2)               # ties
    x[3::4][torch.rand(x[3::4].shape, generator=g) < 0.3] = float("-inf")  # holes
    n = torch.randint(1, block + 1, (rows,), generator=g, dtype=torch.int32)
    k = torch.randint(1, 300, (rows,), generator=g, dtype=torch.int32)
    out = torch.zeros(rows, 4, dtype=torch.int32, device=DEV)
    _kth_kernel[(rows,)](x.to(DEV), n.to(DEV), k.to(DEV), out, BLOCK=block)
    out = out.cpu()
    b = x.view(torch.int32)
    keys = torch.where(b >= 0, b, b ^ 0x7FFFFFFF)
    wide = 0
    for r in range(rows):
        kr = keys[r, :n[r]].long()
        wide += int(kr.max() - kr.min() > 2 ** 31 - 1)
        if n[r] < k[r]:
            continue   # any T (the callers take every entry)
        want = kr.sort(descending=True).values[k[r] - 1]
        c_ge = int((kr >= want).sum())
        assert int(out[r, 0]) == want and int(out[r, 3]) == want, (seed, r)
        assert int(out[r, 1]) == c_ge, (seed, r)
        if n[r] > k[r] and c_ge > k[r]:
            assert int(out[r, 2]) == int((kr > want).sum()), (seed, r)
    assert wide >= 3, (seed, wide)


def test_direct_chunks_and_auto_dispatch(monkeypatch):
    """The direct method gives the same rows when its scores are computed a few rows at a
    time; "auto" takes it up to DIRECT_MAX_POS key positions and the threshold method
    above."""
    inputs = make_inputs(7, 300, 4, 32, ranges="ragged")
    r64 = ref64(*inputs)
    logits = ops.indexer_logits(*inputs).cpu()
    fin = torch.isfinite(r64)
    atol = 2 * float((logits[fin].double() - r64[fin]).abs().max()) + 1e-12
    p = ops.ragged_problem(*inputs)
    whole = ops.select_topk(p, 16, 64, method="direct")
    monkeypatch.setattr(direct, "DIRECT_BYTES", 3 * 300 * 4)  # 3 rows a chunk
    chunked = ops.select_topk(p, 16, 64, method="direct")
    assert torch.equal(whole, chunked)
    check_topk(chunked, r64, *inputs[4:], 16, atol)
    called = []
    for name in ("direct_topk", "threshold_topk"):
        real = getattr(threshold, name)
        monkeypatch.setattr(threshold, name, lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k))
    for limit, want in ((300, "direct_topk"), (299, "threshold_topk")):
        monkeypatch.setattr(direct, "DIRECT_SHORT_POS", limit)
        monkeypatch.setattr(direct, "DIRECT_MAX_POS", limit)
        called.clear()
        check_topk(ops.select_topk(p, 16, 64), r64, *inputs[4:], 16, atol)
        assert called == [want]
    # on a GPU of 132 SMs: short rows directly; up to DIRECT_MAX_POS unless the rows are
    # fewer than 44; past it while the rows fill about one wave
    monkeypatch.undo()
    short, wave = direct.DIRECT_MAX_POS, direct.DIRECT_WAVE_MAX_POS
    very_short = direct.DIRECT_SHORT_POS
    for rows, n_pos, want in ((1, very_short, True), (1, very_short + 1, False), (43, short, False),
                              (44, short, True), (1, short, False)):
        assert direct.direct_wins(rows, n_pos, 132) == want, (rows, n_pos)
    assert direct.direct_wins(1, short, 0)  # no GPU: direct up to DIRECT_MAX_POS
    for rows, n_pos, want in ((128, wave, True), (44, wave, True), (64, wave, True), (264, wave, True),
                              (43, wave, False), (32, wave, False), (265, wave, False), (4096, short, True),
                              (4096, short + 1, False), (128, wave + 1, False), (4096, 100, True)):
        assert direct.direct_wins(rows, n_pos, 132) == want, (rows, n_pos)
    assert not direct.direct_wins(128, wave, 0)  # no GPU: short rows only
    # paged (decode) rows: directly only short rows, at least a fifth as many as the SMs
    for rows, n_pos, want in ((26, very_short, True), (128, very_short, True), (25, very_short, False),
                              (1, very_short, False), (128, very_short + 1, False), (128, wave, False),
                              (4096, short, False)):
        assert direct.direct_wins(rows, n_pos, 132, paged=True) == want, (rows, n_pos)
    assert direct.direct_wins(1, short, 0, paged=True)  # no GPU: as ragged rows
    with pytest.raises(ValueError, match="method"):
        ops.select_topk(p, 16, 64, method="radix")


def test_sample_thresholds_match_torch():
    """Each row's threshold is the score key of its ceil(1.5 * topk * n_s / n)-th largest
    sampled score (torch.topk of the sample), or INT32_MIN where every candidate passes."""
    s_kv, topk = 1500, 24
    inputs = make_inputs(9, s_kv, 4, 32, ranges="ragged")
    p = ops.ragged_problem(*inputs)
    n = (p.ke - p.ks).clamp(min=0)
    thr = ops.sample_thresholds(p, topk).cpu()
    st = threshold.sample_stride(s_kv)
    samp = torch.empty(p.rows, -(-s_kv // st), device=DEV)
    ops.launch_scores(p, ops.SCORES_STORE, (1, 128 * 16), st, out=samp)
    samp, ks, ke, n = samp.cpu(), inputs[4].cpu(), inputs[5].cpu(), n.cpu()
    r_max = min(samp.shape[1], math.ceil(1.5 * topk / st + 1.5) + 1)
    sampled = 0
    for t in range(p.rows):
        n_s = max(0, -(-int(ke[t]) // st) - (-(-int(ks[t]) // st)))
        rank = -(-(n_s * 3 * topk) // (2 * max(int(n[t]), 1)))
        if int(n[t]) <= topk or rank > min(n_s, r_max):
            assert int(thr[t]) == selection.INT32_MIN
        else:
            v = samp[t].topk(rank).values[-1]
            want = v.view(torch.int32) if v >= 0 else v.view(torch.int32) ^ 0x7FFFFFFF
            assert int(thr[t]) == int(want), t
            sampled += 1
    assert sampled >= 3, sampled


def test_without_the_e4m3_type_the_bytes_are_decoded(monkeypatch):
    """Where Triton has no e4m3 type (before sm_89, e.g. the A100) the kernels take the e4m3
    tensors as their uint8 bytes and decode them with integer operations to fp16 (exact):
    the logits within the same budget and an exact top-k by every method."""
    inputs = make_inputs(6, 300, 4, 32, ranges="ragged")
    r64 = ref64(*inputs)
    monkeypatch.setattr(scores, "fp8_native", lambda device: False)
    p = ops.ragged_problem(*inputs)
    assert p.q.dtype == p.k.dtype == torch.uint8 and scores.dot_mode(p.q) == scores.DOT_FP16
    logits = ops.indexer_logits(*inputs).cpu()
    assert rel_err(logits, r64) <= logits_budget(*inputs, r64)
    fin = torch.isfinite(r64)
    atol = 2 * float((logits[fin].double() - r64[fin]).abs().max()) + 1e-12
    for method, mode in METHODS:
        check_topk(run_topk(inputs, 16, None, method, mode), r64, *inputs[4:], 16, atol)


def test_config_table_bounds(monkeypatch):
    """GPU block sizes: the dot's N = BLOCK_Q * H_PAD stays >= 16 and the top-k kernel
    (which unrolls its per-row selection) gets few rows even for tiny head counts."""
    monkeypatch.setattr(scores, "_family", lambda device: "sm90")
    for h in (1, 2, 3, 8, 32, 64):
        for topk in (False, True):
            cfg = ops.default_config(torch.device("cuda"), h, topk=topk)
            h_pad = 1 << (h - 1).bit_length()
            assert cfg["BLOCK_Q"] * h_pad >= 16
            if topk:
                assert cfg["BLOCK_Q"] <= max(scores.MAX_TOPK_ROWS, 16 // h_pad)
    assert ops.default_config(torch.device("cuda"), 64)["BLOCK_Q"] == 4


def test_api_dispatch_and_reference_agree():
    inputs = make_inputs(5, 70, 4, 32, ranges="causal")
    r = api.indexer_topk(*inputs, 8, backend="reference")
    t = api.indexer_topk(*inputs, 8, backend="triton")
    r64 = ref64(*inputs)
    check_topk(t, r64, *inputs[4:], 8, atol=1e-4)
    check_topk(r, r64, *inputs[4:], 8, atol=1e-4)
    lt = api.indexer_logits(*inputs, backend="triton")
    assert rel_err(lt.cpu(), r64) <= logits_budget(*inputs, r64)


@requires_cuda
@pytest.mark.parametrize("s,s_kv,h,topk,ranges", [(300, 5000, 64, 2048, "causal"), (257, 3001, 32, 512, "ragged")])
def test_gpu_fp8_logits_and_topk(s, s_kv, h, topk, ranges):
    """Full-size heads and d_I 128 on the GPU (fp8 tensor-core dot, real block sizes)."""
    inputs = make_inputs(s, s_kv, h, 128, ranges=ranges, device="cuda")
    out = torch.full((s, s_kv), float("nan"), device="cuda")
    ops.indexer_logits(*inputs, out=out)
    r64 = ref64(*inputs)
    assert not out.isnan().any()
    assert torch.equal(torch.isinf(out.cpu()), torch.isinf(r64))
    err = rel_err(out.cpu(), r64)
    assert err <= logits_budget(*inputs, r64), err
    fin = torch.isfinite(r64)
    atol = 2 * float((out.cpu()[fin].double() - r64[fin]).abs().max()) + 1e-12
    for n_split in (None, 4):
        for method, mode in METHODS:
            idx = run_topk(inputs, topk, n_split, method, mode)
            check_topk(idx, r64, *inputs[4:], topk, atol)


def test_lightning_indexer_module_uses_the_kernel():
    """LightningIndexer(backend="triton") goes through flashdsa.indexer_topk to this
    kernel and selects the same scores as the reference backend."""
    from flashdsa.config import DSAConfig
    from flashdsa.layers import LightningIndexer, causal_ranges
    cfg = DSAConfig(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=32, index_topk=8,
                    max_position_embeddings=8192, original_max_position_embeddings=64, rope_factor=4.0)
    m = LightningIndexer(cfg).to(DEV)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32, device=DEV)
    t = 30
    x = torch.randn(t, 64, device=DEV)
    qr = torch.randn(t, 32, device=DEV)
    ang = torch.rand(t, 4, device=DEV)
    cos, sin = ang.cos(), ang.sin()
    ks, ke = causal_ranges(cu, t)
    idx_t = m(x, qr, cos, sin, ks, ke, backend="triton")
    idx_r = m(x, qr, cos, sin, ks, ke, backend="reference")
    # the scores the module ranks, recomputed the way its forward does
    with torch.no_grad():
        q, k, w = m.project(x, qr, cos, sin)
    q8, q_scale = ref.act_quant(q, 32)
    k8, k_scale = ref.act_quant(k, 32)
    w = w * q_scale[..., 0] * 32 ** -0.5
    r64 = ref64(q8, k8, k_scale[:, 0], w, ks, ke)
    atol = 1e-5 * float(r64[torch.isfinite(r64)].abs().max())
    check_topk(idx_t, r64, ks, ke, 8, atol)
    check_topk(idx_r, r64, ks, ke, 8, atol)
