"""Experiment (issue 15): when the softmax warpgroup of the Hopper sparse MLA forward hands
p to the value warpgroup.

In the product (flashdsa/ops/sparse_mla/fwd_sm90.py) the softmax warpgroup signals
``p_ready`` as soon as p and alpha are in shared memory, so both halves of p @ v run at
once and the stage is freed when both are done. TileLang's pipelined kernel signals after
its own half of p @ v has completed, so the value warpgroup's half runs beside the next
block's q . k instead. ``late`` does that.

    python -m benchmarks.probe_gluon_signal --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_signal           # H200: check against float64, then time

Results: ``probe_gluon_signal.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.sparse_mla import fwd_sm90 as F  # noqa: E402

SM_SCALE = 0.1352
VARIANTS = {"same": False, "late": True}  # "same": the product's schedule, built here (a noise check)

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from flashdsa.ops.sparse_mla.fwd_sm90 import (LN2_C, _allocate, _barrier, _issue_rows, _producer_partition,
                                                  _row_range, _value_partition)

    @gluon.jit
    def _softmax_variant(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                         h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                         q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                         BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, LATE: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_K, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 256, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        h_n, h_t = _row_range(pid_h * 64, 64, 4)
        _issue_rows(q_ptr + pid_t.to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, 4)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        _barrier()

        m_i = gl.full([64], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([64], gl.float32, row_s)
        acc = gl.zeros([64, 256], gl.float32, o_layout)
        for j in range(gl.cdiv(topk, BLOCK_K)):
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
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            alpha_buf.index(st).store(alpha)
            kt.store(p.to(gl.bfloat16))
            fence_async_shared()
            _barrier()
            if not LATE:
                mbarrier.arrive(p_ready.index(st), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(kt, kn.slice(0, 256, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            if LATE:
                mbarrier.arrive(p_ready.index(st), count=1)
            mbarrier.arrive(empty.index(st), count=1)

        has = l_i > 0.0
        inv = 1.0 / gl.where(has, l_i, 1.0)
        l_buf.store(inv)
        _barrier()
        mbarrier.arrive(done.index(0), count=1)
        out = (acc * gl.convert_layout(inv, row_o)[:, None]).to(gl.bfloat16)
        heads_o = pid_h * 64 + gl.arange(0, 64, row_o)
        o_ptrs = (out_ptr + pid_t.to(gl.int64) * stride_ot + heads_o[:, None] * stride_oh
                  + gl.arange(0, 256, col_o)[None, :])
        gl.store(o_ptrs, out)
        heads = pid_h * 64 + gl.arange(0, 64, row_s)
        l_off = pid_t.to(gl.int64) * stride_lt + heads
        lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2_C, float("inf"))
        gl.store(lse_ptr + l_off, lse)
        gl.store(ml_ptr + l_off, m_i * LN2_C)

    @gluon.jit
    def variant_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, VALUE_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, FP8: gl.constexpr, LATE: gl.constexpr,
    ):
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done = _allocate(
            BLOCK_K, NUM_STAGES, 1 if FP8 else 128)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_softmax_variant, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                                BLOCK_K, NUM_STAGES, LATE)),
            (_value_partition, (out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                                alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_producer_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                   k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, FP8)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_variant(variant, q, kv, idx, scales=None, rope=None):
    """(out, max_logits, lse) of one launch of ``variant_kernel`` and the compiled kernel."""
    late = VARIANTS[variant]
    cfg = F.SM90_GLUON
    fp8 = scales is not None
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    k = variant_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, kv, scales, rope, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), scales.stride(0) if fp8 else 0, rope.stride(0) if fp8 else 0,
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        VALUE_REGS=cfg["VALUE_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], FP8=fp8, LATE=late,
        maxnreg=cfg["maxnreg"])
    return (out, ml, lse), k


def _rel_err(x, ref):
    fin = torch.isfinite(ref)
    return float((x.double() - ref)[fin].norm() / ref[fin].norm())


def adversarial(s_q, s_kv, h_q, topk, seed):
    """q, kv rows [s_kv, 576], idx with valid, repeated, -1, out-of-range and negative
    entries, an empty first row and a half-valid second row."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s_q, h_q, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, s_kv, (s_q, topk), device="cuda", generator=g, dtype=torch.int32)
    kind = torch.randint(0, 10, idx.shape, device="cuda", generator=g)
    idx = torch.where(kind == 0, -1, idx)
    idx = torch.where(kind == 1, s_kv + 3, idx)
    idx = torch.where(kind == 2, -5, idx)
    idx = torch.where(kind == 3, idx.roll(1, dims=-1), idx)
    idx[0] = -1
    idx[1, topk // 2:] = s_kv
    return q, kv, idx.contiguous()


def check(results) -> bool:
    """Every variant against the float64 reference, beside the product: out within 1.25x
    the product's error, lse and max_logits to 1e-4, the empty row right, no NaN (outputs
    of a NaN-filled allocation reused)."""
    from flashdsa.reference.sparse_mla import sparse_mla_fwd as ref_fwd
    ok = True
    for s_q, s_kv, h_q, topk in ((24, 65536, 128, 2048), (24, 65536, 64, 2048), (24, 3000, 128, 1000),
                                 (9, 100, 64, 64)):
        q, kv, idx = adversarial(s_q, s_kv, h_q, topk, s_q + s_kv + h_q)
        r_out, r_ml, r_lse = ref_fwd(q.double(), kv.double().view(s_kv, 1, 576), idx.view(s_q, 1, topk), SM_SCALE)
        p_err = _rel_err(F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)[0], r_out)
        fin = torch.isfinite(r_lse)
        for v in VARIANTS:
            torch.empty(1 << 28, device="cuda").fill_(float("nan"))
            (out, ml, lse), _ = run_variant(v, q, kv, idx)
            err = _rel_err(out, r_out)
            lse_d = float((lse.double() - r_lse)[fin].abs().max())
            ml_d = float((ml.double() - r_ml)[fin].abs().max())
            empty_ok = bool((out[0] == 0).all() and (lse[0] == float("inf")).all() and (ml[0] == float("-inf")).all())
            good = (not torch.isnan(out).any()) and err <= 1.25 * p_err + 1e-5 and lse_d < 1e-4 and ml_d < 1e-4 \
                and empty_ok
            ok &= good
            row = dict(s_q=s_q, s_kv=s_kv, h_q=h_q, topk=topk, variant=v, out_err=err, product_err=p_err,
                       lse_diff=lse_d, ml_diff=ml_d, empty_row=empty_ok, ok=good)
            results.append(row)
            print(row, flush=True)
    return ok


