"""Experiment (issue 15): the fp8_ds_mla dequantization split between producer and consumers.

Over fp8_ds_mla rows the Hopper forward (flashdsa/ops/sparse_mla/fwd_sm90.py) is bound by
its producer: at batch 128, s_q 2, 32K it takes 0.46 ms where the same rows in bf16 take
0.35, and its 4 producer warps convert all 512 columns of every block while the 8
consumer warps wait. Here the producer converts columns 0-255 only (into the stage's lower
half, as the product does) and hands the stage over; the consumers convert columns
256-511 from the staged bytes themselves before q . k (columns 256-383 over the first byte
tile, which nobody reads any more; columns 384-511, read into registers first, over the
second, behind a barrier of the consumers). The producer's conversion halves; the
consumers, twice as many threads, take a quarter of the old conversion time each block.

The conversion is the product's (`_dequant_tile`, the same scales), so the outputs must
equal the product's bit for bit; the probe checks that on adversarial indices (-1,
out-of-range and negative slots, an empty row, a half-valid row), then times batch 128 x
s_q 2 and 1 over a 32K context and 4096 queries, beside the product and the bf16 rows'
kernel on the same rows dequantized (the bound), with the bf16 matmul ceiling of the same
run.

Built for sm_90 (``--build``), 168 registers at launch: with 88 producer registers no
spills on Triton 3.6 or 3.9; 96 spills 24 bytes on 3.6 (the consumers get 204), 80
spills 32 bytes on 3.9.

    python -m benchmarks.probe_fp8_split_dequant --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_fp8_split_dequant           # H200: check, then time

Results: ``probe_fp8_split_dequant.json`` under $OUT or benchmarks/results/.
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
H_Q = 128

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                         warpgroup_mma_wait)

    from flashdsa.ops.sparse_mla.fwd_sm90 import (LN2_C, _allocate, _async_load, _barrier, _dequant_tile,
                                                  _fp8_staging, _issue_rows, _pair_sum, _row_max, _row_range)

    @gluon.jit
    def _half_producer(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                       k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's fp8 producer, converting only columns 0-255 (into the lower half)."""
        cp_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, cp_l))
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        lanes = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, cp_l))
        lanes_d = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, deq_l))
        n_blocks = gl.cdiv(topk, BLOCK_K)
        idx = gl.load(idx_row + lanes, mask=lanes < topk, other=-1)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            valid = (idx >= 0) & (idx < n_kv)
            row = gl.where(valid, idx, 0).to(gl.int64)
            kd = j * BLOCK_K + lanes_d
            idx_d = gl.load(idx_row + kd, mask=kd < topk, other=-1)
            valid_d = (idx_d >= 0) & (idx_d < n_kv)
            sc = sc_ptr + gl.where(valid_d, idx_d, 0).to(gl.int64) * stride_sc
            s0 = gl.load(sc, mask=valid_d, other=0.0)
            s1 = gl.load(sc + 1, mask=valid_d, other=0.0)
            idx_t = gl.convert_layout(idx_d, gl.SliceLayout(1, tail_l))
            valid_t = (idx_t >= 0) & (idx_t < n_kv)
            row_t = gl.where(valid_t, idx_t, 0).to(gl.int64)
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            dst = k_nope.index(st)
            lo, hi = _fp8_staging(dst)
            src = c8_ptr + gl.multiple_of(row * stride_c8, 16)[:, None] + cols[None, :]
            for c in gl.static_range(2):
                _async_load(lo.slice(c * 128, 128, dim=1), src + c * 128, mask=valid[:, None])
                _async_load(hi.slice(c * 128, 128, dim=1), src + (256 + c * 128), mask=valid[:, None])
            _async_load(k_tail.index(st), pe_ptr + gl.multiple_of(row_t * stride_pe, 8)[:, None] + cols_t[None, :],
                        mask=valid_t[:, None])
            async_copy.commit_group()
            kn = (j + 1) * BLOCK_K + lanes
            idx = gl.load(idx_row + kn, mask=kn < topk, other=-1)
            async_copy.wait_group(0)
            _barrier()  # every thread's copies have landed
            _dequant_tile(lo.slice(0, 128, dim=1).load(deq_l), dst, 0, s0)
            _dequant_tile(lo.slice(128, 128, dim=1).load(deq_l), dst, 128, s1)
            fence_async_shared()
            _barrier()
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def _converting_consumers(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                              h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, sc_ptr, stride_sc,
                              q_nope, q_tail, k_nope, k_tail, ready, empty, m_buf,
                              BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
        """The product's consumers, converting columns 256-511 of each stage before q . k."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_K // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, 256, 16])
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 2], [1, 0])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        lanes_d = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, deq_l))

        h_n, h_t = _row_range(pid_h * 64, 64, num_warps)
        _issue_rows(q_ptr + pid_t.to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, num_warps)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        _barrier()

        m_i = gl.full([64], float("-inf"), gl.float32, row_s)
        l_part = _pair_sum(gl.zeros([64, BLOCK_K], gl.float32, s_layout))
        row_l: gl.constexpr = gl.SliceLayout(1, l_part.type.layout)
        acc = gl.zeros([64, 512], gl.float32, o_layout)
        n_blocks = gl.cdiv(topk, BLOCK_K)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=col_s)
            idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
            kd = j * BLOCK_K + lanes_d
            idx_d = gl.load(idx_row + kd, mask=kd < topk, other=-1)
            valid_d = (idx_d >= 0) & (idx_d < n_kv)
            sc = sc_ptr + gl.where(valid_d, idx_d, 0).to(gl.int64) * stride_sc
            s2 = gl.load(sc + 2, mask=valid_d, other=0.0)
            s3 = gl.load(sc + 3, mask=valid_d, other=0.0)
            mbarrier.wait(ready.index(st), (j // NUM_STAGES) & 1)
            kn = k_nope.index(st)
            kt = k_tail.index(st)
            lo, hi = _fp8_staging(kn)
            last = hi.slice(128, 128, dim=1).load(deq_l)
            _dequant_tile(hi.slice(0, 128, dim=1).load(deq_l), kn, 256, s2)  # over the first byte tile
            _barrier()  # the second byte tile is read: columns 384-511 may overwrite it
            _dequant_tile(last, kn, 384, s3)
            fence_async_shared()
            _barrier()
            s = warpgroup_mma(q_nope, kn.permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            s = warpgroup_mma(q_tail, kt.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            valid = (idx >= 0) & (idx < n_kv)
            s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, _row_max(s, m_buf))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_part = l_part * gl.convert_layout(alpha, row_l)[:, None] + _pair_sum(p)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            kt.store(p.to(gl.bfloat16))
            fence_async_shared()
            _barrier()
            acc = warpgroup_mma(kt, kn, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(st), count=1)

        l_i = gl.convert_layout(gl.sum(l_part, 1), row_s)
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
    def split_dequant_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        """The product's fp8_ds_mla program with the conversion split."""
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty, m_buf = _allocate(BLOCK_K, NUM_STAGES, 1)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_converting_consumers, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                     h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, sc_ptr, stride_sc,
                                     q_nope, q_tail, k_nope, k_tail, ready, empty, m_buf, BLOCK_K, NUM_STAGES,
                                     num_warps)),
            (_half_producer, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                              k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES)),
        ], [4], [PRODUCER_REGS])


