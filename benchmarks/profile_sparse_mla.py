"""A short program for Nsight Compute: the sparse MLA prefill forward as dispatched, or
the paged decode without split-k.

    ncu --clock-control none --kernel-name regex:sparse_mla_fwd --launch-skip 2 --launch-count 1 \
        --set full -o prof python -m benchmarks.profile_sparse_mla [--s-kv 8192] [--h-q 128] [--impl auto]
    ncu ... python -m benchmarks.profile_sparse_mla --decode fp8_ds_mla    # or bf16

Three launches at the shape of benchmarks/bench_sparse_mla (s_q 4096, topk 2048), or with
``--decode`` of benchmarks/bench_sparse_mla_decode at batch 128, s_q 2, context 32K: the
first two compile and warm up, ncu records the third.
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
    ap.add_argument("--decode", default=None, choices=["bf16", "fp8_ds_mla"],
                    help="the paged decode over this cache format instead (batch 128, s_q 2, 32K)")
    args = ap.parse_args()
    from flashdsa.ops.sparse_mla import run_sparse_mla_fwd

    if args.decode:
        from benchmarks.bench_sparse_mla_decode import make_problem
        from flashdsa.api import quantize_mla_cache
        from flashdsa.ops.sparse_mla import sparse_mla_decode

        q, cache, idx = make_problem(128, 32768, 2)
        if args.decode == "fp8_ds_mla":
            cache = quantize_mla_cache(cache)
        for _ in range(3):
            sparse_mla_decode(q, cache, idx, SM_SCALE, D_V, args.decode, n_split=1)
        torch.cuda.synchronize()
        return

    q, kv, idx = make_inputs(S_Q, args.s_kv, args.h_q)
    for _ in range(3):
        run_sparse_mla_fwd(q, kv, idx, SM_SCALE, D_V, impl=args.impl)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
