"""The sparse training stage's forward as one op: sparse MLA attention and the indexer's KL
loss over the selected slots (SPEC 5), the loss reading its target straight from the
attention forward's scratch.

``sparse_mla_fwd(..., return_probs=True)`` followed by ``sparse_kl_loss_from_probs`` runs
three kernels: the attention (which leaves each block's probabilities, relative to the
block's max, in a scratch), a reduction of that scratch over the heads to probs [T, topk],
and the loss. Here the loss kernel does the reduction itself while it walks the same
blocks (``ProbsScratch``, ``BLOCKS`` in ``indexer_kl_fwd_kernel``), so the reduction
kernel and its pass over the scratch are gone; the loss stores the target p [T, topk]
for its backward, as the recomputing loss does.

Registered with ``torch.library`` (opaque to torch.compile):
    ``flashdsa::sparse_mla_kl_fwd(q, kv, indices, iq, ik, w, sm_scale, d_v, probs_bytes)
        -> (out, max_logits, lse, kl [T], stats [T, 2], p [T, topk])``
and its autograd formula calls the two existing backward ops: the attention's (q, kv from
out and lse) and the loss's (iq, ik, w from kl). The target is detached by construction.
"""
from __future__ import annotations

import torch
import triton

from ..reference.losses import _reduce
from . import indexer_loss as L
from .autograd import sparse_mla_bwd as _attn_bwd
from .sparse_mla import sparse_mla_fwd as _attn_fwd


def sparse_mla_kl_fwd(q, kv, indices, sm_scale, d_v, iq, ik, w, probs_dtype=torch.float8_e4m3fn,
                      config=None, attn_config=None, scratch_bytes=1 << 30):
    """(out, max_logits, lse, kl [T] fp32, stats [T, 2], p [T, topk] fp32) on validated
    inputs: ``sparse_mla_fwd(q, kv, indices, sm_scale, d_v)``'s outputs, and the per-row KL of
    the loss with the target taken from the forward's scratch of ``probs_dtype``. ``config``
    overrides the loss kernel's warps and stages (its BLOCK_K is the forward's),
    ``attn_config`` the forward's block sizes (flashdsa.ops.sparse_mla.CONFIGS)."""
    _, _, _, iq, ik, w, idx, _, _, _, topk = L._prep(None, None, None, iq, ik, w, indices, None, None)
    T, h_q = q.shape[0], q.shape[1]
    dev = q.device
    kl = torch.empty(T, dtype=torch.float32, device=dev)
    stats = torch.empty(T, 2, dtype=torch.float32, device=dev)
    p = torch.empty(T, topk, dtype=torch.float32, device=dev)
    cfg = L._config(None, iq) | dict(config or {})
    meta = L._meta(None, iq) | dict(BLOCK_H=max(16, triton.next_power_of_2(h_q)))

    def loss_fwd(sc, c0, c1):
        L.indexer_kl_fwd_kernel[(c1 - c0,)](
            sc.lse, sc.lse, sc.lse, iq[c0:c1], ik, w[c0:c1], idx[c0:c1], kl, kl,
            kl[c0:c1], stats[c0:c1], p[c0:c1], kl,
            ik.shape[0], h_q, iq.shape[1], topk, 0.0, 1.0,
            0, 0, 0, sc.lse.stride(0), iq.stride(0), iq.stride(1), ik.stride(0), w.stride(0), idx.stride(0),
            p.stride(0), **meta, BLOCK_K=sc.block_k, DENSE=False, STORE_P=True, COMPUTE_LSE=False, ATTN=False,
            BLOCKS=True, ps_ptr=sc.p, ms_ptr=sc.m, p_scale=sc.scale, stride_pst=sc.p.stride(0),
            stride_psh=sc.p.stride(1), stride_mst=sc.m.stride(0), stride_msb=sc.m.stride(1),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    out, max_logits, lse = _attn_fwd(q, kv, indices, sm_scale, d_v, config=attn_config, return_probs=True,
                                     probs_dtype=probs_dtype, scratch_bytes=scratch_bytes, probs_sink=loss_fwd)
    return out, max_logits, lse, kl, stats, p


_PROBS_DTYPES = {1: torch.float8_e4m3fn, 2: torch.float16}


@torch.library.custom_op("flashdsa::sparse_mla_kl_fwd", mutates_args=())
def _sparse_mla_kl_fwd_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, iq: torch.Tensor,
                          ik: torch.Tensor, w: torch.Tensor, sm_scale: float, d_v: int, probs_bytes: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return sparse_mla_kl_fwd(q, kv, indices, sm_scale, d_v, iq, ik, w, _PROBS_DTYPES[probs_bytes])


@_sparse_mla_kl_fwd_op.register_fake
def _(q, kv, indices, iq, ik, w, sm_scale, d_v, probs_bytes):
    s_q, h = q.shape[0], q.shape[1]
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(s_q, h, d_v), q.new_empty(s_q, h, **f32), q.new_empty(s_q, h, **f32),
            q.new_empty(s_q, **f32), q.new_empty(s_q, 2, **f32), q.new_empty(s_q, indices.shape[-1], **f32))


def _setup_context(ctx, inputs, output):
    q, kv, indices, iq, ik, w, sm_scale, d_v, _ = inputs
    out, max_logits, lse, kl, stats, p = output
    ctx.mark_non_differentiable(max_logits, stats, p)
    ctx.save_for_backward(q, kv, indices, out, lse, iq, ik, w, stats, p)
    ctx.sm_scale, ctx.d_v = sm_scale, d_v


def _backward(ctx, dout, dmax_logits, dlse, dkl, dstats, dp):
    q, kv, indices, out, lse, iq, ik, w, stats, p = ctx.saved_tensors
    dq = dkv = diq = dik = dw = None
    if dout is not None or dlse is not None:
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dkv = _attn_bwd(q, kv, indices, out, dout, lse, ctx.sm_scale, ctx.d_v, dlse=dlse,
                            deterministic=torch.are_deterministic_algorithms_enabled())
    if dkl is not None:  # the target (the attention's probabilities) is a constant of the loss
        diq, dik, dw = torch.ops.flashdsa.indexer_kl_bwd(dkl, None, None, None, iq, ik, w, indices, None, None,
                                                         stats, p, 0.0)
    return dq, dkv, None, diq, dik, dw, None, None, None


torch.library.register_autograd("flashdsa::sparse_mla_kl_fwd", _backward, setup_context=_setup_context)


def sparse_mla_with_kl_loss(q, kv, indices, sm_scale, iq, ik, weights, d_v=512, probs_precision="e4m3",
                            reduction="sum"):
    """Sparse MLA attention and the sparse-stage indexer loss in one forward, on validated
    inputs: ``(out [s_q, h_q, d_v], lse [s_q, h_q], loss)``, equal to
    ``flashdsa.sparse_mla_fwd(q, kv, indices, sm_scale, d_v, return_probs=True,
    probs_precision=...)`` followed by
    :func:`flashdsa.ops.indexer_loss.sparse_kl_loss_from_probs` on its probs, minus the
    probs reduction kernel. Gradients: q and kv from out and lse; iq, ik and weights from
    the loss only (its target, the attention's probabilities, is detached)."""
    probs_bytes = 1 if probs_precision == "e4m3" else 2
    out, _, lse, kl, _, _ = torch.ops.flashdsa.sparse_mla_kl_fwd(q, kv, indices, iq, ik, weights, float(sm_scale),
                                                                 int(d_v), probs_bytes)
    return out, lse, _reduce(kl, reduction)
