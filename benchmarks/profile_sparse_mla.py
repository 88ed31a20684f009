"""A short program for Nsight Compute: the sparse MLA prefill forward as dispatched.

    ncu --clock-control none --kernel-name regex:sparse_mla_fwd --launch-skip 2 --launch-count 1 \
        --set full -o prof python -m benchmarks.profile_sparse_mla [--s-kv 8192] [--h-q 128] [--impl auto]

Three launches at the shape of benchmarks/bench_sparse_mla (s_q 4096, topk 2048): the first
two compile and warm up, ncu records the third.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_sparse_mla import D_V, S_Q, SM_SCALE, make_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s-kv", type=int, default=8192)
    ap.add_argument("--h-q", type=int, default=128)
    ap.add_argument("--impl", default="auto", choices=["auto", "triton", "gluon"])
    args = ap.parse_args()
    from flashdsa.ops.sparse_mla import run_sparse_mla_fwd

    q, kv, idx = make_inputs(S_Q, args.s_kv, args.h_q)
    for _ in range(3):
        run_sparse_mla_fwd(q, kv, idx, SM_SCALE, D_V, impl=args.impl)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
