"""Sparse MLA backward on the GPU: TFLOP/s at the prefill shapes of the forward benchmark.

    python -m benchmarks.bench_sparse_mla_bwd [--sweep] [--heads 64 128]

Shapes: s_q 4096, s_kv 8192, topk 2048, d_qk 576, d_v 512, bf16, indices = topk distinct
random rows per query (every slot valid). FLOP convention: 2.5 x the forward's
2*s_q*h*topk*(d_qk + d_v) (the usual one for attention backward; the exact count of
the five products, 2*s_q*h*topk*(3*d_qk + 2*d_v), is 1.2% higher and also reported).

Times (median, triton.testing.do_bench): the full backward (both kernels, scratch
included), each kernel alone, the deterministic mode, and the forward for reference.
With --sweep, block-size variants of each kernel are compiled in parallel worker
processes first (Triton's on-disk cache), then timed one by one.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

import torch

from benchmarks.common import (
    bench_ms,
    ceilings_after_compile,
    print_table,
    sweep_arg_parser,
    write_result,
)

S_Q, S_KV, TOPK, D_QK, D_V = 4096, 8192, 2048, 576, 512

# (BLOCK_K, num_warps, num_stages) per kernel; CONFIGS["sm90"] of flashdsa.ops.sparse_mla.bwd took the fastest.
DS_VARIANTS = [(32, 8, 2), (64, 8, 1), (32, 4, 2), (16, 4, 3)]
DQ_VARIANTS = [(64, 8, 2), (32, 8, 3), (64, 8, 3), (128, 8, 1)]
DKV_VARIANTS = [(64, 8, 2), (64, 8, 1), (64, 4, 2), (128, 8, 1)]
KERNELS = {"ds": DS_VARIANTS, "dq": DQ_VARIANTS, "dkv": DKV_VARIANTS}


def fwd_flops(h: int) -> float:
    return 2.0 * S_Q * h * TOPK * (D_QK + D_V)


def make_inputs(h: int, s_q=S_Q, s_kv=S_KV, topk=TOPK, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s_q, h, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 1, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.rand(s_q, s_kv, device="cuda", generator=g).topk(topk, dim=1).indices.int()[:, None]
    dout = torch.randn(s_q, h, D_V, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, kv, idx, dout


def _cfg(kind, v):
    """Config override for one kernel's variant."""
    k = kind.upper()
    return {f"BLOCK_K_{k}": v[0], f"warps_{kind}": v[1], f"stages_{kind}": v[2]}


def _compile_worker(kind: str, variant: tuple) -> tuple:
    """Compile one variant on a small problem with the same specializations (every int
    argument divisible by 16 as in the big one) so the big run hits Triton's cache."""
    try:
        from flashdsa.ops.sparse_mla import run_sparse_mla_bwd, run_sparse_mla_fwd
        q, kv, idx, dout = make_inputs(64, s_q=64, s_kv=1024, topk=256)
        out, _, lse = run_sparse_mla_fwd(q, kv, idx, D_QK ** -0.5, D_V)
        cfg = _cfg(kind, variant)
        run_sparse_mla_bwd(q, kv, idx, out, dout, lse, D_QK ** -0.5, D_V, config=cfg)
        if kind == "dkv" and variant == DKV_VARIANTS[0]:
            run_sparse_mla_bwd(q, kv, idx, out, dout, lse, D_QK ** -0.5, D_V, config=cfg, deterministic=True)
        torch.cuda.synchronize()
        return kind, variant, None
    except Exception as e:  # out of shared memory / registers: reported, skipped
        return kind, variant, f"{type(e).__name__}: {str(e)[:200]}"


def precompile(variants) -> dict:
    failures = {}
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(12, len(variants)), mp_context=ctx) as ex:
        for kind, variant, err in ex.map(_compile_worker, *zip(*variants)):
            if err:
                failures[(kind, variant)] = err
                print(f"compile {kind} {variant}: {err}")
    return failures


