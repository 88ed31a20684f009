"""Blockwise indexer KL losses (Triton; interpreter on CPU) == the naive materialized ones
(float64), values and gradients, for both stages, through the public ops
(flashdsa.warmup_kl_loss, sparse_kl_loss, sparse_kl_loss_from_probs); gradients reach only
the indexer."""
import functools

import pytest
import torch

import flashdsa
from flashdsa import reference as ref
from flashdsa.ops import indexer_loss as ops
from flashdsa.ops.indexer_loss import launch
from tests.utils import KERNEL_DEVICE, rel_err, requires_cuda

LOSSES = {"warmup": flashdsa.warmup_kl_loss, "sparse": flashdsa.sparse_kl_loss,
          "from_probs": flashdsa.sparse_kl_loss_from_probs}


def _loss(stage, backend):
    """The public loss op of ``stage`` with ``backend`` bound."""
    return functools.partial(LOSSES[stage], backend=backend)


@pytest.fixture
def poison(monkeypatch):
    """Float tensors allocated with torch.empty / empty_like start as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture(params=["query_tiled", "one_row"])
def warmup_kernel(request, monkeypatch):
    """Runs a warm-up test on each kernel pair: the query-tiled kernels (what the tests'
    few heads get) and the one-row-a-program kernels (forced)."""
    real, blocks = launch.query_block, []
    if request.param == "one_row":
        monkeypatch.setattr(launch, "query_block", lambda h_q, h_i: blocks.append(1) or 1)
    else:
        monkeypatch.setattr(launch, "query_block", lambda h_q, h_i: blocks.append(real(h_q, h_i)) or blocks[-1])
    yield request.param
    assert blocks and all((b > 1) == (request.param == "query_tiled") for b in blocks), blocks


def test_query_block_by_heads():
    """Query rows a warm-up program takes: tiles of up to 64 rows, each at least 16."""
    qb = launch.query_block
    assert (qb(8, 8), qb(3, 5), qb(20, 17), qb(16, 16)) == (8, 8, 2, 4)
    assert qb(64, 64) == qb(128, 64) == qb(8, 64) == qb(4, 32) == 1 and qb(1, 1) == 64


def _causal(lens, device):
    ks, ke, s = [], [], 0
    for n in lens:
        ks += [s] * n
        ke += list(range(s + 1, s + n + 1))
        s += n
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return (torch.tensor(ks, dtype=torch.int32, device=device), torch.tensor(ke, dtype=torch.int32, device=device), cu)


def _data(T, H, d_qk, HI, DI, scale_i=1.0):
    q = torch.randn(T, H, d_qk, dtype=torch.float64)
    kv = torch.randn(T, 1, d_qk, dtype=torch.float64)
    iq = torch.randn(T, HI, DI, dtype=torch.float64) * scale_i
    ik = torch.randn(T, DI, dtype=torch.float64)
    w = torch.randn(T, HI, dtype=torch.float64) * DI ** -0.5
    return q, kv, iq, ik, w


def _compare(stage, q, kv, lse, iq, ik, w, sm_scale, extra, device):
    """Kernel (fp32) vs naive (float64 truth and fp32): values and gradients under a
    random upstream gradient per row. Budget: 20x the fp32 naive error + 1e-6."""
    g = torch.randn(q.shape[0], dtype=torch.float64)
    naive, blockwise = _loss(stage, "reference"), _loss(stage, "triton")

    def run(fn, dtype, dev):
        xs = [x.detach().to(dev, dtype).requires_grad_() for x in (iq, ik, w)]
        args = [x.to(dev, dtype) for x in (q, kv)]
        args.append(None if lse is None else lse.to(dev, torch.float64 if dtype == torch.float64 else torch.float32))
        ex = [e.to(dev) for e in extra]
        kl = fn(*xs, *args, sm_scale, *ex, reduction="none")
        (kl * g.to(dev, kl.dtype)).sum().backward()
        return [kl] + [x.grad for x in xs]

    truth = run(naive, torch.float64, "cpu")
    low = run(naive, torch.float32, "cpu")
    got = run(blockwise, torch.float32, device)
    for name, a, t, lo in zip(("kl", "diq", "dik", "dw"), got, truth, low):
        budget = 20 * rel_err(lo, t) + 1e-6
        assert rel_err(a.cpu(), t) <= budget, (name, rel_err(a.cpu(), t), budget)


def test_warmup_ranges_past_the_keys_count_their_rows_in_range(poison, warmup_kernel):
    """ks < 0 or ke > S are normal inputs: the rows of [ks, ke) inside [0, S) count, as in
    the naive loss, and the kernels read nothing outside (rows of which none is in range,
    and empty ranges, add 0)."""
    T, H, d_qk, HI, DI = 9, 2, 48, 3, 16
    q, kv, iq, ik, w = _data(T, H, d_qk, HI, DI)
    ks = torch.tensor([-3, 0, 2, -20, 5, 7, 0, 3, 9], dtype=torch.int32)
    ke = torch.tensor([2, 9, 14, 4, 40, 8, 0, 9, 12], dtype=torch.int32)
    lse = torch.rand(T, H, dtype=torch.float64) + 2.0
    _compare("warmup", q, kv, lse, iq, ik, w, 0.3, (ks, ke), KERNEL_DEVICE)


@pytest.mark.parametrize("lens,H,d_qk,HI,DI,block_k,given_lse", [
    ([7, 12], 3, 48, 5, 24, 16, True),   # ragged causal ranges, several key blocks per row
    ([7, 12], 3, 48, 5, 24, 16, False),  # lse computed by the loss kernel (attention ran elsewhere)
    ([19], 20, 40, 17, 32, 16, True),    # heads > 16 (padded tiles), tail 8
])
def test_warmup_blockwise_equals_naive(lens, H, d_qk, HI, DI, block_k, given_lse, poison, monkeypatch,
                                      warmup_kernel):
    monkeypatch.setitem(ops.CONFIGS, "small", dict(ops.CONFIGS["small"], BLOCK_K=block_k))
    T = sum(lens)
    q, kv, iq, ik, w = _data(T, H, d_qk, HI, DI)
    ks, ke, cu = _causal(lens, "cpu")
    sm_scale = d_qk ** -0.5
    _, lse = ref.dense_mla_fwd(q, kv, cu, sm_scale, 32)
    _compare("warmup", q, kv, lse if given_lse else None, iq, ik, w, sm_scale, (ks, ke), KERNEL_DEVICE)
    if given_lse:
        return
    # The kernel's own lse equals the attention's.
    dev = KERNEL_DEVICE
    _, _, _, lse_k = ops.indexer_kl_fwd(*(x.float().to(dev) for x in (q, kv)), None,
                                        *(x.float().to(dev) for x in (iq, ik, w)), None,
                                        ks.to(dev), ke.to(dev), sm_scale)
    # fp32 dots (ieee) on every backend
    assert rel_err(lse_k.cpu(), lse) < 1e-6


def test_sparse_blockwise_equals_naive(poison):
    T, H, d_qk, HI, DI, topk = 17, 3, 48, 5, 24, 21  # topk > T: trailing slots invalid
    q, kv, iq, ik, w = _data(T, H, d_qk, HI, DI)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    for t in range(T):
        n = int(torch.randint(1, T, ()))
        idx[t, :n] = torch.randperm(T)[:n].int()
    idx[1, 0] = T + 3      # out of range
    idx[2, 1] = idx[2, 0]  # duplicate counts twice
    idx[5, :] = -1         # empty row
    idx = idx[:, None]
    sm_scale = 0.2
    _, _, lse = ref.sparse_mla_fwd(q, kv, idx, sm_scale, 32)
    # Shift lse per (row, head) so the head-summed target does not sum to 1 (an lse from
    # another attention, e.g. dense): the L1 normalization must then do real work.
    lse = lse + torch.rand_like(lse)
    _compare("sparse", q, kv, lse, iq, ik, w, sm_scale, (idx,), KERNEL_DEVICE)


def test_sparse_from_probs_equals_naive(poison):
    """The target given (the attention's head-mean probabilities): kernel == naive, values
    and gradients, with invalid, duplicate and empty slots; and == the recomputing loss."""
    T, H, d_qk, HI, DI, topk = 19, 3, 48, 5, 24, 37  # topk > T, not a multiple of BLOCK_K
    q, kv, iq, ik, w = _data(T, H, d_qk, HI, DI)
    idx = torch.randint(-2, T + 3, (T, 1, topk), dtype=torch.int32)
    idx[2, 0, 1] = idx[2, 0, 0]  # duplicate counts twice
    idx[5] = -1                  # empty row
    _, _, lse, probs = ref.sparse_mla_fwd(q, kv, idx, 0.2, 32, return_probs=True)
    g = torch.randn(T, dtype=torch.float64)

    def run(fn, dtype, dev):
        xs = [x.detach().to(dev, dtype).requires_grad_() for x in (iq, ik, w)]
        wide = torch.zeros(T, topk + 3, dtype=dtype, device=dev)
        wide[:, :topk] = probs
        kl = fn(*xs, wide[:, :topk], idx.to(dev), reduction="none")  # a strided target
        (kl * g.to(dev, kl.dtype)).sum().backward()
        return [kl] + [x.grad for x in xs]

    truth = run(_loss("from_probs", "reference"), torch.float64, "cpu")
    low = run(_loss("from_probs", "reference"), torch.float32, "cpu")
    got = run(_loss("from_probs", "triton"), torch.float32, KERNEL_DEVICE)
    for name, a, t, lo in zip(("kl", "diq", "dik", "dw"), got, truth, low):
        budget = 20 * rel_err(lo, t) + 1e-6
        assert rel_err(a.cpu(), t) <= budget, (name, rel_err(a.cpu(), t), budget)
    assert got[0][5] == 0
    # the recomputing loss (target from q, kv, lse) agrees
    f32 = [x.float().to(KERNEL_DEVICE) for x in (iq, ik, w, q, kv, lse)]
    recomputed = flashdsa.sparse_kl_loss(*f32, 0.2, idx.to(KERNEL_DEVICE), reduction="none", backend="triton")
    assert rel_err(recomputed.cpu(), truth[0]) <= 20 * rel_err(low[0], truth[0]) + 1e-6


def _compiled_grads_equal_eager(f, xs):
    """f(*xs) under torch.compile(fullgraph=True) and eagerly: the same gradients."""
    grads = []
    for fn in (torch.compile(f, fullgraph=True), f):
        ys = [x.clone().requires_grad_() for x in xs]
        fn(*ys).backward()
        grads.append([y.grad for y in ys])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6


def test_sparse_from_probs_opcheck_and_compile():
    T, HI, DI, topk = 9, 3, 16, 6
    iq, ik, w = [x.float().to(KERNEL_DEVICE) for x in _data(T, 2, 48, HI, DI)[2:]]
    idx = torch.stack([torch.randperm(T)[:topk] for _ in range(T)]).int()[:, None].to(KERNEL_DEVICE)
    probs = torch.rand(T, topk, device=KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.flashdsa.indexer_kl_fwd.default,
                          (None, None, None, iq, ik, w.clone().requires_grad_(), idx, None, None, probs, 0.0))

    def f(iq, ik, w):
        return flashdsa.sparse_kl_loss_from_probs(iq, ik, w, probs, idx, reduction="mean", backend="triton")

    _compiled_grads_equal_eager(f, (iq, ik, w))


def test_only_indexer_gets_gradients_and_opcheck():
    T, H, d_qk, HI, DI, topk = 9, 2, 48, 3, 16, 6
    q, kv, iq, ik, w = [x.float().to(KERNEL_DEVICE) for x in _data(T, H, d_qk, HI, DI)]
    idx = torch.stack([torch.randperm(T)[:topk] for _ in range(T)]).int()[:, None].to(KERNEL_DEVICE)
    _, _, lse = ref.sparse_mla_fwd(q, kv, idx, 0.3, 32)
    q.requires_grad_()
    kv.requires_grad_()
    lse.requires_grad_()
    xs = [x.requires_grad_() for x in (iq, ik, w)]
    loss = flashdsa.sparse_kl_loss(*xs, q, kv, lse, 0.3, idx, backend="triton")
    loss.backward()
    assert q.grad is None and kv.grad is None and lse.grad is None
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
    torch.library.opcheck(torch.ops.flashdsa.indexer_kl_fwd.default,
                          (q.detach(), kv.detach(), lse.detach(), *[x.detach().requires_grad_() for x in xs], idx,
                           None, None, None, 0.3))


def test_torch_compile_fullgraph():
    """The loss (custom ops with fake kernels) traces without graph breaks; grads == eager."""
    T, H, d_qk, HI, DI, topk = 7, 2, 48, 3, 16, 4
    q, kv, iq, ik, w = [x.float().to(KERNEL_DEVICE) for x in _data(T, H, d_qk, HI, DI)]
    idx = torch.stack([torch.randperm(T)[:topk] for _ in range(T)]).int()[:, None].to(KERNEL_DEVICE)
    _, _, lse = ref.sparse_mla_fwd(q, kv, idx, 0.3, 32)

    def f(iq, ik, w):
        return flashdsa.sparse_kl_loss(iq, ik, w, q, kv, lse, 0.3, idx, reduction="mean", backend="triton")

    _compiled_grads_equal_eager(f, (iq, ik, w))


@requires_cuda
@pytest.mark.parametrize("stage,H,d_qk,HI,DI", [
    ("warmup", 64, 576, 64, 128), ("sparse", 64, 576, 64, 128),
    ("warmup", 8, 288, 8, 64),  # the quality study's layer: the query-tiled warm-up kernels
])
def test_bf16_gpu(stage, H, d_qk, HI, DI):
    """bf16 attention/indexer inputs at the real widths (d_qk 576, H 64, H_I 64, d_I 128)
    and at the quality study's (8 heads of 288, 8 indexer heads of 64)."""
    T, topk = 300, 128
    q, kv, iq, ik, w = _data(T, H, d_qk, HI, DI)
    ks, ke, cu = _causal([100, 200], "cpu")
    sm_scale = d_qk ** -0.5
    if stage == "warmup":
        _, lse = ref.dense_mla_fwd(q, kv, cu, sm_scale, 512)
        extra = (ks, ke)
        naive, blockwise = _loss("warmup", "reference"), _loss("warmup", "triton")
    else:
        idx = torch.stack([torch.randperm(T)[:topk] for _ in range(T)]).int()[:, None]
        _, _, lse = ref.sparse_mla_fwd(q, kv, idx, sm_scale, 512)
        extra = (idx,)
        naive, blockwise = _loss("sparse", "reference"), _loss("sparse", "triton")
    g = torch.randn(T, dtype=torch.float64)

    def run(fn, dtype, dev):
        xs = [x.detach().to(dev, dtype).requires_grad_() for x in (iq, ik)] + [w.detach().to(dev, torch.float32 if dtype != torch.float64 else dtype).requires_grad_()]
        kl = fn(*xs, q.to(dev, dtype), kv.to(dev, dtype), lse.to(dev).float() if dtype != torch.float64 else lse,
                sm_scale, *[e.to(dev) for e in extra], reduction="none")
        (kl * g.to(dev, kl.dtype)).sum().backward()
        return [kl] + [x.grad for x in xs]

    truth = run(naive, torch.float64, "cpu")
    low = run(naive, torch.bfloat16, "cuda")
    got = run(blockwise, torch.bfloat16, "cuda")
    for name, a, t, lo in zip(("kl", "diq", "dik", "dw"), got, truth, low):
        budget = 3 * rel_err(lo.cpu(), t) + 2e-3
        assert rel_err(a.cpu(), t) <= budget, (name, rel_err(a.cpu(), t), budget)


@requires_cuda
def test_from_probs_bf16_gpu():
    """The sparse stage as the MLA module runs it on the GPU: bf16 forward at the real widths
    hands over probs, the loss takes them; kl and gradients vs the float64 recomputed truth."""
    T, H, d_qk, HI, DI, topk = 300, 64, 576, 64, 128, 128
    q, kv, iq, ik, w = _data(T, H, d_qk, HI, DI)
    idx = torch.stack([torch.randperm(T)[:topk] for _ in range(T)]).int()[:, None]
    idx[3, 0, 50:] = -1
    sm_scale = d_qk ** -0.5
    _, _, lse = ref.sparse_mla_fwd(q, kv, idx, sm_scale, 512)
    g = torch.randn(T, dtype=torch.float64)

    def grads(kl, xs):
        (kl * g.to(kl.device, kl.dtype)).sum().backward()
        return [kl] + [x.grad for x in xs]

    xs = [x.clone().requires_grad_() for x in (iq, ik, w)]
    truth = grads(flashdsa.sparse_kl_loss(*xs, q, kv, lse, sm_scale, idx, reduction="none", backend="reference"), xs)
    qb, kvb = q.cuda().bfloat16(), kv.cuda().bfloat16()
    xs = [iq.cuda().bfloat16().requires_grad_(), ik.cuda().bfloat16().requires_grad_(),
          w.cuda().float().requires_grad_()]
    low = grads(flashdsa.sparse_kl_loss(*xs, qb, kvb, lse.cuda().float(), sm_scale, idx.cuda(), reduction="none",
                                        backend="reference"), xs)
    probs = flashdsa.sparse_mla_fwd(qb, kvb, idx.cuda(), sm_scale, 512, backend="triton", return_probs=True)[3]
    xs = [iq.cuda().bfloat16().requires_grad_(), ik.cuda().bfloat16().requires_grad_(),
          w.cuda().float().requires_grad_()]
    got = grads(flashdsa.sparse_kl_loss_from_probs(*xs, probs, idx.cuda(), reduction="none", backend="triton"), xs)
    for name, a, t, lo in zip(("kl", "diq", "dik", "dw"), got, truth, low):
        budget = 3 * rel_err(lo.cpu(), t) + 2e-3
        assert rel_err(a.cpu(), t) <= budget, (name, rel_err(a.cpu(), t), budget)


def _det_case(stage, device, dtype=torch.float32, T=11, H=2, d_qk=48, HI=3, DI=16, topk=37):
    """(forward outputs, bwd arguments) of a case with duplicate, invalid and empty slots
    (sparse) or ragged causal ranges with one past the keys (warm-up)."""
    q, kv, iq, ik, w = (x.to(device, dtype) for x in _data(T, H, d_qk, HI, DI))
    lse = (torch.rand(T, H) + 2.0).to(device)
    if stage == "sparse":
        idx = torch.randint(-2, T + 3, (T, 1, topk), dtype=torch.int32)
        idx[2, 0, 1] = idx[2, 0, 0]
        idx[5] = -1
        extra = dict(indices=idx.to(device), ks=None, ke=None)
    else:
        ks, ke, _ = _causal([T // 3, T - T // 3], "cpu")
        ks[3], ke[T - 2] = -2, T + 4
        extra = dict(indices=None, ks=ks.to(device), ke=ke.to(device))
    kl, stats, p, _ = ops.indexer_kl_fwd(q, kv, lse, iq, ik, w, extra["indices"], extra["ks"], extra["ke"], 0.3)
    dkl = torch.randn(T, device=device)
    return (dkl, q, kv, lse, iq, ik, w, extra["indices"], extra["ks"], extra["ke"], stats, p, 0.3)


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_deterministic_dik_equals_atomics(stage):
    """deterministic=True (each (row, slot)'s dik stored, then summed per key in a fixed
    order; queries in chunks of 3 here) gives the atomics' gradients up to fp32 rounding of
    the sum's order, and the same bits twice."""
    args = _det_case(stage, KERNEL_DEVICE)
    want = ops.indexer_kl_bwd(*args)
    ks, ke = args[8], args[9]
    n_slots = 37 if stage == "sparse" else int((ke - ks).max())
    got = [ops.indexer_kl_bwd(*args, deterministic=True, scratch_bytes=3 * n_slots * 16 * 4) for _ in range(2)]
    for name, a, b, c in zip(("diq", "dik", "dw"), want, *got):
        assert torch.equal(b, c), name
        assert rel_err(b, a) <= 1e-6, (name, rel_err(b, a))


def test_deterministic_algorithms_switch_the_loss_backward(monkeypatch):
    """torch.use_deterministic_algorithms(True) routes the loss's backward to the
    fixed-order dik (the attention's backward does the same for dkv)."""
    calls = []
    real = launch.reduce_slots_fixed_order
    monkeypatch.setattr(launch, "reduce_slots_fixed_order", lambda *a: calls.append(1) or real(*a))
    iq, ik, w = [x.float().to(KERNEL_DEVICE).requires_grad_() for x in _data(9, 2, 48, 3, 16)[2:]]
    idx = torch.stack([torch.randperm(9)[:6] for _ in range(9)]).int()[:, None].to(KERNEL_DEVICE)
    probs = torch.rand(9, 6, device=KERNEL_DEVICE)
    flashdsa.sparse_kl_loss_from_probs(iq, ik, w, probs, idx, backend="triton").backward()
    assert not calls
    torch.use_deterministic_algorithms(True)
    try:
        flashdsa.sparse_kl_loss_from_probs(iq, ik, w, probs, idx, backend="triton").backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls


@requires_cuda
@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_gpu_deterministic_dik_reproducible(stage):
    """On the GPU, at the real indexer widths in bf16: the deterministic dik is the same bits
    on every run and matches the atomics' to a bf16 rounding (2^-8)."""
    args = _det_case(stage, "cuda", torch.bfloat16, T=300, H=16, d_qk=576, HI=64, DI=128, topk=128)
    want = ops.indexer_kl_bwd(*args)
    got = [ops.indexer_kl_bwd(*args, deterministic=True, scratch_bytes=1 << 22) for _ in range(2)]
    for name, a, b, c in zip(("diq", "dik", "dw"), want, *got):
        assert torch.equal(b, c), name
        assert rel_err(b.float(), a.float()) <= 2 ** -8, (name, rel_err(b.float(), a.float()))


def _small_case(T=6, H=2, d_qk=48, HI=3, DI=16, topk=4):
    """Arguments of the three public losses at a tiny shape, fp32 on the kernel device."""
    q, kv, iq, ik, w = [x.float().to(KERNEL_DEVICE) for x in _data(T, H, d_qk, HI, DI)]
    idx = torch.stack([torch.randperm(T)[:topk] for _ in range(T)]).int()[:, None].to(KERNEL_DEVICE)
    ks, ke, _ = _causal([T], KERNEL_DEVICE)
    lse = torch.rand(T, H, device=KERNEL_DEVICE) + 2.0
    probs = torch.rand(T, topk, device=KERNEL_DEVICE)
    return dict(
        warmup=lambda **kw: flashdsa.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke, **kw),
        sparse=lambda **kw: flashdsa.sparse_kl_loss(iq, ik, w, q, kv, lse, 0.3, idx, **kw),
        from_probs=lambda **kw: flashdsa.sparse_kl_loss_from_probs(iq, ik, w, probs, idx, **kw),
    )


@pytest.mark.parametrize("stage", ["warmup", "sparse", "from_probs"])
def test_backend_dispatch(stage, monkeypatch):
    """"auto" runs the kernels on CUDA tensors and the reference elsewhere; "triton" runs the
    kernels (under the interpreter on CPU); "reference" the reference; the two agree."""
    from flashdsa.reference import indexer_loss as reference

    name = {"warmup": "warmup_kl_loss", "sparse": "sparse_kl_loss", "from_probs": "sparse_kl_loss_from_probs"}[stage]
    calls = []
    for mod, tag in ((ops, "triton"), (reference, "reference")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _tag=tag, **k: calls.append(_tag) or _real(*a, **k))
    call = _small_case()[stage]
    got = {b: call(backend=b, reduction="none") for b in ("auto", "triton", "reference")}
    assert calls == ["triton" if KERNEL_DEVICE == "cuda" else "reference", "triton", "reference"]
    assert rel_err(got["triton"], got["reference"]) < 1e-5
    with pytest.raises(ValueError, match="backend: expected one of"):
        call(backend="cuda")


@pytest.mark.parametrize("stage", ["warmup", "sparse", "from_probs"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions_agree_across_backends(stage, reduction):
    call = _small_case()[stage]
    per_row = call(backend="reference", reduction="none")
    want = per_row.sum() if reduction == "sum" else per_row.mean()
    for backend in ("triton", "reference"):
        got = call(backend=backend, reduction=reduction)
        assert got.dim() == 0 and rel_err(got, want) < 1e-5, backend


@pytest.mark.parametrize("case,exc,match", [
    ("reduction", ValueError, "reduction: expected one of"),
    ("sm_scale", TypeError, "sm_scale: expected a float"),
    ("q_missing", TypeError, "q: expected a torch.Tensor"),
    ("lse_device", ValueError, "lse: expected a tensor on"),
])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_public_losses_name_the_bad_argument(case, exc, match, backend):
    T, H, d_qk, HI, DI = 5, 2, 24, 3, 16
    q, kv, iq, ik, w = [x.float() for x in _data(T, H, d_qk, HI, DI)]
    ks, ke, _ = _causal([T], "cpu")
    lse = torch.rand(T, H)
    args = dict(iq=iq, ik=ik, weights=w, q=q, kv=kv, lse=lse, sm_scale=0.3, ks=ks, ke=ke, backend=backend)
    if case == "reduction":
        args["reduction"] = "avg"
    elif case == "sm_scale":
        args["sm_scale"] = torch.tensor(0.3)
    elif case == "q_missing":
        args["q"] = None
    elif case == "lse_device":
        args["lse"] = lse.to("meta")
    with pytest.raises(exc, match=match):
        flashdsa.warmup_kl_loss(**args)


def test_block_sizes_by_gpu():
    """The loss kernels' table by compute capability (CPU check of the dispatch): the A100
    gets "sm80" at 64 heads (sized to its 163 KB of shared memory), Hopper "sm90"; at 128
    heads both "sm90_h128"; with the target given, "sm90_probs"."""
    from flashdsa.ops.indexer_loss import CONFIGS, config_for
    assert config_for(64, (8, 0)) == CONFIGS["sm80"] and config_for(64, (9, 0)) == CONFIGS["sm90"]
    assert config_for(128, (8, 0)) == config_for(128, (10, 0)) == CONFIGS["sm90_h128"]
    assert config_for(None, (8, 0)) == CONFIGS["sm90_probs"]
