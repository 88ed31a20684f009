"""Probe (issue 17): the interpolated search of ``selection.kth_search`` against the
bisection it replaced (kept here as ``kth_search_bisect``), each in its own process (Triton
compiles the callers of ``kth_search`` with whichever the module holds when they first
compile).

    python -m benchmarks.probe_search_interp --variant bisect --tag 1
    python -m benchmarks.probe_search_interp --variant interp --tag 1   # alternate a few times

Each process times the prefill logits and top-k (4096 queries, causal, 8K-128K keys; the
selected scores checked against torch.topk on sampled rows) and the paged top-k of a few
decode batches in a CUDA graph (bench_indexer's cases), and writes
``probe_search_interp_<variant>_<tag>.json``.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.bench_indexer import TOPK, check_topk_exact, prefill_inputs, run_decode
from benchmarks.common import bench_ms, measure_ceilings, write_result
from flashdsa.ops import indexer as ops
from flashdsa.ops.indexer import selection
from flashdsa.ops.indexer.selection import INT32_MIN_C


@triton.jit
def kth_search_bisect(keys, nvalid, thr, k):
    """The search before the interpolation (bisection with the early stop).
    (T, count(keys >= T)): T the k-th largest of one row's keys [CAP] (INT32_MIN: no
    entry; nvalid entries, all >= ``thr``), exact (any value when nvalid < k). Binary
    search on the int32 key range with the invariant count(key >= lo) >= k >
    count(key >= hi + 1), the count at lo carried along; ``thr`` (the last threshold, a
    lower bound of the entries) tightens the start.

    The search stops early at a midpoint with exactly k keys at or above it: the answer
    is then the least of those k (one more reduction). On distinct scores that happens
    once the bracket holds a few keys, after about log2(nvalid) + 2 steps instead of
    the bit width of the bracket (up to 31); ties at the k-th key run to the end."""
    lo = tl.min(tl.where(keys > INT32_MIN_C, keys, 2147483647), axis=0)
    lo = tl.maximum(lo, thr).to(tl.int64)
    hi = tl.max(keys, axis=0).to(tl.int64)
    lo = tl.where(nvalid >= k, lo, hi)  # nothing to search in a short row
    c_lo = nvalid.to(tl.int32)
    while hi > lo:
        mid = lo + (hi - lo + 1) // 2
        c = tl.sum((keys >= mid.to(tl.int32)).to(tl.int32), axis=0)
        ok = c >= k
        lo = tl.where(ok, mid, lo)
        c_lo = tl.where(ok, c, c_lo)
        hi = tl.where(c == k, mid, tl.where(ok, hi, mid - 1))
    return tl.min(tl.where(keys >= lo.to(tl.int32), keys, 2147483647), axis=0), c_lo



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=("bisect", "interp"), required=True)
    ap.add_argument("--tag", default="1")
    ap.add_argument("--s-kv", type=int, nargs="+", default=[8192, 16384, 32768, 131072])
    args = ap.parse_args()
    if args.variant == "bisect":
        selection.kth_search = kth_search_bisect  # before any kernel that calls it compiles
    torch.manual_seed(0)
    ceil = measure_ceilings(repeats=1)
    res = {"variant": args.variant, "ceilings": ceil, "prefill": [], "decode": []}
    for s_kv in args.s_kv:
        inp = prefill_inputs(s_kv)
        logits = ops.indexer_logits(*inp)
        rows = list(range(0, inp[0].shape[0], 64)) + [inp[0].shape[0] - 1]
        diff = check_topk_exact(ops.indexer_topk(*inp, TOPK), logits, inp[4], inp[5], rows)
        del logits
        t_log = bench_ms(lambda: ops.indexer_logits(*inp))
        t_topk = bench_ms(lambda: ops.indexer_topk(*inp, TOPK))
        r = {"s_kv": s_kv, "logits_ms": t_log, "topk_ms": t_topk, "topk_over_logits": t_topk / t_log,
             "topk_check_max_abs_diff": diff}
        res["prefill"].append(r)
        print(r, flush=True)
        del inp
        torch.cuda.empty_cache()
    for bsz, ctx in ((1, 32768), (1, 131072), (32, 32768), (128, 32768)):
        r = run_decode(bsz, ctx, ceil)
        res["decode"].append({k: r[k] for k in ("batch", "context", "fused_topk_graph_ms", "logits_graph_ms",
                                                 "topk_over_logits_graph", "flagged_rows")})
        print(res["decode"][-1], flush=True)
    print("written", write_result(f"probe_search_interp_{args.variant}_{args.tag}", res))


if __name__ == "__main__":
    main()
