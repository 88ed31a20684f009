"""Backward of sparse MLA attention: reference gradcheck (float64, CPU), the Triton
backward (interpreter on CPU, fp32; bf16 on a GPU) against the reference's autograd,
the deterministic mode, sparse-with-every-key == dense, and torch.compile (GPU)."""
import pytest
import torch

import flashdsa
from flashdsa import reference as ref
from flashdsa.ops.sparse_mla import run_sparse_mla_bwd
from flashdsa.ops.sparse_mla.op import _sparse_mla_fwd_op
from tests.utils import KERNEL_DEVICE, rel_err, requires_cuda


@pytest.fixture
def poison(monkeypatch):
    """Every float tensor the host code allocates with torch.empty / empty_like starts as
    NaN, so an output entry the kernels never write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def _indices(s_q, s_kv, topk, device="cpu", invalid=True):
    """Random distinct rows per query, with some -1 and >= s_kv slots, one duplicated
    row, and (if s_q > 3) one query with no valid slot at all."""
    idx = torch.stack([torch.randperm(s_kv)[:topk] for _ in range(s_q)]).int()
    if invalid:
        idx[0, -2:] = -1
        if s_q > 1:
            idx[1, 0] = s_kv + 5  # out of range: invalid, must not be read
        if s_q > 2 and topk > 2:
            idx[2, 1] = idx[2, 0]  # a row listed twice counts twice
        if s_q > 3:
            idx[3, :] = -1
    return idx[:, None, :].to(device)


def _inputs(s_q, h, d_qk, s_kv, topk, dtype, device, invalid=True):
    q = torch.randn(s_q, h, d_qk, dtype=torch.float64)
    kv = torch.randn(s_kv, 1, d_qk, dtype=torch.float64)
    return q.to(device, dtype), kv.to(device, dtype), _indices(s_q, s_kv, topk, device, invalid)


def _ref_grads(q, kv, idx, sm_scale, d_v, dout, dlse, dtype):
    """Reference autograd in ``dtype`` (float64 = truth). Returns out, lse, dq, dkv."""
    qd = q.detach().to(dtype).requires_grad_()
    kvd = kv.detach().to(dtype).requires_grad_()
    out, _, lse = ref.sparse_mla_fwd(qd, kvd, idx, sm_scale, d_v)
    loss = (out.to(dtype) * dout.to(dtype)).sum()
    if dlse is not None:
        fin = torch.isfinite(lse)
        loss = loss + (lse[fin] * dlse.to(lse.dtype)[fin]).sum()
    loss.backward()
    return out, lse, qd.grad, kvd.grad


def test_reference_gradcheck_float64():
    s_q, h, d_qk, d_v, s_kv, topk = 3, 2, 12, 8, 7, 4
    q, kv, idx = _inputs(s_q, h, d_qk, s_kv, topk, torch.float64, "cpu", invalid=False)
    idx[0, 0, -1] = -1
    q.requires_grad_()
    kv.requires_grad_()

    def f(q, kv):
        out, _, lse = ref.sparse_mla_fwd(q, kv, idx, 0.37, d_v)
        return out, lse
    assert torch.autograd.gradcheck(f, (q, kv))


@pytest.mark.parametrize("s_q,h,d_qk,d_v,s_kv,topk,cfg", [
    (5, 3, 48, 32, 37, 20, None),                   # odd heads, tail 16, ragged topk blocks
    (4, 20, 40, 32, 19, 19, {"BLOCK_H": 16}),      # two head blocks, tail 8 (padded), topk = s_kv
    (3, 40, 40, 32, 13, 9, {"BLOCK_H": 16}),       # 3 head blocks, the last partial
    (3, 3, 272, 256, 9, 5, None),                   # d_v 256: dkv in 2 column chunks of 128
    (2, 2, 576, 512, 7, 4, None),                   # the real widths: 4 chunks + rope tail 64
    (3, 2, 32, 16, 11, 5, None),                    # d_v < head part: value is a prefix
])
def test_triton_bwd_matches_reference(s_q, h, d_qk, d_v, s_kv, topk, cfg, poison):
    sm_scale = d_qk ** -0.5 * 1.3
    q, kv, idx = _inputs(s_q, h, d_qk, s_kv, topk, torch.float32, KERNEL_DEVICE)
    dout = torch.randn(s_q, h, d_v, device=KERNEL_DEVICE)
    dlse = torch.randn(s_q, h, device=KERNEL_DEVICE)
    out, lse, gq64, gkv64 = _ref_grads(q, kv, idx, sm_scale, d_v, dout, dlse, torch.float64)
    _, _, gq32, gkv32 = _ref_grads(q, kv, idx, sm_scale, d_v, dout, dlse, torch.float32)
    dq, dkv = run_sparse_mla_bwd(q, kv, idx, out.float(), dout, lse.float(), sm_scale, d_v,
                                 dlse=torch.where(torch.isfinite(lse.float()), dlse, 0.0), config=cfg)
    # Budget from the data: the fp32 reference's own error vs float64, times a margin.
    for got, want, low in ((dq, gq64, gq32), (dkv, gkv64, gkv32)):
        budget = 20 * rel_err(low, want) + 1e-6
        assert rel_err(got, want) <= budget, (rel_err(got, want), budget)
    if s_q > 3:
        assert torch.equal(dq[3], torch.zeros_like(dq[3]))  # no valid index: no gradient


def test_deterministic_mode_reproducible_and_matches_atomics(poison):
    s_q, h, d_qk, d_v, s_kv, topk = 6, 20, 48, 32, 9, 8  # few rows: many queries hit each row
    q, kv, idx = _inputs(s_q, h, d_qk, s_kv, topk, torch.float32, KERNEL_DEVICE)
    out, _, lse = ref.sparse_mla_fwd(q, kv, idx, 0.2, d_v)
    dout = torch.randn_like(out)
    dq_a, dkv_a = run_sparse_mla_bwd(q, kv, idx, out, dout, lse, 0.2, d_v)
    # scratch_bytes=1 forces one query per chunk: the chunked fixed-order path.
    runs = [run_sparse_mla_bwd(q, kv, idx, out, dout, lse, 0.2, d_v, deterministic=True, scratch_bytes=1)
            for _ in range(2)]
    two_blocks = run_sparse_mla_bwd(q, kv, idx, out, dout, lse, 0.2, d_v, deterministic=True, config={"BLOCK_H": 16})
    assert rel_err(two_blocks[1], dkv_a) < 1e-5
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert rel_err(runs[0][1], dkv_a) < 1e-5 and rel_err(runs[0][0], dq_a) < 1e-6
    _, _, _, gkv = _ref_grads(q, kv, idx, 0.2, d_v, dout, None, torch.float64)
    assert rel_err(runs[0][1], gkv) < 1e-5


def test_sparse_with_every_key_equals_dense():
    """topk >= T with the causal rows selected: gradients equal dense attention's."""
    lens = [5, 8]
    T, h, d_qk, d_v = sum(lens), 3, 48, 32
    topk = 11  # > longest sequence: trailing slots are -1
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        for t in range(s, e):
            rows = torch.arange(s, t + 1, dtype=torch.int32)
            idx[t, :len(rows)] = rows[torch.randperm(len(rows))]  # any order
    idx = idx[:, None].to(KERNEL_DEVICE)
    q = torch.randn(T, h, d_qk, dtype=torch.float64)
    kv = torch.randn(T, 1, d_qk, dtype=torch.float64)
    dout = torch.randn(T, h, d_v, dtype=torch.float64)
    qd, kvd = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out_d, _ = ref.dense_mla_fwd(qd, kvd, cu, 0.25, d_v)
    (out_d * dout).sum().backward()
    qs = q.float().to(KERNEL_DEVICE).requires_grad_()
    kvs = kv.float().to(KERNEL_DEVICE).requires_grad_()
    out_s, _, _ = flashdsa.sparse_mla_fwd(qs, kvs, idx, 0.25, d_v, backend="triton")
    (out_s * dout.float().to(KERNEL_DEVICE)).sum().backward()
    assert rel_err(out_s.cpu(), out_d) < 1e-5
    assert rel_err(qs.grad.cpu(), qd.grad) < 1e-5
    assert rel_err(kvs.grad.cpu(), kvd.grad) < 1e-5


