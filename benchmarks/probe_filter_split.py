"""Probe: how many programs the filter pass of the paged threshold top-k should run at
small decode batches. ``choose_split`` aims at about 2 programs an SM, so one row of 128K
keys runs 264 programs of 8 key tiles each; the pass reads 16.7 MB (about 4 us at the
copy ceiling) and takes about 11 us (eager profile, 2026-12-03). More programs with fewer
tiles each put more loads in flight.

For each (batch, context) and each split of the key axis (the default and 2x, 4x, 8x its
programs, down to one tile a program, and the candidate rule below): the top-k replayed
from a CUDA graph, checked to select the default's sets, and the kernels of the fastest
(torch.profiler).

The candidate rule (``rule_split``), from the first run (2026-12-03 22:46 UTC: batch 4 x
128K and batch 32 x 32K were 6-7% faster with 4-8 key tiles a program than with the
default's 16-29, batch 1 no faster with fewer than 4): about 8 programs an SM, but at
least 4 tiles a program, and never fewer programs than the default.

    python -m benchmarks.probe_filter_split     # -> $OUT/probe_filter_split.json (or benchmarks/results/)

Not a benchmark of record: docs/benchmarks_indexer.md says what it found and what the
product took.
"""
from __future__ import annotations

import os
import sys

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, threshold_decode_cases  # noqa: E402
from benchmarks.common import kernel_table, measure_ceilings, write_result  # noqa: E402
from benchmarks.cost_curve import graph_us  # noqa: E402
from flashdsa.ops.indexer import threshold  # noqa: E402
from flashdsa.ops.common import num_sms  # noqa: E402
from flashdsa.ops.indexer.scores import choose_split  # noqa: E402

CASES = ((1, 32768), (1, 65536), (1, 131072), (4, 131072), (8, 32768), (8, 131072), (32, 32768), (32, 131072),
         (128, 131072))
FACTORS = (1, 2, 4, 8)


def rule_split(p, default: int) -> int:
    """The candidate split of the key axis (module docstring)."""
    bn = p.cfg["BLOCK_N"]
    return max(default, min(triton.cdiv(8 * num_sms(p.q.device), p.n_prog()), triton.cdiv(p.n_pos, 4 * bn)))


def main() -> None:
    rows = []
    for bsz, ctx, (q8, *_), p, want in threshold_decode_cases(CASES):
        bn = p.cfg["BLOCK_N"]
        default = choose_split(p.n_prog(), p.n_pos, bn, q8.device, bn)[0]
        row = {"batch": bsz, "context": ctx, "default_split": default}
        best = (float("inf"), None)
        row["rule_split"] = rule_split(p, default)
        splits = sorted({min(default * f, triton.cdiv(p.n_pos, bn)) for f in FACTORS} | {row["rule_split"]})
        for n_split in splits:

            def run(n_split=n_split):
                return threshold.select_topk(p, TOPK, bn, n_split=n_split, method="threshold")

            name = f"split{n_split}"
            try:
                row[name + "_tiles_a_program"] = triton.cdiv(triton.cdiv(p.n_pos, n_split), bn)
                row[name + "_same"] = all(set(r.tolist()) == s for r, s in zip(run(), want))
                row[name + "_us"] = t = graph_us(run)
                if t < best[0]:
                    best = (t, run, name)
            except Exception as e:  # a variant that fails is recorded, not fatal
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if best[1] is not None:
            row["best"] = best[2]
            row["kernels_best"] = kernel_table(best[1], top=6)
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("kernels")}, flush=True)
    print("wrote", write_result("probe_filter_split", {"ceilings": measure_ceilings(), "rows": rows}))


if __name__ == "__main__":
    main()
