"""Host time of the sparse MLA decode launcher, without a GPU: every Triton launch is
recorded instead of run (benchmarks.sm90_build.capture_launches), so what is timed is the
Python between the public call and the kernels (config, views, allocations, launch binding).

    python -m benchmarks.host_overhead [--calls 2000] [--batch 1] [--n-split 8]

Prints microseconds per call (best of --repeat timings). The tree before the op packages
(98f4138) has the same launcher at flashdsa.ops.sparse_mla_decode; timing it takes that one
import changed. Eager decode at batch 1 is bound by this host time on a GPU (issue 16).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.pop("TRITON_INTERPRET", None)  # launches are recorded, never interpreted

import torch  # noqa: E402

from benchmarks.sm90_build import capture_launches  # noqa: E402
from flashdsa.ops.sparse_mla.decode import sparse_mla_decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n-split", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    h, topk, blocks = 128, 2048, 600
    q = torch.randn(args.batch, 1, h, 576, dtype=torch.bfloat16)
    cache = torch.randn(blocks, 64, 1, 576, dtype=torch.bfloat16)
    idx = torch.randint(0, blocks * 64, (args.batch, 1, topk), dtype=torch.int32)

    def call():
        sparse_mla_decode(q, cache, idx, 0.1, 512, "bf16", n_split=args.n_split)

    best = float("inf")
    with capture_launches():
        for _ in range(50):
            call()
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            best = min(best, (time.perf_counter() - t0) / args.calls)
    print(f"sparse_mla_decode host time: {best * 1e6:.1f} us a call (batch {args.batch}, n_split {args.n_split}, "
          f"launches recorded, not run)")


if __name__ == "__main__":
    main()
