"""Threshold top-k of the indexer scores, the default method, and the top-k entry points
(:func:`select_topk`, :func:`indexer_topk`). Never materializes [S, S_kv]:

1. sample: the scores of every SAMPLE_STRIDE-th key give each row a threshold that about
   MARGIN * topk of its scores pass (:func:`sample_thresholds`);
2. filter: one pass of the scores kernel keeps the scores at or above it (per-column
   slots counted in registers, or atomic appends when the key axis is split finely);
3. select: ``indexer_select_kernel`` takes each row's exact top-k of its candidates.

A row whose candidates overflowed or fell short is redone by the streaming kernel
(flashdsa.ops.indexer.streaming): exact on any input, and rare on real data (the
sample's quantile is within a few percent of the true one). :func:`select_topk` also
dispatches to the direct method (flashdsa.ops.indexer.direct) for short rows.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common import interpreted, num_sms, pdl_launch, pdl_prologue
from .direct import direct_topk, prefers_direct
from .filter_sm90 import filter_launcher
from .scores import (
    SCORES_ATOMIC,
    SCORES_SLOTS,
    Problem,
    choose_split,
    launch_scores,
    ragged_problem,
    row_length,
    scored_chunks,
)
from .selection import (
    INT32_MIN,
    INT32_MIN_C,
    chunk_take,
    kth_cut,
    kth_largest,
    score_key,
    scratch,
)
from .streaming import streaming_topk

SAMPLE_STRIDE = 16             # the sample scores every SAMPLE_STRIDE-th key (at least)
SAMPLE_MAX = 8192              # sampled scores a row at most
MARGIN_NUM, MARGIN_DEN = 3, 2  # the threshold aims at MARGIN * topk passing scores a row
MARGIN = MARGIN_NUM / MARGIN_DEN
MARGIN_NUM_C, MARGIN_DEN_C = tl.constexpr(MARGIN_NUM), tl.constexpr(MARGIN_DEN)
SAMPLE_BYTES = 64 * 2 ** 20   # the sample's scores are computed in row chunks of at most this
SLOTS_MAX_SPLIT = 4            # per-slot buffers while the key axis has at most this many splits
SELECT_CHUNK = 1024            # candidates a step of the select kernel's second pass (slots)
SELECT_CHUNK_ATOMIC = 4096     # the same with one buffer a row: a decode row's candidates in one step
CAP_SIGMAS = 4                 # see candidate_capacity
FILTER_PROGRAMS_PER_SM = 8     # decode rows: the filter's split aims at this many programs an SM ...
FILTER_MIN_TILES = 4           # ... with at least this many key tiles a program (see filter_split)


@triton.jit
def _slot_entries(cnt_ptr, r, n_slots, SC, p0, CHUNK: tl.constexpr, NS_PAD: tl.constexpr):
    """(present mask, offset in the row's slot buffers) of a chunk of row r's entries:
    positions p0 + [0, CHUNK // NS_PAD) of every slot (lanes slot-major, so that a warp
    reads runs of consecutive entries). Stepping through positions, the second pass ends
    after the fullest slot's last entry instead of at the slots' capacity."""
    tl.static_assert(CHUNK % NS_PAD == 0, "a chunk holds whole positions of every slot")
    P: tl.constexpr = CHUNK // NS_PAD
    e = tl.arange(0, CHUNK)
    slot = e // P
    pos = p0 + e % P
    cnt = tl.load(cnt_ptr + r * n_slots + slot, mask=slot < n_slots, other=0)
    return pos < tl.minimum(cnt, SC), (r * n_slots + slot) * SC + pos


@triton.jit
def indexer_select_kernel(bkey_ptr, bidx_ptr, cnt_ptr, thr_ptr, ks_ptr, ke_ptr, out_ptr, fail_ptr,
                          n_slots, SC, topk, NEXT_N, n_pos,
                          NS_PAD: tl.constexpr, SC_PAD: tl.constexpr, CHUNK: tl.constexpr,
                          TOPK_PAD: tl.constexpr, PAGED: tl.constexpr, PDL: tl.constexpr = False):
    """Second pass of the threshold top-k, one program a row r: its candidates are
    n_slots slots of SC entries (bkey/bidx [rows, n_slots, SC], counts cnt [rows,
    n_slots]); writes out [r, :topk] (indices, -1 padded) and fail [r] = 1 when the
    candidates cannot give the exact answer: a slot overflowed, or fewer than
    min(topk, n) scores passed the threshold thr [r] (n: :func:`row_length`).
    Two passes (:func:`kth_cut` over the keys of all slots, then :func:`chunk_take`
    over CHUNK entries at a time, stepping through the slots' positions
    (:func:`_slot_entries`), where the indices are read; the next chunk's keys are loaded
    while one is taken). PDL: see flashdsa.ops.common.pdl_prologue."""
    pdl_prologue(PDL)
    r = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, NS_PAD)
    cnt = tl.load(cnt_ptr + r * n_slots + slot, mask=slot < n_slots, other=0)
    c = tl.arange(0, SC_PAD)
    inb = c[None, :] < tl.minimum(cnt, SC)[:, None]
    keys = tl.load(bkey_ptr + ((r * n_slots + slot) * SC)[:, None] + c[None, :], mask=inb, other=INT32_MIN_C)
    keys = tl.reshape(keys, [NS_PAD * SC_PAD])
    nvalid = tl.sum(tl.minimum(cnt, SC), axis=0)
    short = nvalid < tl.minimum(topk, row_length(r, ks_ptr, ke_ptr, NEXT_N, n_pos, PAGED))
    c_max = tl.max(cnt, axis=0)
    tl.store(fail_ptr + r, ((c_max > SC) | short).to(tl.int32))
    T, n_gt, full, cut = kth_cut(keys, nvalid, tl.load(thr_ptr + r), topk)
    out_row = out_ptr + r * topk
    n_take = nvalid * 0
    n_eq = nvalid * 0
    present, off = _slot_entries(cnt_ptr, r, n_slots, SC, 0, CHUNK, NS_PAD)
    kk_next = tl.load(bkey_ptr + off, mask=present, other=INT32_MIN_C)
    # entries up to the fullest slot's last position (one slot, atomic appends: its prefix)
    for p0 in range(0, tl.minimum(c_max, SC), CHUNK // NS_PAD):
        present, off = _slot_entries(cnt_ptr, r, n_slots, SC, p0, CHUNK, NS_PAD)
        kk = kk_next
        present_n, off_n = _slot_entries(cnt_ptr, r, n_slots, SC, p0 + CHUNK // NS_PAD, CHUNK, NS_PAD)
        kk_next = tl.load(bkey_ptr + off_n, mask=present_n, other=INT32_MIN_C)  # in flight while this chunk is taken
        take, pos, n_take, n_eq = chunk_take(kk, present, T, n_gt, full, cut, topk, n_take, n_eq)
        tl.store(out_row + pos, tl.load(bidx_ptr + off, mask=take, other=-1), mask=take)
    p = tl.arange(0, TOPK_PAD)
    tl.store(out_row + p, tl.full([TOPK_PAD], -1, tl.int32), mask=(p >= n_take) & (p < topk))


@triton.jit
def sample_threshold_kernel(samp_ptr, ks_ptr, ke_ptr, thr_ptr, cnt_ptr, stride_s, n_cols, st, topk, r_max,
                            NEXT_N, n_pos, PAGED: tl.constexpr, ZERO_CNT: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr = False):
    """One program a row r of the sample's scores samp [rows, n_cols] (-inf outside the
    row's range): thr [r] = the score key of its rank-th largest sample, rank =
    ceil(MARGIN * topk * n_s / n) (n = :func:`row_length` candidate keys, n_s of them
    sampled), or INT32_MIN (every candidate passes) when n <= topk or rank > min(n_s,
    r_max). ZERO_CNT: also zero the row's append counter cnt [r] of the filter pass.
    PDL: see flashdsa.ops.common.pdl_prologue."""
    pdl_prologue(PDL)
    r = tl.program_id(0).to(tl.int64)
    n = row_length(r, ks_ptr, ke_ptr, NEXT_N, n_pos, PAGED)
    if PAGED:
        n_s = (n + st - 1) // st
    else:
        ks = tl.maximum(tl.load(ks_ptr + r), 0)
        ke = tl.maximum(tl.load(ke_ptr + r), 0)
        n_s = tl.maximum((ke + st - 1) // st - (ks + st - 1) // st, 0)
    nn = tl.maximum(n, 1).to(tl.int64)
    rank = (n_s.to(tl.int64) * (MARGIN_NUM_C * topk) + MARGIN_DEN_C * nn - 1) // (MARGIN_DEN_C * nn)
    rank = tl.maximum(rank, 1).to(tl.int32)
    e = tl.arange(0, BLOCK)
    v = tl.load(samp_ptr + r * stride_s + e, mask=e < n_cols, other=float("-inf"))
    valid = v > float("-inf")
    keys = tl.where(valid, score_key(v), INT32_MIN_C)
    nvalid = tl.sum(valid.to(tl.int32), axis=0)
    T = kth_largest(keys, nvalid, INT32_MIN_C, rank)
    need = (n > topk) & (rank <= n_s) & (rank <= r_max) & (nvalid >= rank)
    tl.store(thr_ptr + r, tl.where(need, T, INT32_MIN_C))
    if ZERO_CNT:
        tl.store(cnt_ptr + r, 0)


def select_warps(p: Problem) -> int:
    """Warps of a select program: 4 when the rows fill the GPU several times over (more
    rows resident an SM: the kernel is throughput-bound), 8 for few rows (latency-bound)."""
    if interpreted() or p.q.device.type != "cuda":
        return 4
    return 4 if p.rows >= 2 * num_sms(p.q.device) else 8


def sample_warps(p: Problem) -> int:
    """Warps of a sample-threshold program (a row of at most SAMPLE_MAX sampled scores)."""
    return 4


def sample_stride(n_pos: int) -> int:
    """Keys between two sampled ones: SAMPLE_STRIDE, or more where the sample of a row
    would exceed SAMPLE_MAX scores (the threshold kernel holds a sampled row in registers)."""
    return max(SAMPLE_STRIDE, triton.cdiv(n_pos, SAMPLE_MAX))


def sample_thresholds(p: Problem, topk: int, zero_cnt: torch.Tensor | None = None) -> torch.Tensor:
    """[rows] int32 score keys: the ceil(MARGIN * topk * n_s / n)-th largest of the
    row's n_s sampled scores (n = its candidate keys), INT32_MIN where the row has at
    most topk candidates or the sample is too short (every candidate then passes).
    ``zero_cnt`` [rows] (the atomic filter's counters) is zeroed on the way. The sample
    pass splits its keys down to one tile a program: with few rows (small decode
    batches) its latency, not its work, is its cost."""
    dev = p.q.device
    st = sample_stride(p.n_pos)
    n_s_all = triton.cdiv(p.n_pos, st)
    if n_s_all == 0:
        if zero_cnt is not None:
            zero_cnt.zero_()
        return torch.full((p.rows,), INT32_MIN, dtype=torch.int32, device=dev)
    thr = torch.empty(p.rows, dtype=torch.int32, device=dev)
    r_max = min(n_s_all, math.ceil(MARGIN * topk / st + MARGIN) + 1)
    for r0, sub, out in scored_chunks(p, st, SAMPLE_BYTES, p.cfg["BLOCK_N"]):
        r1 = r0 + sub.rows
        sample_threshold_kernel[(sub.rows,)](
            out, sub.ks, sub.ke, thr[r0:r1], thr if zero_cnt is None else zero_cnt[r0:r1], out.stride(0), n_s_all,
            st, topk, r_max, p.next_n, p.n_pos, PAGED=p.paged, ZERO_CNT=zero_cnt is not None,
            BLOCK=triton.next_power_of_2(n_s_all), num_warps=sample_warps(p), **pdl_launch(dev))
    return thr


def candidate_capacity(topk: int, n_pos: int, slots: bool) -> int:
    """Candidates a row's filter buffers hold; a row whose passing scores overflow them is
    redone by the fallback. The count of scores at or above the rank-r sampled score
    (r = about MARGIN * topk / stride) has a relative spread of about 1 / sqrt(r),
    whatever the scores' distribution (order statistics of a uniform sample), ties
    apart. One buffer a row (atomic appends): the expected count plus CAP_SIGMAS of
    that spread (3980 at top-k 2048, stride 16). Per-column slots: twice the expected
    count, since each of the many slots can overflow on its own."""
    st = sample_stride(n_pos)
    expected = math.ceil(MARGIN * topk) + st
    if slots:
        return 2 * expected
    rank = max(1, math.ceil(MARGIN * topk / st))
    return expected + math.ceil(CAP_SIGMAS * expected / math.sqrt(rank))


def filter_split(p: Problem, min_split: int, n_split: int | None = None) -> tuple[int, int]:
    """(n_split, split_len) of the filter pass: ``choose_split``'s, except that paged
    (decode) rows, too few to fill the GPU, split the key axis further: to about
    FILTER_PROGRAMS_PER_SM programs an SM, but never below FILTER_MIN_TILES key tiles a
    program (benchmarks/probe_filter_split.py measures the choice)."""
    n_pos = max(p.n_pos, 1)
    split = choose_split(p.n_prog(), n_pos, p.cfg["BLOCK_N"], p.q.device, min_split, n_split)
    if n_split is not None or not p.paged:
        return split
    want = min(triton.cdiv(FILTER_PROGRAMS_PER_SM * num_sms(p.q.device), p.n_prog()),
               triton.cdiv(n_pos, FILTER_MIN_TILES * p.cfg["BLOCK_N"]))
    if want <= split[0]:
        return split
    return choose_split(p.n_prog(), n_pos, p.cfg["BLOCK_N"], p.q.device, min_split, want)


def threshold_topk(p: Problem, topk: int, min_split: int, n_split: int | None = None,
                   mode: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, topk] int32 indices, -1 padded, [rows] int32 fail flags) of the
    threshold method, before any fallback. ``mode``: SCORES_SLOTS or SCORES_ATOMIC
    (default: slots while the key axis has at most SLOTS_MAX_SPLIT splits)."""
    dev = p.q.device
    bn = p.cfg["BLOCK_N"]
    split = filter_split(p, min_split, n_split)
    if mode is None:
        mode = SCORES_SLOTS if split[0] <= SLOTS_MAX_SPLIT else SCORES_ATOMIC
    cap = candidate_capacity(topk, p.n_pos, mode == SCORES_SLOTS)
    if mode == SCORES_SLOTS:
        n_slots = split[0] * bn
        sc = triton.cdiv(cap, n_slots) + 16
    else:
        n_slots, sc = 1, cap
    cnt = scratch(p.rows * n_slots, device=dev)  # slots: written by the filter; appends: zeroed by the sample
    thr = sample_thresholds(p, topk, zero_cnt=cnt if mode == SCORES_ATOMIC else None)
    bkey = scratch(p.rows * n_slots * sc, device=dev)
    bidx = scratch(p.rows * n_slots * sc, device=dev)
    run_filter = filter_launcher(p) if mode == SCORES_SLOTS else None   # the Gluon filter on Hopper
    if run_filter is not None:
        run_filter(p, split, thr, bkey, bidx, cnt, sc)
    else:
        launch_scores(p, mode, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)
    out = scratch(p.rows, topk, device=dev)
    fail = scratch(p.rows, device=dev)
    sc_pad, ns_pad = triton.next_power_of_2(sc), triton.next_power_of_2(n_slots)
    # a chunk takes whole positions of every slot (at least one entry of each)
    chunk = max(ns_pad, min(SELECT_CHUNK if mode == SCORES_SLOTS else SELECT_CHUNK_ATOMIC, ns_pad * sc_pad))
    if p.rows:
        indexer_select_kernel[(p.rows,)](
            bkey, bidx, cnt, thr, p.ks, p.ke, out, fail, n_slots, sc, topk, p.next_n, p.n_pos,
            NS_PAD=ns_pad, SC_PAD=sc_pad, CHUNK=chunk,
            TOPK_PAD=triton.next_power_of_2(topk), PAGED=p.paged, num_warps=select_warps(p), **pdl_launch(dev))
    return out, fail


METHODS = ("auto", "direct", "threshold", "streaming")


def select_topk(p: Problem, topk: int, min_split: int, n_split: int | None = None, method: str = "auto",
                mode: int | None = None) -> torch.Tensor:
    """[rows, topk] int32, exact up to ties, by ``method``: "direct" (materialized scores
    of row chunks, flashdsa.ops.indexer.direct), "threshold" (with the streaming fallback
    for flagged rows), "streaming", or "auto": direct where
    :func:`~flashdsa.ops.indexer.direct.prefers_direct` says so, else threshold. No host sync: the fallback is one launch whose unflagged
    programs exit at once (CUDA-graph safe)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if p.rows == 0:
        return torch.empty(0, topk, dtype=torch.int32, device=p.q.device)
    if method == "auto":
        method = "direct" if prefers_direct(p) else "threshold"
    if method == "direct":
        return direct_topk(p, topk, min_split)
    if method == "streaming":
        return streaming_topk(p, topk, min_split, n_split)
    out, fail = threshold_topk(p, topk, min_split, n_split, mode)
    streaming_topk(p, topk, min_split, out=out, fail=fail)
    return out


def indexer_topk(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                 ks: torch.Tensor, ke: torch.Tensor, topk: int, config: dict | None = None,
                 n_split: int | None = None, method: str = "auto") -> torch.Tensor:
    """[S, topk] int32 key rows of the topk largest index scores in each row's [ks, ke),
    -1 padded, in no particular order; never materializes [S, S_kv] (direct method: the
    scores of row chunks of at most DIRECT_BYTES; threshold method: about 8 * S * 3 *
    topk bytes of candidates plus a sample of at most SAMPLE_BYTES; see
    :func:`select_topk`). Inputs as :func:`indexer_logits`."""
    p = ragged_problem(q8, k8, k_scale, weights, ks, ke, config)
    return select_topk(p, topk, 4 * p.cfg["BLOCK_N"], n_split, method)

