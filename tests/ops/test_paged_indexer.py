"""Paged indexer (SPEC 4): cache write path, paged logits and top-k vs the reference,
with random block tables, odd context lengths and next_n 1 and 2."""
import pytest
import torch

from flashdsa import api
from flashdsa import reference as ref
from flashdsa.cache import PagedIndexerCache
from flashdsa.ops import indexer as ops
from flashdsa.ops.indexer import direct
from flashdsa.reference import paged_indexer as pref
from tests.ops.test_indexer import make_inputs, poison_scratch, small_chunks
from tests.utils import KERNEL_DEVICE, rel_err, requires_cuda

DEV = KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_scratch(monkeypatch)
    small_chunks(monkeypatch)


def make_cache(ctx, d, max_blocks, device=DEV, extra_blocks=3):
    """A cache holding random keys for sequences of lengths ``ctx``, pages scattered by
    a random block table (blocks past a sequence's end hold garbage ids, like vLLM)."""
    bsz = len(ctx)
    nb = bsz * max_blocks + extra_blocks
    perm = torch.randperm(nb, device=device)[: bsz * max_blocks]
    block_table = perm.view(bsz, max_blocks).int()
    for b, n in enumerate(ctx):  # unused pages point far out of range: must never be read
        block_table[b, (n + 63) // 64:] = 2 ** 30
    cache = PagedIndexerCache(nb, d, device=device)
    cache.kv.copy_(torch.randint(0, 256, cache.kv.shape, device=device, dtype=torch.uint8) & 0x77)  # finite junk
    slots = torch.cat([pref.logical_slots(block_table, b, n) for b, n in enumerate(ctx)])
    k = torch.randn(slots.numel(), d, device=device) * torch.rand(slots.numel(), 1, device=device) * 4
    cache.write(k, slots, backend="reference")
    return cache, block_table, torch.tensor(ctx, dtype=torch.int32, device=device)


def paged_budget(q8, cache, w, cl, bt, r):
    """Relative error allowed for the paged kernels' logits vs the float64 reference r:
    fp32 summation order, plus the fp8 tensor-core accumulation on a GPU (see
    tests/ops/test_indexer.py: FP8_MMA_REL times the norm of the |q|,|k|,|w| scores)."""
    budget = 1e-6
    if q8.is_cuda:
        d = q8.shape[-1]
        kv_abs = cache.kv.clone()
        kv_abs[:, : 64 * d] &= 0x7F  # clear the e4m3 sign bits of the keys
        mag = pref.paged_indexer_logits(q8.float().abs().to(torch.float8_e4m3fn).cpu(), kv_abs.cpu(),
                                        w.double().abs().cpu(), cl.cpu(), bt.cpu())
        fin = torch.isfinite(r)
        budget += 2.0 ** -12 * float(mag[fin].norm() / r[fin].norm())
    return budget


def make_queries(bsz, next_n, h, d, device=DEV):
    q8 = (torch.randn(bsz, next_n, h, d, device=device) * 2).to(torch.float8_e4m3fn)
    w = torch.randn(bsz * next_n, h, device=device)
    return q8, w


def test_cache_write_matches_reference_bytes():
    d, nb = 32, 5
    n = 40
    slots = torch.randperm(nb * 64, device=DEV)[:n]
    slots[3] = -1  # padding token: must not be written
    # wide dynamic range: e4m3 subnormals, values rounding up across a power of two, the 448 clamp
    k = torch.randn(n, d, device=DEV) * torch.logspace(-3, 1, n, device=DEV)[:, None]
    k[5, 0] = 1e6
    junk = torch.randint(0, 256, (nb, 64 * (d + 4)), dtype=torch.uint8, device=DEV)
    a, b = junk.clone(), junk.cpu().clone()  # the reference writes on CPU
    ops.indexer_cache_write(a, k, slots.int())
    pref.indexer_cache_write(b, k.cpu(), slots.cpu())
    assert torch.equal(a.cpu(), b.cpu())
    k8, sc = pref.indexer_cache_read(a, slots[slots >= 0], d)
    ref8, refsc = ref.act_quant(k[slots >= 0], d, "ue8m0")
    assert torch.equal(k8.float(), ref8.float()) and torch.equal(sc, refsc[:, 0])


def test_cache_module_roundtrip():
    cache = PagedIndexerCache(3, 32, device=DEV)
    k = torch.randn(10, 32, device=DEV)
    slots = torch.tensor([0, 1, 2, 63, 64, 65, 100, 130, 191, -1], device=DEV)
    cache.write(k, slots, backend="triton")
    k8, sc = cache.read(slots[:-1])
    assert rel_err(k8.float() * sc[:, None], k[:-1]) < 0.05  # e4m3 has a 3-bit mantissa
    with pytest.raises(ValueError, match="slots"):
        cache.write(k, torch.full((10,), 3 * 64, device=DEV))
    with pytest.raises(ValueError, match="k"):
        cache.write(torch.randn(10, 16, device=DEV), slots)


@pytest.mark.parametrize("next_n", [1, 2])
def test_paged_logits_match_reference(next_n):
    ctx, h, d, max_blocks = [70, 1, 130, 2], 4, 32, 3
    cache, bt, cl = make_cache(ctx, d, max_blocks)
    q8, w = make_queries(len(ctx), next_n, h, d)
    width = max_blocks * 64
    out = torch.full((len(ctx) * next_n, width), float("nan"), device=DEV)
    ops.paged_indexer_logits(q8, cache.kv, w, cl, bt, width, out=out)
    r = pref.paged_indexer_logits(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu())
    assert not out.isnan().any()
    assert torch.equal(torch.isinf(out.cpu()), torch.isinf(r))
    assert rel_err(out.cpu(), r) <= paged_budget(q8, cache, w, cl, bt, r)
    # the causal rule: query j of a sequence of n tokens sees positions <= n - next_n + j
    for b, n in enumerate(ctx):
        for j in range(next_n):
            lim = n - next_n + j + 1
            row = out[b * next_n + j].cpu()
            assert torch.isfinite(row[:max(lim, 0)]).all() and torch.isinf(row[max(lim, 0):]).all()


def check_paged_topk(slots, r, bt, ctx, next_n, topk, atol=0.0):
    """Every row holds min(topk, visible) distinct physical slots of visible positions,
    whose reference scores are the top ones, then -1 padding."""
    slots = slots.cpu().long()
    for b, n in enumerate(ctx):
        phys = pref.logical_slots(bt.cpu(), b, n)
        slot_to_pos = {int(p): i for i, p in enumerate(phys)}
        for j in range(next_n):
            t = b * next_n + j
            lim = max(n - next_n + j + 1, 0)
            want = min(topk, lim)
            row = slots[t]
            assert bool((row[want:] == -1).all()), f"row {t}: expected -1 padding after {want}"
            pos = torch.tensor([slot_to_pos[int(s)] for s in row[:want]], dtype=torch.long)  # KeyError: bad slot
            assert pos.unique().numel() == want and bool((pos < lim).all()), f"row {t}: bad positions"
            got = torch.sort(r[t, pos], descending=True).values
            best = torch.topk(r[t, :lim], want).values
            assert torch.allclose(got, best, rtol=1e-6, atol=atol), f"row {t}: selected scores differ"


@pytest.mark.parametrize("method,mode", [("threshold", ops.SCORES_SLOTS), ("threshold", ops.SCORES_ATOMIC),
                                         ("streaming", None), ("direct", None)])
@pytest.mark.parametrize("next_n,topk,n_split,ctx", [
    (1, 16, None, [150, 3, 64, 97]), (2, 24, 2, [150, 3, 64, 97]), (1, 256, None, [150, 3, 64, 97]),
    (2, 16, 5, [700, 190, 2, 431])])   # long contexts: real sample thresholds
def test_paged_topk_returns_physical_slots(next_n, topk, n_split, ctx, method, mode):
    h, d = 4, 32
    max_blocks = max(ctx) // 64 + 1
    cache, bt, cl = make_cache(ctx, d, max_blocks)
    q8, w = make_queries(len(ctx), next_n, h, d)
    p = ops.paged_problem(q8, cache.kv, w, cl, bt, max_blocks * 64)
    slots = ops.select_topk(p, topk, 8 * p.cfg["BLOCK_N"], n_split, method, mode)
    r = pref.paged_indexer_logits(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu())
    check_paged_topk(slots, r, bt, ctx, next_n, topk, atol=kernel_atol(q8, cache, w, cl, bt, r))


def test_paged_without_the_e4m3_type(monkeypatch):
    """Before sm_89 the queries go in as bytes and the cache's key bytes are decoded with
    integer operations (no e4m3 bitcast): the same exact top-k by every method."""
    from flashdsa.ops.indexer import scores
    ctx, next_n, topk = [150, 3, 64, 97], 2, 16
    max_blocks = max(ctx) // 64 + 1
    cache, bt, cl = make_cache(ctx, 32, max_blocks)
    q8, w = make_queries(len(ctx), next_n, 4, 32)
    r = pref.paged_indexer_logits(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu())
    atol = kernel_atol(q8, cache, w, cl, bt, r)
    monkeypatch.setattr(scores, "fp8_native", lambda device: False)
    p = ops.paged_problem(q8, cache.kv, w, cl, bt, max_blocks * 64)
    assert p.q.dtype == torch.uint8
    for method in ("direct", "threshold", "streaming"):
        slots = ops.select_topk(p, topk, 8 * p.cfg["BLOCK_N"], method=method)
        check_paged_topk(slots, r, bt, ctx, next_n, topk, atol=atol)


def test_paged_direct_in_chunks(monkeypatch):
    """The direct method's chunks are whole sequences (their next_n rows together)."""
    ctx, next_n, topk = [150, 3, 64, 97, 130], 2, 16
    max_blocks = max(ctx) // 64 + 1
    cache, bt, cl = make_cache(ctx, 32, max_blocks)
    q8, w = make_queries(len(ctx), next_n, 4, 32)
    p = ops.paged_problem(q8, cache.kv, w, cl, bt, max_blocks * 64)
    whole = ops.select_topk(p, topk, 8 * p.cfg["BLOCK_N"], method="direct")
    monkeypatch.setattr(direct, "DIRECT_BYTES", 2 * next_n * max_blocks * 64 * 4)  # 2 sequences a chunk
    assert torch.equal(ops.select_topk(p, topk, 8 * p.cfg["BLOCK_N"], method="direct"), whole)
    r = pref.paged_indexer_logits(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu())
    check_paged_topk(whole, r, bt, ctx, next_n, topk, atol=kernel_atol(q8, cache, w, cl, bt, r))


def test_direct_pdl_for_decode_rows_only(monkeypatch):
    """The direct method's select is a PDL launch for decode (paged) rows, where the
    launches of a step overlap, and a plain launch for prefill (ragged) rows: there its
    programs, started early, would take the SMs from the scores kernel."""
    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append(kw["PDL"])
                kw.pop("launch_pdl", None)
                return self.kernel[grid](*args, **dict(kw, PDL=False))
            return launch

    monkeypatch.setattr(direct, "pdl_launch", lambda device: dict(PDL=True, launch_pdl=True))
    monkeypatch.setattr(direct, "rows_topk_kernel", Recorder(direct.rows_topk_kernel))
    ctx, topk = [150, 97], 16
    max_blocks = max(ctx) // 64 + 1
    cache, bt, cl = make_cache(ctx, 32, max_blocks)
    q8, w = make_queries(len(ctx), 1, 4, 32)
    p = ops.paged_problem(q8, cache.kv, w, cl, bt, max_blocks * 64)
    ops.select_topk(p, topk, 8 * p.cfg["BLOCK_N"], method="direct")
    assert launched == [True]
    pr = ops.ragged_problem(*make_inputs(7, 300, 4, 32, ranges="ragged"))
    ops.select_topk(pr, topk, 4 * pr.cfg["BLOCK_N"], method="direct")
    assert launched == [True, False]


def kernel_atol(q8, cache, w, cl, bt, r):
    """Twice the kernel's largest logit error: near-ties within it may swap."""
    out = ops.paged_indexer_logits(q8, cache.kv, w, cl, bt, bt.shape[1] * 64).cpu()
    fin = torch.isfinite(r)
    return 2 * float((out[fin].double() - r[fin]).abs().max())


def test_paged_api_validation_and_backends():
    ctx, h, d = [65, 10], 4, 32
    cache, bt, cl = make_cache(ctx, d, 2)
    q8, w = make_queries(2, 1, h, d)
    r = pref.paged_indexer_logits(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu())
    for backend in ("triton", "reference"):
        slots = api.paged_indexer_topk(q8, cache.kv, w, cl, bt, 8, backend=backend)
        check_paged_topk(slots, r, bt, ctx, 1, 8, atol=kernel_atol(q8, cache, w, cl, bt, r))
    pa = api.paged_indexer_logits(q8, cache.kv, w, cl, bt, backend="triton").cpu()
    pb = api.paged_indexer_logits(q8, cache.kv, w, cl, bt, backend="reference").cpu()
    assert pa.shape == pb.shape == (2, 128) and rel_err(pa, pb) < 2 * paged_budget(q8, cache, w, cl, bt, r)
    with pytest.raises(ValueError, match="next_n"):
        api.paged_indexer_topk(q8.expand(2, 3, h, d).contiguous(), cache.kv, w.repeat(3, 1), cl, bt, 8)
    with pytest.raises(TypeError, match="q8"):
        api.paged_indexer_logits(q8.float(), cache.kv, w, cl, bt)
    with pytest.raises(ValueError, match="kv_cache"):
        api.paged_indexer_logits(q8, cache.kv[:, :100], w, cl, bt)
    with pytest.raises(ValueError, match="context_lens"):
        api.paged_indexer_logits(q8, cache.kv, w, torch.tensor([65, 129], dtype=torch.int32, device=DEV), bt)


@requires_cuda
@pytest.mark.parametrize("next_n", [1, 2])
def test_gpu_paged_full_size(next_n):
    ctx, h, d, max_blocks, topk = [5000, 64, 2049, 777], 64, 128, 80, 2048
    cache, bt, cl = make_cache(ctx, d, max_blocks, device="cuda")
    q8, w = make_queries(len(ctx), next_n, h, d, device="cuda")
    out = ops.paged_indexer_logits(q8, cache.kv, w, cl, bt, max_blocks * 64)
    r = pref.paged_indexer_logits(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu())
    assert torch.equal(torch.isinf(out.cpu()), torch.isinf(r))
    assert rel_err(out.cpu(), r) <= paged_budget(q8, cache, w, cl, bt, r)
    slots = ops.paged_indexer_topk(q8, cache.kv, w, cl, bt, topk).cpu()
    ref_slots = pref.paged_indexer_topk(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu(), topk)
    # same number of valid slots per row, and the sets agree up to near-ties
    assert torch.equal((slots >= 0).sum(1), (ref_slots >= 0).sum(1))
    for t in range(slots.shape[0]):
        a = set(slots[t][slots[t] >= 0].tolist())
        b = set(ref_slots[t][ref_slots[t] >= 0].tolist())
        assert len(a ^ b) <= 0.01 * len(b) + 2, f"row {t}: {len(a ^ b)} slots differ"


@requires_cuda
def test_gpu_paged_topk_in_cuda_graph_with_fallback():
    """Captured in a CUDA graph (as the engine's decode runs it), the threshold top-k and
    its streaming fallback need no host sync: a sequence whose 8000 keys all tie
    overflows its candidate buffer (about 2 * 1.5 * topk) and must still come out exact
    on replay. The direct method (the default at this length) too."""
    ctx, h, d, topk = [6000, 8000], 64, 128, 2048
    max_blocks = max(ctx) // 64 + 1
    cache, bt, cl = make_cache(ctx, d, max_blocks, device="cuda")
    tied = pref.logical_slots(bt.cpu(), 1, ctx[1]).cuda()
    cache.write(torch.ones(tied.numel(), d, device="cuda"), tied, backend="reference")  # every score ties
    q8, w = make_queries(len(ctx), 1, h, d, device="cuda")
    p = ops.paged_problem(q8, cache.kv, w, cl, bt, max_blocks * 64)
    _, fail = ops.threshold_topk(p, topk, 8 * p.cfg["BLOCK_N"])
    assert fail.tolist() == [0, 1], fail.tolist()
    r = pref.paged_indexer_logits(q8.cpu(), cache.kv.cpu(), w.double().cpu(), cl.cpu(), bt.cpu())
    for method in ("threshold", "direct"):
        ops.paged_indexer_topk(q8, cache.kv, w, cl, bt, topk, method=method)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            slots = ops.paged_indexer_topk(q8, cache.kv, w, cl, bt, topk, method=method)
        slots.fill_(-7)
        graph.replay()
        check_paged_topk(slots, r, bt, ctx, 1, topk, atol=kernel_atol(q8, cache, w, cl, bt, r))
