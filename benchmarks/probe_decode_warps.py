"""Probe: warps of the top-k's one-program-a-row kernels (direct select, sample
threshold, threshold select) at small decode batches, where one row is one program and
the kernel's latency is the step's: each variant sets the same warp count for all three,
times the paged top-k replayed from a CUDA graph and checks it selects what the default
does (same sets).

    python -m benchmarks.probe_decode_warps     # -> $OUT/probe_decode_warps.json (or benchmarks/results/)

Not a benchmark of record: docs/engine.md says what it found and what the product took.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, decode_inputs  # noqa: E402
from benchmarks.common import bench_ms, measure_ceilings, write_result  # noqa: E402
from benchmarks.cost_curve import graphed  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer import direct, threshold  # noqa: E402

WARPS = (4, 8, 16)


def graph_ms(fn) -> float:
    replay, _ = graphed(fn, torch.device("cuda"))
    return bench_ms(replay)


def main() -> None:
    rows = []
    defaults = (direct._warps, threshold.select_warps, threshold.sample_warps)
    for bsz in (1, 4):
        for ctx in (8192, 32768, 131072):
            q8, cache, w, cl, bt = decode_inputs(bsz, ctx)

            def run():
                return ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK)

            want = [set(r.tolist()) for r in run()]
            row = {"batch": bsz, "context": ctx, "method": "direct" if ops.prefers_direct(
                ops.paged_problem(q8, cache, w, cl, bt, bt.shape[1] * 64)) else "threshold"}
            for nw in WARPS:
                direct._warps = lambda block, nw=nw: nw
                threshold.select_warps = threshold.sample_warps = lambda p, nw=nw: nw
                try:
                    same = all(set(r.tolist()) == s for r, s in zip(run(), want))
                    row[f"warps{nw}_us"] = round(graph_ms(run) * 1e3, 2)
                    row[f"warps{nw}_same"] = same
                except Exception as e:  # a variant that fails to build is recorded, not fatal
                    row[f"warps{nw}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                finally:
                    direct._warps, threshold.select_warps, threshold.sample_warps = defaults
            rows.append(row)
            print(row, flush=True)
    print("wrote", write_result("probe_decode_warps", {"ceilings": measure_ceilings(), "rows": rows}))


if __name__ == "__main__":
    main()
