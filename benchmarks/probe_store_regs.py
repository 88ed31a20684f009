"""Probe (issue 17): the scores kernel's register cap when it writes scores.

Nsight Compute on the H200 (``benchmarks/ncu_indexer.py``, 2026-12-04 10:08 UTC) found
the threshold sample's scoring pass (the scores of every 16th key) at 140 registers a
thread: one program of 8 warps an SM, where the logits pass (127 registers) runs two.
The product caps the scores kernel at 128 registers when it writes scores
(``store_maxnreg`` in flashdsa/ops/indexer/scores.py); built for sm_90 with the cap it
has no spills. Here, for bench_indexer's prefill at 8K-128K keys, the sample pass, the
threshold top-k and the logits with the cap and without (``store_maxnreg=None``), and
whether both select the same sets.

    python -m benchmarks.probe_store_regs      # -> $OUT/probe_store_regs.json (or benchmarks/results/)

Not a benchmark of record: docs/benchmarks_indexer.md says what it found.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402

VARIANTS = {"capped": None, "uncapped": dict(store_maxnreg=None)}


def main() -> None:
    ceil = measure_ceilings()
    print(ceil, flush=True)
    rows = []
    torch.manual_seed(0)
    for s_kv in (8192, 32768, 65536, 131072):
        inp = prefill_inputs(s_kv)
        row = {"s_kv": s_kv}
        sets = {}
        for name, cfg in VARIANTS.items():
            p = ops.ragged_problem(*inp, config=cfg)
            min_split = 4 * p.cfg["BLOCK_N"]
            row[f"{name}_sample_ms"] = bench_ms(lambda: ops.sample_thresholds(p, TOPK))
            row[f"{name}_threshold_ms"] = bench_ms(lambda: ops.select_topk(p, TOPK, min_split, method="threshold"))
            row[f"{name}_logits_ms"] = bench_ms(lambda: ops.indexer_logits(*inp, config=cfg))
            sets[name] = ops.select_topk(p, TOPK, min_split, method="threshold").sort(1).values
        row["same_sets"] = bool(torch.equal(sets["capped"], sets["uncapped"]))
        rows.append(row)
        print(row, flush=True)
    print_table(rows, list(rows[0].keys()))
    print("wrote", write_result("probe_store_regs", {"ceilings": ceil, "rows": rows}))


if __name__ == "__main__":
    main()
