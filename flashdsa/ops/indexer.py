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

Top-k (``indexer_topk``, ``select_topk``) never materializes [S, S_kv]. The default
*threshold* method: (1) the scores of every SAMPLE_STRIDE-th key give each row a
threshold about MARGIN * topk of its scores pass; (2) one scoring pass keeps the scores
at or above it (per-column slots counted in registers, or atomic appends when the key
axis is split finely); (3) a select pass takes each row's exact top-k of its candidates.
A row whose candidates overflowed or fell short is redone by the *streaming* kernel:
each program keeps, per query row, a candidate buffer of CAP >= topk + BLOCK_N (score
key, index) pairs in global memory (O(S * topk) scratch) and a threshold ``thr`` that
only rises:

- a tile's scores above ``thr`` are appended (positions by a cumsum over the tile);
- when a buffer could overflow, an exact radix (binary) search over the order-preserving
  int32 image of the fp32 scores finds the topk-th largest key T; the buffer is
  compacted in place to exactly topk entries (ties at T kept in position order) and
  ``thr`` becomes T: later scores <= T can never enter the top-k (exact up to ties);
- at the end the same selection writes the row's topk indices, -1 padded.

When there are few query blocks (decode), the key axis is split over programs; each
split selects its own top-k and a torch.topk over the n_split * topk candidates merges
them.

Scores are compared as int32 "keys": for fp32 bits b, key = b if b >= 0 else
b ^ 0x7FFFFFFF, which orders like the floats (and -inf above every NaN pattern).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

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


# What indexer_scores_kernel does with each tile of scores (MODE):
SCORES_STORE = 0    # write them: out [rows, n_pos] fp32, -inf outside each row's range
SCORES_SLOTS = 1    # keep those >= the row's threshold, in per-(row, split, tile column) slots
SCORES_ATOMIC = 2   # keep those >= the row's threshold, appended to a per-row buffer by atomics


