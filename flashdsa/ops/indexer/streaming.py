"""Streaming top-k of the indexer scores: exact on any input, the fallback of the
threshold method (flashdsa.ops.indexer.threshold) and ``method="streaming"``.

Each program keeps, per query row, a candidate buffer of CAP >= topk + BLOCK_N (score
key, index) pairs in global memory (O(S * topk) scratch) and a threshold ``thr`` that
only rises:

- a tile's scores above ``thr`` are appended (positions by a cumsum over the tile);
- when a buffer could overflow, an exact radix (binary) search over the score keys
  (flashdsa.ops.indexer.selection) finds the topk-th largest key T; the buffer is
  compacted in place to exactly topk entries (ties at T kept in position order) and
  ``thr`` becomes T: later scores <= T can never enter the top-k (exact up to ties);
- at the end the same selection writes the row's topk indices, -1 padded.

When there are few query blocks (decode), the key axis is split over programs; each
split selects its own top-k and a torch.topk over the n_split * topk candidates merges
them (:func:`merge_splits`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout import PAGE_SIZE
from ..common import pdl_launch, pdl_prologue
from .scores import (Problem, block_range, choose_split, dot_mode, load_keys, load_rows, program_split, query_rows,
                     tile_scores)
from .selection import INT32_MIN, INT32_MIN_C, score_key, scratch, take_topk


@triton.jit
def _select_row(bkey_ptr, bidx_ptr, base, cnt, thr, k, CAP: tl.constexpr):
    """Exact top-k of one buffer row (base: int64 offset, cnt slots; slots holding
    INT32_MIN are empty). Returns (take, pos, keys, idx, T, n_take, full) as
    :func:`take_topk`. Rows are done one at a time so the [CAP] tiles stay in registers."""
    c = tl.arange(0, CAP)
    inb = c < cnt
    keys = tl.load(bkey_ptr + base + c, mask=inb, other=INT32_MIN_C)
    idx = tl.load(bidx_ptr + base + c, mask=inb, other=-1)
    valid = inb & (keys != INT32_MIN_C)
    take, pos, n_take, nvalid, T, full = take_topk(keys, valid, thr, k)
    return take, pos, keys, idx, T, n_take, full


@triton.jit
def _row(x, jr, j):
    """Element j of a small per-row vector x [BLOCK_Q] as a scalar."""
    return tl.sum(tl.where(jr == j, x, 0), axis=0)


@triton.jit
def indexer_topk_kernel(
    q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, bt_ptr,
    bkey_ptr, bidx_ptr, okey_ptr, oidx_ptr, fail_ptr,
    S, S_kv, H, NEXT_N, split_len, n_split, topk,
    stride_qs, stride_qh, stride_k, stride_ws, stride_bt,
    D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, CAP: tl.constexpr,
    TOPK_PAD: tl.constexpr, DOT: tl.constexpr, PAGED: tl.constexpr, HEAVY_FIRST: tl.constexpr,
    ONLY_FAILED: tl.constexpr, PDL: tl.constexpr = False,
):
    """Streaming top-k (the exact fallback of the threshold top-k). Buffers bkey/bidx
    [S * n_split, CAP] int32 (scratch); outputs okey/oidx [S * n_split, topk] int32: per
    (row, split) its top-k keys and indices (-1 / INT32_MIN padded), in buffer order.
    ONLY_FAILED: programs none of whose rows is flagged in fail [S] return at once.

    The key tiles are walked in segments: a segment is as many tiles as the fullest
    buffer has room for, so its inner loop never compacts and stays a plain loop that
    Triton software-pipelines (loads of the next tiles in flight during the dots);
    compactions happen between segments. A tile's scores above the threshold are
    appended at positions given by a cumsum over the tile. PDL: see
    flashdsa.ops.common.pdl_prologue."""
    pdl_prologue(PDL)
    pid_q, pid_s, n_start, n_end = program_split(split_len, S_kv, HEAVY_FIRST)
    if ONLY_FAILED:  # almost every program holds no flagged row: it exits before loading its queries
        f_rows, f_mask = query_rows(pid_q, S, NEXT_N, BLOCK_Q, PAGED)
        if tl.max(tl.load(fail_ptr + f_rows, mask=f_mask, other=0)) == 0:
            return
    qT, w, rows, rmask, ks, ke = load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
                                           stride_qs, stride_qh, stride_ws, D, D_PAD, BLOCK_Q, H_PAD, PAGED)
    lo, hi = block_range(ks, ke, rmask, n_start, n_end, BLOCK_N)
    base = (rows.to(tl.int64) * n_split + pid_s) * CAP  # [BLOCK_Q] buffer rows
    jr = tl.arange(0, BLOCK_Q)
    thr = tl.full([BLOCK_Q], INT32_MIN_C, tl.int32)
    cnt = tl.zeros([BLOCK_Q], dtype=tl.int32)
    seg = lo
    while seg < hi:
        room = (CAP - tl.max(cnt)) // BLOCK_N  # >= 1: cnt <= CAP - BLOCK_N here
        seg_end = tl.minimum(seg + room * BLOCK_N, hi)
        for n0 in range(seg, seg_end, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            kmask = offs < hi  # hi <= n_end; past it a paged block table may hold garbage
            k8, kscale, kidx, kmask = load_keys(k_ptr, ksc_ptr, bt_ptr, offs, kmask, pid_q, stride_k,
                                                stride_bt, D, D_PAD, PAGE, PAGED, DOT)
            s = tile_scores(k8, kscale, qT, w, BLOCK_N, BLOCK_Q, H_PAD, DOT)  # [BLOCK_N, BLOCK_Q]
            key = score_key(s)
            inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :]) & kmask[:, None]
            keep = inside & (key > thr[None, :]) & rmask[None, :]
            keep_i = keep.to(tl.int32)
            pos = cnt[None, :] + tl.cumsum(keep_i, axis=0) - 1
            ptr = base[None, :] + pos
            tl.store(bkey_ptr + ptr, key, mask=keep)
            tl.store(bidx_ptr + ptr, tl.broadcast_to(kidx[:, None], [BLOCK_N, BLOCK_Q]), mask=keep)
            cnt += tl.sum(keep_i, axis=0)
        seg = seg_end
        if (tl.max(cnt) > CAP - BLOCK_N) & (seg < hi):
            # the next tile could overflow a buffer: shrink every row with more than topk
            # entries to exactly topk and raise its threshold to the topk-th key
            tl.debug_barrier()  # appends by other threads must be visible
            for j in tl.static_range(BLOCK_Q):
                base_j = _row(base, jr, j)
                take, pos2, keys, idx, T, n_take, full = _select_row(
                    bkey_ptr, bidx_ptr, base_j, _row(cnt, jr, j), _row(thr, jr, j), topk, CAP)
                tl.debug_barrier()  # every thread has read its entries before any moves
                tl.store(bkey_ptr + base_j + pos2, keys, mask=take)
                tl.store(bidx_ptr + base_j + pos2, idx, mask=take)
                thr = tl.where(tl.where(full, jr == j, False), T, thr)
                cnt = tl.where(jr == j, n_take, cnt)
            tl.debug_barrier()
    tl.debug_barrier()
    p = tl.arange(0, TOPK_PAD)
    for j in tl.static_range(BLOCK_Q):
        base_j = _row(base, jr, j)
        take, pos, keys, idx, T, n_take, full = _select_row(
            bkey_ptr, bidx_ptr, base_j, _row(cnt, jr, j), _row(thr, jr, j), topk, CAP)
        live = _row(rmask.to(tl.int32), jr, j) > 0
        obase = (_row(rows, jr, j).to(tl.int64) * n_split + pid_s) * topk
        take = tl.where(live, take, False)
        tl.store(okey_ptr + obase + pos, keys, mask=take)
        tl.store(oidx_ptr + obase + pos, idx, mask=take)
        pad = tl.where(live, (p >= n_take) & (p < topk), False)
        tl.store(okey_ptr + obase + p, tl.full([TOPK_PAD], INT32_MIN_C, tl.int32), mask=pad)
        tl.store(oidx_ptr + obase + p, tl.full([TOPK_PAD], -1, tl.int32), mask=pad)



def merge_splits(okey: torch.Tensor, oidx: torch.Tensor, rows: int, n_split: int, topk: int) -> torch.Tensor:
    """[rows * n_split, topk] per-split selections -> [rows, topk] int32 indices."""
    if n_split == 1:
        return oidx.view(rows, topk)
    okey = okey.view(rows, n_split * topk)
    oidx = oidx.view(rows, n_split * topk)
    best, pos = okey.topk(topk, dim=1)
    idx = oidx.gather(1, pos)
    return torch.where(best > INT32_MIN, idx, -1).to(torch.int32)


def topk_cap(topk: int, block_n: int) -> int:
    """Streaming top-k buffer length: room for topk survivors plus one tile of newcomers."""
    return triton.next_power_of_2(topk + block_n)


def streaming_topk(p: Problem, topk: int, min_split: int, n_split: int | None = None,
                   out: torch.Tensor | None = None, fail: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, topk] int32 by the streaming kernel (exact, no threshold; scratch
    16 * rows * n_split * CAP bytes). With ``fail`` [rows] int32, only programs holding
    a flagged row run and the key axis is not split (no host sync: CUDA-graph safe);
    they write into ``out``."""
    cfg = p.topk_cfg or p.cfg
    bn = cfg["BLOCK_N"]
    cap = topk_cap(topk, bn)
    if fail is not None:
        n_split, split_len = 1, triton.cdiv(max(p.n_pos, 1), bn) * bn
    else:
        n_split, split_len = choose_split(p.n_prog(cfg), max(p.n_pos, 1), bn, p.q.device, max(cap, min_split),
                                          n_split)
    dev = p.q.device
    bkey, bidx, okey = (scratch(p.rows * n_split, n, device=dev) for n in (cap, cap, topk))
    oidx = out if fail is not None else scratch(p.rows * n_split, topk, device=dev)
    indexer_topk_kernel[(p.n_prog(cfg), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, p.ctx, p.bt,
        bkey, bidx, okey, oidx, p.w if fail is None else fail,
        p.rows, max(p.n_pos, 1), p.q.shape[1], p.next_n, split_len, n_split, topk,
        p.q.stride(0), p.q.stride(1), 0 if p.paged else p.k.stride(0), p.w.stride(0),
        p.bt.stride(0) if p.paged else 0, **p.dims(),
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_N=bn, PAGE=PAGE_SIZE, CAP=cap,
        TOPK_PAD=triton.next_power_of_2(topk), DOT=dot_mode(p.q), PAGED=p.paged, HEAVY_FIRST=not p.paged,
        ONLY_FAILED=fail is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(dev))
    return out if fail is not None else merge_splits(okey, oidx, p.rows, n_split, topk)

