"""Experiment (issue 15): fewer barriers in the consumers of the Hopper sparse MLA forward.

The consumers' main loop of the product (flashdsa/ops/sparse_mla/fwd_sm90.py,
``_attend_partition``; its SASS for sm_90, read by hand) waits at nine 256-thread barriers
for every 64-row block: three for the row max shared by the two warpgroups (each holds half
of the block's keys), two for the row sums, three for moving p from the score layout into
the register operand of p @ v (two rounds through the ~2 KB of shared memory left), one
before freeing the stage. Barrier stalls were 28% of the prefill kernel's stall samples
(docs/benchmarks_sparse_mla.md, "Profile").

Two changes, each a variant:
- ``smem_p``: p goes to p @ v from shared memory, stored into the stage's rope columns
  (k_tail, [64, 64] bf16, read only by q . k, which both warpgroups have finished by the
  row-max exchange): one barrier instead of three, and no p operand in registers;
- ``defer_sum`` (with smem_p): each thread keeps its part of the row sums, [64, BLOCK_K]
  fp32 scaled by alpha every block, reduced across the warpgroups once at the end: no
  barrier for the sums.

The producers are the product's (bf16 gather and fp8 staging). Checked against the product
(``smem_p`` alone must be equal bit for bit: the same bf16 p into the same MMA; with
``defer_sum`` the sums are added in another order, so out within 2 bf16 ulps-scale of the
product's error against float64, lse within 1e-5), then timed at the issue's prefill
shapes and its decode shape, beside the product, with the bf16 matmul ceiling of the same
run.

    python -m benchmarks.probe_gluon_consumers --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_consumers           # H200: check, then time

Results: ``probe_gluon_consumers.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.sparse_mla import fwd_sm90 as F  # noqa: E402

VARIANTS = ("smem_p", "smem_p_defer_sum")
SM_SCALE = 0.1352

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                         warpgroup_mma_wait)

    from flashdsa.ops.sparse_mla.fwd_sm90 import (LN2_C, _allocate, _barrier, _issue_rows, _producer_partition,
                                                  _row_range)

    @gluon.jit
    def _attend_variant(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                        h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                        q_nope, q_tail, k_nope, k_tail, ready, empty,
                        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
                        DEFER_SUM: gl.constexpr):
        """The product's attention partition with p through the stage's rope columns and,
        with DEFER_SUM, the row sums reduced once at the end."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_K // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, 256, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

        h_n, h_t = _row_range(pid_h * 64, 64, num_warps)
        _issue_rows(q_ptr + pid_t.to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, num_warps)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        _barrier()

        m_i = gl.full([64], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([64], gl.float32, row_s)
        l_acc = gl.zeros([64, BLOCK_K], gl.float32, s_layout)
        acc = gl.zeros([64, 512], gl.float32, o_layout)
        n_blocks = gl.cdiv(topk, BLOCK_K)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=col_s)
            idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
            mbarrier.wait(ready.index(st), (j // NUM_STAGES) & 1)
            fence_async_shared()
            kn = k_nope.index(st)
            kt = k_tail.index(st)
            s = warpgroup_mma(q_nope, kn.permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            s = warpgroup_mma(q_tail, kt.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            valid = (idx >= 0) & (idx < n_kv)
            s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            # the row max crosses the warpgroups: past it, both have finished reading kt
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            if DEFER_SUM:
                l_acc = l_acc * alpha[:, None] + p
            else:
                l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            kt.store(p.to(gl.bfloat16))  # [64 heads, 64 rows] over the rope columns, read by q . k only
            fence_async_shared()
            _barrier()  # both warpgroups' halves of p are in place
            acc = warpgroup_mma(kt, kn, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            _barrier()
            mbarrier.arrive(empty.index(st), count=1)

        if DEFER_SUM:
            l_i = gl.sum(l_acc, 1)
        has = l_i > 0.0
        inv = gl.convert_layout(1.0 / gl.where(has, l_i, 1.0), row_o)
        out = (acc * inv[:, None]).to(gl.bfloat16)
        heads_o = pid_h * 64 + gl.arange(0, 64, row_o)
        o_ptrs = (out_ptr + pid_t.to(gl.int64) * stride_ot + heads_o[:, None] * stride_oh
                  + gl.arange(0, 512, col_o)[None, :])
        gl.store(o_ptrs, out)
        heads = pid_h * 64 + gl.arange(0, 64, row_s)
        l_off = pid_t.to(gl.int64) * stride_lt + heads
        lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2_C, float("inf"))
        gl.store(lse_ptr + l_off, lse)
        gl.store(ml_ptr + l_off, m_i * LN2_C)

    @gluon.jit
    def consumers_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        FP8: gl.constexpr, DEFER_SUM: gl.constexpr,
    ):
        """The product's program with the variant consumers."""
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty = _allocate(BLOCK_K, NUM_STAGES, 1 if FP8 else 128)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_attend_variant, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                               h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                               q_nope, q_tail, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, num_warps,
                               DEFER_SUM)),
            (_producer_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                   k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, FP8)),
        ], [4], [PRODUCER_REGS])


