"""Probe: the top-k selects' search, two-way (the product's kth_search: one count a
step) against four-way (three pivots a step, their counts packed in one int64 sum:
half the steps, three compares an entry a step). The one-program selects of small
decode batches are bound by the latency of their search steps (reduce, broadcast,
next midpoint), not by the compares, so fewer steps should pay there; prefill's many
rows are throughput-bound and may lose. One process per variant (``--ways``; the
variant replaces selection.kth_search before anything compiles), each timing:

- the paged decode top-k (CUDA graph) at batch 1 x 8K / 32K / 128K and 32 x 32K, with
  its kernels (torch.profiler) and a check that it selects what torch.topk of the
  paged logits does (same score sets);
- the prefill top-k of 4096 queries over 8K and 32K keys (the direct and the threshold
  method).

    python -m benchmarks.probe_search_ways --ways 2    # -> $OUT/probe_search_ways2.json
    python -m benchmarks.probe_search_ways --ways 4    # -> $OUT/probe_search_ways4.json

Not a benchmark of record: docs/benchmarks_indexer.md says what it found.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, decode_inputs, prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, kernel_table, measure_ceilings, write_result  # noqa: E402
from benchmarks.cost_curve import graph_us  # noqa: E402
from flashdsa.ops.indexer import selection  # noqa: E402
from flashdsa.ops.indexer.selection import INT32_MIN_C  # noqa: E402



@triton.jit
def kth_search4(keys, nvalid, thr, k):
    """selection.kth_search with three pivots a step (the bracket shrinks fourfold):
    the counts at the pivots come from one int64 sum of packed 21-bit fields."""
    lo = tl.min(tl.where(keys > INT32_MIN_C, keys, 2147483647), axis=0)
    lo = tl.maximum(lo, thr).to(tl.int64)
    hi = tl.max(keys, axis=0).to(tl.int64)
    lo = tl.where(nvalid >= k, lo, hi)
    c_lo = nvalid.to(tl.int32)
    mask = (1 << 21) - 1  # one packed count
    while hi > lo:
        span = hi - lo
        p1 = lo + (span + 3) // 4
        p2 = lo + (2 * span + 3) // 4
        p3 = lo + (3 * span + 3) // 4
        packed = ((keys >= p1.to(tl.int32)).to(tl.int64) + ((keys >= p2.to(tl.int32)).to(tl.int64) << 21)
                  + ((keys >= p3.to(tl.int32)).to(tl.int64) << 42))
        s = tl.sum(packed, axis=0)
        c1 = (s & mask).to(tl.int32)
        c2 = ((s >> 21) & mask).to(tl.int32)
        c3 = (s >> 42).to(tl.int32)
        new_lo = tl.where(c3 >= k, p3, tl.where(c2 >= k, p2, tl.where(c1 >= k, p1, lo)))
        new_c = tl.where(c3 >= k, c3, tl.where(c2 >= k, c2, tl.where(c1 >= k, c1, c_lo)))
        new_hi = tl.where(c3 >= k, hi, tl.where(c2 >= k, p3 - 1, tl.where(c1 >= k, p2 - 1, p1 - 1)))
        moved = new_lo > lo
        new_hi = tl.where(moved & (new_c == k), new_lo, new_hi)  # exactly k at or above: done
        lo = new_lo
        c_lo = new_c
        hi = new_hi
    return tl.min(tl.where(keys >= lo.to(tl.int32), keys, 2147483647), axis=0), c_lo


def same_scores(idx, logits, rows, bt=None) -> bool:
    """The selected scores of each row equal torch.topk's (as sorted lists). ``bt``: the
    block table of a paged problem (one row a sequence), whose top-k returns physical
    slots: mapped back to logical positions."""
    for t in rows:
        sel = idx[t][idx[t] >= 0].long()
        if bt is not None:
            inv = torch.empty(int(bt.max()) + 1, dtype=torch.long, device=bt.device)
            inv[bt[t].long()] = torch.arange(bt.shape[1], device=bt.device)
            sel = inv[sel // 64] * 64 + sel % 64
        got = logits[t][sel].sort(descending=True).values
        want = logits[t].topk(sel.numel()).values
        if not torch.equal(got, want):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ways", type=int, choices=(2, 4), default=2)
    args = ap.parse_args()
    if args.ways == 4:
        selection.kth_search = kth_search4
    from flashdsa.ops import indexer as ops  # after the patch: nothing compiled yet
    rows = []
    for bsz, ctx in ((1, 8192), (1, 32768), (1, 131072), (32, 32768)):
        q8, cache, w, cl, bt = decode_inputs(bsz, ctx)
        width = bt.shape[1] * 64
        row = {"phase": "decode", "batch": bsz, "context": ctx}
        for method in ("auto", "threshold"):
            def run(method=method):
                return ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK, method=method)
            logits = ops.paged_indexer_logits(q8, cache, w, cl, bt, width)
            row[method + "_same"] = same_scores(run(), logits, range(min(bsz, 4)), bt)
            row[method + "_us"] = graph_us(run)
        row["kernels"] = kernel_table(lambda: ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK), top=6)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "kernels"}, flush=True)
    for s_kv in (8192, 32768):
        inp = prefill_inputs(s_kv)
        logits = ops.indexer_logits(*inp)
        row = {"phase": "prefill", "queries": inp[0].shape[0], "s_kv": s_kv}
        for method in ("direct", "threshold"):
            def run(method=method):
                return ops.indexer_topk(*inp, TOPK, method=method)
            row[method + "_same"] = same_scores(run(), logits, range(0, inp[0].shape[0], 997))
            row[method + "_ms"] = round(bench_ms(run), 4)
        rows.append(row)
        print(row, flush=True)
    print("wrote", write_result(f"probe_search_ways{args.ways}", {"ways": args.ways, "ceilings": measure_ceilings(),
                                                                   "rows": rows}))


if __name__ == "__main__":
    main()