def cases(device="cuda", small=False):
    """(name, q, rows or the fp8 views, idx, flop): the issue's prefill and decode shapes."""
    from benchmarks.bench_sparse_mla import make_inputs
    from benchmarks.bench_sparse_mla_decode import make_problem
    from flashdsa.api import quantize_mla_cache
    from flashdsa.layout import MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views

    s_q = 64 if small else 4096
    for s_kv, h in ((8192, 128), (65536, 128), (8192, 64), (65536, 64)):
        q, kv, idx = make_inputs(s_q, min(s_kv, 4096) if small else s_kv, h, device=device)
        yield f"prefill {s_kv // 1024}K h{h}", q, (kv.view(kv.shape[0], 576), ), idx[:, 0], 2 * s_q * h * 2048 * 1088
    b = 4 if small else 128
    q, cache, slots = make_problem(b, 4096 if small else 32768, 2, device=device)
    q, idx, rows = q.flatten(0, 1), slots.flatten(0, 1).contiguous(), cache.reshape(-1, 576)
    flop = 2 * q.shape[0] * q.shape[1] * 2048 * 1088
    yield f"decode bf16 b{b} s_q2", q, (rows, ), idx, flop
    c8, sc, pe = mla_byte_views(quantize_mla_cache(rows.view(rows.shape[0], 1, 1, 576)).view(rows.shape[0], -1))
    yield f"decode fp8 b{b} s_q2", q, (c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]), idx, flop


def speed(results, ceil):
    for name, q, views, idx, flop in cases():
        row = dict(case=name)
        if len(views) == 3:
            runs = [("product", lambda: F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE))]
        else:
            runs = [("product", lambda: F.run_sparse_mla_fwd_sm90(q, views[0], idx, SM_SCALE))]
        runs += [(v, lambda v=v: run_variant(v, q, views[0], idx, *views[1:])) for v in VARIANTS]
        for label, fn in runs:
            ms = bench_ms(fn)
            row[f"{label}_ms"] = round(ms, 4)
            row[f"{label}_x_bf16"] = round(flop / ms / 1e9 / ceil["bf16_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers and spills of every variant, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        picked = [c for c in cases("cpu", small=True) if c[0].startswith(("prefill 8K h128", "decode fp8"))]
        labels = []
        with capture_launches() as launches:
            for name, q, views, idx, _ in picked:
                for v in VARIANTS:
                    run_variant(v, q, views[0], idx, *views[1:])
                    labels.append((name, v))
    for (name, v), row in zip(labels, build_launches(launches, keep_going=True)):
        row.pop("loop", None)
        print(dict(case=name, variant=v, **row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="build for sm_90 on this machine (CPU) and report")
    args = ap.parse_args()
    if args.build:
        build()
        return
    results = {"check": []}
    ok = check(results["check"])
    results["checks_pass"] = ok
    print("checks pass:", ok, flush=True)
    ceil = measure_ceilings()
    results["ceilings"] = ceil
    results["speed"] = []
    speed(results["speed"], ceil)
    print_table(results["speed"], ["case"] + [k for k in results["speed"][0] if k.endswith("_ms")])
    print("wrote", write_result("probe_gluon_signal", results))


if __name__ == "__main__":
    main()
