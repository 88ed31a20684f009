"""FlashMLA's Python API (``flash_mla``) on flashdsa's sparse MLA ops.

The interface is the one FlashMLA shipped with DeepSeek-V3.2 (its first sparse kernels)::

    tile_scheduler_metadata, num_splits = get_mla_metadata(
        cache_seqlens, s_q * h_q // h_kv, h_kv, h_q, is_fp8, topk)
    out, lse = flash_mla_with_kvcache(
        q, kvcache, block_table, cache_seqlens, dv, tile_scheduler_metadata, num_splits,
        causal=is_causal, is_fp8_kvcache=is_fp8_kvcache, indices=indices)
    out, max_logits, lse = flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512)

What differs from flashdsa's own ops, and is converted here:
- ``flash_mla_sparse_fwd`` returns ``max_logits`` and ``lse`` in base 2 (of the logits
  times log2(e)); :func:`flashdsa.sparse_mla_fwd` returns both in natural-log units.
- ``flash_mla_with_kvcache`` returns ``softmax_lse`` as ``[b, h_q, s_q]``;
  :func:`flashdsa.sparse_mla_decode` returns ``[b, s_q, h_q]`` (both natural log).
- FlashMLA's fp8 cache is a ``float8_e4m3fn`` (or byte) tensor ``[num_blocks, 64, 1, 656]``;
  flashdsa's ``"fp8_ds_mla"`` format holds the same 656 bytes a token as uint8.
- ``softmax_scale`` of ``flash_mla_with_kvcache`` defaults to ``head_dim ** -0.5`` as in
  FlashMLA (flashdsa requires it: that default is wrong for absorbed MLA).
- FlashMLA's dense decode (``indices=None``) reads ``cache_seqlens`` tokens through
  ``block_table``; here it is flashdsa's sparse decode over every one of those slots.
- Beyond FlashMLA: sparse decode also over bf16 pages (FlashMLA's needs the fp8 cache),
  and inputs in any float dtype (FlashMLA's are bf16).

Later FlashMLA releases changed this interface (natural-log ``max_logits``/``lse`` from
``flash_mla_sparse_fwd``, ``attn_sink``/``topk_length`` arguments, a scheduler object from
``get_mla_metadata``); those are not provided here.
"""
from __future__ import annotations

import math

import torch

from .. import api
from .._validate import check, check_tensor
from ..layout import PAGE_SIZE

LOG2E = math.log2(math.e)
TILE_SCHEDULER_METADATA_SIZE = 8  # int32 words per SM part in FlashMLA's scheduler metadata


def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_heads_q: int | None = None, is_fp8_kvcache: bool = False, topk: int | None = None):
    """FlashMLA's scheduler metadata call: returns ``(tile_scheduler_metadata [1, 8] int32,
    num_splits [batch_size + 1] int32)``, placeholders that :func:`flash_mla_with_kvcache`
    accepts and ignores (flashdsa's decode splits its work itself)."""
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), layout="[batch_size] int32")
    dev = cache_seqlens.device
    metadata = torch.zeros(1, TILE_SCHEDULER_METADATA_SIZE, dtype=torch.int32, device=dev)
    return metadata, torch.arange(cache_seqlens.shape[0] + 1, dtype=torch.int32, device=dev)


def flash_mla_sparse_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                         d_v: int = 512, *, backend: str = "auto"):
    """FlashMLA's sparse prefill: ``(out [s_q, h_q, d_v], max_logits [s_q, h_q] fp32,
    lse [s_q, h_q] fp32)``, ``max_logits`` and ``lse`` in base 2 as FlashMLA returns them:
    ``max_s(P)`` and ``log2(sum_s 2^P)`` with ``P = q.kv * sm_scale * log2(e)``.

    q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk], indices [s_q, 1, topk] int32 (-1 or >= s_kv
    invalid). A row with no valid index gets out 0, max_logits -inf and lse +inf.
    :func:`flashdsa.sparse_mla_fwd` computes it (natural-log results, rescaled here)."""
    out, max_logits, lse = api.sparse_mla_fwd(q, kv, indices, sm_scale, d_v, backend=backend)
    return out, max_logits * LOG2E, lse * LOG2E


