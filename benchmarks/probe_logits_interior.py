"""Experiment (issue 17): the logits kernel without the range mask on tiles inside every
row's range.

The source profile of the logits kernel (``ncu --section SourceCounters`` on ``python -m
benchmarks.ncu_indexer --s-kv 32768``, then ``python -m benchmarks.ncu_source``, H200,
2026-12-04 18:19 UTC) has its warps issue-bound in the epilogue ("math" and "not
selected" stalls), with the main loop at 271 instructions a thread for 64 scores' ReLU and
weight (124 of them: FMNMX and FFMA); the rest is overhead, among it the range mask of
each score (ISETP and SEL) and the store's mask. In a causal prefill almost every key
tile lies inside the ranges of all the program's rows. Here a tile with
max(ks) <= n0 and n0 + BLOCK_N <= min(ke, n_end) stores its scores unmasked; other tiles
take the product's path. The same scores, so the output must equal the product's bit for
bit.

    python -m benchmarks.probe_logits_interior           # H200: check, then time

Results: ``probe_logits_interior.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer import scores as Sc  # noqa: E402
from flashdsa.ops.indexer.scores import block_range, load_keys, load_rows, program_split, tile_scores  # noqa: E402

VARIANTS = {"interior": dict(num_stages=3), "interior_s4": dict(num_stages=4)}
REPEATS = 4


@triton.jit
def logits_interior_kernel(
    q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr,
    S, S_kv, H, split_len, stride_qs, stride_qh, stride_k, stride_ws, stride_os,
    D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
):
    """The product's indexer_scores_kernel in MODE SCORES_STORE over ragged rows, with
    interior tiles stored without the range mask."""
    pid_q, pid_s, n_start, n_end = program_split(split_len, S_kv, True)
    qT, w, rows, rmask, ks, ke = load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ks_ptr, pid_q, S, H, 1,
                                           stride_qs, stride_qh, stride_ws, D, D_PAD, BLOCK_Q, H_PAD, False)
    lo, hi = block_range(ks, ke, rmask, n_start, n_end, BLOCK_N)
    if hi <= lo:
        lo = n_end
        hi = n_end
    ks_max = tl.max(tl.where(rmask, ks, -2147483647))
    ke_min = tl.minimum(tl.min(tl.where(rmask, ke, 2147483647)), n_end)
    out_row = out_ptr + rows.to(tl.int64) * stride_os
    col = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + col
        kmask = offs < hi
        k8, kscale, kidx, kmask = load_keys(k_ptr, ksc_ptr, ksc_ptr, offs, kmask, pid_q, stride_k, 0,
                                            D, D_PAD, 64, False, DOT)
        s = tile_scores(k8, kscale, qT, w, BLOCK_N, BLOCK_Q, H_PAD, DOT)
        if (n0 >= ks_max) & (n0 + BLOCK_N <= ke_min):
            tl.store(out_row[None, :] + offs[:, None], s, mask=rmask[None, :])
        else:
            inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :])
            s = tl.where(inside, s, float("-inf"))
            tl.store(out_row[None, :] + offs[:, None], s, mask=rmask[None, :] & (offs < n_end)[:, None])
    hi_t = tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, n_end)
    ninf = tl.full([BLOCK_Q, BLOCK_N], float("-inf"), tl.float32)
    for n0 in range(n_start, lo, BLOCK_N):
        offs = n0 + col
        tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < lo)[None, :])
    for n0 in range(hi_t, n_end, BLOCK_N):
        offs = n0 + col
        tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < n_end)[None, :])


def run_variant(variant, q8, k8, k_scale, weights, ks, ke):
    p = Sc.ragged_problem(q8, k8, k_scale, weights, ks, ke)
    s, s_kv = p.rows, p.n_pos
    bn = p.cfg["BLOCK_N"]
    n_split, split_len = Sc.choose_split(p.n_prog(), s_kv, bn, q8.device, 4 * bn)
    out = torch.empty(s, s_kv, dtype=torch.float32, device=q8.device)
    logits_interior_kernel[(p.n_prog(), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, out, s, s_kv, p.q.shape[1], split_len,
        p.q.stride(0), p.q.stride(1), p.k.stride(0), p.w.stride(0), out.stride(0), **p.dims(),
        BLOCK_Q=p.cfg["BLOCK_Q"], BLOCK_N=bn, DOT=Sc.dot_mode(p.q), num_warps=p.cfg["store_warps"],
        **VARIANTS[variant])
    return out


def check(results) -> bool:
    """Scores equal to the product's bit for bit: causal rows, ragged rows with empty and
    partial ranges, rows not a multiple of the block, a split key axis."""
    ok = True
    g = torch.Generator(device="cuda").manual_seed(3)
    for s, s_kv, ragged in ((4096, 32768, False), (333, 9001, True), (70, 130, True), (5, 20000, True)):
        q8, k8, k_scale, weights, ks, ke = prefill_inputs(s_kv, s=s)
        if ragged:
            ke = torch.randint(0, s_kv + 1, (s,), device="cuda", generator=g, dtype=torch.int32)
            ks = (torch.rand(s, device="cuda", generator=g) * ke).to(torch.int32)
            ks[0], ke[0] = 5, 5  # an empty range
        want = ops.indexer_logits(q8, k8, k_scale, weights, ks, ke)
        for v in VARIANTS:
            got = run_variant(v, q8, k8, k_scale, weights, ks, ke)
            same = torch.equal(got, want)
            ok &= same
            results.append(dict(s=s, s_kv=s_kv, ragged=ragged, variant=v, equal=same))
            print(results[-1], flush=True)
    return ok


def speed(results, ceil):
    for s_kv in (8192, 16384, 32768, 131072):
        inp = prefill_inputs(s_kv)
        tflop = 2 * int((inp[5] - inp[4]).sum()) * 64 * 128 / 1e12  # pairs inside the ranges, as bench_indexer
        row = dict(s_kv=s_kv)
        runs = [("product", lambda: ops.indexer_logits(*inp))] + [(v, lambda v=v: run_variant(v, *inp)) for v in VARIANTS]
        for _ in range(REPEATS):  # alternating, so that a drift of the clock shows
            for name, fn in runs:
                ms = bench_ms(fn)
                row[f"{name}_ms"] = min(row.get(f"{name}_ms", 1e9), round(ms, 4))
                row.setdefault(f"{name}_runs", []).append(round(ms, 4))
        for name, _ in runs:
            row[f"{name}_x_fp8"] = round(tflop / row[f"{name}_ms"] * 1e3 / ceil["fp8_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)
        del inp


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    results = {"check": []}
    ok = check(results["check"])
    results["checks_pass"] = ok
    print("checks equal:", ok, flush=True)
    ceil = measure_ceilings()
    results["ceilings"] = ceil
    results["speed"] = []
    speed(results["speed"], ceil)
    print_table(results["speed"], ["s_kv"] + [k for k in results["speed"][0] if k.endswith("_ms")])
    print("wrote", write_result("probe_logits_interior", results))


if __name__ == "__main__":
    main()
