"""Direct top-k of the indexer scores, for short rows: the scores kernel writes the
scores of a chunk of rows (SCORES_STORE), then ``rows_topk_kernel`` takes each row's
exact top-k with the row held in registers (binary search on the int32 score keys,
then the positions by a running prefix sum; ties in position order). No sample, no
candidate slots, no fallback: at a few thousand keys a row the threshold method's fixed
costs outweigh what it saves (the crossovers, :func:`prefers_direct`, are measured:
docs/benchmarks_indexer.md).

Memory: the scores of at most DIRECT_BYTES a chunk (plus the [rows, topk] output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout import PAGE_SIZE
from ..common import interpreted, num_sms, pdl_launch, pdl_prologue
from .scores import Problem, row_length, scored_chunks
from .selection import INT32_MIN_C, chunk_take, kth_cut, score_key

DIRECT_SHORT_POS = 8192         # "auto" takes the direct method for rows of at most this many keys,
DIRECT_MAX_POS = 16384          # up to this many unless the rows are few,
DIRECT_WAVE_MAX_POS = 32768     # and up to this many when its programs (a row each) fill about one wave
                                # (see direct_wins; paged rows: DIRECT_SHORT_POS, enough rows)
DIRECT_BYTES = 256 * 2 ** 20    # the scores of one chunk of rows at most
DIRECT_CHUNK = 1024             # scores a step of the select's second pass


def prefers_direct(p: Problem) -> bool:
    """Whether "auto" takes the direct method for ``p``: :func:`direct_wins` with the
    GPU's SM count (short rows only under the interpreter or on CPU)."""
    sms = num_sms(p.q.device) if p.q.device.type == "cuda" and not interpreted() else 0
    return direct_wins(p.rows, p.n_pos, sms, p.paged)


def direct_wins(rows: int, n_pos: int, sms: int, paged: bool = False) -> bool:
    """The measured crossovers on an H200 (docs/benchmarks_indexer.md).

    Paged (decode) rows, whose threshold passes split the key axis down to a few tiles a
    program (``threshold.filter_split``): the direct method only for rows of at most
    DIRECT_SHORT_POS keys, and only when they are at least a fifth as many as the SMs
    (one row of 8K: 25 us by threshold against 26-28 directly, 32 rows: 48-49 against
    48; 128 rows of 32K: 251-253 against 264 us).

    Ragged (prefill) rows: the direct method for rows of at most DIRECT_SHORT_POS keys; up
    to DIRECT_MAX_POS keys when there are at least a third as many rows as SMs (4096 rows
    of 16K: 1.52 ms against 1.63); up to DIRECT_WAVE_MAX_POS keys while the rows fill the
    GPU about once (a third of to twice as many rows as SMs), where one wave of long
    selects beat the threshold passes when it was measured on decode rows, before their
    finer split. Many long rows (4096 of 32K: 3.03 ms by threshold against 3.68) go to
    the threshold method. Without a GPU (sms 0): the direct method up to DIRECT_MAX_POS,
    paged rows too."""
    if paged and sms > 0:
        return n_pos <= DIRECT_SHORT_POS and rows >= sms // 5
    if n_pos <= DIRECT_SHORT_POS:
        return True
    if n_pos <= DIRECT_MAX_POS:
        return sms == 0 or rows >= sms // 3
    return n_pos <= DIRECT_WAVE_MAX_POS and sms > 0 and sms // 3 <= rows <= 2 * sms


