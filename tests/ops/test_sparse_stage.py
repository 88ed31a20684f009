"""The fused sparse-stage forward (attention + indexer loss reading the attention's scratch)
== the attention with return_probs followed by the from-probs loss: outputs, loss values
and the gradients of all five inputs; opcheck and torch.compile."""
import pytest
import torch

from flashdsa.ops import indexer_loss, sparse_stage
from flashdsa.ops.autograd import sparse_mla_fwd as attention
from tests.utils import KERNEL_DEVICE, rel_err, requires_cuda


def _inputs(T, S, H, d_qk, HI, DI, topk, dtype, device):
    g = torch.Generator().manual_seed(T * 1000 + H)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    q, kv = r(T, H, d_qk), r(S, 1, d_qk)
    iq, ik, w = r(T, HI, DI), r(S, DI), (torch.randn(T, HI, generator=g) * DI ** -0.5).to(device)
    idx = torch.randint(-2, S + 3, (T, 1, topk), dtype=torch.int32, generator=g)
    idx[1, 0, 1] = idx[1, 0, 0]  # a duplicate slot counts twice
    idx[3 % T] = -1              # a row with no valid slot
    return q, kv, iq, ik, w, idx.to(device)


def _run(fused, q, kv, iq, ik, w, idx, sm_scale, d_v, precision):
    """Outputs and the gradients of (out * go).sum() + (lse * gl).sum() + (kl * gk).sum()."""
    xs = [x.detach().clone().requires_grad_() for x in (q, kv, iq, ik, w)]
    if fused:
        out, lse, kl = sparse_stage.sparse_mla_with_kl_loss(xs[0], xs[1], idx, sm_scale, *xs[2:], d_v=d_v,
                                                            probs_precision=precision, reduction="none")
    else:
        out, _, lse, probs = attention(xs[0], xs[1], idx, sm_scale, d_v, return_probs=True,
                                       probs_precision=precision)
        kl = indexer_loss.sparse_kl_loss_from_probs(*xs[2:], probs, idx, reduction="none")
    g = torch.Generator().manual_seed(1)
    go, gl, gk = (torch.randn(x.shape, generator=g).to(x.device, x.dtype) for x in (out, lse, kl))
    ((out * go).sum() + (torch.where(torch.isfinite(lse), lse, 0) * gl).sum() + (kl * gk).sum()).backward()
    return [out, lse, kl] + [x.grad for x in xs]


NAMES = ("out", "lse", "kl", "dq", "dkv", "diq", "dik", "dw")


@pytest.mark.parametrize("precision", ["e4m3", "fp16"])
def test_fused_equals_attention_then_loss(precision):
    """Odd sizes (topk not a multiple of BLOCK_K, topk > s_kv), invalid, duplicate slots and
    an empty row: the attention side is the same kernels (bitwise), the loss the same sums."""
    T, S, H, d_qk, d_v, HI, DI, topk = 7, 40, 5, 80, 64, 3, 24, 45
    args = _inputs(T, S, H, d_qk, HI, DI, topk, torch.float32, KERNEL_DEVICE)
    got = _run(True, *args, 0.2, d_v, precision)
    want = _run(False, *args, 0.2, d_v, precision)
    for name, a, b in zip(NAMES, got, want):
        if name in ("out", "lse", "dq", "dkv"):
            assert torch.equal(a, b), name
        else:
            assert rel_err(a, b) <= 1e-6, (name, rel_err(a, b))
    assert got[2][3] == 0  # the empty row's KL


def test_chunked_scratch_equals_one_chunk():
    """Queries in chunks (the scratch reused): the loss of each chunk reads its own."""
    T, S, H, d_qk, d_v, HI, DI, topk = 9, 50, 4, 80, 64, 3, 24, 40
    q, kv, iq, ik, w, idx = _inputs(T, S, H, d_qk, HI, DI, topk, torch.float32, KERNEL_DEVICE)
    one = sparse_stage.sparse_mla_kl_fwd(q, kv, idx, 0.2, d_v, iq, ik, w)
    chunked = sparse_stage.sparse_mla_kl_fwd(q, kv, idx, 0.2, d_v, iq, ik, w, scratch_bytes=4 * H * topk)
    for name, a, b in zip(("out", "max_logits", "lse", "kl", "stats", "p"), one, chunked):
        assert torch.equal(a, b), name


def test_opcheck_and_compile():
    T, S, H, d_qk, d_v, HI, DI, topk = 5, 30, 2, 48, 32, 3, 16, 12
    q, kv, iq, ik, w, idx = _inputs(T, S, H, d_qk, HI, DI, topk, torch.float32, KERNEL_DEVICE)
    torch.library.opcheck(sparse_stage._sparse_mla_kl_fwd_op,
                          (q.requires_grad_(), kv, idx, iq, ik, w.requires_grad_(), 0.3, d_v, 1))

    def f(q, kv, iq, ik, w):
        out, _, loss = sparse_stage.sparse_mla_with_kl_loss(q, kv, idx, 0.3, iq, ik, w, d_v=d_v, reduction="mean")
        return out.square().mean() + loss

    grads = []
    for fn in (torch.compile(f, fullgraph=True), f):
        ys = [x.detach().clone().requires_grad_() for x in (q, kv, iq, ik, w)]
        fn(*ys).backward()
        grads.append([y.grad for y in ys])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6


@requires_cuda
@pytest.mark.parametrize("H", [64, 128])
def test_gpu_bf16_fused_equals_attention_then_loss(H):
    """The real widths (d_qk 576, H_I 64, d_I 128) in bf16 with the H200 configurations (TMA
    stores of the scratch, BLOCK_K 64) and a tail block (topk 200)."""
    args = _inputs(300, 700, H, 576, 64, 128, 200, torch.bfloat16, "cuda")
    torch.use_deterministic_algorithms(True)  # the attention's dkv in a fixed order
    try:
        got = _run(True, *args, 576 ** -0.5, 512, "e4m3")
        want = _run(False, *args, 576 ** -0.5, 512, "e4m3")
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(NAMES, got, want):
        if name in ("out", "lse", "dq", "dkv"):
            assert torch.equal(a, b), name
        elif name == "dik":  # fp32 atomics in any order, then bf16: at most a bf16 ulp (2^-8) apart
            assert rel_err(a.float(), b.float()) <= 2 ** -8, (name, rel_err(a.float(), b.float()))
        else:  # the target's head sums may associate differently (another kernel's layout)
            assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
