"""Experiment (issue 15): the softmax warpgroup's p @ v of block j - 1 in flight during
its softmax of block j.

In the product (flashdsa/ops/sparse_mla/fwd_sm90.py) the softmax warpgroup runs, for
each block, q . k, the softmax, then its p @ v (d_v 0-255) and waits for it. The source
profile of 2026-12-04 18:12 UTC (ncu SourceCounters, prefill 8K h_q 128) splits its time
about 52% q . k (issue and wait), 20% softmax, 18% p @ v, 6% the epilogue, and the tensor
pipe is 60% busy: nothing runs on the tensor cores during the softmax.

Here the softmax warpgroup issues p @ v of block j - 1 right after q . k of block j and
computes the softmax of block j while it runs; then it waits for it, frees block j - 1's
stage, rescales by block j's alpha and hands block j's p to the value warpgroup, which
is unchanged. The accumulator sees the same operations in the same order (acc * alpha_j
after p_(j-1) @ v), so the outputs must equal the product's bit for bit. A stage is now
held until the middle of the next block: the producer has less time to refill it.

    python -m benchmarks.probe_gluon_pv_overlap --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_pv_overlap           # H200: check, then time

Results: ``probe_gluon_pv_overlap.json`` under $OUT or benchmarks/results/.
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

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from flashdsa.ops.sparse_mla.fwd_sm90 import (LN2_C, _allocate, _barrier, _issue_rows, _producer_partition,
                                                  _row_range, _value_partition)

    @gluon.jit
    def _scores(j, q_nope, q_tail, k_nope, k_tail, ready, idx_row, n_kv, topk, qk_scale, s_layout: gl.constexpr,
                BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Block j's scores (masked, scaled by qk_scale), once its stage is ready."""
        st = j % NUM_STAGES
        kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, s_layout))
        idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
        mbarrier.wait(ready.index(st), (j // NUM_STAGES) & 1)
        fence_async_shared()
        s = warpgroup_mma(q_nope, k_nope.index(st).permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        s = warpgroup_mma(q_tail, k_tail.index(st).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        valid = (idx >= 0) & (idx < n_kv)
        return gl.where(valid[None, :], s * qk_scale, float("-inf"))

    @gluon.jit
    def _hand_over(j, pb, alpha, k_tail, alpha_buf, p_ready, NUM_STAGES: gl.constexpr):
        """Block j's p over its stage's rope columns and alpha, signalled to the value warpgroup."""
        st = j % NUM_STAGES
        alpha_buf.index(st).store(alpha)
        k_tail.index(st).store(pb)
        fence_async_shared()
        _barrier()
        mbarrier.arrive(p_ready.index(st), count=1)

    @gluon.jit
    def _softmax_overlap(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                         h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                         q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                         BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's softmax warpgroup with p @ v of block j - 1 issued after q . k of
        block j and waited for after block j's softmax."""
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
        n_blocks = gl.cdiv(topk, BLOCK_K)
        if n_blocks > 0:  # block 0: nothing to multiply yet
            s = _scores(0, q_nope, q_tail, k_nope, k_tail, ready, idx_row, n_kv, topk, qk_scale, s_layout,
                        BLOCK_K, NUM_STAGES)
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            _hand_over(0, p.to(gl.bfloat16), alpha, k_tail, alpha_buf, p_ready, NUM_STAGES)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        for j in range(1, n_blocks):
            pv = (j - 1) % NUM_STAGES
            s = _scores(j, q_nope, q_tail, k_nope, k_tail, ready, idx_row, n_kv, topk, qk_scale, s_layout,
                        BLOCK_K, NUM_STAGES)
            # block j - 1's p @ v, in flight during this block's softmax
            acc = warpgroup_mma(k_tail.index(pv), k_nope.index(pv).slice(0, 256, dim=1), acc, is_async=True)
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            pb = p.to(gl.bfloat16)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(pv), count=1)
            _hand_over(j, pb, alpha, k_tail, alpha_buf, p_ready, NUM_STAGES)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        if n_blocks > 0:
            last = (n_blocks - 1) % NUM_STAGES
            acc = warpgroup_mma(k_tail.index(last), k_nope.index(last).slice(0, 256, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(last), count=1)

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
    def overlap_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, VALUE_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, FP8: gl.constexpr,
    ):
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done = _allocate(
            BLOCK_K, NUM_STAGES, 1 if FP8 else 128)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_softmax_overlap, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                                BLOCK_K, NUM_STAGES)),
            (_value_partition, (out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                                alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_producer_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                   k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, FP8)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_overlap(q, kv, idx, scales=None, rope=None, **cfg_over):
    cfg = dict(F.SM90_GLUON, **cfg_over)
    fp8 = scales is not None
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    overlap_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, kv, scales, rope, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), scales.stride(0) if fp8 else 0, rope.stride(0) if fp8 else 0,
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        VALUE_REGS=cfg["VALUE_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], FP8=fp8, maxnreg=cfg["maxnreg"])
    return out, ml, lse


def _holes(idx, n_kv, g):
    m = torch.rand(idx.shape, device=idx.device, generator=g)
    idx[m < 0.1] = -1
    idx[(m >= 0.1) & (m < 0.13)] = n_kv + 5
    idx[(m >= 0.13) & (m < 0.15)] = -7
    idx[0] = -1
    if idx.shape[0] > 1:
        idx[1, idx.shape[1] // 2:] = -1
    return idx


def bf16_problem(t, n_kv, h_q, topk, seed, device="cuda", holes=False, causal=False):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(t, h_q, 576, device=device, dtype=torch.bfloat16, generator=g)
    kv = torch.randn(n_kv, 576, device=device, dtype=torch.bfloat16, generator=g)
    if causal:
        ctx = (n_kv - t + 1 + torch.arange(t, device=device)).clamp(min=1)
        idx = (torch.rand(t, topk, device=device, generator=g) * ctx[:, None]).to(torch.int32)
    else:
        idx = torch.randint(0, n_kv, (t, topk), device=device, generator=g, dtype=torch.int32)
    return q, kv, _holes(idx, n_kv, g) if holes else idx


def fp8_problem(t, n_rows, topk, seed, device="cuda", holes=False):
    from flashdsa.api import quantize_mla_cache
    from flashdsa.layout import MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views

    g = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randn(n_rows, 576, device=device, dtype=torch.bfloat16, generator=g)
    c8, sc, pe = mla_byte_views(quantize_mla_cache(rows.view(n_rows, 1, 1, 576)).view(n_rows, -1))
    q = torch.randn(t, 128, 576, device=device, dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, n_rows, (t, topk), device=device, generator=g, dtype=torch.int32)
    return q, (c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]), _holes(idx, n_rows, g) if holes else idx


def check(results) -> bool:
    """Outputs equal to the product's bit for bit, on every kind of invalid index, topk
    not a multiple of the block, one block, one partial block."""
    ok = True
    for t, n_kv, h_q, topk in ((37, 3001, 128, 1000), (9, 100, 64, 64), (5, 300, 64, 40), (64, 65536, 128, 2048)):
        q, kv, idx = bf16_problem(t, n_kv, h_q, topk, t + n_kv, holes=True)
        want = F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)
        got = run_overlap(q, kv, idx)
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        ok &= same
        results.append(dict(t=t, n_kv=n_kv, h_q=h_q, topk=topk, rows="bf16", equal=same,
                            max_abs_diff_out=float((got[0].float() - want[0].float()).abs().max())))
        print(results[-1], flush=True)
    for t, n_rows, topk in ((37, 3001, 1000), (256, 65536, 2048)):
        q, views, idx = fp8_problem(t, n_rows, topk, t + n_rows, holes=True)
        want = F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
        got = run_overlap(q, views[0], idx, views[1], views[2])
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        ok &= same
        results.append(dict(t=t, n_rows=n_rows, topk=topk, rows="fp8_ds_mla", equal=same,
                            max_abs_diff_out=float((got[0].float() - want[0].float()).abs().max())))
        print(results[-1], flush=True)
    return ok


def _time(row, runs, tflop, ceil):
    for _ in range(2):  # twice, alternating, so that a drift of the clock shows
        for name, fn in runs:
            ms = bench_ms(fn)
            row[f"{name}_ms"] = min(row.get(f"{name}_ms", 1e9), round(ms, 4))
    for name, _ in runs:
        row[f"{name}_x_bf16"] = round(tflop / row[f"{name}_ms"] * 1e3 / ceil["bf16_matmul_tflops"], 4)


def speed(results, ceil):
    for name, t, n_kv, h_q in (("prefill 8K h128", 4096, 8192, 128), ("prefill 64K h128", 4096, 65536, 128),
                               ("prefill 8K h64", 4096, 8192, 64), ("prefill 64K h64", 4096, 65536, 64),
                               ("decode bf16 b128 s_q2 32K", 256, 128 * 32768, 128)):
        q, kv, idx = bf16_problem(t, n_kv, h_q, 2048, 0, causal=name.startswith("prefill"))
        row = dict(case=name)
        _time(row, [("product", lambda: F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)),
                    ("overlap", lambda: run_overlap(q, kv, idx))], 2 * t * h_q * 2048 * 1088 / 1e12, ceil)
        results.append(row)
        print(row, flush=True)
        del q, kv, idx
    q, views, idx = fp8_problem(256, 128 * 32768, 2048, 0)
    row = dict(case="decode fp8 b128 s_q2 32K")
    _time(row, [("product", lambda: F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)),
                ("overlap", lambda: run_overlap(q, views[0], idx, views[1], views[2]))],
          2 * 256 * 128 * 2048 * 1088 / 1e12, ceil)
    results.append(row)
    print(row, flush=True)


def build() -> None:
    """Registers and spills, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        q, kv, idx = bf16_problem(4, 1000, 128, 256, 0, device="cpu")
        q8, views, idx8 = fp8_problem(4, 1000, 256, 0, device="cpu")
        with capture_launches() as launches:
            run_overlap(q, kv, idx)
            run_overlap(q8, views[0], idx8, views[1], views[2])
    for rows, row in zip(("bf16", "fp8_ds_mla"), build_launches(launches, keep_going=True)):
        row.pop("loop", None)
        print(dict(rows=rows, **row), flush=True)


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
    print("checks equal:", ok, flush=True)
    ceil = measure_ceilings()
    results["ceilings"] = ceil
    results["speed"] = []
    speed(results["speed"], ceil)
    print_table(results["speed"], ["case"] + [k for k in results["speed"][0] if k.endswith("_ms")])
    print("wrote", write_result("probe_gluon_pv_overlap", results))


if __name__ == "__main__":
    main()
