"""Experiment (issue 15): over fp8_ds_mla rows, the value warpgroup converts half of each
block while it would otherwise wait.

In the product (flashdsa/ops/sparse_mla/fwd_sm90.py) the producer alone converts all 512
e4m3 columns of a block, and it sets the pace of the fp8 decode (0.454 ms at batch 128,
s_q 2, 32K, against 0.326 over the same rows in bf16; the profile of 2026-12-04 16:48 has
the tensor pipe 36% busy). The value warpgroup runs one m64n256 product a block and waits
for the next p the rest of the time.

Here the conversion is split: the producer converts columns 0-255 (into the stage's lower
half, as before) and signals when it has read its bytes; the value warpgroup converts
columns 256-511 of block j + 2 right after its p @ v of block j (block j + 2 goes to the
stage block j frees): 256-383 over the producer's bytes once they are read, 384-511 over
its own bytes after reading them all into registers. The stage is ready after both
(two arrivals). Blocks 0 and 1 are converted before the loop. Registers: 232 for the
softmax warpgroup, 176 for the value warpgroup, 96 for the producer (the 504 of 12 warps
at 168). Same conversion as the product, so the outputs must equal its bit for bit.

    python -m benchmarks.probe_fp8_value_dequant --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_fp8_value_dequant           # H200: check, then time

Results: ``probe_fp8_value_dequant.json`` under $OUT or benchmarks/results/.
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
# variant -> (value warpgroup registers, producer registers); the softmax warpgroup gets the rest of 504
VARIANTS = {"value_dequant": (176, 96), "value_dequant_r168": (168, 96)}

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from flashdsa.ops.sparse_mla.fwd_sm90 import (_allocate, _async_load, _barrier, _dequant_tile, _fp8_staging,
                                                  _softmax_partition)

    @gluon.jit
    def _half_producer(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                       k_nope, k_tail, ready, empty, bytes_ready, lo_read,
                       BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's fp8 producer, converting columns 0-255 only: after its copies land
        it signals ``bytes_ready``, converts, then signals ``lo_read`` and ``ready``."""
        cp_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, cp_l))
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        lanes = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, cp_l))
        n_blocks = gl.cdiv(topk, BLOCK_K)
        idx = gl.load(idx_row + lanes, mask=lanes < topk, other=-1)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            valid = (idx >= 0) & (idx < n_kv)
            row = gl.where(valid, idx, 0).to(gl.int64)
            idx_d = gl.convert_layout(idx, gl.SliceLayout(1, deq_l))
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
            mbarrier.arrive(bytes_ready.index(st), count=1)
            _dequant_tile(lo.slice(0, 128, dim=1).load(deq_l), dst, 0, s0)
            _dequant_tile(lo.slice(128, 128, dim=1).load(deq_l), dst, 128, s1)
            fence_async_shared()
            _barrier()  # the first byte tile is read, columns 0-255 stored
            mbarrier.arrive(lo_read.index(st), count=1)
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def _convert_upper(c, sc_ptr, idx_row, n_kv, topk, stride_sc, k_nope, bytes_ready, lo_read, ready,
                       BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Columns 256-511 of block c into its stage: 256-383 over the producer's bytes once
        it has read them, 384-511 over this block's own bytes after all are in registers."""
        sub_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])  # [64, 32] bytes, 16 a thread
        st = c % NUM_STAGES
        kd = c * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, sub_l))
        idx_d = gl.load(idx_row + kd, mask=kd < topk, other=-1)
        valid_d = (idx_d >= 0) & (idx_d < n_kv)
        sc = sc_ptr + gl.where(valid_d, idx_d, 0).to(gl.int64) * stride_sc
        s2 = gl.load(sc + 2, mask=valid_d, other=0.0)
        s3 = gl.load(sc + 3, mask=valid_d, other=0.0)
        dst = k_nope.index(st)
        _, hi = _fp8_staging(dst)
        mbarrier.wait(bytes_ready.index(st), (c // NUM_STAGES) & 1)
        mbarrier.wait(lo_read.index(st), (c // NUM_STAGES) & 1)
        for p in gl.static_range(4):
            x = hi.slice(p * 32, 32, dim=1).load(sub_l)
            v = x.to(gl.float8e4nv, bitcast=True).to(gl.float32) * s2[:, None]
            dst.slice(256 + p * 32, 32, dim=1).store(v.to(gl.bfloat16))
        x0 = hi.slice(128, 32, dim=1).load(sub_l)
        x1 = hi.slice(160, 32, dim=1).load(sub_l)
        x2 = hi.slice(192, 32, dim=1).load(sub_l)
        x3 = hi.slice(224, 32, dim=1).load(sub_l)
        _barrier()  # every thread has its bytes of columns 384-511: their region may be overwritten
        dst.slice(384, 32, dim=1).store((x0.to(gl.float8e4nv, bitcast=True).to(gl.float32) * s3[:, None])
                                        .to(gl.bfloat16))
        dst.slice(416, 32, dim=1).store((x1.to(gl.float8e4nv, bitcast=True).to(gl.float32) * s3[:, None])
                                        .to(gl.bfloat16))
        dst.slice(448, 32, dim=1).store((x2.to(gl.float8e4nv, bitcast=True).to(gl.float32) * s3[:, None])
                                        .to(gl.bfloat16))
        dst.slice(480, 32, dim=1).store((x3.to(gl.float8e4nv, bitcast=True).to(gl.float32) * s3[:, None])
                                        .to(gl.bfloat16))
        fence_async_shared()
        _barrier()
        mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def _value_converting(out_ptr, sc_ptr, idx_row, n_kv, topk, stride_sc, pid_t, pid_h, stride_ot, stride_oh,
                          k_nope, k_tail, empty, p_ready, alpha_buf, l_buf, done, bytes_ready, lo_read, ready,
                          BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's value warpgroup, converting the upper columns of block j + 2 after its
        p @ v of block j (of blocks 0 and 1 before the loop)."""
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 256, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        n_blocks = gl.cdiv(topk, BLOCK_K)
        for c in range(gl.minimum(n_blocks, NUM_STAGES)):
            _convert_upper(c, sc_ptr, idx_row, n_kv, topk, stride_sc, k_nope, bytes_ready, lo_read, ready,
                           BLOCK_K, NUM_STAGES)
        acc = gl.zeros([64, 256], gl.float32, o_layout)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            mbarrier.wait(p_ready.index(st), (j // NUM_STAGES) & 1)
            fence_async_shared()
            acc = acc * alpha_buf.index(st).load(row_o)[:, None]
            acc = warpgroup_mma(k_tail.index(st), k_nope.index(st).slice(256, 256, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(st), count=1)
            if j + NUM_STAGES < n_blocks:
                _convert_upper(j + NUM_STAGES, sc_ptr, idx_row, n_kv, topk, stride_sc, k_nope, bytes_ready,
                               lo_read, ready, BLOCK_K, NUM_STAGES)
        mbarrier.wait(done.index(0), 0)
        out = (acc * l_buf.load(row_o)[:, None]).to(gl.bfloat16)
        heads_o = pid_h * 64 + gl.arange(0, 64, row_o)
        o_ptrs = (out_ptr + pid_t.to(gl.int64) * stride_ot + heads_o[:, None] * stride_oh
                  + (256 + gl.arange(0, 256, col_o))[None, :])
        gl.store(o_ptrs, out)

    @gluon.jit
    def value_dequant_kernel(
        q_ptr, c8_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_c8, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, VALUE_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        # ready: two arrivals a block (the producer's half, the value warpgroup's half)
        q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done = _allocate(
            BLOCK_K, NUM_STAGES, 2)
        bytes_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        lo_read = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(bytes_ready.index(i), count=1)
            mbarrier.init(lo_read.index(i), count=1)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_softmax_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                  h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                  q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                                  BLOCK_K, NUM_STAGES)),
            (_value_converting, (out_ptr, sc_ptr, idx_row, n_kv, topk, stride_sc, pid_t, pid_h, stride_ot,
                                 stride_oh, k_nope, k_tail, empty, p_ready, alpha_buf, l_buf, done, bytes_ready,
                                 lo_read, ready, BLOCK_K, NUM_STAGES)),
            (_half_producer, (c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                              k_nope, k_tail, ready, empty, bytes_ready, lo_read, BLOCK_K, NUM_STAGES)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_variant(variant, q, c8, scales, rope, idx):
    """(out, max_logits, lse) of one launch of ``value_dequant_kernel`` and the compiled kernel."""
    value_regs, producer_regs = VARIANTS[variant]
    cfg = F.SM90_GLUON
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    k = value_dequant_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, c8, scales, rope, idx, out, ml, lse, c8.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E,
        q.stride(0), q.stride(1), c8.stride(0), scales.stride(0), rope.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], VALUE_REGS=value_regs, PRODUCER_REGS=producer_regs,
        num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return (out, ml, lse), k


def problem(t, n_rows, topk, seed, device="cuda", holes=False):
    """q [t, 128, 576], an fp8_ds_mla cache of n_rows random rows as (c8, scales, rope)
    views, and idx [t, topk] (with ``holes``: -1, out-of-range and negative entries, an
    empty row and a half-valid row)."""
    from flashdsa.api import quantize_mla_cache
    from flashdsa.layout import MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views

    g = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randn(n_rows, 576, device=device, dtype=torch.bfloat16, generator=g)
    c8, sc, pe = mla_byte_views(quantize_mla_cache(rows.view(n_rows, 1, 1, 576)).view(n_rows, -1))
    q = torch.randn(t, H_Q, 576, device=device, dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, n_rows, (t, topk), device=device, generator=g, dtype=torch.int32)
    if holes:
        m = torch.rand(t, topk, device=device, generator=g)
        idx[m < 0.1] = -1
        idx[(m >= 0.1) & (m < 0.13)] = n_rows + 5
        idx[(m >= 0.13) & (m < 0.15)] = -7
        idx[0] = -1
        idx[1, topk // 2:] = -1
    return q, (c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]), idx


def check(results) -> bool:
    """Outputs equal to the product's bit for bit (the same conversion and consumers), on
    indices with every kind of invalid slot, topk not a multiple of the block, one block."""
    ok = True
    for t, n_rows, topk, holes in ((37, 3001, 1000, True), (9, 100, 64, False), (5, 300, 100, True),
                                   (256, 65536, 2048, True)):
        q, views, idx = problem(t, n_rows, topk, t + n_rows, holes=holes)
        want = F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
        for v in VARIANTS:
            got, _ = run_variant(v, q, *views, idx)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            row = dict(t=t, n_rows=n_rows, topk=topk, holes=holes, variant=v, equal=same,
                       max_abs_diff_out=float((got[0].float() - want[0].float()).abs().max()))
            ok &= same
            results.append(row)
            print(row, flush=True)
    return ok


def speed(results, ceil):
    for t in (256, 128, 4096):
        q, views, idx = problem(t, 128 * 32768 if t < 4096 else 65536, 2048, 0)
        tflop = 2 * t * H_Q * 2048 * 1088 / 1e12
        row = dict(tokens=t)
        runs = [("product", lambda: F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE))]
        runs += [(v, lambda v=v: run_variant(v, q, *views, idx)) for v in VARIANTS]
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
        q, views, idx = problem(4, 1000, 256, 0, device="cpu")
        with capture_launches() as launches:
            for v in VARIANTS:
                run_variant(v, q, *views, idx)
    for v, row in zip(VARIANTS, build_launches(launches, keep_going=True)):
        row.pop("loop", None)
        print(dict(variant=v, **row), flush=True)


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
    print_table(results["speed"], ["tokens"] + [k for k in results["speed"][0] if k.endswith("_ms")])
    print("wrote", write_result("probe_fp8_value_dequant", results))


if __name__ == "__main__":
    main()
