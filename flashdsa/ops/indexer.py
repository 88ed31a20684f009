"""Triton lightning indexer (SPEC 1 and 2): FP8 logits and a fused, streaming top-k.

Scores (DeepGEMM ``fp8_mqa_logits`` semantics):

    logits[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q8[t, h] . k8[s])     ks[t] <= s < ke[t]
                 = -inf                                                     elsewhere

One program takes ``BLOCK_Q`` query rows (all their H heads: M = BLOCK_Q * H_PAD dot
columns) and walks one split of the key axis in tiles of ``BLOCK_N`` keys. Each tile is
ONE tensor-core dot with the keys as the M side (DeepGEMM's orientation):

    acc = k8[BLOCK_N, D] @ q8^T[D, BLOCK_Q * H_PAD]          fp32  [BLOCK_N, BLOCK_Q * H_PAD]
    s   = sum_h w * ReLU(acc)  (reshape to [BLOCK_N, BLOCK_Q, H_PAD], reduce the heads)
    s  *= k_scale                                                   [BLOCK_N, BLOCK_Q]

With keys on the M side the head reduction runs along the dot's N axis, which an MMA
accumulator keeps inside one thread (plus a quad shuffle), not across warps. Key tiles
wholly outside the union of the block's ranges [min ks, max ke) are never computed
(causal prefill: half the work); the logits kernel writes -inf there instead.

Top-k (``indexer_topk``) never materializes [S, S_kv]. Each program keeps, per query
row, a candidate buffer of CAP >= topk + BLOCK_N (score key, index) pairs in global
memory (O(S * topk) scratch) and a threshold ``thr`` that only rises:

- a tile's scores above ``thr`` are appended (positions by a cumsum over the tile);
- when a buffer could overflow, an exact radix (binary) search over the order-preserving
  int32 image of the fp32 scores finds the topk-th largest key T; the buffer is
  compacted in place to exactly topk entries (ties at T kept in position order) and
  ``thr`` becomes T: later scores <= T can never enter the top-k (exact up to ties);
- at the end the same selection writes the row's topk indices, -1 padded.

For long rows a threshold rises fast (after the first compaction only about
topk * ln(n / topk) of n keys are appended), so the selection costs little next to
the dots. When there are few query blocks (decode), the key axis is split over
programs; each split selects its own top-k and a torch.topk over the n_split * topk
candidates merges them.

Scores are compared as int32 "keys": for fp32 bits b, key = b if b >= 0 else
b ^ 0x7FFFFFFF, which orders like the floats (and -inf above every NaN pattern).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INT32_MIN = -(2 ** 31)
INT32_MIN_C = tl.constexpr(INT32_MIN)

# Block sizes per GPU family (H_I = 64, d_I = 128; QH = BLOCK_Q * H_PAD is the dot's N).
# BLOCK_N keys a tile (the dot's M; 64 = one wgmma M tile for a 4-warp warpgroup);
# num_stages: software-pipelining depth of the key tiles (8 KB each at D = 128 in fp8).
# Chosen by the variant sweep of benchmarks/bench_indexer.py on an H200 (2026-11-28,
# 4096 x 32K causal: 848 TFLOP/s for 64/256/4 warps, 686 for 128/128/8 warps;
# docs/benchmarks_indexer.md).
CONFIGS = {
    "sm90": dict(BLOCK_N=64, QH=256, num_warps=4, num_stages=3),
    "sm80": dict(BLOCK_N=64, QH=128, num_warps=4, num_stages=3),
    "small": dict(BLOCK_N=16, QH=32, num_warps=4, num_stages=1),
}
# The top-k kernel holds a [BLOCK_Q, CAP] tile of its buffer during a compaction;
# fewer query rows a program keep that tile in registers.
# APPEND_TILES: append whole tiles instead of the passing scores (see the kernel);
# CAP_MULT: buffer length in units of next_pow2(topk + BLOCK_N) (longer segments
# between compactions, more scratch). sm90: fastest of 8 variants on an H200
# (2026-11-28, 4096 x 128K causal, topk 2048: 21.4 ms, logits alone 10.3 ms; whole-tile
# appends 42-50 ms; docs/benchmarks_indexer.md).
TOPK_CONFIGS = {
    "sm90": dict(BLOCK_N=64, QH=256, num_warps=4, num_stages=3, APPEND_TILES=False, CAP_MULT=1),
    "sm80": dict(BLOCK_N=64, QH=128, num_warps=4, num_stages=3, APPEND_TILES=False, CAP_MULT=1),
    "small": dict(BLOCK_N=16, QH=32, num_warps=4, num_stages=1, APPEND_TILES=False, CAP_MULT=1),
}

# Query rows of one top-k program at most (before the N >= 16 floor of small H): each
# row's selection is unrolled, so 128 rows (H = 2 with QH = 256) would compile for minutes.
MAX_TOPK_ROWS = 4

# dot modes: how the q.k products are computed
DOT_FP8 = 0  # e4m3 x e4m3 tensor-core dot (sm_89 and newer; the interpreter)
DOT_FP16 = 1  # e4m3 (or fp16) tiles converted to fp16 first (exact): sm_80 fallback
DOT_FP32 = 2  # fp32 / bf16 inputs: fp32 dot in full precision (reference-grade, slow)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _family(device: torch.device) -> str:
    if device.type != "cuda" or _interpreted():
        return "small"
    major, minor = torch.cuda.get_device_capability(device)
    return "sm90" if (major, minor) >= (8, 9) else "sm80"


def dot_mode(x: torch.Tensor) -> int:
    """Which dot a q8/k8 dtype and device get (see DOT_*)."""
    if x.dtype == torch.float8_e4m3fn:
        if x.device.type == "cuda" and not _interpreted():
            return DOT_FP8 if torch.cuda.get_device_capability(x.device) >= (8, 9) else DOT_FP16
        return DOT_FP8
    return DOT_FP16 if x.dtype == torch.float16 else DOT_FP32


def default_config(device: torch.device, h: int, topk: bool = False, **override) -> dict:
    """Block sizes: BLOCK_Q query rows (of H_PAD heads) and BLOCK_N keys a program step."""
    fam = _family(device)
    cfg = dict((TOPK_CONFIGS if topk else CONFIGS)[fam])
    h_pad = max(triton.next_power_of_2(h), 1)
    qh = cfg.pop("QH")
    cfg["BLOCK_Q"] = max(1, qh // h_pad)
    if topk:  # the top-k kernel unrolls its selection over the rows: keep them few
        cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], MAX_TOPK_ROWS)
    cfg.update(override)
    if cfg["BLOCK_Q"] * h_pad < 16:  # tl.dot needs N >= 16
        cfg["BLOCK_Q"] = 16 // h_pad
    return cfg


@triton.jit
def _score_key(s):
    """Order-preserving int32 image of fp32 scores."""
    b = s.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _tile_scores(k8, kscale, qT, w, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
                 DOT: tl.constexpr):
    """Weighted ReLU head sum of one key tile.

    k8 [BLOCK_N, D_PAD], qT [D_PAD, BLOCK_Q * H_PAD], w [BLOCK_Q * H_PAD] fp32 (0 on padded
    heads and rows), kscale [BLOCK_N] fp32. Returns [BLOCK_N, BLOCK_Q] fp32."""
    if DOT == 0:
        acc = tl.dot(k8, qT)
    elif DOT == 1:
        acc = tl.dot(k8.to(tl.float16), qT.to(tl.float16))
    else:
        acc = tl.dot(k8.to(tl.float32), qT.to(tl.float32), input_precision="ieee")
    acc = tl.maximum(acc, 0.0) * w[None, :]
    s = tl.sum(tl.reshape(acc, [BLOCK_N, BLOCK_Q, H_PAD]), axis=2)
    return s * kscale[:, None]


@triton.jit
def _load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
               stride_qs, stride_qh, stride_ws,
               D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
               PAGED: tl.constexpr):
    """The program's query rows: qT [D_PAD, BLOCK_Q * H_PAD], w [BLOCK_Q * H_PAD],
    rows/rmask/ks/ke [BLOCK_Q].

    Ragged: rows pid_q * BLOCK_Q + j with ranges from ks/ke. Paged (one program = one
    sequence b of NEXT_N query tokens): rows b * NEXT_N + j, keys [0, ctx_b - NEXT_N + j + 1)
    (SPEC 4's causal rule for multi-token decode)."""
    j = tl.arange(0, BLOCK_Q)
    if PAGED:
        rows = pid_q * NEXT_N + j
        rmask = j < NEXT_N
        ctx = tl.load(ctx_ptr + pid_q)
        ks = tl.zeros([BLOCK_Q], dtype=tl.int32)
        ke = tl.where(rmask, tl.maximum(ctx - NEXT_N + j + 1, 0), 0)
    else:
        rows = pid_q * BLOCK_Q + j
        rmask = rows < S
        ks = tl.load(ks_ptr + rows, mask=rmask, other=0)
        ke = tl.load(ke_ptr + rows, mask=rmask, other=0)
    # column m of the dot = (row j, head h) = (m // H_PAD, m % H_PAD)
    m = tl.arange(0, BLOCK_Q * H_PAD)
    mrow = pid_q * (NEXT_N if PAGED else BLOCK_Q) + m // H_PAD
    mh = m % H_PAD
    mmask = ((m // H_PAD) < (NEXT_N if PAGED else BLOCK_Q)) & (mrow < S) & (mh < H)
    d = tl.arange(0, D_PAD)
    q_off = mrow.to(tl.int64)[:, None] * stride_qs + mh[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=mmask[:, None] & (d[None, :] < D), other=0.0)  # [M, D_PAD]
    qT = tl.trans(q)  # K-major B operand, as the fp8 wgmma wants it
    w = tl.load(w_ptr + mrow.to(tl.int64) * stride_ws + mh, mask=mmask, other=0.0).to(tl.float32)
    return qT, w, rows, rmask, ks, ke


@triton.jit
def _load_keys(k_ptr, ksc_ptr, bt_ptr, offs, kmask, pid_q, stride_k, stride_bt,
               D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr):
    """A key tile k8 [BLOCK_N, D_PAD], its scales [BLOCK_N] and the index each key is
    reported by ([BLOCK_N] int32: the key row, or the physical slot when PAGED).

    Paged cache (SPEC 4): uint8 [num_blocks, PAGE * (D + 4)], each block holding its
    PAGE x D e4m3 key bytes, then PAGE fp32 scales; ``ksc_ptr`` is the same storage seen
    as fp32. Logical position p of sequence b lives in block block_table[b, p // PAGE]."""
    d = tl.arange(0, D_PAD)
    dmask = d < D
    if PAGED:
        blk = tl.load(bt_ptr + pid_q.to(tl.int64) * stride_bt + offs // PAGE, mask=kmask, other=0)
        kmask = kmask & (blk >= 0)
        blk = tl.maximum(blk, 0).to(tl.int64)
        t = offs % PAGE
        kb = tl.load(k_ptr + (blk * (PAGE * (D + 4)) + t * D)[:, None] + d[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0)
        k8 = kb.to(tl.float8e4nv, bitcast=True)
        kscale = tl.load(ksc_ptr + blk * (PAGE * (D + 4) // 4) + (PAGE * D // 4) + t, mask=kmask, other=0.0)
        kidx = (blk * PAGE + t).to(tl.int32)
    else:
        k8 = tl.load(k_ptr + offs.to(tl.int64)[:, None] * stride_k + d[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0.0)
        kscale = tl.load(ksc_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        kidx = offs
    return k8, kscale, kidx, kmask


@triton.jit
def _block_range(ks, ke, rmask, n_start, n_end, BLOCK_N: tl.constexpr):
    """Tiles [lo, hi) of this split that meet some row's range (lo aligned to BLOCK_N);
    lo >= hi when none does."""
    live = rmask & (ke > ks)
    lo = tl.min(tl.where(live, ks, 2147483647))
    hi = tl.max(tl.where(live, ke, 0))
    lo = tl.maximum(lo, n_start)
    hi = tl.minimum(hi, n_end)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def indexer_logits_kernel(
    q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, bt_ptr, out_ptr,
    S, S_kv, H, NEXT_N, split_len,
    stride_qs, stride_qh, stride_k, stride_ws, stride_bt, stride_os,
    D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    DOT: tl.constexpr, PAGED: tl.constexpr, HEAVY_FIRST: tl.constexpr,
):
    """out [S, S_kv] fp32 (paged: [B * NEXT_N, S_kv] over logical positions). Grid:
    (query blocks, key splits of split_len, a multiple of BLOCK_N)."""
    pid_q = tl.program_id(0)
    if HEAVY_FIRST:  # causal prefill: late rows have the longest ranges, start them first
        pid_q = tl.num_programs(0) - 1 - pid_q
    n_start = tl.program_id(1) * split_len
    n_end = tl.minimum(n_start + split_len, S_kv)
    qT, w, rows, rmask, ks, ke = _load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
                                            stride_qs, stride_qh, stride_ws, D, D_PAD, BLOCK_Q, H_PAD, PAGED)
    lo, hi = _block_range(ks, ke, rmask, n_start, n_end, BLOCK_N)
    if hi <= lo:
        lo = n_end
        hi = n_end
    out_row = out_ptr + rows.to(tl.int64) * stride_os  # [BLOCK_Q]
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        kmask = offs < hi  # hi <= n_end; past it a paged block table may hold garbage
        k8, kscale, kidx, kmask = _load_keys(k_ptr, ksc_ptr, bt_ptr, offs, kmask, pid_q, stride_k, stride_bt,
                                             D, D_PAD, PAGE, PAGED)
        s = _tile_scores(k8, kscale, qT, w, BLOCK_N, BLOCK_Q, H_PAD, DOT)  # [BLOCK_N, BLOCK_Q]
        inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :])
        s = tl.where(inside, s, float("-inf"))
        tl.store(out_row[None, :] + offs[:, None], s, mask=rmask[None, :] & (offs < n_end)[:, None])
    # the rest of this split lies outside every row's range
    hi_t = tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, n_end)
    ninf = tl.full([BLOCK_Q, BLOCK_N], float("-inf"), tl.float32)
    for n0 in range(n_start, lo, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < lo)[None, :])
    for n0 in range(hi_t, n_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < n_end)[None, :])


@triton.jit
def _kth_largest(keys, valid, nvalid, thr, k):
    """The k-th largest of one row's keys [CAP] (entries where ``valid``), exact (any
    value when nvalid < k). Binary search on the int32 key range with the invariant
    count(key >= lo) >= k > count(key >= hi + 1); ``thr`` (the last threshold, with at
    least k entries at or above it) tightens the start."""
    big = tl.where(valid, keys, INT32_MIN_C)
    lo = tl.min(tl.where(valid, keys, 2147483647), axis=0)
    lo = tl.maximum(lo, thr).to(tl.int64)
    hi = tl.max(big, axis=0).to(tl.int64)
    lo = tl.where(nvalid >= k, lo, hi)  # nothing to search in a short row
    while hi > lo:
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum((big >= mid.to(tl.int32)).to(tl.int32), axis=0)
        ok = c >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def _select_row(bkey_ptr, bidx_ptr, base, cnt, thr, k, CAP: tl.constexpr):
    """Exact top-k of one buffer row (base: int64 offset, cnt slots; slots holding
    INT32_MIN are empty). Returns (take [CAP] mask, pos = destination of each taken
    entry, keys, idx, T = the k-th largest key, n_take, full = more than k entries).
    A row with at most k entries takes all of them. Rows are done one at a time so
    the [CAP] tiles stay in registers."""
    c = tl.arange(0, CAP)
    inb = c < cnt
    keys = tl.load(bkey_ptr + base + c, mask=inb, other=INT32_MIN_C)
    idx = tl.load(bidx_ptr + base + c, mask=inb, other=-1)
    valid = inb & (keys != INT32_MIN_C)
    nvalid = tl.sum(valid.to(tl.int32), axis=0)
    T = _kth_largest(keys, valid, nvalid, thr, k)
    gt = valid & (keys > T)
    eq = valid & (keys == T)
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    take = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= k - n_gt))
    full = nvalid > k
    # (tl.where, not `&`, with a scalar bool: the 3.9 interpreter's tensor & scalar-bool
    # gives a mask dtype tl.store rejects)
    take = tl.where(full, take, valid)
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    n_take = tl.minimum(nvalid, k)
    return take, pos, keys, idx, T, n_take, full


@triton.jit
def _row(x, jr, j):
    """Element j of a small per-row vector x [BLOCK_Q] as a scalar."""
    return tl.sum(tl.where(jr == j, x, 0), axis=0)


@triton.jit
def indexer_topk_kernel(
    q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, bt_ptr,
    bkey_ptr, bidx_ptr, okey_ptr, oidx_ptr,
    S, S_kv, H, NEXT_N, split_len, n_split, topk,
    stride_qs, stride_qh, stride_k, stride_ws, stride_bt,
    D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, CAP: tl.constexpr,
    TOPK_PAD: tl.constexpr, DOT: tl.constexpr, PAGED: tl.constexpr, HEAVY_FIRST: tl.constexpr,
    APPEND_TILES: tl.constexpr,
):
    """Streaming top-k. Buffers bkey/bidx [S * n_split, CAP] int32 (scratch); outputs
    okey/oidx [S * n_split, topk] int32: per (row, split) its top-k keys and indices
    (-1 / INT32_MIN padded), in buffer order.

    The key tiles are walked in segments: a segment is as many tiles as the fullest
    buffer has room for, so its inner loop never compacts and stays a plain loop that
    Triton software-pipelines (loads of the next tiles in flight during the dots);
    compactions happen between segments. APPEND_TILES=False appends only the scores
    above the threshold (positions by a cumsum over the tile); True appends a row's
    whole tile (scores below the threshold or outside the range as empty slots) when
    any of its scores passes: no scan, more compactions."""
    pid_q = tl.program_id(0)
    if HEAVY_FIRST:
        pid_q = tl.num_programs(0) - 1 - pid_q
    pid_s = tl.program_id(1)
    n_start = pid_s * split_len
    n_end = tl.minimum(n_start + split_len, S_kv)
    qT, w, rows, rmask, ks, ke = _load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
                                            stride_qs, stride_qh, stride_ws, D, D_PAD, BLOCK_Q, H_PAD, PAGED)
    lo, hi = _block_range(ks, ke, rmask, n_start, n_end, BLOCK_N)
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
            k8, kscale, kidx, kmask = _load_keys(k_ptr, ksc_ptr, bt_ptr, offs, kmask, pid_q, stride_k,
                                                 stride_bt, D, D_PAD, PAGE, PAGED)
            s = _tile_scores(k8, kscale, qT, w, BLOCK_N, BLOCK_Q, H_PAD, DOT)  # [BLOCK_N, BLOCK_Q]
            key = _score_key(s)
            inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :]) & kmask[:, None]
            keep = inside & (key > thr[None, :])
            if APPEND_TILES:
                any_keep = (tl.max(keep.to(tl.int32), axis=0) > 0) & rmask  # [BLOCK_Q]
                pos = cnt[None, :] + tl.arange(0, BLOCK_N)[:, None]
                ptr = base[None, :] + pos
                m = any_keep[None, :] & (pos >= 0)
                tl.store(bkey_ptr + ptr, tl.where(keep, key, INT32_MIN_C), mask=m)
                tl.store(bidx_ptr + ptr, tl.broadcast_to(kidx[:, None], [BLOCK_N, BLOCK_Q]), mask=m)
                cnt += tl.where(any_keep, BLOCK_N, 0)
            else:
                keep = keep & rmask[None, :]
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


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and not _interpreted():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def choose_split(n_qblocks: int, s_kv: int, block_n: int, device: torch.device, min_split: int,
                 n_split: int | None = None) -> tuple[int, int]:
    """(n_split, split_len): split the key axis only when query blocks alone leave the
    GPU under-filled (about 2 programs per SM), never below ``min_split`` keys a split."""
    if n_split is None:
        target = 2 * _num_sms(device)
        n_split = max(1, min(triton.cdiv(target, max(n_qblocks, 1)), triton.cdiv(s_kv, min_split)))
    split_len = triton.cdiv(triton.cdiv(max(s_kv, 1), n_split), block_n) * block_n
    return triton.cdiv(max(s_kv, 1), split_len), split_len


