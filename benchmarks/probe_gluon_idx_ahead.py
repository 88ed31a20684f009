"""Experiment (issue 15): the softmax warpgroup loads the next block's indices a block ahead.

The product's softmax warpgroup loads block j's indices (for its mask) from global memory
right before it waits for block j's stage, and then fences for the wgmma
(``fence_async_shared``, which ptxas turns into MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S: the
MEMBAR waits for every outstanding load of the thread, that index load included). In the
prefill the stage is almost always ready already, so each block the warpgroup waits an
L2 round trip at the fence. The source profile of 2026-12-04 18:12 UTC has about 11% of
the softmax warpgroup's samples in that stretch (the index load, the stage wait and the
fence), a quarter of them "long scoreboard". Here block j + 1's indices are loaded right
after block j's q . k is issued, in flight during it. The same masks, so the outputs
must equal the product's bit for bit.

    python -m benchmarks.probe_gluon_idx_ahead --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_idx_ahead           # H200: check, then time

Results: ``probe_gluon_idx_ahead.json`` under $OUT or benchmarks/results/.
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
    def _softmax_ahead(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                           h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                           q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                           BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The softmax warpgroup (the default partition, 4 warps): q into shared memory, then
        for each block: wait for its stage, s = q . k^T over the whole block (m64n64), the
        online softmax with each row in one warpgroup (row max and sum by shuffles), alpha
        into ``alpha_buf`` and p (bf16) over the stage's rope columns, which only this q . k
        reads; signal the value warpgroup (``p_ready``), acc += p @ v over d_v columns
        0-255, free the stage (one of its two arrivals). After the loop: 1 / l into
        ``l_buf`` for the value warpgroup (``done``), then this half of out, lse, max_logits."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_K, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 256, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        gl.static_assert(BLOCK_K == 64, "p [64, BLOCK_K] takes the place of a stage's [BLOCK_K, 64] rope columns")

        # q of this token's 64 heads: rows pid_h * 64 + [0, 64) of q[pid_t], copied as gathered rows are
        h_n, h_t = _row_range(pid_h * 64, 64, 4)
        _issue_rows(q_ptr + pid_t.to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, 4)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()  # q is read by wgmma (the async proxy)
        _barrier()

        m_i = gl.full([64], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([64], gl.float32, row_s)
        acc = gl.zeros([64, 256], gl.float32, o_layout)
        kk0 = gl.arange(0, BLOCK_K, layout=col_s)
        idx_next = gl.load(idx_row + kk0, mask=kk0 < topk, other=-1)
        for j in range(gl.cdiv(topk, BLOCK_K)):
            st = j % NUM_STAGES
            idx = idx_next
            mbarrier.wait(ready.index(st), (j // NUM_STAGES) & 1)
            fence_async_shared()  # the producer's copies, read next by wgmma
            kn = k_nope.index(st)
            kt = k_tail.index(st)
            s = warpgroup_mma(q_nope, kn.permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            s = warpgroup_mma(q_tail, kt.permute((1, 0)), s, is_async=True)
            # the next block's indices, in flight during this q . k (not before the fence above,
            # which waits for every load of the thread)
            kk = (j + 1) * BLOCK_K + kk0
            idx_next = gl.load(idx_row + kk, mask=kk < topk, other=-1)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            valid = (idx >= 0) & (idx < n_kv)
            s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while all masked
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            alpha_buf.index(st).store(alpha)
            kt.store(p.to(gl.bfloat16))  # over the rope columns: the A operand of both p @ v
            fence_async_shared()
            _barrier()  # the warpgroup's p and alpha are in place
            mbarrier.arrive(p_ready.index(st), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(kt, kn.slice(0, 256, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(st), count=1)

        has = l_i > 0.0
        inv = 1.0 / gl.where(has, l_i, 1.0)  # rows with no valid index: acc is 0
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
    def ahead_kernel(
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
            (_softmax_ahead, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                              h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                              q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                              BLOCK_K, NUM_STAGES)),
            (_value_partition, (out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                                alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_producer_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                   k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, FP8)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_variant(q, kv, idx, scales=None, rope=None):
    cfg = F.SM90_GLUON
    fp8 = scales is not None
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    ahead_kernel[(h_q // F.BLOCK_H * t_q, )](
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
        got = run_variant(q, kv, idx)
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        ok &= same
        results.append(dict(t=t, n_kv=n_kv, h_q=h_q, topk=topk, rows="bf16", equal=same,
                            max_abs_diff_out=float((got[0].float() - want[0].float()).abs().max())))
        print(results[-1], flush=True)
    for t, n_rows, topk in ((37, 3001, 1000), (256, 65536, 2048)):
        q, views, idx = fp8_problem(t, n_rows, topk, t + n_rows, holes=True)
        want = F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
        got = run_variant(q, views[0], idx, views[1], views[2])
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        ok &= same
        results.append(dict(t=t, n_rows=n_rows, topk=topk, rows="fp8_ds_mla", equal=same,
                            max_abs_diff_out=float((got[0].float() - want[0].float()).abs().max())))
        print(results[-1], flush=True)
    return ok


def _time(row, runs, tflop, ceil):
    for _ in range(3):  # alternating, so that a drift of the clock shows
        for name, fn in runs:
            ms = bench_ms(fn)
            row[f"{name}_ms"] = min(row.get(f"{name}_ms", 1e9), round(ms, 4))
            row.setdefault(f"{name}_runs", []).append(round(ms, 4))
    for name, _ in runs:
        row[f"{name}_x_bf16"] = round(tflop / row[f"{name}_ms"] * 1e3 / ceil["bf16_matmul_tflops"], 4)


def speed(results, ceil):
    for name, t, n_kv, h_q in (("prefill 8K h128", 4096, 8192, 128), ("prefill 64K h128", 4096, 65536, 128),
                               ("prefill 8K h64", 4096, 8192, 64), ("prefill 64K h64", 4096, 65536, 64),
                               ("decode bf16 b128 s_q2 32K", 256, 128 * 32768, 128)):
        q, kv, idx = bf16_problem(t, n_kv, h_q, 2048, 0, causal=name.startswith("prefill"))
        row = dict(case=name)
        _time(row, [("product", lambda: F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)),
                    ("ahead", lambda: run_variant(q, kv, idx))], 2 * t * h_q * 2048 * 1088 / 1e12, ceil)
        results.append(row)
        print(row, flush=True)
        del q, kv, idx
    q, views, idx = fp8_problem(256, 128 * 32768, 2048, 0)
    row = dict(case="decode fp8 b128 s_q2 32K")
    _time(row, [("product", lambda: F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)),
                ("ahead", lambda: run_variant(q, views[0], idx, views[1], views[2]))],
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
            run_variant(q, kv, idx)
            run_variant(q8, views[0], idx8, views[1], views[2])
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
    print("wrote", write_result("probe_gluon_idx_ahead", results))


if __name__ == "__main__":
    main()
