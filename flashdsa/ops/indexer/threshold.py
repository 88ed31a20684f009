"""Threshold top-k of the indexer scores, the default method, and the top-k entry points
(:func:`select_topk`, :func:`indexer_topk`). Never materializes [S, S_kv]:

1. sample: the scores of every SAMPLE_STRIDE-th key give each row a threshold that about
   MARGIN * topk of its scores pass (:func:`sample_thresholds`);
2. filter: one pass of the scores kernel keeps the scores at or above it (per-column
   slots counted in registers, or atomic appends when the key axis is split finely);
3. select: ``indexer_select_kernel`` takes each row's exact top-k of its candidates.

A row whose candidates overflowed or fell short is redone by the streaming kernel
(flashdsa.ops.indexer.streaming): exact on any input, and rare on real data (the
sample's quantile is within a few percent of the true one).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common import interpreted
from .scores import SCORES_ATOMIC, SCORES_SLOTS, SCORES_STORE, Problem, choose_split, launch_scores, ragged_problem
from .selection import INT32_MIN, INT32_MIN_C, score_keys, scratch, take_topk
from .streaming import streaming_topk

SAMPLE_STRIDE = 16             # the sample scores every SAMPLE_STRIDE-th key
MARGIN = 1.5                   # the threshold aims at MARGIN * topk passing scores a row
SAMPLE_BYTES = 64 * 2 ** 20   # the sample's scores are computed in row chunks of at most this
SLOTS_MAX_SPLIT = 4            # per-slot buffers while the key axis has at most this many splits


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
    take, pos, n_take, nvalid, T, full = take_topk(keys, inb, tl.load(thr_ptr + r), topk)
    tl.store(out_ptr + r * topk + pos, idx, mask=take)
    p = tl.arange(0, TOPK_PAD)
    tl.store(out_ptr + r * topk + p, tl.full([TOPK_PAD], -1, tl.int32), mask=(p >= n_take) & (p < topk))
    short = nvalid < tl.minimum(topk, tl.load(nrow_ptr + r))
    tl.store(fail_ptr + r, ((tl.max(cnt) > SC) | short).to(tl.int32))



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
    return torch.where(need, score_keys(t), INT32_MIN)


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
        cnt = scratch(p.rows * n_slots, device=dev)
    else:
        n_slots, sc = 1, 2 * expected
        cnt = scratch(p.rows, device=dev, fill=0)
    bkey = scratch(p.rows * n_slots * sc, device=dev)
    bidx = scratch(p.rows * n_slots * sc, device=dev)
    launch_scores(p, mode, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)
    out = scratch(p.rows, topk, device=dev)
    fail = scratch(p.rows, device=dev)
    if p.rows:
        indexer_select_kernel[(p.rows,)](
            bkey, bidx, cnt, thr, n, out, fail, n_slots, sc, topk,
            NS_PAD=triton.next_power_of_2(n_slots), SC_PAD=triton.next_power_of_2(sc),
            TOPK_PAD=triton.next_power_of_2(topk), num_warps=4 if interpreted() else 8)
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

