"""Sparse and dense MLA attention in absorbed (MQA) form (SPEC 3), and the paged sparse
decode over an MLA latent cache (SPEC 4), in plain PyTorch (kernels: flashdsa.ops.sparse_mla)."""
from __future__ import annotations

import torch

from .mla_cache import cache_rows


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _softmax_out(logits: torch.Tensor, values: torch.Tensor, any_valid: torch.Tensor, out_dtype):
    """Masked softmax of ``logits [s, h, k]`` (-inf = masked) applied to ``values [s, k, d_v]``:
    (out, max_logits, lse, the probabilities [s, h, k]).

    Rows with no valid entry (``any_valid`` False) give out 0, max_logits -inf and lse +inf.
    The logsumexp runs on a finite copy of such rows so that no NaN reaches autograd."""
    safe = logits.masked_fill(~any_valid[..., None], 0.0)
    lse = torch.logsumexp(safe, dim=-1)
    probs = torch.exp(logits - lse[..., None])  # exactly 0 where masked
    probs = probs.masked_fill(~any_valid[..., None], 0.0)
    out = torch.einsum("shk,skd->shd", probs, values).to(out_dtype)
    max_logits = logits.amax(dim=-1)
    lse = torch.where(any_valid, lse, torch.full_like(lse, float("inf")))
    return out, max_logits, lse, probs


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                   d_v: int = 512, return_probs: bool = False):
    """Attention of each query over only its selected key rows (FlashMLA sparse semantics).

    q [s_q, h_q, d_qk]; kv [s_kv, 1, d_qk] (one latent head shared by all query heads;
    the value is its first ``d_v`` dims); indices [s_q, 1, topk] integer rows of kv, where
    -1 or >= s_kv marks an unused slot. A row listed twice counts twice.

        logits[t, h, j] = sm_scale * q[t, h] . kv[indices[t, j]]
        out[t, h]       = sum_j softmax_j(logits[t, h]) * kv[indices[t, j], :d_v]

    Returns ``(out [s_q, h_q, d_v] in q.dtype, max_logits [s_q, h_q], lse [s_q, h_q])``,
    the last two in fp32 (float64 for float64 inputs), lse in natural log. A query with no
    valid index gets out 0, max_logits -inf and lse +inf. Differentiable in q and kv.
    ``return_probs``: also ``probs [s_q, topk]``, the mean over heads of softmax_j(logits)
    per slot (0 at invalid slots; detached), the sparse-stage target of the indexer loss.
    This reference gathers [s_q, topk, d_qk]: fine for checking, too big for real sizes.
    """
    ct = _compute_dtype(q)
    s_kv = kv.shape[0]
    idx = indices[:, 0, :].long()  # [s, k]
    valid = (idx >= 0) & (idx < s_kv)
    rows = kv[:, 0].to(ct)[idx.clamp(0, max(s_kv - 1, 0)) * valid]  # [s, k, d_qk]
    logits = torch.einsum("shd,skd->shk", q.to(ct), rows) * sm_scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    any_valid = valid.any(-1)[:, None].expand(-1, q.shape[1])
    out, max_logits, lse, probs = _softmax_out(logits, rows[..., :d_v], any_valid, q.dtype)
    if return_probs:
        return out, max_logits, lse, probs.detach().mean(1)
    return out, max_logits, lse


def dense_mla_fwd(q: torch.Tensor, kv: torch.Tensor, cu_seqlens: torch.Tensor, sm_scale: float,
                  d_v: int = 512):
    """Causal dense attention in absorbed form over a flattened batch of sequences.

    q [T, h_q, d_qk], kv [T, 1, d_qk]; ``cu_seqlens [B + 1]`` holds the sequence
    boundaries in the flattened T axis. Query t attends to the key rows of its own
    sequence up to and including t. Returns ``(out [T, h_q, d_v], lse [T, h_q])``.
    """
    ct = _compute_dtype(q)
    outs, lses = [], []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks = q[start:end].to(ct), kv[start:end, 0].to(ct)
        logits = torch.einsum("shd,kd->shk", qs, ks) * sm_scale
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal[:, None, :], float("-inf"))
        any_valid = torch.ones(n, q.shape[1], dtype=torch.bool, device=q.device)
        values = ks[None, :, :d_v].expand(n, -1, -1)
        out, _, lse, _ = _softmax_out(logits, values, any_valid, q.dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      d_v: int = 512, kv_format: str = "bf16", compute_dtype: torch.dtype | None = None):
    """Paged sparse MLA decode: gather rows by physical slot, then :func:`sparse_mla_fwd`.

    q [b, s_q, h_q, d_qk]; kv_cache as the format says (flashdsa.reference.mla_cache);
    indices [b, s_q, topk] physical slots (-1 or >= num_blocks * 64 = unused).
    ``compute_dtype`` (e.g. float64) upcasts q and the (dequantized) rows before the
    attention, for error references.
    Returns ``(out [b, s_q, h_q, d_v] in q.dtype, lse [b, s_q, h_q] fp32)``."""
    b, s_q, h_q, d_qk = q.shape
    rows = cache_rows(kv_cache, kv_format, compute_dtype)
    qq = q.reshape(b * s_q, h_q, d_qk)
    if compute_dtype is not None:
        qq = qq.to(compute_dtype)
    elif rows.dtype != qq.dtype:
        rows = rows.to(qq.dtype)
    out, _, lse = sparse_mla_fwd(qq, rows, indices.reshape(b * s_q, 1, -1), sm_scale, d_v)
    return out.to(q.dtype).reshape(b, s_q, h_q, d_v), lse.float().reshape(b, s_q, h_q)