def test_public_api_autograd_and_opcheck():
    """flashdsa.sparse_mla_fwd(backend="triton") is differentiable (incl. through lse), and
    the registered op passes torch.library.opcheck (schema, fake tensor, autograd)."""
    s_q, h, d_qk, d_v, s_kv, topk = 4, 3, 48, 32, 23, 9
    q, kv, idx = _inputs(s_q, h, d_qk, s_kv, topk, torch.float32, KERNEL_DEVICE)
    q.requires_grad_()
    kv.requires_grad_()
    out, max_logits, lse = flashdsa.sparse_mla_fwd(q, kv, idx, 0.3, d_v, backend="triton")
    assert not max_logits.requires_grad
    fin = torch.isfinite(lse)
    (out.square().sum() + lse[fin].sum()).backward()
    qd = q.detach().double().requires_grad_()
    kvd = kv.detach().double().requires_grad_()
    o2, _, l2 = ref.sparse_mla_fwd(qd, kvd, idx, 0.3, d_v)
    (o2.square().sum() + l2[torch.isfinite(l2)].sum()).backward()
    assert rel_err(q.grad, qd.grad) < 1e-5 and rel_err(kv.grad, kvd.grad) < 1e-5
    for probs_bytes in (0, 2, 1):
        torch.library.opcheck(_sparse_mla_fwd_op, (q.detach().requires_grad_(), kv.detach().requires_grad_(),
                                                   idx, 0.3, d_v, probs_bytes, "triton"))