@triton.jit
def indexer_scores_kernel(
    q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, bt_ptr, out_ptr,
    thr_ptr, bkey_ptr, bidx_ptr, cnt_ptr,
    S, S_kv, H, NEXT_N, split_len, pos_stride, n_split, SC,
    stride_qs, stride_qh, stride_k, stride_ws, stride_bt, stride_os,
    D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    DOT: tl.constexpr, PAGED: tl.constexpr, HEAVY_FIRST: tl.constexpr, MODE: tl.constexpr,
):
    """Scores of the program's rows over one split of the key axis (grid: query blocks,
    key splits of ``split_len``, a multiple of BLOCK_N).

    The key axis is walked in units of ``pos_stride`` positions: unit u is key position
    u * pos_stride (1 = every key; SAMPLE_STRIDE for the threshold sample), and S_kv
    counts units. A row's range [ks, ke) becomes [cdiv(ks, st), cdiv(ke, st)) in units.

    MODE SCORES_STORE writes out [rows, S_kv] (-inf outside the ranges). The filter
    modes read thr [rows] (int32 score keys) and keep the scores whose key is >= thr:
    SCORES_SLOTS: a row's kept keys of tile column c (key % BLOCK_N) go to its slot
    (row, split, c) of SC entries, counted in registers (no atomics, no scan);
    cnt [rows * n_split * BLOCK_N] gets the counts (which may exceed SC: overflow).
    SCORES_ATOMIC: positions from an atomic counter per row (cnt [rows], zeroed by the
    caller), a buffer of SC entries per row. bkey/bidx hold (score key, index)."""
    pid_q = tl.program_id(0)
    if HEAVY_FIRST:  # causal prefill: late rows have the longest ranges, start them first
        pid_q = tl.num_programs(0) - 1 - pid_q
    pid_s = tl.program_id(1)
    n_start = pid_s * split_len
    n_end = tl.minimum(n_start + split_len, S_kv)
    qT, w, rows, rmask, ks, ke = _load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
                                            stride_qs, stride_qh, stride_ws, D, D_PAD, BLOCK_Q, H_PAD, PAGED)
    ks = (ks + pos_stride - 1) // pos_stride
    ke = (ke + pos_stride - 1) // pos_stride
    lo, hi = _block_range(ks, ke, rmask, n_start, n_end, BLOCK_N)
    if hi <= lo:
        lo = n_end
        hi = n_end
    out_row = out_ptr + rows.to(tl.int64) * stride_os  # [BLOCK_Q]
    col = tl.arange(0, BLOCK_N)
    if MODE != 0:
        thr = tl.load(thr_ptr + rows, mask=rmask, other=0)
        cnt = tl.zeros([BLOCK_N, BLOCK_Q], dtype=tl.int32)
        sbase = (rows.to(tl.int64) * n_split + pid_s) * BLOCK_N  # [BLOCK_Q] first slot of the row
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + col
        kmask = offs < hi  # hi <= n_end; past it a paged block table may hold garbage
        k8, kscale, kidx, kmask = _load_keys(k_ptr, ksc_ptr, bt_ptr, offs * pos_stride, kmask, pid_q, stride_k,
                                             stride_bt, D, D_PAD, PAGE, PAGED)
        s = _tile_scores(k8, kscale, qT, w, BLOCK_N, BLOCK_Q, H_PAD, DOT)  # [BLOCK_N, BLOCK_Q]
        inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :])
        if MODE == 0:
            s = tl.where(inside, s, float("-inf"))
            tl.store(out_row[None, :] + offs[:, None], s, mask=rmask[None, :] & (offs < n_end)[:, None])
        else:
            key = _score_key(s)
            keep = inside & kmask[:, None] & rmask[None, :] & (key >= thr[None, :])
            kidx2 = tl.broadcast_to(kidx[:, None], [BLOCK_N, BLOCK_Q])
            if MODE == 1:
                ptr = (sbase[None, :] + col[:, None]) * SC + cnt
                ok = keep & (cnt < SC)
                cnt += keep.to(tl.int32)
            else:
                rows2 = tl.broadcast_to(rows[None, :], [BLOCK_N, BLOCK_Q])
                pos = tl.atomic_add(cnt_ptr + rows2, tl.full([BLOCK_N, BLOCK_Q], 1, tl.int32), mask=keep,
                                    sem="relaxed")
                ptr = rows2.to(tl.int64) * SC + pos
                ok = keep & (pos < SC)
            tl.store(bkey_ptr + ptr, key, mask=ok)
            tl.store(bidx_ptr + ptr, kidx2, mask=ok)
    if MODE == 0:
        # the rest of this split lies outside every row's range
        hi_t = tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, n_end)
        ninf = tl.full([BLOCK_Q, BLOCK_N], float("-inf"), tl.float32)
        for n0 in range(n_start, lo, BLOCK_N):
            offs = n0 + col
            tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < lo)[None, :])
        for n0 in range(hi_t, n_end, BLOCK_N):
            offs = n0 + col
            tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < n_end)[None, :])
    elif MODE == 1:
        tl.store(cnt_ptr + sbase[None, :] + col[:, None], cnt, mask=rmask[None, :])


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
def _take_topk(keys, valid, thr, k):
    """Exact top-k of the ``valid`` entries of keys [N] (any layout, flattened): returns
    (take [N] mask, pos = destination 0..n_take-1 of each taken entry, n_take, nvalid,
    T = the k-th largest key, full = more than k entries). All entries are >= ``thr``
    (a lower bound for the search). Ties at T are taken in position order; a row with at
    most k entries takes all of them."""
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
    return take, pos, tl.minimum(nvalid, k), nvalid, T, full


