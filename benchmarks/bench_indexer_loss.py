"""Cost of the indexer KL losses relative to the attention forward, on the GPU.

    python -m benchmarks.bench_indexer_loss [--sweep] [--heads 64 128] [--from-probs-only]

Sparse stage: s_q 4096, s_kv 8192, topk 2048, d_qk 576 (the sparse MLA benchmark's
shapes), indexer H_I 64, d_I 128, bf16. Compared with flashdsa's sparse MLA forward at
the same shapes, measured in the same run. Target: the losses add <= 30% to it. Two ways:
  - "from probs" (what the MLA module's sparse stage runs): the forward returns the
    head-mean probabilities (``return_probs=True``) and the loss computes only the index
    scores. Added to the forward: (forward with probs - forward) + loss fwd; the loss's
    backward runs in the backward pass and is reported beside it.
  - "recompute": the loss recomputes the attention logits from q, kv and lse.

Warm-up stage: one causal sequence of T 4096 (dense). Two baselines: the dense causal
forward's FLOPs in the absorbed form (2*H*T*(T+1)/2*(d_qk+d_v)) at the rate the sparse
forward reaches here (an estimate, labelled so), and the attention the MLA module's warm-up
stage really runs: torch SDPA, causal, in the multi-head form (q.k over 128 nope + 64 rope
dims, values of 128), timed.

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
    ceilings_after_compile,
    print_table,
    sweep_arg_parser,
    write_result,
)

S_Q, S_KV, TOPK, D_QK, D_V, HI, DI = 4096, 8192, 2048, 576, 512, 64, 128
D_QK_MHA, D_V_MHA = 128 + 64, 128  # the multi-head form of the same attention (DeepSeek-V3 widths)
T_WARM = 4096
VARIANTS = [(32, 8, 2), (32, 8, 1), (64, 8, 1), (32, 4, 2)]  # (BLOCK_K, num_warps, num_stages)
PROBS_VARIANTS = [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 2), (16, 4, 3)]  # target given


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


def _probs_error(q, kv, idx, lse, probs, sm_scale, n_rows=64):
    """Relative error of the forward's probs on n_rows rows vs an fp32 recompute from q, kv, lse."""
    rows = torch.arange(0, q.shape[0], q.shape[0] // n_rows, device=q.device)[:n_rows]
    sel = kv[:, 0].float()[idx[rows, 0].long()]  # [n, topk, d_qk]
    logits = torch.einsum("nhd,nkd->nhk", q[rows].float(), sel) * sm_scale
    want = torch.exp(logits - lse[rows, :, None]).mean(1)
    return float(((probs[rows] - want).norm() / want.norm()).item())


def _compile_worker(variant, h):
    try:
        from flashdsa.ops import indexer_loss as L
        q, kv, iq, ik, w, idx = make(max(h, 16), 64, 1024, 256)
        lse = torch.rand(64, max(h, 16), device="cuda") + 10
        cfg = dict(BLOCK_K=variant[0], num_warps=variant[1], num_stages=variant[2])
        if h == 0:  # the target-given kernels (no attention tile)
            p = torch.rand(64, 256, device="cuda")
            kl, st, _, _ = L.indexer_kl_fwd(None, None, None, iq, ik, w, idx, None, None, 0.0, cfg, probs=p)
            L.indexer_kl_bwd(torch.ones_like(kl), None, None, None, iq, ik, w, idx, None, None, st, p, 0.0, cfg)
            torch.cuda.synchronize()
            return variant, h, None
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


def _time_loss(L, q, kv, lse, iq, ik, w, idx, ks, ke, sm_scale, cfg):
    """(per-row KL, forward ms, backward ms) of the recomputing loss (sparse with ``idx``,
    warm-up with ``ks``/``ke``) at kernel config ``cfg``; L is flashdsa.ops.indexer_loss."""
    kl, st, p, _ = L.indexer_kl_fwd(q, kv, lse, iq, ik, w, idx, ks, ke, sm_scale, cfg)
    dkl = torch.ones_like(kl)
    tf = bench_ms(lambda: L.indexer_kl_fwd(q, kv, lse, iq, ik, w, idx, ks, ke, sm_scale, cfg))
    tb = bench_ms(lambda: L.indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, idx, ks, ke, st, p, sm_scale, cfg))
    return kl, tf, tb


