"""Probe (issue 17): does splitting the key axis of a prefill's scoring passes pay?

At 4096 query rows ``choose_split`` (flashdsa/ops/indexer/scores.py) keeps the key axis
whole: 1024 programs of 4 rows fill the GPU several times over. bench_indexer's sweep
(H200, 2026-12-04 09:43 UTC) nevertheless timed the logits at 32K 9% faster with two
key splits (2.14 against 2.35 ms) and unchanged at 128K. Here, for bench_indexer's
prefill (the last 4096 queries of a causal sequence, H_I 64, d_I 128), at 8K-128K keys:

- the logits with n_split 1, 2, 3, 4, 8, at the product's pipeline depth and at 4;
- the threshold top-k with its filter pass split 1, 2, 4 ways (per-column slots up to
  SLOTS_MAX_SPLIT), checked to select the same sets as the unsplit one.

    python -m benchmarks.probe_prefill_split      # -> $OUT/probe_prefill_split.json (or benchmarks/results/)

Not a benchmark of record: docs/benchmarks_indexer.md says what it found.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import H, D, TOPK, prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402

CONTEXTS = (8192, 16384, 32768, 65536, 131072)
LOGITS_SPLITS = (1, 2, 3, 4, 8)
FILTER_SPLITS = (1, 2, 4)


def main() -> None:
    ceil = measure_ceilings()
    print(ceil, flush=True)
    rows = []
    for s_kv in CONTEXTS:
        inp = prefill_inputs(s_kv)
        tflop = 2 * int((inp[5] - inp[4]).sum()) * H * D / 1e12
        row = {"s_kv": s_kv}
        for stages in (None, 4):
            cfg = None if stages is None else dict(num_stages=stages)
            for n in LOGITS_SPLITS:
                t = bench_ms(lambda: ops.indexer_logits(*inp, config=cfg, n_split=n))
                row[f"logits_st{stages or 'P'}_split{n}_ratio"] = round(tflop / t * 1e3 / ceil["fp8_matmul_tflops"], 4)
                row[f"logits_st{stages or 'P'}_split{n}_ms"] = t
        p = ops.ragged_problem(*inp)
        min_split = 4 * p.cfg["BLOCK_N"]
        want = None
        for n in FILTER_SPLITS:
            def run(n=n):
                return ops.select_topk(p, TOPK, min_split, n_split=n, method="threshold")
            got = run().sort(1).values
            want = got if want is None else want
            row[f"topk_split{n}_same"] = bool(torch.equal(got, want))
            row[f"topk_split{n}_flagged"] = int(ops.threshold_topk(p, TOPK, min_split, n_split=n)[1].sum())
            row[f"topk_split{n}_ms"] = bench_ms(run)
        row["logits_product_ms"] = bench_ms(lambda: ops.indexer_logits(*inp))
        row["topk_auto_ms"] = bench_ms(lambda: ops.indexer_topk(*inp, TOPK))
        rows.append(row)
        print(row, flush=True)
    cols = ["s_kv", "logits_product_ms", "topk_auto_ms"] + [f"logits_stP_split{n}_ratio" for n in LOGITS_SPLITS] + \
        [f"logits_st4_split{n}_ratio" for n in LOGITS_SPLITS] + [f"topk_split{n}_ms" for n in FILTER_SPLITS]
    print_table(rows, cols)
    print("wrote", write_result("probe_prefill_split", {"ceilings": ceil, "rows": rows}))


if __name__ == "__main__":
    main()
