"""Score keys and exact top-k selection, shared by both top-k methods.

Scores are compared as int32 *keys*: for fp32 bits b, key = b if b >= 0 else
b ^ 0x7FFFFFFF, which orders like the floats (and -inf above every NaN pattern); an
empty candidate slot holds INT32_MIN. :func:`take_topk` finds a row's exact top-k by a
binary search over that int32 range (no sort), ties at the k-th key taken in position
order. The streaming kernel uses it to compact its buffers and at the end. The
select kernels of the direct and threshold methods run it in two passes
(:func:`kth_cut`, then :func:`chunk_take` a chunk at a time), so that only the keys
stay in registers during the search.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INT32_MIN = -(2 ** 31)
INT32_MIN_C = tl.constexpr(INT32_MIN)


@triton.jit
def score_key(s):
    """Order-preserving int32 image of fp32 scores."""
    b = s.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _halve(lo, hi, c_lo, c, k, mid):
    """One step of :func:`kth_search`'s bracket, given c = count(key >= mid)."""
    ok = c >= k
    return tl.where(ok, mid, lo), tl.where(c == k, mid, tl.where(ok, hi, mid - 1)), tl.where(ok, c, c_lo)


@triton.jit
def kth_search(keys, nvalid, thr, k):
    """(T, count(keys >= T), rel, base): T the k-th largest of one row's keys [CAP]
    (INT32_MIN: no entry; nvalid entries, all >= ``thr``), exact (any value when nvalid <
    k); rel = keys - base clamped to the search's first bracket (all in [0, 2^31)), which
    :func:`kth_cut` counts from instead of the keys. Binary search on the int32 key
    range with the invariant count(key >= lo) >= k > count(key >= hi + 1), the count at
    lo carried along; ``thr`` (the last threshold, a lower bound of the entries) tightens
    the start.

    The search stops early at a midpoint with exactly k keys at or above it: the answer
    is then the least of those k (one more reduction). On distinct scores that happens
    once the bracket holds a few keys, after about log2(nvalid) + 2 steps instead of
    the bit width of the bracket (up to 31); ties at the k-th key run to the end.

    Once the bracket spans less than 2^31 keys (at once, unless the row holds scores of
    both signs far apart: then after one or two compares of the keys), the search counts
    on rel, base = the bracket's low end: rel - m < 0 exactly when rel < m, so a count is
    a subtraction and the sign bit's sum, half the instructions of a compare and a
    select a key. Only rel is live from then on."""
    lo = tl.min(tl.where(keys > INT32_MIN_C, keys, 2147483647), axis=0)
    lo = tl.maximum(lo, thr).to(tl.int64)
    hi = tl.max(keys, axis=0).to(tl.int64)
    lo = tl.where(nvalid >= k, lo, hi)  # nothing to search in a short row
    c_lo = nvalid.to(tl.int32)
    while hi - lo > 2147483646:
        mid = lo + (hi - lo + 1) // 2
        lo, hi, c_lo = _halve(lo, hi, c_lo, tl.sum((keys >= mid.to(tl.int32)).to(tl.int32), axis=0), k, mid)
    base = lo.to(tl.int32)
    # [0, hi + 1 - lo] < 2^31: the keys above the bracket (after a compare step) at its top + 1
    rel = tl.where(keys > hi.to(tl.int32), (hi + 1 - lo).to(tl.int32), tl.maximum(keys, base) - base)
    n_all = c_lo * 0 + keys.numel  # entries of the tile, as a scalar tensor (rel 0 for the empty ones)
    while hi > lo:
        mid = lo + (hi - lo + 1) // 2
        below = tl.sum(((rel - (mid - base).to(tl.int32)) >> 31) & 1, axis=0)  # entries with rel < mid - base
        lo, hi, c_lo = _halve(lo, hi, c_lo, n_all - below, k, mid)
    t = (lo - base.to(tl.int64)).to(tl.int32)
    return tl.min(tl.where(rel >= t, rel, 2147483647), axis=0) + base, c_lo, rel, base


@triton.jit
def kth_largest(keys, nvalid, thr, k):
    """The k-th largest of one row's keys (see :func:`kth_search`)."""
    return kth_search(keys, nvalid, thr, k)[0]


@triton.jit
def take_topk(keys, valid, thr, k):
    """Exact top-k of the ``valid`` entries of keys [N] (any layout, flattened): returns
    (take [N] mask, pos = destination 0..n_take-1 of each taken entry, n_take, nvalid,
    T = the k-th largest key, full = more than k entries). All entries are >= ``thr``
    (a lower bound for the search). Ties at T are taken in position order; a row with at
    most k entries takes all of them."""
    nvalid = tl.sum(valid.to(tl.int32), axis=0)
    T = kth_largest(tl.where(valid, keys, INT32_MIN_C), nvalid, thr, k)
    gt = valid & (keys > T)
    eq = valid & (keys == T)
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    if n_gt + tl.sum(eq.to(tl.int32), axis=0) > k:  # ties at T cut: the first ones by position
        take = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= k - n_gt))
    else:
        take = gt | eq
    full = nvalid > k
    # (tl.where, not `&`, with a scalar bool: the 3.9 interpreter's tensor & scalar-bool
    # gives a mask dtype tl.store rejects)
    take = tl.where(full, take, valid)
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    return take, pos, tl.minimum(nvalid, k), nvalid, T, full


@triton.jit
def kth_cut(keys, nvalid, thr, k):
    """First pass of a two-pass top-k over keys [N] (INT32_MIN: no entry; nvalid
    entries, all >= thr): (T = the k-th largest key, n_gt = entries above T when ties
    are cut, else 0, full = more than k entries, cut = ties at T must be cut). Only the keys need be live: the second
    pass (:func:`chunk_take`) re-reads the entries a chunk at a time."""
    T, c_ge, rel, base = kth_search(keys, nvalid, thr, k)
    full = nvalid > k
    cut = full & (c_ge > k)  # T > INT32_MIN when full
    n_gt = (nvalid * 0).to(tl.int32)  # needed only to cut ties
    if cut:
        n_gt = tl.sum((rel > T - base).to(tl.int32), axis=0)
    return T, n_gt, full, cut


@triton.jit
def chunk_take(keys, present, T, n_gt, full, cut, k, n_take, n_eq):
    """Second pass of the two-pass top-k, on one chunk of entries (in position order):
    (take mask, pos = destination of each taken entry, n_take, n_eq) with the running
    counts of taken entries and (when ties are cut) of entries equal to T updated. Ties
    at T are taken in position order; a row with at most k entries takes all of them."""
    if full:
        if cut:
            eq = present & (keys == T)
            take = (present & (keys > T)) | (eq & (n_eq + tl.cumsum(eq.to(tl.int32), axis=0) <= k - n_gt))
            n_eq += tl.sum(eq.to(tl.int32), axis=0)
        else:
            take = present & (keys >= T)
    else:
        take = present
    pos = n_take + tl.cumsum(take.to(tl.int32), axis=0) - 1
    n_take += tl.sum(take.to(tl.int32), axis=0)
    return take, pos, n_take, n_eq


def scratch(*shape, device, fill=None) -> torch.Tensor:
    """int32 scratch of the top-k methods: zeros when ``fill == 0``, else uninitialized
    (the kernels write every entry they later read)."""
    if fill == 0:
        return torch.zeros(*shape, dtype=torch.int32, device=device)
    return torch.empty(*shape, dtype=torch.int32, device=device)
