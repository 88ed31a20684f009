"""Probe (issue 17): warps of the direct method's select (``rows_topk_kernel``) on prefill
rows (4096 queries, causal, 8K and 16K keys), where ``direct._warps`` gives 4 a row.

Each variant's indices are checked equal (as sets) to the product's, then the whole
direct top-k is timed, the variants alternated.

    python -m benchmarks.probe_direct_warps [--s-kv 8192 16384] [--warps 2 4 8] [--repeats 3]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_indexer import TOPK, prefill_inputs
from benchmarks.common import bench_ms, write_result
from flashdsa.ops import indexer as ops
from flashdsa.ops.indexer import direct


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s-kv", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    product = direct._warps
    res = {"cases": []}
    for s_kv in args.s_kv:
        torch.manual_seed(0)
        inp = prefill_inputs(s_kv)
        want = ops.indexer_topk(*inp, TOPK, method="direct").sort(dim=1).values
        row = {"s_kv": s_kv, "product_warps": product(s_kv), "same": {}, "topk_ms": {}}
        for nw in args.warps:
            direct._warps = lambda block, nw=nw: nw
            got = ops.indexer_topk(*inp, TOPK, method="direct").sort(dim=1).values
            row["same"][nw] = bool(torch.equal(got, want))
            row["topk_ms"][nw] = []
        for _ in range(args.repeats):
            for nw in args.warps:
                direct._warps = lambda block, nw=nw: nw
                row["topk_ms"][nw].append(bench_ms(lambda: ops.indexer_topk(*inp, TOPK, method="direct")))
        direct._warps = product
        row["logits_ms"] = bench_ms(lambda: ops.indexer_logits(*inp))
        row["median"] = {nw: sorted(v)[len(v) // 2] for nw, v in row["topk_ms"].items()}
        res["cases"].append(row)
        print(row, flush=True)
        del inp
        torch.cuda.empty_cache()
    print("written", write_result("probe_direct_warps", res))


if __name__ == "__main__":
    main()