@requires_cuda
@pytest.mark.parametrize("h", [64, 128])
def test_bf16_gpu_matches_reference(h):
    s_q, d_qk, d_v, s_kv, topk = 48, 576, 512, 700, 256
    sm_scale = d_qk ** -0.5
    q, kv, idx = _inputs(s_q, h, d_qk, s_kv, topk, torch.bfloat16, "cuda")
    dout = torch.randn(s_q, h, d_v, device="cuda", dtype=torch.bfloat16)
    out, _, lse = flashdsa.sparse_mla_fwd(q, kv, idx, sm_scale, d_v, backend="triton")
    _, _, gq64, gkv64 = _ref_grads(q, kv, idx, sm_scale, d_v, dout, None, torch.float64)
    _, _, gq16, gkv16 = _ref_grads(q, kv, idx, sm_scale, d_v, dout, None, torch.bfloat16)
    for det in (False, True):
        dq, dkv = run_sparse_mla_bwd(q, kv, idx, out, dout, lse, sm_scale, d_v, deterministic=det)
        for got, want, low in ((dq, gq64, gq16), (dkv, gkv64, gkv16)):
            # low: fp32 math on the bf16 values, grads rounded to bf16; the kernel also
            # rounds P and dS to bf16 as tensor-core operands: allow that much again.
            budget = 3 * rel_err(low, want) + 2e-3
            assert rel_err(got, want) <= budget, (det, rel_err(got, want), budget)


class Toy(torch.nn.Module):
    """q and kv projected from x, sparse attention through the public op, output projection."""

    def __init__(self, dim, h, d_qk, d_v):
        super().__init__()
        self.h, self.d_qk, self.d_v = h, d_qk, d_v
        self.wq = torch.nn.Linear(dim, h * d_qk, bias=False)
        self.wkv = torch.nn.Linear(dim, d_qk, bias=False)
        self.wo = torch.nn.Linear(h * d_v, dim, bias=False)

    def forward(self, x, idx):
        q = self.wq(x).view(x.shape[0], self.h, self.d_qk)
        kv = self.wkv(x).view(x.shape[0], 1, self.d_qk)
        out, _, lse = flashdsa.sparse_mla_fwd(q, kv, idx, self.d_qk ** -0.5, self.d_v, backend="triton")
        return self.wo(out.reshape(x.shape[0], -1)), lse


def _compile_check(T, dim, h, d_qk, d_v, topk, device, dtype, tol):
    """torch.compile(fullgraph=True) of Toy forward + backward == eager."""
    torch.manual_seed(0)
    model = Toy(dim, h, d_qk, d_v).to(device, dtype)
    x = torch.randn(T, dim, device=device, dtype=dtype)
    idx = _indices(T, T, topk, device, invalid=False)
    compiled = torch.compile(model, fullgraph=True)
    y, lse = compiled(x, idx)
    y.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y2, _ = model(x, idx)
    y2.float().square().mean().backward()
    assert rel_err(y, y2) < tol
    for g, g2 in zip(grads, (p.grad for p in model.parameters())):
        assert rel_err(g, g2) < tol


