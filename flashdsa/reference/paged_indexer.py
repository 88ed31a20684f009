"""Reference of the paged indexer key cache and paged decode scoring (SPEC 4).

Layout (DeepGEMM / vLLM, see flashdsa.layout): a uint8 tensor [num_blocks, PAGE * (D + 4)]
(PAGE = PAGE_SIZE = 64 tokens, D = 128: 64 * 132 bytes). In each block the PAGE x D e4m3
key bytes come first, token after token, then PAGE fp32 scales (one a token). Logical
position p of sequence b lives in physical block block_table[b, p // PAGE], row p % PAGE;
its physical slot is block_table[b, p // PAGE] * PAGE + p % PAGE.

Decode with next_n query tokens a sequence (1, or 2 for speculative/MTP steps): the
j-th query of a sequence with context length n sees keys [0, n - next_n + j] (SPEC 4).
"""
from __future__ import annotations

import torch

from ..layout import PAGE_SIZE, indexer_cache_views
from .indexer import indexer_logits
from .quant import act_quant
from .topk import topk_indices


def indexer_cache_write_fp8(cache: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, slots: torch.Tensor,
                            page_size: int = PAGE_SIZE) -> None:
    """Store already quantized keys k8 [N, D] e4m3 with scales k_scale [N] fp32 at the
    physical ``slots [N]`` of ``cache`` (in place); slots < 0 are skipped (padding)."""
    d = k8.shape[-1]
    keys, scales = indexer_cache_views(cache, d, page_size)
    ok = slots >= 0
    s = slots[ok].long()
    blk, row = s // page_size, s % page_size
    keys[blk, row] = k8[ok].view(torch.uint8)
    scales[blk, row] = k_scale[ok].float().contiguous().view(torch.uint8).view(-1, 4)


def indexer_cache_write(cache: torch.Tensor, k: torch.Tensor, slots: torch.Tensor,
                        page_size: int = PAGE_SIZE) -> None:
    """Quantize keys k [N, D] (one ue8m0 block of D a token, SPEC 1) and store them at
    ``slots`` (see :func:`indexer_cache_write_fp8`)."""
    k8, scale = act_quant(k, k.shape[-1], "ue8m0")
    indexer_cache_write_fp8(cache, k8, scale[:, 0], slots, page_size)


def indexer_cache_read(cache: torch.Tensor, slots: torch.Tensor, head_dim: int, page_size: int = PAGE_SIZE):
    """(k8 [N, D] e4m3, k_scale [N] fp32) stored at physical ``slots [N]`` (all valid)."""
    keys, scales = indexer_cache_views(cache, head_dim, page_size)
    s = slots.long()
    blk, row = s // page_size, s % page_size
    k8 = keys[blk, row].contiguous().view(torch.float8_e4m3fn)
    scale = scales[blk, row].contiguous().view(torch.float32)[:, 0]
    return k8, scale


def logical_slots(block_table: torch.Tensor, b: int, n: int, page_size: int = PAGE_SIZE) -> torch.Tensor:
    """Physical slots [n] of positions 0..n-1 of sequence b."""
    pos = torch.arange(n, device=block_table.device)
    return block_table[b, pos // page_size].long() * page_size + pos % page_size


def paged_indexer_logits(q8: torch.Tensor, cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, max_context_len: int | None = None,
                         page_size: int = PAGE_SIZE) -> torch.Tensor:
    """Decode index scores over the paged key cache.

    q8 [B, next_n, H, D] e4m3, cache uint8 [num_blocks, page_size * (D + 4)], weights
    [B * next_n, H] fp32 (folded as in SPEC 1), context_lens [B] int32, block_table
    [B, max_blocks] int32. Returns [B * next_n, max_context_len] fp32 over LOGICAL
    positions (default width max_blocks * page_size): -inf past each query's causal limit
    context_len - next_n + j."""
    bsz, next_n, h, d = q8.shape
    width = block_table.shape[1] * page_size if max_context_len is None else max_context_len
    out = torch.full((bsz * next_n, width), float("-inf"), dtype=torch.float32, device=q8.device)
    j = torch.arange(next_n, device=q8.device, dtype=torch.int32)
    for b in range(bsz):
        n = int(context_lens[b])
        if n == 0:
            continue
        k8, ksc = indexer_cache_read(cache, logical_slots(block_table, b, n, page_size), d, page_size)
        ke = (n - next_n + j + 1).clamp(min=0).to(torch.int32)
        ks = torch.zeros_like(ke)
        rows = slice(b * next_n, (b + 1) * next_n)
        out[rows, :n] = indexer_logits(q8[b], k8, ksc, weights[rows], ks, ke).float()
    return out


def paged_indexer_topk(q8: torch.Tensor, cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                       block_table: torch.Tensor, topk: int, page_size: int = PAGE_SIZE) -> torch.Tensor:
    """[B * next_n, topk] int32 PHYSICAL slots of the top-k keys of each decode query
    (ready for sparse_mla_decode), -1 padded. Arguments as :func:`paged_indexer_logits`."""
    bsz, next_n, h, d = q8.shape
    out = torch.full((bsz * next_n, topk), -1, dtype=torch.int32, device=q8.device)
    j = torch.arange(next_n, device=q8.device, dtype=torch.int32)
    for b in range(bsz):
        n = int(context_lens[b])
        if n == 0:
            continue
        slots = logical_slots(block_table, b, n, page_size)
        k8, ksc = indexer_cache_read(cache, slots, d, page_size)
        ke = (n - next_n + j + 1).clamp(min=0).to(torch.int32)
        ks = torch.zeros_like(ke)
        rows = slice(b * next_n, (b + 1) * next_n)
        logits = indexer_logits(q8[b], k8, ksc, weights[rows], ks, ke)
        pos = topk_indices(logits, ks, ke, topk).long()
        out[rows] = torch.where(pos >= 0, slots[pos.clamp(min=0)], -1).to(torch.int32)
    return out