@triton.jit
def _select_row(bkey_ptr, bidx_ptr, base, cnt, thr, k, CAP: tl.constexpr):
    """Exact top-k of one buffer row (base: int64 offset, cnt slots; slots holding
    INT32_MIN are empty). Returns (take, pos, keys, idx, T, n_take, full) as
    :func:`_take_topk`. Rows are done one at a time so the [CAP] tiles stay in registers."""
    c = tl.arange(0, CAP)
    inb = c < cnt
    keys = tl.load(bkey_ptr + base + c, mask=inb, other=INT32_MIN_C)
    idx = tl.load(bidx_ptr + base + c, mask=inb, other=-1)
    valid = inb & (keys != INT32_MIN_C)
    take, pos, n_take, nvalid, T, full = _take_topk(keys, valid, thr, k)
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
    ONLY_FAILED: tl.constexpr,
):
    """Streaming top-k (the exact fallback of the threshold top-k). Buffers bkey/bidx
    [S * n_split, CAP] int32 (scratch); outputs okey/oidx [S * n_split, topk] int32: per
    (row, split) its top-k keys and indices (-1 / INT32_MIN padded), in buffer order.
    ONLY_FAILED: programs none of whose rows is flagged in fail [S] return at once.

    The key tiles are walked in segments: a segment is as many tiles as the fullest
    buffer has room for, so its inner loop never compacts and stays a plain loop that
    Triton software-pipelines (loads of the next tiles in flight during the dots);
    compactions happen between segments. A tile's scores above the threshold are
    appended at positions given by a cumsum over the tile."""
    pid_q = tl.program_id(0)
    if HEAVY_FIRST:
        pid_q = tl.num_programs(0) - 1 - pid_q
    pid_s = tl.program_id(1)
    n_start = pid_s * split_len
    n_end = tl.minimum(n_start + split_len, S_kv)
    qT, w, rows, rmask, ks, ke = _load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
                                            stride_qs, stride_qh, stride_ws, D, D_PAD, BLOCK_Q, H_PAD, PAGED)
    if ONLY_FAILED:
        if tl.max(tl.load(fail_ptr + rows, mask=rmask, other=0)) == 0:
            return
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


@triton.jit
def indexer_select_kernel(bkey_ptr, bidx_ptr, cnt_ptr, thr_ptr, nrow_ptr, out_ptr, fail_ptr,
                          n_slots, SC, topk,
                          NS_PAD: tl.constexpr, SC_PAD: tl.constexpr, TOPK_PAD: tl.constexpr):
    """Second pass of the threshold top-k, one program a row r: its candidates are
    n_slots slots of SC entries (bkey/bidx [rows, n_slots, SC], counts cnt [rows,
    n_slots]); writes out [r, :topk] (indices, -1 padded) and fail [r] = 1 when the
    candidates cannot give the exact answer: a slot overflowed, or fewer than
    min(topk, nrow[r]) scores passed the threshold thr [r]."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, NS_PAD * SC_PAD)
    slot = e // SC_PAD
    c = e % SC_PAD
    smask = slot < n_slots
    cnt = tl.load(cnt_ptr + r * n_slots + slot, mask=smask, other=0)
    inb = smask & (c < tl.minimum(cnt, SC))
    off = (r * n_slots + slot) * SC + c
    keys = tl.load(bkey_ptr + off, mask=inb, other=INT32_MIN_C)
    idx = tl.load(bidx_ptr + off, mask=inb, other=-1)
    take, pos, n_take, nvalid, T, full = _take_topk(keys, inb, tl.load(thr_ptr + r), topk)
    tl.store(out_ptr + r * topk + pos, idx, mask=take)
    p = tl.arange(0, TOPK_PAD)
    tl.store(out_ptr + r * topk + p, tl.full([TOPK_PAD], -1, tl.int32), mask=(p >= n_take) & (p < topk))
    short = nvalid < tl.minimum(topk, tl.load(nrow_ptr + r))
    tl.store(fail_ptr + r, ((tl.max(cnt) > SC) | short).to(tl.int32))


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


@dataclass
class Problem:
    """One scoring problem, ragged or paged, as the kernels take it.

    q [rows, H, D] and w [rows, H] fp32: the query rows. Ragged: k = k8 [S_kv, D],
    ksc = k_scale [S_kv] fp32, ks/ke [rows] int32; a *unit* (what ``take`` selects and
    programs are launched over, BLOCK_Q rows a program) is a row. Paged: k = the uint8
    cache, ksc its fp32 view, ctx [B] int32, bt [B, max_blocks] int32; a unit is a
    sequence of next_n rows, one program each. ``n_pos``: key positions walked."""
    q: torch.Tensor
    k: torch.Tensor
    ksc: torch.Tensor
    w: torch.Tensor
    ks: torch.Tensor
    ke: torch.Tensor
    ctx: torch.Tensor
    bt: torch.Tensor
    n_pos: int
    next_n: int
    paged: bool
    cfg: dict
    topk_cfg: dict | None = None

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def units(self) -> int:
        return self.ctx.shape[0] if self.paged else self.rows

    def n_prog(self, cfg: dict | None = None) -> int:
        """Programs along the grid's first axis with the block sizes ``cfg`` (default: the
        scoring kernel's)."""
        return self.units if self.paged else triton.cdiv(self.rows, (cfg or self.cfg)["BLOCK_Q"])

    def row_len(self) -> torch.Tensor:
        """[rows] int32: candidate keys of each row (SPEC 2 and 4)."""
        if not self.paged:
            return (self.ke - self.ks).clamp(min=0).to(torch.int32)
        j = torch.arange(self.next_n, device=self.q.device, dtype=torch.int32)
        n = self.ctx[:, None] - self.next_n + 1 + j[None, :]
        return n.clamp(min=0, max=self.n_pos).reshape(-1).to(torch.int32)

    def take(self, units: torch.Tensor) -> "Problem":
        """The sub-problem of some units (a 1-D index tensor)."""
        if self.paged:
            rows = self.unit_rows(units)
            return replace(self, q=self.q[rows], w=self.w[rows], ctx=self.ctx[units], bt=self.bt[units])
        return replace(self, q=self.q[units], w=self.w[units], ks=self.ks[units], ke=self.ke[units])

    def dims(self) -> dict:
        """The kernels' width constexprs: D, D_PAD (fp8 MMAs need K >= 32; tiny test
        widths are 16), H_PAD."""
        h, d = self.q.shape[1], self.q.shape[2]
        return dict(D=d, D_PAD=max(triton.next_power_of_2(d), 32), H_PAD=triton.next_power_of_2(h))

    def unit_rows(self, units: torch.Tensor) -> torch.Tensor:
        """Row indices of some units."""
        if not self.paged:
            return units
        return (units[:, None] * self.next_n + torch.arange(self.next_n, device=units.device)).reshape(-1)


