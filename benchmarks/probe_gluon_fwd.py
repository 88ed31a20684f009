"""The Hopper Gluon sparse MLA forward (flashdsa/ops/sparse_mla/fwd_sm90.py) against the
float64 reference and against the Triton kernel, on one H200.

    python -m benchmarks.probe_gluon_fwd [--quick]

1. Exactness: adversarial indices (duplicates, -1 holes, out-of-range and negative
   values, an empty row, a half-valid row, odd topk) at h_q 64 and 128, outputs poisoned
   with NaN through the caching allocator first; each variant's ||out - ref|| / ||ref||
   beside the Triton kernel's, lse and max_logits against the reference.
2. Speed: the prefill shapes of bench_sparse_mla (s_q 4096, topk 2048, s_kv 8K and 64K,
   h_q 128 and 64), every variant and the Triton kernel, with the ceilings of this run.
Results: ``probe_gluon_fwd.json`` under $OUT (device runs) or benchmarks/results/.

Variants are configurations of the product kernel (keys of fwd_sm90.SM90_GLUON); the
designs measured on the way to it, and those that lost, are in docs/benchmarks_sparse_mla.md.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_sparse_mla import D_QK, D_V, S_Q, SM_SCALE, TOPK, flops, make_inputs
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result
from flashdsa.ops.sparse_mla import fwd_sm90 as G


def _run(v):
    """The runner of variant ``v``: the product's kernel with ``v`` as config."""
    return lambda q, kv, idx, scale: G.run_sparse_mla_fwd_sm90(q, kv, idx, scale, v)


# configurations of the Gluon kernel to compare (keys of fwd_sm90.SM90_GLUON over its
# defaults; the empty one is the product's). The variants measured on the way to the
# product's design are in docs/benchmarks_sparse_mla.md ("Hopper: the Gluon forward").
VARIANTS = [dict()]


def _name(v):
    return "gluon" + "".join(f"_{k}{v[k]}" for k in sorted(v))


def adversarial(s_q, s_kv, h, topk, seed):
    """q, kv, indices with every kind of slot the kernels must take: valid rows, rows
    listed twice, -1 holes, rows >= s_kv and < -1, a row with no valid slot (query 0), a
    row whose second half is invalid (query 1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s_q, h, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 1, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, s_kv, (s_q, 1, topk), device="cuda", dtype=torch.int32, generator=g)
    kind = torch.randint(0, 10, (s_q, 1, topk), device="cuda", generator=g)
    idx = torch.where(kind == 0, -1, idx)
    idx = torch.where(kind == 1, s_kv + torch.randint(0, 1000, idx.shape, device="cuda", generator=g).int(), idx)
    idx = torch.where(kind == 2, -2 - torch.randint(0, 1000, idx.shape, device="cuda", generator=g).int(), idx)
    idx = torch.where(kind == 3, idx.roll(1, dims=2), idx)  # duplicates of a neighbour
    idx[0] = -1
    idx[1, :, topk // 2:] = s_kv
    return q, kv, idx


def poison():
    """Fill the caching allocator's free blocks with NaN, so an output element the kernel
    does not write reads NaN."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.empty(min(free // 2, 8 << 30) // 4, device="cuda")
    x.fill_(float("nan"))
    del x


def runners(variants) -> dict:
    """{name: run(q, kv [N, 576], idx [T, topk], sm_scale)} of the product kernel's configurations."""
    return {_name(v): _run(v) for v in variants}


def check(runs: dict, results) -> bool:
    """Each runner of ``runs`` ({name: run(q, kv [N, 576], idx [T, topk], sm_scale) -> (out,
    max_logits, lse)}) against the float64 reference, beside the Triton kernel; a runner
    that raises is recorded (``error``) and fails the check."""
    from flashdsa.ops.sparse_mla import run_sparse_mla_fwd
    from flashdsa.reference.sparse_mla import sparse_mla_fwd as ref_fwd

    rows = []
    for seed, (s_q, s_kv, h, topk) in enumerate([(37, 5000, 64, 2048), (29, 70000, 128, 2048), (19, 3000, 128, 1000),
                                                (23, 777, 64, 130), (21, 500, 64, 64), (16, 65536, 128, 2048)]):
        q, kv, idx = adversarial(s_q, s_kv, h, topk, seed)
        r_out, r_ml, r_lse = ref_fwd(q.double(), kv.double(), idx, SM_SCALE, D_V)
        row = dict(s_q=s_q, s_kv=s_kv, h_q=h, topk=topk)

        def err(out, ml, lse):
            fin = torch.isfinite(r_lse)
            e = dict(out=((out.double() - r_out).norm() / r_out.norm()).item(),
                     out_nan=int(torch.isnan(out).sum()),
                     lse=(lse.double() - r_lse)[fin].abs().max().item(),
                     ml=(ml.double() - r_ml)[fin].abs().max().item(),
                     empty_ok=bool((lse[~fin] == float("inf")).all() and (ml[~fin] == float("-inf")).all()
                                   and (out[0] == 0).all()))
            return e

        poison()
        row["triton"] = err(*run_sparse_mla_fwd(q, kv, idx, SM_SCALE, D_V, impl="triton"))
        for name, run in runs.items():
            poison()
            try:
                row[name] = err(*run(q, kv[:, 0], idx[:, 0], SM_SCALE))
            except Exception as e:  # noqa: BLE001 - recorded (e.g. a build error), the next one runs
                row[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        print(row, flush=True)
    results["check"] = rows
    ok = all("error" not in r[n] and r[n]["out_nan"] == 0 and r[n]["empty_ok"]
             and r[n]["out"] <= 2 * r["triton"]["out"] + 1e-3 for r in rows for n in runs)
    results["check_passed"] = ok
    print("check passed" if ok else "CHECK FAILED", flush=True)
    return ok


def speed(runs: dict, results, quick):
    """Milliseconds and the share of the bf16 matmul ceiling of each runner and of the
    Triton kernel at the prefill shapes."""
    from flashdsa.ops.sparse_mla import run_sparse_mla_fwd

    ceiling = results["ceilings"]["bf16_matmul_tflops"]
    rows = []
    shapes = [(8192, 128)] if quick else [(8192, 128), (8192, 64), (65536, 128), (65536, 64)]
    for s_kv, h in shapes:
        q, kv, idx = make_inputs(S_Q, s_kv, h)
        f = flops(S_Q, h, TOPK)
        row = dict(s_kv=s_kv, h_q=h)
        ms = bench_ms(lambda: run_sparse_mla_fwd(q, kv, idx, SM_SCALE, D_V, impl="triton"))
        row["triton_ms"], row["triton_x"] = ms, f / ms * 1e-9 / ceiling
        kv2, idx2 = kv[:, 0], idx[:, 0]
        for name, run in runs.items():
            ms = bench_ms(lambda: run(q, kv2, idx2, SM_SCALE))
            row[name + "_ms"], row[name + "_x"] = ms, f / ms * 1e-9 / ceiling
        rows.append(row)
        print(row, flush=True)
        del q, kv, idx
    results["speed"] = rows
    print_table(rows, list(rows[0].keys()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="speed at s_kv 8K, h_q 128 only")
    args = ap.parse_args()
    results = {"ceilings": measure_ceilings(), "variants": VARIANTS}
    print("ceilings", results["ceilings"], flush=True)
    try:
        check(runners(VARIANTS), results)
        speed(runners(VARIANTS), results, args.quick)
    finally:
        print("written", write_result("probe_gluon_fwd", results))


if __name__ == "__main__":
    main()
