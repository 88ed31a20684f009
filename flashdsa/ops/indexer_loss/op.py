"""The indexer KL losses as ``torch.library`` custom ops (``flashdsa::indexer_kl_fwd`` and
``flashdsa::indexer_kl_bwd``, opaque to torch.compile, with fake kernels), their autograd,
and the host functions the public ops call (inputs assumed validated: use
``flashdsa.warmup_kl_loss`` and the others, flashdsa.api).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...reference.indexer_loss import reduce_loss
from .launch import indexer_kl_bwd, indexer_kl_fwd


@torch.library.custom_op("flashdsa::indexer_kl_fwd", mutates_args=())
def _indexer_kl_fwd_op(q: Optional[torch.Tensor], kv: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                       iq: torch.Tensor, ik: torch.Tensor, w: torch.Tensor, indices: Optional[torch.Tensor],
                       ks: Optional[torch.Tensor], ke: Optional[torch.Tensor], probs: Optional[torch.Tensor],
                       sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return indexer_kl_fwd(q, kv, lse, iq, ik, w, indices, ks, ke, sm_scale, probs=probs)


@_indexer_kl_fwd_op.register_fake
def _(q, kv, lse, iq, ik, w, indices, ks, ke, probs, sm_scale):
    T = iq.shape[0]
    topk = 0 if indices is None or probs is not None else indices.shape[-1]
    lse_shape = (T, q.shape[1]) if lse is None and probs is None else (0, 0)
    return (iq.new_empty(T, dtype=torch.float32), iq.new_empty(T, 2, dtype=torch.float32),
            iq.new_empty(T, topk, dtype=torch.float32), iq.new_empty(lse_shape, dtype=torch.float32))


@torch.library.custom_op("flashdsa::indexer_kl_bwd", mutates_args=())
def _indexer_kl_bwd_op(dkl: torch.Tensor, q: Optional[torch.Tensor], kv: Optional[torch.Tensor],
                       lse: Optional[torch.Tensor], iq: torch.Tensor, ik: torch.Tensor, w: torch.Tensor,
                       indices: Optional[torch.Tensor], ks: Optional[torch.Tensor], ke: Optional[torch.Tensor],
                       stats: torch.Tensor, p: torch.Tensor, sm_scale: float,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, indices, ks, ke, stats, p, sm_scale,
                          deterministic=deterministic)


@_indexer_kl_bwd_op.register_fake
def _(dkl, q, kv, lse, iq, ik, w, indices, ks, ke, stats, p, sm_scale, deterministic):
    return torch.empty_like(iq), torch.empty_like(ik), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    q, kv, lse, iq, ik, w, indices, ks, ke, probs, sm_scale = inputs
    kl, stats, p, lse_out = output
    ctx.mark_non_differentiable(stats, p, lse_out)
    if indices is not None:  # sparse: the backward reads the target, not the attention
        q = kv = lse = None
        p = probs if probs is not None else p
    elif lse is None:
        lse = lse_out
    ctx.save_for_backward(q, kv, lse, iq, ik, w, indices, ks, ke, stats, p)
    ctx.sm_scale = sm_scale


def _backward(ctx, dkl, dstats, dp, dlse_out):
    q, kv, lse, iq, ik, w, indices, ks, ke, stats, p = ctx.saved_tensors
    diq, dik, dw = _indexer_kl_bwd_op(dkl, q, kv, lse, iq, ik, w, indices, ks, ke, stats, p, ctx.sm_scale,
                                      torch.are_deterministic_algorithms_enabled())
    # The attention side (q, kv, lse or probs) is a detached target: no gradient by design.
    return None, None, None, diq, dik, dw, None, None, None, None, None


torch.library.register_autograd("flashdsa::indexer_kl_fwd", _backward, setup_context=_setup_context)


def warmup_kl_loss(iq, ik, weights, q, kv, lse, sm_scale, ks, ke, reduction="sum"):
    """Blockwise dense warm-up loss sum_t KL(p[t] || softmax(I[t])) over [ks[t], ke[t]).
    Same contract as :func:`flashdsa.warmup_kl_loss` (which validates the inputs and calls
    this); gradients reach iq, ik and weights only. ``lse=None``: computed here (one more
    pass of q.kv)."""
    kl = torch.ops.flashdsa.indexer_kl_fwd(q.detach(), kv.detach(), None if lse is None else lse.detach(),
                                           iq, ik, weights, None, ks, ke, None, float(sm_scale))[0]
    return reduce_loss(kl, reduction)


def sparse_kl_loss(iq, ik, weights, q, kv, lse, sm_scale, indices, reduction="sum"):
    """Blockwise sparse-stage loss over the selected slots ``indices`` [T, 1, topk], its
    target recomputed from the attention's q, kv and lse. Same contract as
    :func:`flashdsa.sparse_kl_loss`. When the attention is flashdsa's,
    :func:`sparse_kl_loss_from_probs` is cheaper (no second q.kv pass)."""
    kl = torch.ops.flashdsa.indexer_kl_fwd(q.detach(), kv.detach(), None if lse is None else lse.detach(),
                                           iq, ik, weights, indices, None, None, None, float(sm_scale))[0]
    return reduce_loss(kl, reduction)


def sparse_kl_loss_from_probs(iq, ik, weights, attn_probs, indices, reduction="sum"):
    """Blockwise sparse-stage loss with the target given: ``attn_probs`` [T, topk], the
    head-mean attention probabilities of the slots ``indices`` [T, 1, topk] (what
    ``flashdsa.sparse_mla_fwd(..., return_probs=True)`` returns). Only the index scores are
    computed here. Same contract as :func:`flashdsa.sparse_kl_loss_from_probs`."""
    kl = torch.ops.flashdsa.indexer_kl_fwd(None, None, None, iq, ik, weights, indices, None, None,
                                           attn_probs.detach(), 0.0)[0]
    return reduce_loss(kl, reduction)