def _launch_common(q8):
    s, h, d = q8.shape
    h_pad = max(triton.next_power_of_2(h), 1)
    d_pad = max(triton.next_power_of_2(d), 32)  # fp8 MMAs need K >= 32 (tiny test widths are 16)
    return s, h, d, h_pad, d_pad


def indexer_logits(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                   ks: torch.Tensor, ke: torch.Tensor, config: dict | None = None,
                   n_split: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Index scores [S, S_kv] fp32, -inf outside [ks, ke). Inputs as the public
    ``flashdsa.indexer_logits`` (assumed validated): q8 [S, H, D], k8 [S_kv, D] (e4m3, or
    fp16/fp32), k_scale [S_kv], weights [S, H] fp32, ks/ke [S] int32. ``config``
    overrides block sizes, ``n_split`` the key-axis split, ``out`` the result buffer."""
    s, h, d, h_pad, d_pad = _launch_common(q8)
    s_kv = k8.shape[0]
    cfg = default_config(q8.device, h, **(config or {}))
    if out is None:
        out = torch.empty(s, s_kv, dtype=torch.float32, device=q8.device)
    if s == 0 or s_kv == 0:
        return out
    q8, k8 = q8.contiguous() if q8.stride(-1) != 1 else q8, k8.contiguous() if k8.stride(-1) != 1 else k8
    weights = weights.float().contiguous()
    k_scale = k_scale.float().contiguous()
    bq, bn = cfg["BLOCK_Q"], cfg["BLOCK_N"]
    nq = triton.cdiv(s, bq)
    n_split, split_len = choose_split(nq, s_kv, bn, q8.device, 4 * bn, n_split)
    indexer_logits_kernel[(nq, n_split)](
        q8, k8, k_scale, weights, ks, ke, ks, ks, out,
        s, s_kv, h, 1, split_len,
        q8.stride(0), q8.stride(1), k8.stride(0), weights.stride(0), 0, out.stride(0),
        D=d, D_PAD=d_pad, H_PAD=h_pad, BLOCK_Q=bq, BLOCK_N=bn, PAGE=64,
        DOT=dot_mode(q8), PAGED=False, HEAVY_FIRST=True,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def merge_splits(okey: torch.Tensor, oidx: torch.Tensor, rows: int, n_split: int, topk: int) -> torch.Tensor:
    """[rows * n_split, topk] per-split selections -> [rows, topk] int32 indices."""
    if n_split == 1:
        return oidx.view(rows, topk)
    okey = okey.view(rows, n_split * topk)
    oidx = oidx.view(rows, n_split * topk)
    best, pos = okey.topk(topk, dim=1)
    idx = oidx.gather(1, pos)
    return torch.where(best > INT32_MIN, idx, -1).to(torch.int32)


# Tests set this to fill the scratch and outputs with garbage, so an entry the kernel
# fails to write (or reads before writing) cannot pass unnoticed.
POISON_BUFFERS = False


def _topk_buffers(rows: int, n_split: int, topk: int, cap: int, device) -> tuple:
    bufs = tuple(torch.empty(rows * n_split, n, dtype=torch.int32, device=device) for n in (cap, cap, topk, topk))
    if POISON_BUFFERS:
        for b in bufs:
            b.fill_(2 ** 31 - 7)
    return bufs


def topk_cap(topk: int, block_n: int, mult: int = 1) -> int:
    """Candidate buffer length: room for topk survivors plus one tile of newcomers
    (times ``mult``)."""
    return triton.next_power_of_2(topk + block_n) * mult


def indexer_topk(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                 ks: torch.Tensor, ke: torch.Tensor, topk: int, config: dict | None = None,
                 n_split: int | None = None) -> torch.Tensor:
    """[S, topk] int32 key rows of the topk largest index scores in each row's [ks, ke),
    -1 padded, in no particular order; computed without materializing [S, S_kv] (peak
    scratch 16 * S * n_split * CAP bytes, CAP = next_pow2(topk + BLOCK_N)). Inputs as
    :func:`indexer_logits`."""
    s, h, d, h_pad, d_pad = _launch_common(q8)
    s_kv = k8.shape[0]
    cfg = default_config(q8.device, h, topk=True, **(config or {}))
    if s == 0:
        return torch.empty(0, topk, dtype=torch.int32, device=q8.device)
    q8, k8 = q8.contiguous() if q8.stride(-1) != 1 else q8, k8.contiguous() if k8.stride(-1) != 1 else k8
    weights = weights.float().contiguous()
    k_scale = k_scale.float().contiguous()
    bq, bn = cfg["BLOCK_Q"], cfg["BLOCK_N"]
    nq = triton.cdiv(s, bq)
    cap = topk_cap(topk, bn, cfg.get("CAP_MULT", 1))
    n_split, split_len = choose_split(nq, s_kv, bn, q8.device, max(cap, 4 * bn), n_split)
    bkey, bidx, okey, oidx = _topk_buffers(s, n_split, topk, cap, q8.device)
    indexer_topk_kernel[(nq, n_split)](
        q8, k8, k_scale, weights, ks, ke, ks, ks,
        bkey, bidx, okey, oidx,
        s, s_kv, h, 1, split_len, n_split, topk,
        q8.stride(0), q8.stride(1), k8.stride(0), weights.stride(0), 0,
        D=d, D_PAD=d_pad, H_PAD=h_pad, BLOCK_Q=bq, BLOCK_N=bn, PAGE=64, CAP=cap,
        TOPK_PAD=triton.next_power_of_2(topk), DOT=dot_mode(q8), PAGED=False, HEAVY_FIRST=True,
        APPEND_TILES=cfg.get("APPEND_TILES", False), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return merge_splits(okey, oidx, s, n_split, topk)
