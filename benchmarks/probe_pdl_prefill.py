"""Probe (issue 17): does programmatic dependent launch (PDL) cost the prefill top-k?

The 2026-12-04 03:30 UTC bench_indexer run timed the direct top-k of 4096 rows of 16K
keys at 1.71 ms, against 1.52 ms on 2026-12-03 04:52 UTC; between the two runs its
kernels (the scores kernel writing scores, then ``rows_topk_kernel``) became PDL
launches (``pdl_launch`` / ``pdl_prologue`` in flashdsa/ops/common.py), and nothing
else of that path changed. Here each prefill top-k method runs with the product's
launches and with PDL turned off in every indexer module, same inputs, checked to select
the same sets: 4096 queries (the last tokens of a causal sequence) x 8K / 16K / 32K.

    python -m benchmarks.probe_pdl_prefill     # -> $OUT/probe_pdl_prefill.json (or benchmarks/results/)

Not a benchmark of record: docs/benchmarks_indexer.md says what it found.
"""
from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, kernel_table, measure_ceilings, print_table, write_result  # noqa: E402
from benchmarks.probe_gluon_filter import TOPK, prefill_problem  # noqa: E402
from flashdsa.ops.indexer import direct, prep, scores, streaming, threshold  # noqa: E402


@contextlib.contextmanager
def no_pdl():
    """Every indexer kernel launched without PDL (its prologue compiles to nothing)."""
    with contextlib.ExitStack() as stack:
        for mod in (scores, threshold, direct, streaming, prep):
            stack.enter_context(mock.patch.object(mod, "pdl_launch", lambda device: {"PDL": False}))
        yield


def main() -> None:
    rows = []
    for s_kv in (8192, 16384, 32768):
        (q8, k8, ksc, w, ks, ke), p = prefill_problem(4096, s_kv, 0)
        row = {"s_kv": s_kv, "logits_ms": bench_ms(lambda: scores.indexer_logits(q8, k8, ksc, w, ks, ke))}
        for method in ("direct", "threshold"):
            def run(method=method):
                return threshold.select_topk(p, TOPK, 4 * p.cfg["BLOCK_N"], method=method)

            want = run().cpu()
            row[f"{method}_pdl_ms"] = bench_ms(run)
            row[f"{method}_pdl_kernels"] = kernel_table(run, top=6)
            with no_pdl():
                have = run().cpu()
                row[f"{method}_nopdl_ms"] = bench_ms(run)
                row[f"{method}_nopdl_kernels"] = kernel_table(run, top=6)
            row[f"{method}_same"] = all(set(a.tolist()) == set(b.tolist()) for a, b in zip(want, have))
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("kernels")}, flush=True)
        for k, v in row.items():
            if k.endswith("kernels"):
                print(s_kv, k, v, flush=True)
    print_table(rows, [k for k in rows[0] if not k.endswith("kernels")])
    print("wrote", write_result("probe_pdl_prefill", {"ceilings": measure_ceilings(), "rows": rows}))


if __name__ == "__main__":
    main()
