"""The paged (decode) lightning indexer (SPEC 4) and the write path of its key cache.

The scores and streaming top-k kernels are those of the ragged op run with PAGED=True:
one program takes the next_n (1 or 2) query tokens of ONE sequence (they share its
keys) and walks a split of its logical positions in tiles of BLOCK_N keys; each key's
physical block comes from the block table, so a tile may span several pages. Key
bytes are loaded as uint8 and reinterpreted as e4m3; the scales are read through an
fp32 view of the same cache storage. Top-k returns physical slots (block * 64 + row),
what ``sparse_mla_decode`` takes.

Cache layout (flashdsa.layout): uint8 [num_blocks, PAGE_SIZE * (D + 4)], each block =
PAGE_SIZE x D e4m3 key bytes, then PAGE_SIZE fp32 scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout import PAGE_SIZE
from ..common import capability, interpreted, quantize_rows_ue8m0
from .scores import SCORES_STORE, Problem, as_bytes_without_e4m3, choose_split, default_config, launch_scores
from .threshold import select_topk

# Decode block sizes on sm_90 and newer (one sequence a program, so the dot's N is
# next_n * H_PAD), for the logits and the streaming top-k kernel: keys as in
# scores.CONFIGS. The measurements behind them are in docs/benchmarks_indexer.md.
PAGED_SM90 = dict(logits=dict(BLOCK_N=128, num_warps=4, num_stages=3),
                  topk=dict(BLOCK_N=64, num_warps=4, num_stages=3))


def _paged_config(q8: torch.Tensor, next_n: int, topk: bool, config: dict | None) -> dict:
    h = q8.shape[2]
    h_pad = triton.next_power_of_2(h)
    cfg = default_config(q8.device, h, topk=topk)
    if q8.device.type == "cuda" and not interpreted() and capability(q8.device) >= (9, 0):
        cfg.update(PAGED_SM90["topk" if topk else "logits"])
    # all next_n tokens of a sequence in one program (and N = BLOCK_Q * H_PAD >= 16)
    cfg["BLOCK_Q"] = max(triton.next_power_of_2(next_n), triton.cdiv(16, h_pad))
    cfg.update(config or {})
    if "store_warps" not in (config or {}):
        cfg["store_warps"] = cfg["num_warps"]  # one warp count for every mode in decode
    return cfg


def paged_problem(q8, kv_cache, weights, context_lens, block_table, max_context_len, config=None) -> Problem:
    """The paged Problem of a decode batch (q8 [B, next_n, H, D])."""
    bsz, next_n, h, d = q8.shape
    q, = as_bytes_without_e4m3(q8.reshape(bsz * next_n, h, d))
    return Problem(q, kv_cache, kv_cache.view(torch.float32), weights.float().contiguous(), context_lens,
                   context_lens, context_lens, block_table, max_context_len, next_n, True,
                   _paged_config(q8, next_n, False, config), _paged_config(q8, next_n, True, config))


def paged_indexer_logits(q8: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor, max_context_len: int,
                         config: dict | None = None, n_split: int | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """[B * next_n, max_context_len] fp32 scores over logical positions, -inf past each
    query's causal limit. q8 [B, next_n, H, D] e4m3, kv_cache uint8 [num_blocks,
    64 * (D + 4)], weights [B * next_n, H] fp32, context_lens [B] int32, block_table
    [B, max_blocks] int32 (inputs assumed validated)."""
    bsz, next_n = q8.shape[:2]
    if out is None:
        out = torch.empty(bsz * next_n, max_context_len, dtype=torch.float32, device=q8.device)
    if bsz == 0 or max_context_len == 0:
        return out
    p = paged_problem(q8, kv_cache, weights, context_lens, block_table, max_context_len, config)
    bn = p.cfg["BLOCK_N"]
    launch_scores(p, SCORES_STORE, choose_split(bsz, max_context_len, bn, q8.device, 8 * bn, n_split), out=out)
    return out


def paged_indexer_topk(q8: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                       context_lens: torch.Tensor, block_table: torch.Tensor, topk: int,
                       max_context_len: int | None = None, config: dict | None = None,
                       n_split: int | None = None, method: str = "auto") -> torch.Tensor:
    """[B * next_n, topk] int32 physical slots of each decode query's top-k keys, -1
    padded, in no particular order; materializes the scores only of short rows, in
    chunks (see flashdsa.ops.indexer.select_topk for the methods). ``max_context_len`` (default
    max_blocks * 64) bounds the positions walked; the key axis is split over programs
    when the batch alone does not fill the GPU, down to one BLOCK_N tile a program (at
    small batches the passes are latency-bound). CUDA-graph capturable."""
    if max_context_len is None:
        max_context_len = block_table.shape[1] * PAGE_SIZE
    p = paged_problem(q8, kv_cache, weights, context_lens, block_table, max(max_context_len, 1), config)
    return select_topk(p, topk, p.cfg["BLOCK_N"], n_split, method)


@triton.jit
def indexer_cache_write_kernel(k_ptr, slot_ptr, cache_ptr, scale_ptr, N, stride_k,
                               D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                               PAGE: tl.constexpr):
    """Quantize BLOCK_T keys (one e4m3 block of D each, ue8m0 scales, SPEC 1) into their
    slots. cache_ptr: the cache as uint8; scale_ptr: the same storage as fp32."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < N, other=-1).to(tl.int64)
    ok = slot >= 0  # negative slots are padding tokens: nothing is written
    d = tl.arange(0, D_PAD)
    x = tl.load(k_ptr + t.to(tl.int64)[:, None] * stride_k + d[None, :],
                mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    y8, scale = quantize_rows_ue8m0(x)  # integer encoding: exact on every backend, -0 kept
    store_key_rows(cache_ptr, scale_ptr, slot, ok, y8, scale, d, D, PAGE)


@triton.jit
def store_key_rows(cache_ptr, scale_ptr, slot, ok, y8, scale, d, D: tl.constexpr, PAGE: tl.constexpr):
    """Store e4m3 key bytes y8 [BLOCK, D_PAD] (int32) and scales [BLOCK] at int64 physical
    ``slot`` [BLOCK] of the cache (rows with ``ok`` False skipped; d = arange(D_PAD))."""
    blk = slot // PAGE
    row = slot % PAGE
    tl.store(cache_ptr + (blk * (PAGE * (D + 4)) + row * D)[:, None] + d[None, :], y8.to(tl.uint8),
             mask=ok[:, None] & (d[None, :] < D))
    tl.store(scale_ptr + blk * (PAGE * (D + 4) // 4) + PAGE * D // 4 + row, scale, mask=ok)


def indexer_cache_write(kv_cache: torch.Tensor, k: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize keys k [N, D] (float, last dim contiguous) into kv_cache uint8
    [num_blocks, 64 * (D + 4)] at physical ``slots [N]`` (in place; slots < 0 skipped)."""
    n, d = k.shape
    if n == 0:
        return
    block_t = 16 if interpreted() or k.device.type != "cuda" else 32
    indexer_cache_write_kernel[(triton.cdiv(n, block_t),)](
        k, slots, kv_cache, kv_cache.view(torch.float32), n, k.stride(0),
        D=d, D_PAD=max(triton.next_power_of_2(d), 16), BLOCK_T=block_t, PAGE=PAGE_SIZE, num_warps=4)