def split_fp8(q, c8, scales, rope, idx, regs):
    """As ``F.run_sparse_mla_decode_sm90_fp8`` with the split conversion; also the compiled kernel."""
    cfg = F.SM90_GLUON_FP8
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    k = split_dequant_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, c8, scales, rope, idx, out, ml, lse, c8.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E,
        q.stride(0), q.stride(1), c8.stride(0), scales.stride(0), rope.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=regs, maxnreg=cfg["maxnreg"])
    return (out, ml, lse), k


# producer registers: the product's 88, and either side of it
REGS = (96, 88, 80)


def problem(t, n_rows, topk, seed, device="cuda", holes=False):
    """q [t, 128, 576], an fp8_ds_mla cache of n_rows random rows as (c8, scales, rope)
    views, its bf16 dequantization, and idx [t, topk] (with ``holes``: -1, out-of-range
    and negative entries, an empty row and a half-valid row)."""
    from flashdsa.api import quantize_mla_cache
    from flashdsa.layout import MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views
    from flashdsa.reference.mla_cache import dequantize_mla_cache

    g = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randn(n_rows, 576, device=device, dtype=torch.bfloat16, generator=g)
    rows8 = quantize_mla_cache(rows.view(n_rows, 1, 1, 576)).view(n_rows, -1)
    c8, sc, pe = mla_byte_views(rows8)
    q = torch.randn(t, H_Q, 576, device=device, dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, n_rows, (t, topk), device=device, generator=g, dtype=torch.int32)
    if holes:
        m = torch.rand(t, topk, device=device, generator=g)
        idx[m < 0.1] = -1
        idx[(m >= 0.1) & (m < 0.13)] = n_rows + 5
        idx[(m >= 0.13) & (m < 0.15)] = -7
        idx[0] = -1
        idx[1, topk // 2:] = -1
    return q, (c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]), dequantize_mla_cache(rows8).view(n_rows, 576), idx