def main():
    args = sweep_arg_parser().parse_args()

    from flashdsa.ops.sparse_mla import bwd as bwd_mod
    from flashdsa.ops.sparse_mla import run_sparse_mla_fwd as sparse_mla_fwd

    variants = [(k, v) for k, vs in KERNELS.items() for v in vs]
    failures = {} if args.no_precompile else precompile(variants if args.sweep else [("dkv", DKV_VARIANTS[0])])
    ceil = ceilings_after_compile(args)
    if ceil is None:
        return
    sm_scale = D_QK ** -0.5
    rows = []
    for h in args.heads:
        q, kv, idx, dout = make_inputs(h)
        out, _, lse = sparse_mla_fwd(q, kv, idx, sm_scale, D_V)
        f_fwd = fwd_flops(h)
        f_bwd = 2.5 * f_fwd
        t_fwd = bench_ms(lambda: sparse_mla_fwd(q, kv, idx, sm_scale, D_V))
        rows.append(dict(h=h, variant="forward", ms=t_fwd, tflops=f_fwd / t_fwd * 1e-9))

        def full(cfg=None, det=False):
            return bwd_mod.run_sparse_mla_bwd(q, kv, idx, out, dout, lse, sm_scale, D_V, config=cfg,
                                              deterministic=det)

        dq_a, dkv_a = full()
        dq_d, dkv_d = full(det=True)
        dq_b, dkv_b = full()
        check = dict(
            dkv_atomic_run_to_run=float((dkv_a.float() - dkv_b.float()).norm() / dkv_a.float().norm()),
            dkv_det_vs_atomic=float((dkv_d.float() - dkv_a.float()).norm() / dkv_a.float().norm()),
            dq_det_vs_atomic=float((dq_d.float() - dq_a.float()).norm() / dq_a.float().norm()),
            finite=bool(torch.isfinite(dq_a).all() and torch.isfinite(dkv_a).all()),
        )
        print(f"h={h} checks:", check)
        del dq_a, dkv_a, dq_d, dkv_d, dq_b, dkv_b
        t = bench_ms(full, warmup=50, rep=300)
        rows.append(dict(h=h, variant="bwd default", ms=t, tflops=f_bwd / t * 1e-9,
                         exact_tflops=f_fwd * (3 * D_QK + 2 * D_V) / (D_QK + D_V) / t * 1e-9,
                         ratio_bf16=f_bwd / t * 1e-9 / ceil["bf16_matmul_tflops"], **check))
        t = bench_ms(lambda: full(det=True), warmup=50, rep=300)
        rows.append(dict(h=h, variant="bwd deterministic", ms=t, tflops=f_bwd / t * 1e-9,
                         ratio_bf16=f_bwd / t * 1e-9 / ceil["bf16_matmul_tflops"]))

        if args.sweep:
            # Each kernel alone over the whole problem (one chunk: the scratch, 4096 x h x 2048 x 2 x 2 B, fits).
            m0 = bwd_mod._prepare(q, kv, idx, out, dout, lse, None, D_V, None)
            delta = bwd_mod.launch_preprocess(m0)
            p_buf = torch.empty(S_Q, h, TOPK, dtype=q.dtype, device="cuda")
            ds_buf = torch.empty_like(p_buf)
            dq = torch.empty_like(q)
            dkv = torch.zeros(S_KV, D_QK, dtype=torch.float32, device="cuda")
            bwd_mod.launch_ds(m0, 0, S_Q, p_buf, ds_buf, sm_scale)
            flops = {"ds": f_fwd, "dq": f_fwd * D_QK / (D_QK + D_V), "dkv": f_fwd}  # s+dP | dS kv | dS^T q + P^T dout
            for kind, vs in KERNELS.items():
                for v in vs:
                    if (kind, v) in failures:
                        rows.append(dict(h=h, variant=f"{kind} {v}", ms=None, note="compile failed"))
                        continue
                    m = bwd_mod._prepare(q, kv, idx, out, dout, lse, None, D_V, _cfg(kind, v))
                    m["delta"] = delta
                    fn = {"ds": lambda: bwd_mod.launch_ds(m, 0, S_Q, p_buf, ds_buf, sm_scale),
                          "dq": lambda: bwd_mod.launch_dq(m, 0, S_Q, dq, ds_buf),
                          "dkv": lambda: bwd_mod.launch_dkv(m, 0, S_Q, p_buf, ds_buf, dkv)}[kind]
                    try:
                        t = bench_ms(fn, warmup=10, rep=100)
                        k = kind.upper()
                        used = (m["cfg"][f"BLOCK_K_{k}"], m["cfg"][f"warps_{kind}"], m["cfg"][f"stages_{kind}"])
                        rows.append(dict(h=h, variant=f"{kind} {v}", ms=t, tflops=flops[kind] / t * 1e-9,
                                         note=None if used == tuple(v) else f"fell back to {used}"))
                    except Exception as e:
                        rows.append(dict(h=h, variant=f"{kind} {v}", ms=None, note=str(e)[:120]))
            t = bench_ms(lambda: bwd_mod.launch_preprocess(m0), warmup=10, rep=50)
            rows.append(dict(h=h, variant="preprocess (delta)", ms=t))
            del p_buf, ds_buf, dq, dkv
            # The fastest variant of each kernel, put together and timed end to end.
            best = {}
            for kind, vs in KERNELS.items():
                timed = [(r["ms"], v) for v in vs for r in rows
                         if r.get("h") == h and r.get("variant") == f"{kind} {v}" and r.get("ms") and not r.get("note")]
                if timed:
                    best.update(_cfg(kind, min(timed)[1]))
            t = bench_ms(lambda: full(best), warmup=50, rep=300)
            rows.append(dict(h=h, variant="bwd best-of-sweep", ms=t, tflops=f_bwd / t * 1e-9,
                             ratio_bf16=f_bwd / t * 1e-9 / ceil["bf16_matmul_tflops"], note=str(best)))
        del q, kv, idx, dout, out, lse
        torch.cuda.empty_cache()
        # Written after each head count so a run cut short still brings its numbers back.
        path = write_result("sparse_mla_bwd" + ("_sweep" if args.sweep else ""), dict(
            shape=dict(s_q=S_Q, s_kv=S_KV, topk=TOPK, d_qk=D_QK, d_v=D_V, dtype="bf16"),
            flop_convention="2.5 x forward 2*s_q*h*topk*(d_qk+d_v); 'exact_tflops' counts the five products",
            ceilings=ceil, config=bwd_mod.CONFIGS["sm90"], rows=rows,
            compile_failures={f"{k} {v}": e for (k, v), e in failures.items()}))
        print_table(rows, ["h", "variant", "ms", "tflops", "ratio_bf16", "note"])
    print("wrote", path)


if __name__ == "__main__":
    main()
