"""Probe (issue 17): warps of the sample-threshold kernel on prefill rows (4096 queries).

``threshold.sample_warps`` gives every row's program 4 warps; with thousands of rows the
kernel is throughput-bound, and a row of 2048 sampled scores fits one or two warps. Each
variant's thresholds are checked equal to the product's, then the sample thresholds alone
and the whole top-k are timed, the variants alternated.

    python -m benchmarks.probe_sample_warps [--s-kv 32768 131072] [--warps 1 2 4] [--repeats 3]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_indexer import TOPK, prefill_inputs
from benchmarks.common import bench_ms, measure_ceilings, write_result
from flashdsa.ops import indexer as ops
from flashdsa.ops.indexer import threshold


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s-kv", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    product = threshold.sample_warps
    res = {"ceilings": measure_ceilings(), "cases": []}
    for s_kv in args.s_kv:
        torch.manual_seed(0)
        inp = prefill_inputs(s_kv)
        p = ops.ragged_problem(*inp)
        want = threshold.sample_thresholds(p, TOPK)
        row = {"s_kv": s_kv, "product_warps": product(p), "sample_ms": {}, "topk_ms": {}, "same": {}}
        for nw in args.warps:
            threshold.sample_warps = lambda p, nw=nw: nw
            row["same"][nw] = bool(torch.equal(threshold.sample_thresholds(p, TOPK), want))
            row["sample_ms"][nw], row["topk_ms"][nw] = [], []
        for _ in range(args.repeats):
            for nw in args.warps:
                threshold.sample_warps = lambda p, nw=nw: nw
                row["sample_ms"][nw].append(bench_ms(lambda: threshold.sample_thresholds(p, TOPK)))
                row["topk_ms"][nw].append(bench_ms(lambda: ops.indexer_topk(*inp, TOPK)))
        threshold.sample_warps = product
        row["logits_ms"] = bench_ms(lambda: ops.indexer_logits(*inp))
        row["median"] = {k: {nw: sorted(v)[len(v) // 2] for nw, v in row[k].items()} for k in ("sample_ms", "topk_ms")}
        res["cases"].append(row)
        print(row, flush=True)
        del inp, p
        torch.cuda.empty_cache()
    print("written", write_result("probe_sample_warps", res))


if __name__ == "__main__":
    main()