def _attention_with_lse_rows(q, k, v, h, n):
    """The warm-up's attention (multi-head form, causal) through the torch kernels that also
    return the lse the loss needs (SDPA itself returns none): time, and the lse's largest
    difference from an fp32 computation on 128 rows."""
    scale = q.shape[-1] ** -0.5
    rows_t = torch.arange(q.shape[2] - 128, q.shape[2], device=q.device)
    a = (q[0, :, rows_t].float() @ k[0].float().transpose(1, 2)) * scale  # [h, 128, T]
    a = a.masked_fill(torch.arange(q.shape[2], device=q.device)[None, None, :] > rows_t[None, :, None], float("-inf"))
    want = torch.logsumexp(a, dim=-1)  # [h, 128]
    kernels = {
        "cudnn": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                           scale=scale)[:2],
        "efficient": lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True,
                                                                                   scale=scale)[:2],
    }
    out = []
    for name, fn in kernels.items():
        try:
            lse = fn()[1]
            err = float((lse.reshape(h, -1)[:, :q.shape[2]][:, rows_t].float() - want).abs().max().item())
            t = bench_ms(fn)
        except Exception as e:  # a kernel this GPU / torch build lacks
            out.append(dict(stage="warmup", h=h, variant=f"attention fwd + lse ({name})",
                            note=f"{type(e).__name__}: {str(e)[:150]}"))
            continue
        out.append(dict(stage="warmup", h=h, variant=f"attention fwd + lse ({name})", ms=t,
                        tflops=2.0 * n * h * (D_QK_MHA + D_V_MHA) / t * 1e-9, lse_max_abs_err=err,
                        lse_shape=list(lse.shape)))
    return out


