"""DeepGEMM's lightning-indexer scoring API (``deep_gemm``) on flashdsa's indexer ops::

    logits = fp8_mqa_logits(q, (k, k_scale), weights, cu_seq_len_k_start, cu_seq_len_k_end)
    schedule_meta = get_paged_mqa_logits_metadata(context_lens, block_kv, get_num_sms())
    logits = fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table,
                                  schedule_meta, max_context_len, clean_logits=False)

What differs from flashdsa's own ops, and is converted here:
- ``fp8_mqa_logits`` takes the keys as one ``(k, k_scale)`` tuple and ranges that may
  reach outside ``[0, seq_len_kv)`` (clamped here); with ``max_seqlen_k > 0`` it returns
  the compressed ``[seq_len, max_seqlen_k]`` form, column j of row i being key
  ``cu_seq_len_k_start[i] + j``. :func:`flashdsa.indexer_logits` always returns
  ``[seq_len, seq_len_kv]``, so the compressed form is gathered from it here (the full
  scores are materialized once).
- DeepGEMM's paged key cache is 4-d, ``[num_blocks, block_kv, 1, D + 4]`` uint8, a
  reinterpretation of the bytes of each block (the ``block_kv * D`` fp8 keys, then the
  ``block_kv`` fp32 scales); flashdsa's is the same bytes as ``[num_blocks, 64 * (D + 4)]``.
  flashdsa's pages hold 64 tokens: ``block_kv`` must be 64.
- ``fp8_paged_mqa_logits`` also takes ``context_lens`` as ``[batch, next_n]`` (query j of
  sequence b sees positions < context_lens[b, j]) and any ``next_n``; flashdsa's op takes
  ``[batch]`` with next_n 1 or 2, so those calls run as next_n = 1 over every query.
- ``clean_logits=False`` leaves the scores outside each query's range unspecified in
  DeepGEMM; flashdsa writes -inf there either way.
- ``weights`` may be fp16 (DeepGEMM's faster fp16-accumulation kernel); flashdsa scores
  in fp32 with the weights converted.
- The schedule metadata is a placeholder of DeepGEMM's shape; flashdsa's kernels do not
  read it.
"""
from __future__ import annotations

import torch

from .. import api
from .._validate import check, check_tensor
from ..layout import PAGE_SIZE


