"""Cost of the indexer KL losses relative to the attention forward, on the GPU.

    python -m benchmarks.bench_indexer_loss [--sweep] [--heads 64 128]

Sparse stage: s_q 4096, s_kv 8192, topk 2048, d_qk 576 (the sparse MLA benchmark's
shapes), indexer H_I 64, d_I 128, bf16. Compared with flashdsa's sparse MLA forward at
the same shapes, measured in the same run. Target: loss fwd + bwd <= 30% of it.

Warm-up stage: one causal sequence of T 4096 (dense). There is no dense MLA kernel to
compare with, so the ratio is against the dense causal forward's FLOPs
(2*H*T*(T+1)/2*(d_qk+d_v)) run at the rate the sparse forward reaches here (an estimate,
labelled so).

Loss FLOPs (tensor-core work): forward = attention logits 2*n*H*d_qk + index scores
2*n*H_I*d_I over the n scored (t, s) pairs; backward = scores again + two products
4*n*H_I*d_I, plus (warm-up only, p is not stored) the attention logits again.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

import torch

from benchmarks.common import (
    bench_ms,
    measure_ceilings,
    print_table,
    sweep_arg_parser,
    wait_for,
    write_result,
)

S_Q, S_KV, TOPK, D_QK, D_V, HI, DI = 4096, 8192, 2048, 576, 512, 64, 128
T_WARM = 4096
VARIANTS = [(32, 8, 2), (32, 8, 1), (64, 8, 1), (32, 4, 2)]  # (BLOCK_K, num_warps, num_stages)


def make(h, s_q, s_kv, topk, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(s_q, h, D_QK, **bf)
    kv = torch.randn(s_kv, 1, D_QK, **bf)
    iq = torch.randn(s_q, HI, DI, **bf)
    ik = torch.randn(s_kv, DI, **bf)
    w = torch.randn(s_q, HI, device="cuda", generator=g) * (HI * DI) ** -0.5
    idx = torch.rand(s_q, s_kv, device="cuda", generator=g).topk(topk, dim=1).indices.int()[:, None] if topk else None
    return q, kv, iq, ik, w, idx


def _compile_worker(variant, h):
    try:
        from flashdsa.ops import indexer_loss as L
        q, kv, iq, ik, w, idx = make(h, 64, 1024, 256)
        lse = torch.rand(64, h, device="cuda") + 10
        cfg = dict(BLOCK_K=variant[0], num_warps=variant[1], num_stages=variant[2])
        kl, st, p, _ = L.indexer_kl_fwd(q, kv, lse, iq, ik, w, idx, None, None, 0.04, cfg)
        L.indexer_kl_bwd(torch.ones_like(kl), q, kv, lse, iq, ik, w, idx, None, None, st, p, 0.04, cfg)
        ks = torch.zeros(64, dtype=torch.int32, device="cuda")
        ke = torch.arange(1, 65, dtype=torch.int32, device="cuda")
        q2, kv2, iq2, ik2, w2, _ = make(h, 64, 64, 0)
        kl, st, p, _ = L.indexer_kl_fwd(q2, kv2, lse, iq2, ik2, w2, None, ks, ke, 0.04, cfg)
        L.indexer_kl_bwd(torch.ones_like(kl), q2, kv2, lse, iq2, ik2, w2, None, ks, ke, st, p, 0.04, cfg)
        torch.cuda.synchronize()
        return variant, h, None
    except Exception as e:
        return variant, h, f"{type(e).__name__}: {str(e)[:200]}"


def main():
    args = sweep_arg_parser().parse_args()
    from flashdsa.ops import indexer_loss as L
    from flashdsa.ops.sparse_mla import sparse_mla_fwd

    jobs = [(v, h) for h in args.heads for v in (VARIANTS if args.sweep else [None])]
    jobs = [(v if v else tuple(L._config(torch.empty(1, h, D_QK, device="cuda")).values()), h) for v, h in jobs]
    failures = {}
    if not args.no_precompile:
        with cf.ProcessPoolExecutor(max_workers=min(12, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            for v, h, err in ex.map(_compile_worker, *zip(*jobs)):
                if err:
                    failures[(v, h)] = err
                    print("compile", v, h, err)
    if args.precompile_only:
        return
    wait_for(args.wait_for)
    ceil = measure_ceilings()
    print("ceilings:", {k: round(v, 1) for k, v in ceil.items()})
    sm_scale = D_QK ** -0.5
    rows = []
    for h in args.heads:
        q, kv, iq, ik, w, idx = make(h, S_Q, S_KV, TOPK)
        _, _, lse = sparse_mla_fwd(q, kv, idx, sm_scale, D_V)
        t_attn = bench_ms(lambda: sparse_mla_fwd(q, kv, idx, sm_scale, D_V))
        attn_tflops = 2.0 * S_Q * h * TOPK * (D_QK + D_V) / t_attn * 1e-9
        rows.append(dict(stage="sparse", h=h, variant="attention fwd", ms=t_attn, tflops=attn_tflops))
        n = S_Q * TOPK
        f_fwd = 2.0 * n * (h * D_QK + HI * DI)
        f_bwd = 2.0 * n * 3 * HI * DI
        for v in [vv for vv, hh in jobs if hh == h]:
            if (v, h) in failures:
                rows.append(dict(stage="sparse", h=h, variant=str(v), note="compile failed"))
                continue
            cfg = dict(BLOCK_K=v[0], num_warps=v[1], num_stages=v[2])
            try:
                kl, st, p, _ = L.indexer_kl_fwd(q, kv, lse, iq, ik, w, idx, None, None, sm_scale, cfg)
                dkl = torch.ones_like(kl)
                tf = bench_ms(lambda: L.indexer_kl_fwd(q, kv, lse, iq, ik, w, idx, None, None, sm_scale, cfg))
                tb = bench_ms(lambda: L.indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, idx, None, None, st, p,
                                                       sm_scale, cfg))
            except Exception as e:
                rows.append(dict(stage="sparse", h=h, variant=str(v), note=f"{type(e).__name__}: {str(e)[:150]}"))
                continue
            rows.append(dict(stage="sparse", h=h, variant=str(v), fwd_ms=tf, bwd_ms=tb, ms=tf + tb,
                             tflops=(f_fwd + f_bwd) / (tf + tb) * 1e-9, ratio_to_attn_fwd=(tf + tb) / t_attn,
                             fwd_ratio=tf / t_attn, finite=bool(torch.isfinite(kl).all())))
        del q, kv, iq, ik, w, idx, lse
        torch.cuda.empty_cache()

        # Warm-up: one causal sequence, the attention's lse from a random-but-consistent source
        # (the loss normalizes the target itself, so any finite lse times the same).
        T = T_WARM
        q, kv, iq, ik, w, _ = make(h, T, T, 0)
        lse = torch.full((T, h), 20.0, device="cuda")
        ks = torch.zeros(T, dtype=torch.int32, device="cuda")
        ke = torch.arange(1, T + 1, dtype=torch.int32, device="cuda")
        n = T * (T + 1) / 2
        f_fwd = 2.0 * n * (h * D_QK + HI * DI)
        f_bwd = 2.0 * n * (h * D_QK + 3 * HI * DI)
        dense_fwd_est = 2.0 * n * h * (D_QK + D_V) / (attn_tflops * 1e9)
        for v in [vv for vv, hh in jobs if hh == h]:
            if (v, h) in failures:
                continue
            cfg = dict(BLOCK_K=v[0], num_warps=v[1], num_stages=v[2])
            try:
                kl, st, p, _ = L.indexer_kl_fwd(q, kv, lse, iq, ik, w, None, ks, ke, sm_scale, cfg)
                dkl = torch.ones_like(kl)
                tf = bench_ms(lambda: L.indexer_kl_fwd(q, kv, lse, iq, ik, w, None, ks, ke, sm_scale, cfg))
                tb = bench_ms(lambda: L.indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, None, ks, ke, st, p,
                                                       sm_scale, cfg))
            except Exception as e:
                rows.append(dict(stage="warmup", h=h, variant=str(v), note=f"{type(e).__name__}: {str(e)[:150]}"))
                continue
            rows.append(dict(stage="warmup", h=h, variant=str(v), fwd_ms=tf, bwd_ms=tb, ms=tf + tb,
                             tflops=(f_fwd + f_bwd) / (tf + tb) * 1e-9,
                             ratio_to_dense_fwd_est=(tf + tb) / dense_fwd_est, fwd_ratio_est=tf / dense_fwd_est))
        del q, kv, iq, ik, w, lse
        torch.cuda.empty_cache()
        path = write_result("indexer_loss" + ("_sweep" if args.sweep else ""), dict(
            shapes=dict(sparse=dict(s_q=S_Q, s_kv=S_KV, topk=TOPK), warmup=dict(T=T_WARM), d_qk=D_QK, d_v=D_V,
                        h_i=HI, d_i=DI, dtype="bf16"),
            notes="ratio_to_attn_fwd: (loss fwd + bwd) / sparse_mla_fwd at the same shape, same run. "
                  "ratio_to_dense_fwd_est: vs dense causal forward FLOPs at the sparse forward's measured rate.",
            ceilings=ceil, configs=L.CONFIGS, rows=rows,
            compile_failures={f"{v} h{h}": e for (v, h), e in failures.items()}))
        print_table(rows, ["stage", "h", "variant", "fwd_ms", "bwd_ms", "ms", "tflops", "ratio_to_attn_fwd",
                           "ratio_to_dense_fwd_est"])
    print("wrote", path)


if __name__ == "__main__":
    main()