def main():
    ap = sweep_arg_parser()
    ap.add_argument("--from-probs-only", action="store_true",
                    help="only the forward with probs and the from-probs loss (skip recompute and warm-up rows)")
    args = ap.parse_args()
    import flashdsa
    from flashdsa.ops import indexer_loss as L

    def sparse_mla_fwd(q, kv, idx, sm_scale, d_v, probs_precision=None):
        """The public sparse MLA forward on the Triton backend, with probs at ``probs_precision``."""
        return flashdsa.sparse_mla_fwd(q, kv, idx, sm_scale, d_v, backend="triton",
                                       return_probs=probs_precision is not None,
                                       probs_precision=probs_precision or "fp16")

    def default_variant(h):
        """The (BLOCK_K, num_warps, num_stages) the launcher picks at these widths."""
        return tuple(L.CONFIGS["sm90" if h <= 64 else "sm90_h128"].values())

    jobs = [] if args.from_probs_only else [(v, h) for h in args.heads for v in (VARIANTS if args.sweep else [None])]
    jobs = [(v if v else default_variant(h), h) for v, h in jobs]
    # h 0: the target-given (from probs) kernels
    jobs += [(v, 0) for v in (PROBS_VARIANTS if args.sweep else [tuple(L.CONFIGS["sm90_probs"].values())])]
    failures = {}
    if not args.no_precompile:
        with cf.ProcessPoolExecutor(max_workers=min(12, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            for v, h, err in ex.map(_compile_worker, *zip(*jobs)):
                if err:
                    failures[(v, h)] = err
                    print("compile", v, h, err)
    ceil = ceilings_after_compile(args)
    if ceil is None:
        return
    sm_scale = D_QK ** -0.5
    rows = []
    name = "indexer_loss" + ("_sweep" if args.sweep else "") + ("_from_probs" if args.from_probs_only else "")
    for h in args.heads:
        q, kv, iq, ik, w, idx = make(h, S_Q, S_KV, TOPK)
        _, _, lse = sparse_mla_fwd(q, kv, idx, sm_scale, D_V)
        t_attn = bench_ms(lambda: sparse_mla_fwd(q, kv, idx, sm_scale, D_V))
        attn_tflops = 2.0 * S_Q * h * TOPK * (D_QK + D_V) / t_attn * 1e-9
        rows.append(dict(stage="sparse", h=h, variant="attention fwd", ms=t_attn, tflops=attn_tflops))
        # the forward handing over the target: its extra time, and the target's accuracy
        _, _, lse_p, probs = sparse_mla_fwd(q, kv, idx, sm_scale, D_V, "fp16")
        t_attn_p = bench_ms(lambda: sparse_mla_fwd(q, kv, idx, sm_scale, D_V, "fp16"))
        probs_err = _probs_error(q, kv, idx, lse, probs, sm_scale)
        rows.append(dict(stage="sparse", h=h, variant="attention fwd + probs", ms=t_attn_p,
                         tflops=2.0 * S_Q * h * TOPK * (D_QK + D_V) / t_attn_p * 1e-9,
                         probs_overhead_ms=t_attn_p - t_attn, probs_rel_err=probs_err))
        probs8 = sparse_mla_fwd(q, kv, idx, sm_scale, D_V, "e4m3")[3]
        t_attn_p8 = bench_ms(lambda: sparse_mla_fwd(q, kv, idx, sm_scale, D_V, "e4m3"))
        rows.append(dict(stage="sparse", h=h, variant="attention fwd + probs (e4m3)", ms=t_attn_p8,
                         tflops=2.0 * S_Q * h * TOPK * (D_QK + D_V) / t_attn_p8 * 1e-9,
                         probs_overhead_ms=t_attn_p8 - t_attn,
                         probs_rel_err=_probs_error(q, kv, idx, lse, probs8, sm_scale)))
        n = S_Q * TOPK
        f_idx = 2.0 * n * HI * DI  # one index-score product
        kl_rec = L.indexer_kl_fwd(q, kv, lse, iq, ik, w, idx, None, None, sm_scale)[0]
        for v in [vv for vv, hh in jobs if hh == 0]:
            if (v, 0) in failures:
                rows.append(dict(stage="sparse", h=h, variant=f"from probs {v}", note="compile failed"))
                continue
            cfg = dict(BLOCK_K=v[0], num_warps=v[1], num_stages=v[2])
            try:
                kl, st, _, _ = L.indexer_kl_fwd(None, None, None, iq, ik, w, idx, None, None, 0.0, cfg, probs=probs)
                dkl = torch.ones_like(kl)
                tf = bench_ms(lambda: L.indexer_kl_fwd(None, None, None, iq, ik, w, idx, None, None, 0.0, cfg,
                                                       probs=probs))
                tb = bench_ms(lambda: L.indexer_kl_bwd(dkl, None, None, None, iq, ik, w, idx, None, None, st, probs,
                                                       0.0, cfg))
            except Exception as e:
                rows.append(dict(stage="sparse", h=h, variant=f"from probs {v}", note=f"{type(e).__name__}: {str(e)[:150]}"))
                continue
            added_fwd = t_attn_p - t_attn + tf
            rows.append(dict(stage="sparse", h=h, variant=f"from probs {v}", fwd_ms=tf, bwd_ms=tb, ms=tf + tb,
                             tflops=4 * f_idx / (tf + tb) * 1e-9, fwd_tflops=f_idx / tf * 1e-9,
                             added_to_fwd=added_fwd / t_attn, ratio_to_attn_fwd=(added_fwd + tb) / t_attn,
                             kl_vs_recompute=float(((kl - kl_rec).norm() / kl_rec.norm()).item())))
        cfg = L.CONFIGS["sm90_probs"]
        kl8 = L.indexer_kl_fwd(None, None, None, iq, ik, w, idx, None, None, 0.0, cfg, probs=probs8)[0]
        tf = bench_ms(lambda: L.indexer_kl_fwd(None, None, None, iq, ik, w, idx, None, None, 0.0, cfg, probs=probs8))
        added_fwd = t_attn_p8 - t_attn + tf
        rows.append(dict(stage="sparse", h=h, variant=f"from e4m3 probs {tuple(cfg.values())}", fwd_ms=tf,
                         added_to_fwd=added_fwd / t_attn,
                         kl_vs_recompute=float(((kl8 - kl_rec).norm() / kl_rec.norm()).item())))
        del probs, probs8, lse_p, kl_rec
        f_fwd = 2.0 * n * (h * D_QK + HI * DI)
        f_bwd = 2.0 * n * 3 * HI * DI
        for v in [vv for vv, hh in jobs if hh == h]:
            if (v, h) in failures:
                rows.append(dict(stage="sparse", h=h, variant=str(v), note="compile failed"))
                continue
            cfg = dict(BLOCK_K=v[0], num_warps=v[1], num_stages=v[2])
            try:
                kl, tf, tb = _time_loss(L, q, kv, lse, iq, ik, w, idx, None, None, sm_scale, cfg)
            except Exception as e:
                rows.append(dict(stage="sparse", h=h, variant=str(v), note=f"{type(e).__name__}: {str(e)[:150]}"))
                continue
            rows.append(dict(stage="sparse", h=h, variant=f"recompute {v}", fwd_ms=tf, bwd_ms=tb, ms=tf + tb,
                             tflops=(f_fwd + f_bwd) / (tf + tb) * 1e-9, ratio_to_attn_fwd=(tf + tb) / t_attn,
                             fwd_ratio=tf / t_attn, finite=bool(torch.isfinite(kl).all())))
        del q, kv, iq, ik, w, idx, lse
        torch.cuda.empty_cache()

        if not args.from_probs_only:
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
            qm, km = (torch.randn(1, h, T, D_QK_MHA, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            vm = torch.randn(1, h, T, D_V_MHA, device="cuda", dtype=torch.bfloat16)
            t_sdpa = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qm, km, vm, is_causal=True))
            rows.append(dict(stage="warmup", h=h, variant="attention fwd (SDPA, multi-head form)", ms=t_sdpa,
                             tflops=2.0 * n * h * (D_QK_MHA + D_V_MHA) / t_sdpa * 1e-9))
            rows += _attention_with_lse_rows(qm, km, vm, h, n)
            del qm, km, vm
            for v in [vv for vv, hh in jobs if hh == h]:
                if (v, h) in failures:
                    continue
                cfg = dict(BLOCK_K=v[0], num_warps=v[1], num_stages=v[2])
                try:
                    _, tf, tb = _time_loss(L, q, kv, lse, iq, ik, w, None, ks, ke, sm_scale, cfg)
                except Exception as e:
                    rows.append(dict(stage="warmup", h=h, variant=str(v), note=f"{type(e).__name__}: {str(e)[:150]}"))
                    continue
                t_own_lse = bench_ms(lambda: L.indexer_kl_fwd(q, kv, None, iq, ik, w, None, ks, ke, sm_scale, cfg))
                rows.append(dict(stage="warmup", h=h, variant=str(v), fwd_ms=tf, bwd_ms=tb, ms=tf + tb,
                                 fwd_ms_computing_lse=t_own_lse,
                                 tflops=(f_fwd + f_bwd) / (tf + tb) * 1e-9,
                                 ratio_to_dense_fwd_est=(tf + tb) / dense_fwd_est, fwd_ratio_est=tf / dense_fwd_est,
                                 ratio_to_sdpa_fwd=(tf + tb) / t_sdpa, fwd_ratio_sdpa=tf / t_sdpa))
            del q, kv, iq, ik, w, lse
            torch.cuda.empty_cache()
        path = write_result(name, dict(
            shapes=dict(sparse=dict(s_q=S_Q, s_kv=S_KV, topk=TOPK), warmup=dict(T=T_WARM), d_qk=D_QK, d_v=D_V,
                        h_i=HI, d_i=DI, dtype="bf16"),
            notes="ratio_to_attn_fwd: what the losses add (fwd + bwd) / sparse_mla_fwd at the same shape, same run; "
                  "for 'from probs' rows the probs overhead of the forward counts in. added_to_fwd: the part "
                  "added to the forward pass (probs overhead + loss fwd). kl_vs_recompute: relative "
                  "difference of the per-row KL, target from the forward's probs vs recomputed in fp32. "
                  "ratio_to_dense_fwd_est: vs dense causal forward FLOPs at the sparse forward's measured rate; "
                  "ratio_to_sdpa_fwd: vs the timed SDPA forward the MLA module's warm-up runs.",
            ceilings=ceil, configs=L.CONFIGS, rows=rows,
            compile_failures={f"{v} h{h}": e for (v, h), e in failures.items()}))
        print_table(rows, ["stage", "h", "variant", "fwd_ms", "bwd_ms", "ms", "tflops", "added_to_fwd",
                           "ratio_to_attn_fwd", "ratio_to_dense_fwd_est", "ratio_to_sdpa_fwd", "probs_rel_err",
                           "kl_vs_recompute", "fwd_ms_computing_lse", "lse_max_abs_err", "note"])
    print("wrote", path)


if __name__ == "__main__":
    main()