def ragged_problem(q8, k8, k_scale, weights, ks, ke, config: dict | None = None) -> Problem:
    """A ragged Problem (ctx and bt unused), with the default block sizes updated by
    ``config`` for both kernels."""
    q8 = q8.contiguous() if q8.stride(-1) != 1 else q8
    k8 = k8.contiguous() if k8.stride(-1) != 1 else k8
    h = q8.shape[1]
    cfg = default_config(q8.device, h, **(config or {}))
    topk_cfg = default_config(q8.device, h, topk=True, **(config or {}))
    return Problem(q8, k8, k_scale.float().contiguous(), weights.float().contiguous(), ks, ke, ks, ks,
                   k8.shape[0], 1, False, cfg, topk_cfg)


def launch_scores(p: Problem, mode: int, split: tuple[int, int], pos_stride: int = 1, out=None,
                  thr=None, bkey=None, bidx=None, cnt=None, sc: int = 0) -> None:
    """Run indexer_scores_kernel on ``p`` (see its docstring for the modes and buffers);
    split = (n_split, split_len) in units of pos_stride positions."""
    n_split, split_len = split
    dummy = p.w
    indexer_scores_kernel[(p.n_prog(), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, p.ctx, p.bt, dummy if out is None else out,
        dummy if thr is None else thr, dummy if bkey is None else bkey, dummy if bidx is None else bidx,
        dummy if cnt is None else cnt,
        p.rows, triton.cdiv(p.n_pos, pos_stride), p.q.shape[1], p.next_n, split_len, pos_stride, n_split, sc,
        p.q.stride(0), p.q.stride(1), 0 if p.paged else p.k.stride(0), p.w.stride(0),
        p.bt.stride(0) if p.paged else 0, 0 if out is None else out.stride(0), **p.dims(),
        BLOCK_Q=p.cfg["BLOCK_Q"], BLOCK_N=p.cfg["BLOCK_N"], PAGE=64, DOT=dot_mode(p.q), PAGED=p.paged,
        HEAVY_FIRST=not p.paged, MODE=mode, num_warps=p.cfg["num_warps"], num_stages=p.cfg["num_stages"])


def indexer_logits(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                   ks: torch.Tensor, ke: torch.Tensor, config: dict | None = None,
                   n_split: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Index scores [S, S_kv] fp32, -inf outside [ks, ke). Inputs as the public
    ``flashdsa.indexer_logits`` (assumed validated): q8 [S, H, D], k8 [S_kv, D] (e4m3, or
    fp16/fp32), k_scale [S_kv], weights [S, H] fp32, ks/ke [S] int32. ``config``
    overrides block sizes, ``n_split`` the key-axis split, ``out`` the result buffer."""
    s, s_kv = q8.shape[0], k8.shape[0]
    if out is None:
        out = torch.empty(s, s_kv, dtype=torch.float32, device=q8.device)
    if s == 0 or s_kv == 0:
        return out
    p = ragged_problem(q8, k8, k_scale, weights, ks, ke, config)
    bn = p.cfg["BLOCK_N"]
    launch_scores(p, SCORES_STORE, choose_split(p.n_prog(), s_kv, bn, q8.device, 4 * bn, n_split), out=out)
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


def _scratch(*shape, device, fill=None) -> torch.Tensor:
    """int32 scratch; zeros when fill == 0, else garbage under POISON_BUFFERS."""
    if fill == 0:
        return torch.zeros(*shape, dtype=torch.int32, device=device)
    t = torch.empty(*shape, dtype=torch.int32, device=device)
    if POISON_BUFFERS:
        t.fill_(2 ** 31 - 7)
    return t


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
    bkey, bidx, okey = (_scratch(p.rows * n_split, n, device=dev) for n in (cap, cap, topk))
    oidx = out if fail is not None else _scratch(p.rows * n_split, topk, device=dev)
    indexer_topk_kernel[(p.n_prog(cfg), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, p.ctx, p.bt,
        bkey, bidx, okey, oidx, p.w if fail is None else fail,
        p.rows, max(p.n_pos, 1), p.q.shape[1], p.next_n, split_len, n_split, topk,
        p.q.stride(0), p.q.stride(1), 0 if p.paged else p.k.stride(0), p.w.stride(0),
        p.bt.stride(0) if p.paged else 0, **p.dims(),
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_N=bn, PAGE=64, CAP=cap,
        TOPK_PAD=triton.next_power_of_2(topk), DOT=dot_mode(p.q), PAGED=p.paged, HEAVY_FIRST=not p.paged,
        ONLY_FAILED=fail is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out if fail is not None else merge_splits(okey, oidx, p.rows, n_split, topk)


# Threshold top-k (the default method). A sample of every SAMPLE_STRIDE-th key gives each
# row a threshold that about MARGIN * topk of its scores pass; one scoring pass keeps
# those (indexer_scores_kernel, filter modes), a select pass takes the exact top-k of
# them (indexer_select_kernel). A row where fewer than topk scores passed, or whose
# candidate slots overflowed, is redone by the streaming kernel: exact on any input, and
# rare on real data (the sample's quantile is within a few percent of the true one).
SAMPLE_STRIDE = 16
MARGIN = 1.5
SAMPLE_BYTES = 64 * 2 ** 20   # the sample's scores are computed in row chunks of at most this
SLOTS_MAX_SPLIT = 4            # per-slot buffers while the key axis has at most this many splits


def _score_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 image of fp32 scores (as _score_key); -inf -> INT32_MIN."""
    b = x.contiguous().view(torch.int32)
    key = torch.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return torch.where(torch.isneginf(x), INT32_MIN, key).to(torch.int32)


def sample_thresholds(p: Problem, topk: int, min_split: int, n: torch.Tensor) -> torch.Tensor:
    """[rows] int32 score keys: the ceil(MARGIN * topk * n_s / n)-th largest of the
    row's n_s sampled scores (n [rows] = its candidate keys), INT32_MIN where the row has
    at most topk candidates or the sample is too short (every candidate then passes)."""
    dev = p.q.device
    st = SAMPLE_STRIDE
    n_s_all = triton.cdiv(p.n_pos, st)
    if n_s_all == 0:
        return torch.full((p.rows,), INT32_MIN, dtype=torch.int32, device=dev)
    r_max = min(n_s_all, math.ceil(MARGIN * topk / st + MARGIN) + 1)
    if p.paged:
        n_s = (n + st - 1) // st
    else:
        n_s = ((p.ke.clamp(min=0) + st - 1) // st - (p.ks.clamp(min=0) + st - 1) // st).clamp(min=0)
    r = torch.ceil(n_s * (MARGIN * topk) / n.clamp(min=1)).long()
    need = (n > topk) & (r <= n_s) & (r <= r_max)
    chunk = max(1, SAMPLE_BYTES // (4 * n_s_all * p.next_n))   # units a chunk
    vals = []
    for u0 in range(0, p.units, chunk):
        sub = p if chunk >= p.units else p.take(torch.arange(u0, min(u0 + chunk, p.units), device=dev))
        out = torch.empty(sub.rows, n_s_all, dtype=torch.float32, device=dev)
        bn = sub.cfg["BLOCK_N"]
        launch_scores(sub, SCORES_STORE, choose_split(sub.n_prog(), n_s_all, bn, dev, min_split), st, out=out)
        vals.append(out.topk(r_max, dim=1).values)                                   # sorted, descending
    vals = vals[0] if len(vals) == 1 else torch.cat(vals)
    t = vals.gather(1, (r.clamp(1, r_max) - 1)[:, None])[:, 0]
    return torch.where(need, _score_keys(t), INT32_MIN)


def threshold_topk(p: Problem, topk: int, min_split: int, n_split: int | None = None,
                   mode: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, topk] int32 indices, -1 padded, [rows] int32 fail flags) of the
    threshold method, before any fallback. ``mode``: SCORES_SLOTS or SCORES_ATOMIC
    (default: slots while the key axis has at most SLOTS_MAX_SPLIT splits)."""
    dev = p.q.device
    n = p.row_len()
    thr = sample_thresholds(p, topk, min_split, n)
    bn = p.cfg["BLOCK_N"]
    split = choose_split(p.n_prog(), max(p.n_pos, 1), bn, dev, min_split, n_split)
    if mode is None:
        mode = SCORES_SLOTS if split[0] <= SLOTS_MAX_SPLIT else SCORES_ATOMIC
    expected = math.ceil(MARGIN * topk) + SAMPLE_STRIDE
    if mode == SCORES_SLOTS:
        n_slots = split[0] * bn
        sc = triton.cdiv(2 * expected, n_slots) + 16
        cnt = _scratch(p.rows * n_slots, device=dev)
    else:
        n_slots, sc = 1, 2 * expected
        cnt = _scratch(p.rows, device=dev, fill=0)
    bkey = _scratch(p.rows * n_slots * sc, device=dev)
    bidx = _scratch(p.rows * n_slots * sc, device=dev)
    launch_scores(p, mode, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)
    out = _scratch(p.rows, topk, device=dev)
    fail = _scratch(p.rows, device=dev)
    if p.rows:
        indexer_select_kernel[(p.rows,)](
            bkey, bidx, cnt, thr, n, out, fail, n_slots, sc, topk,
            NS_PAD=triton.next_power_of_2(n_slots), SC_PAD=triton.next_power_of_2(sc),
            TOPK_PAD=triton.next_power_of_2(topk), num_warps=4 if _interpreted() else 8)
    return out, fail


def select_topk(p: Problem, topk: int, min_split: int, n_split: int | None = None, method: str = "threshold",
                mode: int | None = None) -> torch.Tensor:
    """[rows, topk] int32, exact up to ties, by ``method`` "threshold" (with the
    streaming fallback for flagged rows) or "streaming". Under CUDA-graph capture the
    fallback runs without a host sync (a launch whose unflagged programs exit)."""
    if p.rows == 0:
        return torch.empty(0, topk, dtype=torch.int32, device=p.q.device)
    if method == "streaming":
        return streaming_topk(p, topk, min_split, n_split)
    if method != "threshold":
        raise ValueError(f"method must be 'threshold' or 'streaming', got {method!r}")
    out, fail = threshold_topk(p, topk, min_split, n_split, mode)
    if p.q.is_cuda and torch.cuda.is_current_stream_capturing():
        streaming_topk(p, topk, min_split, out=out, fail=fail)
        return out
    per_unit = fail.view(p.units, -1).amax(1) if p.paged else fail
    bad = per_unit.nonzero()[:, 0]
    if bad.numel():
        out[p.unit_rows(bad)] = streaming_topk(p.take(bad), topk, min_split)
    return out


def indexer_topk(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                 ks: torch.Tensor, ke: torch.Tensor, topk: int, config: dict | None = None,
                 n_split: int | None = None, method: str = "threshold") -> torch.Tensor:
    """[S, topk] int32 key rows of the topk largest index scores in each row's [ks, ke),
    -1 padded, in no particular order; computed without materializing [S, S_kv]
    (threshold method: about 8 * S * 3 * topk bytes of candidates plus a sample of at
    most SAMPLE_BYTES; see :func:`select_topk`). Inputs as :func:`indexer_logits`."""
    p = ragged_problem(q8, k8, k_scale, weights, ks, ke, config)
    return select_topk(p, topk, 4 * p.cfg["BLOCK_N"], n_split, method)