def get_num_sms() -> int:
    """Multiprocessors of the current CUDA device (1 without one): what DeepGEMM's
    callers pass to :func:`get_paged_mqa_logits_metadata`."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 1


def _weights(weights: torch.Tensor) -> torch.Tensor:
    return weights.float() if weights.dtype == torch.float16 else weights


def fp8_mqa_logits(q: torch.Tensor, kv: tuple, weights: torch.Tensor, cu_seq_len_k_start: torch.Tensor,
                   cu_seq_len_k_end: torch.Tensor, clean_logits: bool = True, max_seqlen_k: int = 0, *,
                   backend: str = "auto") -> torch.Tensor:
    """DeepGEMM's prefill index scores: ``logits[i, j] = k_scale[j] * sum_h weights[i, h] *
    ReLU(q[i, h] . k[j])`` for ``cu_seq_len_k_start[i] <= j < cu_seq_len_k_end[i]``, -inf
    elsewhere; fp32 ``[seq_len, seq_len_kv]``, or ``[seq_len, max_seqlen_k]`` (column j =
    key ``cu_seq_len_k_start[i] + j``) when ``max_seqlen_k > 0``.

    q [seq_len, num_heads, head_dim] e4m3; kv = (k [seq_len_kv, head_dim] e4m3, k_scale
    [seq_len_kv] fp32); weights [seq_len, num_heads] fp32 (or fp16); the ranges [seq_len]
    int32. :func:`flashdsa.indexer_logits` computes it."""
    check(isinstance(kv, (tuple, list)) and len(kv) == 2, TypeError,
          f"kv: expected a (k [seq_len_kv, head_dim], k_scale [seq_len_kv]) tuple, got {type(kv).__name__}")
    k, k_scale = kv
    check_tensor("kv[1]", k_scale, layout="[seq_len_kv] fp32 scales")
    if k_scale.dim() == 2 and k_scale.shape[1] == 1:
        k_scale = k_scale[:, 0]
    check_tensor("kv[0]", k, ndim=2, layout="[seq_len_kv, head_dim]")
    check(isinstance(max_seqlen_k, int) and max_seqlen_k >= 0, ValueError,
          f"max_seqlen_k: expected a non-negative int, got {max_seqlen_k!r}")
    s_kv = k.shape[0]
    check_tensor("cu_seq_len_k_start", cu_seq_len_k_start, ndim=1, layout="[seq_len] int32")
    check_tensor("cu_seq_len_k_end", cu_seq_len_k_end, ndim=1, layout="[seq_len] int32")
    ks = cu_seq_len_k_start.clamp(0, s_kv)
    ke = torch.maximum(cu_seq_len_k_end.clamp(0, s_kv), ks)   # an empty or reversed range scores nothing
    logits = api.indexer_logits(q, k, k_scale, _weights(weights), ks.to(cu_seq_len_k_start.dtype),
                                ke.to(cu_seq_len_k_end.dtype), backend=backend)
    if not max_seqlen_k:
        return logits
    cols = ks.long()[:, None] + torch.arange(max_seqlen_k, device=q.device)   # [seq_len, max_seqlen_k]
    inside = cols < ke.long()[:, None]
    packed = logits.gather(1, cols.clamp(max=max(s_kv - 1, 0))) if s_kv else logits.new_empty(cols.shape)
    return packed.masked_fill(~inside, float("-inf"))


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int) -> torch.Tensor:
    """DeepGEMM's schedule for :func:`fp8_paged_mqa_logits`: an int32 ``[num_sms + 1, 2]``
    placeholder (flashdsa's paged kernels schedule themselves and do not read it)."""
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), layout="[batch] or [batch, next_n] int32")
    check(isinstance(num_sms, int) and num_sms > 0, ValueError, f"num_sms: expected a positive int, got {num_sms!r}")
    return torch.zeros(num_sms + 1, 2, dtype=torch.int32, device=context_lens.device)


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor, schedule_meta,
                         max_context_len: int, clean_logits: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """DeepGEMM's decode index scores over the paged key cache: fp32
    ``[batch * next_n, max_context_len]`` over logical positions, -inf outside what each
    query sees: with ``context_lens`` [batch], query j of sequence b sees positions
    <= context_lens[b] - next_n + j; with ``context_lens`` [batch, next_n], positions
    < context_lens[b, j].

    q [batch, next_n, num_heads, head_dim] e4m3; kv_cache [num_blocks, 64, 1, head_dim + 4]
    uint8 (each block: 64 * head_dim key bytes, then 64 fp32 scales); weights
    [batch * next_n, num_heads] fp32 (or fp16); block_table [batch, max_blocks] int32.
    ``schedule_meta`` and ``clean_logits`` are accepted and not read.
    :func:`flashdsa.paged_indexer_logits` computes it."""
    check_tensor("q", q, ndim=4, layout="[batch, next_n, num_heads, head_dim]")
    bsz, next_n, _, d = q.shape
    check_tensor("kv_cache", kv_cache, ndim=4, device=q.device, layout="[num_blocks, block_kv, 1, head_dim + 4]")
    check(kv_cache.shape[1:] == (PAGE_SIZE, 1, d + 4), ValueError,
          f"kv_cache: expected [num_blocks, {PAGE_SIZE}, 1, {d + 4}] (flashdsa's pages hold {PAGE_SIZE} tokens), "
          f"got {tuple(kv_cache.shape)}")
    cache = kv_cache.reshape(kv_cache.shape[0], PAGE_SIZE * (d + 4))   # same bytes, flashdsa's 2-d view
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), device=q.device,
                 layout="[batch] or [batch, next_n] int32")
    check(context_lens.shape in ((bsz,), (bsz, next_n)), ValueError,
          f"context_lens: expected shape [{bsz}] or [{bsz}, {next_n}], got {tuple(context_lens.shape)}")
    weights = _weights(weights)
    if context_lens.dim() == 1 and next_n in (1, 2):
        return api.paged_indexer_logits(q, cache, weights, context_lens, block_table, max_context_len,
                                        backend=backend)
    # Every query on its own (next_n = 1), seeing positions < its own length.
    if context_lens.dim() == 1:
        lens = context_lens[:, None] - next_n + 1 + torch.arange(next_n, device=q.device, dtype=torch.int32)
    else:
        lens = context_lens
    check_tensor("block_table", block_table, ndim=2, shape=(bsz, None), device=q.device,
                 layout="[batch, max_blocks] int32")
    return api.paged_indexer_logits(q.reshape(bsz * next_n, 1, *q.shape[2:]), cache, weights,
                                    lens.reshape(-1).clamp_min(0), block_table.repeat_interleave(next_n, dim=0),
                                    max_context_len, backend=backend)
