"""The indexer's prefill kernels, each run a few times, for Nsight Compute to profile (issue 17).

bench_indexer's prefill (the last 4096 queries of a causal sequence of S_kv keys, H_I 64,
d_I 128, top-k 2048): the logits kernel, then the top-k (``--method``; threshold: its
sample, filter and select kernels; direct: the scores and ``rows_topk_kernel``), after a
warm-up that compiles them. Run it under ``ncu``, for example:

    ncu --kernel-name regex:"indexer_scores_kernel|indexer_filter_sm90_kernel" --launch-skip 3 \\
        --launch-count 3 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        --section ComputeWorkloadAnalysis --section Occupancy python -m benchmarks.ncu_indexer --s-kv 32768

Without ncu it only runs the kernels (nothing is timed or written).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, prefill_inputs  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--s-kv", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3, help="runs of each op after the warm-up")
    ap.add_argument("--method", default="threshold", choices=["threshold", "direct", "auto"],
                    help="the top-k method run after the logits")
    args = ap.parse_args()
    torch.manual_seed(0)
    inp = prefill_inputs(args.s_kv)
    for _ in range(1 + args.reps):   # the first run compiles
        ops.indexer_logits(*inp)
        ops.indexer_topk(*inp, TOPK, method=args.method)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
