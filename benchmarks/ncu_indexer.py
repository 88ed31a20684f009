"""The indexer's prefill kernels, each run a few times, for Nsight Compute to profile (issue 17);
with ``--decode-batch B``, the paged (decode) top-k instead (issue 16).

bench_indexer's prefill (the last 4096 queries of a causal sequence of S_kv keys, H_I 64,
d_I 128, top-k 2048): the logits kernel, then the top-k (``--method``; threshold: its
sample, filter and select kernels; direct: the scores and ``rows_topk_kernel``), after a
warm-up that compiles them. Run it under ``ncu``, for example:

    ncu --kernel-name regex:"indexer_scores_kernel|indexer_filter_sm90_kernel" --launch-skip 3 \\
        --launch-count 3 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        --section ComputeWorkloadAnalysis --section Occupancy python -m benchmarks.ncu_indexer --s-kv 32768

``--decode-batch B --s-kv L``: B decode queries over paged contexts of L keys
(bench_indexer's decode inputs), the paged top-k (its sample pass, sample threshold,
filter, select and fallback launch at batch 1), whose kernels ncu runs one at a time, so
each one's duration is its own (in a CUDA graph with PDL they overlap), e.g.

    ncu --kernel-name regex:"indexer_|sample_threshold" --launch-skip 5 --launch-count 5 \
        --section SpeedOfLight --section LaunchStats python -m benchmarks.ncu_indexer --decode-batch 1 --s-kv 131072

Without ncu it only runs the kernels (nothing is timed or written).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, decode_inputs, prefill_inputs  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--s-kv", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3, help="runs of each op after the warm-up")
    ap.add_argument("--method", default="threshold", choices=["threshold", "direct", "auto"],
                    help="the top-k method run after the logits")
    ap.add_argument("--decode-batch", type=int, default=None, help="profile the paged top-k of this many queries")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.decode_batch:
        q8, cache, w, cl, bt = decode_inputs(args.decode_batch, args.s_kv)
        for _ in range(1 + args.reps):
            ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK, method=args.method)
        torch.cuda.synchronize()
        return
    inp = prefill_inputs(args.s_kv)
    for _ in range(1 + args.reps):   # the first run compiles
        ops.indexer_logits(*inp)
        ops.indexer_topk(*inp, TOPK, method=args.method)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