def check(results) -> bool:
    ok = True
    for t, n_rows, topk, holes in ((37, 3001, 1000, True), (9, 100, 64, False), (256, 65536, 2048, True)):
        q, views, _, idx = problem(t, n_rows, topk, t + n_rows, holes=holes)
        want = F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
        for regs in REGS:
            got, _ = split_fp8(q, *views, idx, regs)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            row = dict(t=t, n_rows=n_rows, topk=topk, holes=holes, regs=regs, equal=same,
                       max_abs_diff_out=float((got[0].float() - want[0].float()).abs().max()))
            ok &= same
            results.append(row)
            print(row, flush=True)
    return ok


def speed(results, ceil):
    for t in (256, 128, 4096):
        q, views, deq, idx = problem(t, 128 * 32768 if t < 4096 else 65536, 2048, 0)
        tflop = 2 * t * H_Q * 2048 * 1088 / 1e12
        row = dict(tokens=t)
        runs = [("product", lambda: F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)),
                ("bf16_rows", lambda: F.run_sparse_mla_fwd_sm90(q, deq, idx, SM_SCALE))]
        for regs in REGS:
            _, k = split_fp8(q, *views, idx, regs)
            row[f"split_r{regs}_spills"] = k.n_spills
            runs.append((f"split_r{regs}", lambda regs=regs: split_fp8(q, *views, idx, regs)))
        for name, fn in runs:
            ms = bench_ms(fn)
            row[f"{name}_ms"] = round(ms, 4)
            row[f"{name}_x_bf16"] = round(tflop / ms * 1e3 / ceil["bf16_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers and spills, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        q, views, _, idx = problem(4, 1000, 256, 0, device="cpu")
        with capture_launches() as launches:
            for regs in REGS:
                split_fp8(q, *views, idx, regs)
    for regs, row in zip(REGS, build_launches(launches, keep_going=True)):
        row.pop("loop", None)
        print(dict(producer_regs=regs, **row), flush=True)


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
    speed(results["speed"], ceil)   # timed even when unequal, to know what a fix is worth
    print_table(results["speed"], [c for c in results["speed"][0] if c.endswith("_ms") or c == "tokens"])
    print("checks equal:", ok)
    print("wrote", write_result("probe_fp8_split_dequant", results))


if __name__ == "__main__":
    main()