@triton.jit
def rows_topk_kernel(s_ptr, ks_ptr, ke_ptr, bt_ptr, out_ptr, stride_s, stride_bt, topk, NEXT_N, n_pos,
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr, TOPK_PAD: tl.constexpr, PAGE: tl.constexpr,
                     PAGED: tl.constexpr, PDL: tl.constexpr = False):
    """One program a row r of the scores s [rows, n_pos] (n_pos <= BLOCK): out [r, :topk]
    = the positions of its topk largest scores among its candidates (ragged: [ks, ke);
    paged: the first :func:`row_length` positions, reported as the physical slot
    block_table[r // NEXT_N, pos // PAGE] * PAGE + pos % PAGE), -1 padded, in position
    order, ties at the k-th score taken in position order.

    Two passes: the k-th largest key T by binary search over the row held in registers
    (only the keys are live: a register-light kernel, several rows an SM), then the row
    re-read (from L2) in CHUNK-wide pieces whose taken positions are placed by a running
    prefix sum, the next piece loaded while one is taken. PDL: see
    flashdsa.ops.common.pdl_prologue."""
    pdl_prologue(PDL)
    r = tl.program_id(0).to(tl.int64)
    n = row_length(r, ks_ptr, ke_ptr, NEXT_N, n_pos, PAGED)
    start = 0 if PAGED else tl.load(ks_ptr + r)
    end = start + n
    row = s_ptr + r * stride_s
    e = tl.arange(0, BLOCK)
    # the whole row in vector loads (its scores outside [start, end) are not read as keys)
    v = tl.load(row + e, mask=e < n_pos, other=0.0)
    keys = tl.where((e >= start) & (e < end), score_key(v), INT32_MIN_C)
    T, n_gt, full, cut = kth_cut(keys, n, INT32_MIN_C, topk)
    out_row = out_ptr + r * topk
    c = tl.arange(0, CHUNK)
    n_take = n * 0
    n_eq = n * 0
    a0 = start // CHUNK * CHUNK  # aligned pieces: vector loads
    v_next = tl.load(row + a0 + c, mask=a0 + c < n_pos, other=0.0)
    for c0 in range(a0, end, CHUNK):
        off = c0 + c
        m = (off >= start) & (off < end)
        kk = score_key(v_next)
        v_next = tl.load(row + off + CHUNK, mask=off + CHUNK < n_pos, other=0.0)  # in flight while this chunk is taken
        take, pos, n_take, n_eq = chunk_take(kk, m, T, n_gt, full, cut, topk, n_take, n_eq)
        if PAGED:
            blk = tl.load(bt_ptr + (r // NEXT_N) * stride_bt + off // PAGE, mask=take, other=0)
            idx = blk * PAGE + off % PAGE
        else:
            idx = off
        tl.store(out_row + pos, idx, mask=take)
    p = tl.arange(0, TOPK_PAD)
    tl.store(out_row + p, tl.full([TOPK_PAD], -1, tl.int32), mask=(p >= n_take) & (p < topk))


def _warps(block: int) -> int:
    if interpreted():
        return 4
    return 4 if block <= 16384 else 16


def direct_topk(p: Problem, topk: int, min_split: int) -> torch.Tensor:
    """[rows, topk] int32, exact (ties in position order), by the direct method, for rows
    of at most DIRECT_WAVE_MAX_POS key positions (a row is held in registers)."""
    if p.n_pos > DIRECT_WAVE_MAX_POS:
        raise ValueError(f"the direct top-k takes at most {DIRECT_WAVE_MAX_POS} key positions a row, "
                         f"got {p.n_pos}: use method 'threshold' or 'auto'")
    dev = p.q.device
    n_pos = max(p.n_pos, 1)
    out = torch.empty(p.rows, topk, dtype=torch.int32, device=dev)
    block = triton.next_power_of_2(n_pos)
    # PDL for decode rows only: a prefill chunk's select programs, launched early, would
    # wait in their prologue on SMs that the scores kernel's later waves still need
    pdl = pdl_launch(dev) if p.paged else dict(PDL=False)
    for r0, sub, scores in scored_chunks(p, 1, DIRECT_BYTES, min_split):
        rows_topk_kernel[(sub.rows,)](
            scores, sub.ks, sub.ke, sub.bt, out[r0:r0 + sub.rows], scores.stride(0),
            sub.bt.stride(0) if p.paged else 0, topk, p.next_n, n_pos, BLOCK=block, CHUNK=min(block, DIRECT_CHUNK),
            TOPK_PAD=triton.next_power_of_2(topk), PAGE=PAGE_SIZE, PAGED=p.paged, num_warps=_warps(block), **pdl)
    return out