def _fp8_cache_bytes(k_cache: torch.Tensor) -> torch.Tensor:
    """FlashMLA's fp8 cache (e4m3 tensor of 656 "values" a token) as flashdsa's uint8 bytes."""
    check_tensor("k_cache", k_cache, dtypes=(torch.float8_e4m3fn, torch.uint8),
                 layout="[num_blocks, 64, 1, 656] float8_e4m3fn or uint8 when is_fp8_kvcache")
    return k_cache if k_cache.dtype == torch.uint8 else k_cache.view(torch.uint8)


def _dense_slots(block_table: torch.Tensor, cache_seqlens: torch.Tensor, s_q: int, causal: bool) -> torch.Tensor:
    """Physical slots [b, s_q, max_blocks * 64] int32 of every position a dense decode query
    sees (-1 elsewhere): positions < cache_seqlens[b], and with ``causal`` query j of s_q
    only those <= cache_seqlens[b] - s_q + j."""
    b, max_blocks = block_table.shape
    pos = torch.arange(max_blocks * PAGE_SIZE, device=block_table.device)           # [L]
    slots = block_table[:, pos // PAGE_SIZE] * PAGE_SIZE + (pos % PAGE_SIZE).to(torch.int32)  # [b, L]
    limit = cache_seqlens.long()[:, None].expand(b, s_q)                            # [b, s_q]
    if causal:
        limit = limit - s_q + 1 + torch.arange(s_q, device=pos.device)
    seen = pos[None, None, :] < limit[..., None]                                    # [b, s_q, L]
    return torch.where(seen, slots[:, None, :], -1).to(torch.int32)


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None,
                           cache_seqlens: torch.Tensor | None, head_dim_v: int, tile_scheduler_metadata,
                           num_splits, softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices: torch.Tensor | None = None, *,
                           backend: str = "auto"):
    """FlashMLA's paged decode: ``(out [b, s_q, h_q, head_dim_v] in q.dtype,
    softmax_lse [b, h_q, s_q] fp32)``, lse in natural log (+inf and out 0 for a query that
    sees no token).

    q [b, s_q, h_q, head_dim]; k_cache [num_blocks, 64, 1, head_dim] (bf16 rows) or, with
    ``is_fp8_kvcache``, [num_blocks, 64, 1, 656] in the fp8 format (head_dim 576,
    head_dim_v 512). With ``indices`` [b, s_q, topk] int32 (physical slots
    ``block * 64 + offset``, -1 invalid) attention is sparse and ``block_table`` /
    ``cache_seqlens`` are not read; without, every token < ``cache_seqlens[b]`` of the
    pages in ``block_table`` [b, max_blocks] is attended (``causal``: query j of s_q sees
    positions <= cache_seqlens[b] - s_q + j). ``tile_scheduler_metadata`` and
    ``num_splits`` (from :func:`get_mla_metadata`) are accepted and not read.
    :func:`flashdsa.sparse_mla_decode` computes it."""
    check_tensor("q", q, ndim=4, layout="[batch_size, seq_len_q, num_heads_q, head_dim]")
    check_tensor("k_cache", k_cache, ndim=4, device=q.device, layout="[num_blocks, page_block_size, 1, head_dim]")
    check(k_cache.shape[1] == PAGE_SIZE and k_cache.shape[2] == 1, ValueError,
          f"k_cache: flashdsa's paged cache has pages of {PAGE_SIZE} tokens and one kv head, got shape "
          f"{tuple(k_cache.shape)}")
    cache = _fp8_cache_bytes(k_cache) if is_fp8_kvcache else k_cache
    kv_format = "fp8_ds_mla" if is_fp8_kvcache else "bf16"
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if indices is not None:
        check(not causal, ValueError, "causal: must be False when indices are given (sparse attention)")
    else:
        b, s_q = q.shape[:2]
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), shape=(b, None), device=q.device,
                     layout="[batch_size, max_num_blocks_per_seq] int32")
        check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), shape=(b,), device=q.device,
                     layout="[batch_size] int32")
        indices = _dense_slots(block_table, cache_seqlens, s_q, causal)
    out, lse = api.sparse_mla_decode(q, cache, indices, softmax_scale, head_dim_v, kv_format, backend=backend)
    return out, lse.transpose(1, 2).contiguous()