def test_torch_compile_fullgraph_tiny():
    """Traceable without graph breaks (custom ops + fake kernels), also on CPU (interpreter)."""
    _compile_check(8, 16, 2, 48, 32, 5, KERNEL_DEVICE, torch.float32, 1e-5)


class ToySparseStage(Toy):
    """Toy + the sparse stage's indexer loss: the forward hands over probs (return_probs),
    a tiny indexer on detached x learns from sparse_kl_loss_from_probs."""

    def __init__(self, dim, h, d_qk, d_v, hi=4, di=16):
        super().__init__(dim, h, d_qk, d_v)
        self.hi, self.di = hi, di
        self.wiq = torch.nn.Linear(dim, hi * di, bias=False)
        self.wik = torch.nn.Linear(dim, di, bias=False)
        self.ww = torch.nn.Linear(dim, hi, bias=False)

    def forward(self, x, idx):
        from flashdsa.ops.indexer_loss import sparse_kl_loss_from_probs
        q = self.wq(x).view(x.shape[0], self.h, self.d_qk)
        kv = self.wkv(x).view(x.shape[0], 1, self.d_qk)
        out, _, _, probs = flashdsa.sparse_mla_fwd(q, kv, idx, self.d_qk ** -0.5, self.d_v, backend="triton",
                                                   return_probs=True)
        xd = x.detach()
        iq = self.wiq(xd).view(x.shape[0], self.hi, self.di)
        loss = sparse_kl_loss_from_probs(iq, self.wik(xd), self.ww(xd).float(), probs, idx, reduction="mean")
        return self.wo(out.reshape(x.shape[0], -1)), loss


def test_torch_compile_fullgraph_sparse_stage_with_probs():
    """Forward with probs + the loss from them + backward compile without graph breaks;
    loss and every gradient equal eager ones; the indexer gets gradients from the loss only."""
    torch.manual_seed(0)
    model = ToySparseStage(16, 2, 48, 32).to(KERNEL_DEVICE)
    x = torch.randn(8, 16, device=KERNEL_DEVICE)
    idx = _indices(8, 8, 5, KERNEL_DEVICE, invalid=False)
    runs = []
    for fn in (torch.compile(model, fullgraph=True), model):
        model.zero_grad()
        y, loss = fn(x, idx)
        (y.square().mean() + loss).backward()
        runs.append([y, loss] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert rel_err(a, b) < 1e-5
    model.zero_grad()
    y, loss = model(x, idx)
    y.square().mean().backward()  # the LM side alone: nothing reaches the indexer
    assert all(p.grad is None for p in (model.wiq.weight, model.wik.weight, model.ww.weight))


@requires_cuda
def test_torch_compile_fullgraph_forward_backward():
    """A module whose forward calls flashdsa.sparse_mla_fwd compiles with fullgraph=True on
    the GPU at the real widths, and its gradients equal eager ones."""
    _compile_check(256, 256, 64, 576, 512, 64, "cuda", torch.bfloat16, 2e-2)


def test_use_deterministic_algorithms_switches_the_backward(monkeypatch):
    """torch.use_deterministic_algorithms(True) routes the autograd backward through the
    fixed-order reduction; repeated backward passes are then bitwise equal."""
    import flashdsa.ops.sparse_mla.op as op
    seen = []
    real = op.run_sparse_mla_bwd

    def spy(*a, **k):
        seen.append(k["deterministic"])
        return real(*a, **k)

    monkeypatch.setattr(op, "run_sparse_mla_bwd", spy)
    s_q, h, d_qk, d_v, s_kv, topk = 6, 3, 48, 32, 7, 6
    q, kv, idx = _inputs(s_q, h, d_qk, s_kv, topk, torch.float32, KERNEL_DEVICE, invalid=False)
    grads = []
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(2):
            qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()
            out, _, _ = flashdsa.sparse_mla_fwd(qg, kvg, idx, 0.3, d_v, backend="triton")
            out.square().sum().backward()
            grads.append((qg.grad, kvg.grad))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [True, True]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