def variant_fwd(q, kv, idx, sm_scale, variant, scales=None, rope=None):
    """As the product's ``_launch`` (bf16 rows ``kv``, or fp8_ds_mla rows with their
    ``scales`` and ``rope`` views) with the variant consumers; also the compiled kernel."""
    fp8 = scales is not None
    cfg = F.SM90_GLUON_FP8 if fp8 else F.SM90_GLUON
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    k = consumers_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, kv, scales, rope, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, sm_scale * F.LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), scales.stride(0) if fp8 else 0, rope.stride(0) if fp8 else 0,
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], FP8=fp8, DEFER_SUM=variant.endswith("defer_sum"),
        maxnreg=cfg["maxnreg"])
    return (out, ml, lse), k


def prefill_inputs(t, h_q, n_kv, topk, seed, device="cuda", holes=True):
    """q [t, h_q, 576], kv [n_kv, 576] bf16, idx [t, topk] (with ``holes``: -1,
    out-of-range and negative entries, an empty row and a half-valid row)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(t, h_q, 576, device=device, dtype=torch.bfloat16, generator=g)
    kv = torch.randn(n_kv, 576, device=device, dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, n_kv, (t, topk), device=device, generator=g, dtype=torch.int32)
    if holes:
        m = torch.rand(t, topk, device=device, generator=g)
        idx[m < 0.1] = -1
        idx[(m >= 0.1) & (m < 0.13)] = n_kv + 5
        idx[(m >= 0.13) & (m < 0.15)] = -7
        idx[0] = -1
        idx[1, topk // 2:] = -1
    return q, kv, idx


def fp8_views(kv):
    """The fp8_ds_mla bytes of rows ``kv`` as (c8, scales, rope) views, and their bf16 dequantization."""
    from flashdsa.api import quantize_mla_cache
    from flashdsa.layout import MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views
    from flashdsa.reference.mla_cache import dequantize_mla_cache

    rows8 = quantize_mla_cache(kv.view(kv.shape[0], 1, 1, 576)).view(kv.shape[0], -1)
    c8, sc, pe = mla_byte_views(rows8)
    return (c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]), dequantize_mla_cache(rows8).view(kv.shape[0], 576)


def _reference(q, kv, idx):
    """float64 out and lse of the sparse attention (invalid indices masked; empty rows 0 / +inf)."""
    from flashdsa.reference.sparse_mla import sparse_mla_fwd

    out, _, lse = sparse_mla_fwd(q.double().unsqueeze(0), kv.double().view(1, -1, 1, 576),
                                 idx.view(1, idx.shape[0], 1, -1), SM_SCALE, 512)
    return out[0], lse[0]


def check(results) -> bool:
    from tests.utils import rel_err

    ok = True
    for t, h_q, n_kv, topk, fp8 in ((24, 128, 70000, 2048, False), (37, 64, 3001, 1000, False),
                                    (9, 128, 100, 64, False), (64, 128, 65536, 2048, True)):
        q, kv, idx = prefill_inputs(t, h_q, n_kv, topk, t + n_kv)
        if fp8:
            views, rows = fp8_views(kv)
            want = F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
        else:
            views, rows = None, kv
            want = F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)
        r_out, r_lse = _reference(q, rows, idx)
        for variant in VARIANTS:
            if fp8:
                got, _ = variant_fwd(q, views[0], idx, SM_SCALE, variant, views[1], views[2])
            else:
                got, _ = variant_fwd(q, kv, idx, SM_SCALE, variant)
            equal = all(torch.equal(a, b) for a, b in zip(got, want))
            fin = torch.isfinite(r_lse)
            row = dict(t=t, h_q=h_q, n_kv=n_kv, topk=topk, fp8=fp8, variant=variant, equal=equal,
                       err=rel_err(got[0], r_out), product_err=rel_err(want[0], r_out),
                       lse_diff=float((got[2].double() - r_lse)[fin].abs().max()),
                       no_nan=not bool(torch.isnan(got[0]).any()))
            row["ok"] = (equal if variant == "smem_p" else
                         row["err"] <= 1.25 * row["product_err"] + 1e-5 and row["lse_diff"] < 1e-4) and row["no_nan"]
            ok &= row["ok"]
            results.append(row)
            print(row, flush=True)
    return ok


def speed(results, ceil):
    cases = [("prefill 8K h128", 4096, 128, 8192, False), ("prefill 8K h64", 4096, 64, 8192, False),
             ("prefill 64K h128", 4096, 128, 65536, False),
             ("decode bf16 b128 s_q2 32K", 256, 128, 128 * 32768, False),
             ("decode fp8 b128 s_q2 32K", 256, 128, 128 * 32768, True)]
    for name, t, h_q, n_kv, fp8 in cases:
        q, kv, idx = prefill_inputs(t, h_q, n_kv, 2048, 0, holes=False)
        tflop = 2 * t * h_q * 2048 * 1088 / 1e12
        row = dict(case=name)
        if fp8:
            views, _ = fp8_views(kv)
            runs = [("product", lambda: F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE))]
            runs += [(v, lambda v=v: variant_fwd(q, views[0], idx, SM_SCALE, v, views[1], views[2]))
                     for v in VARIANTS]
        else:
            runs = [("product", lambda: F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE))]
            runs += [(v, lambda v=v: variant_fwd(q, kv, idx, SM_SCALE, v)) for v in VARIANTS]
        for vname, fn in runs:
            ms = bench_ms(fn)
            row[f"{vname}_ms"] = round(ms, 4)
            row[f"{vname}_x_bf16"] = round(tflop / ms * 1e3 / ceil["bf16_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers, spills and the consumers' loop (barriers) of each variant, built for sm_90."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        q, kv, idx = prefill_inputs(4, 128, 1000, 256, 0, device="cpu", holes=False)
        views, _ = fp8_views(kv)
        with capture_launches() as launches:
            for v in VARIANTS:
                variant_fwd(q, kv, idx, SM_SCALE, v)
                variant_fwd(q, views[0], idx, SM_SCALE, v, views[1], views[2])
            F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)
    names = [f"{v} {rows}" for v in VARIANTS for rows in ("bf16", "fp8")] + ["product bf16"]
    for name, row in zip(names, build_launches(launches, keep_going=True)):
        print(dict(variant=name, **row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="build for sm_90 on this machine (CPU) and report")
    args = ap.parse_args()
    if args.build:
        build()
        return
    ceil = measure_ceilings()
    results = {"ceilings": ceil, "check": [], "speed": []}
    ok = check(results["check"])
    speed(results["speed"], ceil)
    print_table(results["speed"], [c for c in results["speed"][0] if c.endswith("_ms") or c == "case"])
    print("checks:", ok)
    print("wrote", write_result("probe_gluon_consumers", results))


if __name__ == "__main__":
    main()
