"""Differentiable sparse MLA attention on the Triton kernels, visible to torch.compile.

Three layers (the flash-attention interface pattern):
  1. raw ops registered with ``torch.library.custom_op`` plus ``register_fake`` (shape and
     dtype propagation without running a kernel), so torch.compile traces them as opaque
     nodes instead of graph-breaking on Triton launches:
       ``flashdsa::sparse_mla_fwd(q, kv, indices, sm_scale, d_v, probs_bytes, impl)
                                  -> (out, max_logits, lse, probs)`` (probs [s_q, 0] unless
                                  probs_bytes is 2 (fp16 scratch) or 1 (e4m3 scratch); impl:
                                  "auto", "triton" or "gluon", see run_sparse_mla_fwd)
       ``flashdsa::sparse_mla_bwd(q, kv, indices, out, dout, lse, dlse, sm_scale, d_v,
                                  deterministic) -> (dq, dkv)``
  2. the autograd formula attached with ``torch.library.register_autograd``: it saves q,
     kv, indices, out and lse and calls the backward op (``max_logits`` and ``probs`` are
     not differentiable; ``lse`` is, through dS += P * dlse);
  3. :func:`sparse_mla_fwd`, the host function ``flashdsa.sparse_mla_fwd`` dispatches to
     for ``backend="triton"``.

Determinism: when ``torch.use_deterministic_algorithms(True)`` is on, the backward uses
the fixed-order dkv reduction (bitwise reproducible, more memory) instead of atomics.

Module split of the op: fwd.py (forward kernel and launcher), fwd_fp8.py (fp8_ds_mla
kernel), decode.py (paged decode), bwd.py (backward), op.py (this).
"""
from __future__ import annotations

from typing import Optional

import torch

from .bwd import run_sparse_mla_bwd
from .fwd import run_sparse_mla_fwd


@torch.library.custom_op("flashdsa::sparse_mla_fwd", mutates_args=())
def _sparse_mla_fwd_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                       d_v: int, probs_bytes: int, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    res = run_sparse_mla_fwd(q, kv, indices, sm_scale, d_v, return_probs=probs_bytes > 0,
                             probs_dtype=torch.float8_e4m3fn if probs_bytes == 1 else torch.float16, impl=impl)
    probs = res[3] if probs_bytes else q.new_empty(q.shape[0], 0, dtype=torch.float32)
    # custom_op outputs may not alias inputs or each other; the kernels allocate fresh.
    return res[0], res[1], res[2], probs


@_sparse_mla_fwd_op.register_fake
def _(q, kv, indices, sm_scale, d_v, probs_bytes, impl):
    s_q, h = q.shape[0], q.shape[1]
    return (q.new_empty(s_q, h, d_v), q.new_empty(s_q, h, dtype=torch.float32),
            q.new_empty(s_q, h, dtype=torch.float32),
            q.new_empty(s_q, indices.shape[-1] if probs_bytes else 0, dtype=torch.float32))


@torch.library.custom_op("flashdsa::sparse_mla_bwd", mutates_args=())
def _sparse_mla_bwd_op(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                       dout: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor], sm_scale: float,
                       d_v: int, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return run_sparse_mla_bwd(q, kv, indices, out, dout, lse, sm_scale, d_v, dlse=dlse, deterministic=deterministic)


@_sparse_mla_bwd_op.register_fake
def _(q, kv, indices, out, dout, lse, dlse, sm_scale, d_v, deterministic):
    return torch.empty_like(q), torch.empty_like(kv)


def _setup_context(ctx, inputs, output):
    q, kv, indices, sm_scale, d_v, _, _ = inputs
    out, max_logits, lse, probs = output
    ctx.save_for_backward(q, kv, indices, out, lse)
    ctx.sm_scale, ctx.d_v = sm_scale, d_v
    ctx.mark_non_differentiable(max_logits, probs)


def _backward(ctx, dout, dmax_logits, dlse, dprobs):
    q, kv, indices, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dkv = _sparse_mla_bwd_op(q, kv, indices, out, dout.contiguous(), lse, dlse, ctx.sm_scale, ctx.d_v,
                                 torch.are_deterministic_algorithms_enabled())
    return dq, dkv, None, None, None, None, None


torch.library.register_autograd("flashdsa::sparse_mla_fwd", _backward, setup_context=_setup_context)


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                   return_probs: bool = False, probs_precision: str = "e4m3", impl: str = "auto"):
    """Sparse MLA forward on the GPU kernels, differentiable in q and kv (and through lse).

    Same contract as :func:`flashdsa.ops.sparse_mla.fwd.run_sparse_mla_fwd`: q [s_q, h_q, d_qk],
    kv [s_kv, 1, d_qk], indices [s_q, 1, topk] int32 -> (out [s_q, h_q, d_v] in q.dtype,
    max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32), plus the head-mean probs [s_q, topk]
    fp32 (not differentiable) with ``return_probs``, through a scratch of ``probs_precision``
    ("e4m3" or "fp16"). ``impl``: which forward kernel, see run_sparse_mla_fwd. Inputs
    assumed validated.
    """
    probs_bytes = (1 if probs_precision == "e4m3" else 2) if return_probs else 0
    res = torch.ops.flashdsa.sparse_mla_fwd(q, kv, indices, float(sm_scale), int(d_v), probs_bytes, impl)
    return res if return_probs else res[:3]


def sparse_mla_bwd(q, kv, indices, out, dout, lse, sm_scale, d_v=512, dlse=None, deterministic=False):
    """The registered backward op (dq, dkv); see flashdsa.ops.sparse_mla.bwd."""
    return torch.ops.flashdsa.sparse_mla_bwd(q, kv, indices, out, dout, lse, dlse, float(sm_scale), int(d_v),
                                             bool(deterministic))
