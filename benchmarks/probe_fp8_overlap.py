"""Experiment (issue 15): the fp8_ds_mla producer, its copies overlapped with its
conversion, and its conversion without the conversion instructions.

The product's dequantizing producer (flashdsa/ops/sparse_mla/fwd_sm90.py) sets the pace of
the fp8 decode. First version of this probe (commit 63f0897, 2026-12-04 18:00 UTC,
``benchmarks/results/issue15/probe_fp8_overlap_1800.json``): ``split`` (the copies in
two groups, columns 0-255 converted while 256-511 land: 0.447 against 0.452 ms, now in
the product) and ``bf16`` (e4m3 -> bf16 and the scale in bf16 through Triton's
conversions: 0.587 ms, slower: its F2F conversions replace fp32 multiplies).

This version: the product's conversion goes e4m3x2 -> f16x2 -> fp32 (F2FP, HADD2),
multiplies by the scale in fp32 and packs to bf16 (F2FP), two conversion instructions a
pair of values. The variants build the bf16 bits with integer operations instead
(byte permute, shift, masks: the e4m3 sign, exponent and mantissa placed in a bf16
that holds 2^-120 x the value, normal or subnormal) and scale by bf16 multiplies, which
are exact because fp8_ds_mla's scales are powers of two (flashdsa.layout):

- ``asm1``: one multiply by 2^120 x scale (exact while the scale is at most 2^7);
- ``asm2``: a multiply by 2^120, then by the scale (exact for every scale).

The outputs must equal the product's bit for bit.

    python -m benchmarks.probe_fp8_overlap --build   # CPU: registers, spills, SASS size for sm_90
    python -m benchmarks.probe_fp8_overlap           # H200: check, then time

Results: ``probe_fp8_overlap.json`` under $OUT or benchmarks/results/.
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
# variant -> (SPLIT, CVT: see _convert)
VARIANTS = {"asm1": (True, 1), "asm2": (True, 2)}

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    from flashdsa.ops.sparse_mla.fwd_sm90 import (_allocate, _async_load, _barrier, _fp8_staging,
                                                  _softmax_partition, _value_partition)

    # e4m3 bytes -> bf16 by integer operations: each byte's sign to bit 15 of a 16-bit half,
    # its 7 other bits to bits 4-10 (exponent field e, mantissa m), which read as a bf16
    # hold 2^-120 x the e4m3 value (normal or subnormal alike; the bf16 multiply keeps
    # subnormals); then multiplied by 2^120 x the tile's power-of-two scale
    _E4M3_HALVES = gl.constexpr(
        "{ .reg .b32 w, v, t;\n"
        "prmt.b32 w, $2, 0, 0x1404; shr.b32 v, w, 4; and.b32 v, v, 0x07f007f0; and.b32 t, w, 0x80008000;\n"
        "or.b32 v, v, t; mul.rn.bf16x2 $0, v, $3;\n"
        "prmt.b32 w, $2, 0, 0x3424; shr.b32 v, w, 4; and.b32 v, v, 0x07f007f0; and.b32 t, w, 0x80008000;\n"
        "or.b32 v, v, t; mul.rn.bf16x2 $1, v, $4; }")
    _E4M3_HALVES2 = gl.constexpr(
        "{ .reg .b32 w, v, t;\n"
        "prmt.b32 w, $2, 0, 0x1404; shr.b32 v, w, 4; and.b32 v, v, 0x07f007f0; and.b32 t, w, 0x80008000;\n"
        "or.b32 v, v, t; mov.b32 t, 0x7B807B80; mul.rn.bf16x2 v, v, t; mul.rn.bf16x2 $0, v, $3;\n"
        "prmt.b32 w, $2, 0, 0x3424; shr.b32 v, w, 4; and.b32 v, v, 0x07f007f0; and.b32 t, w, 0x80008000;\n"
        "or.b32 v, v, t; mov.b32 t, 0x7B807B80; mul.rn.bf16x2 v, v, t; mul.rn.bf16x2 $1, v, $4; }")

    @gluon.jit
    def _convert(x, dst, c0: gl.constexpr, scale, CVT: gl.constexpr):
        """e4m3 bytes ``x`` [64, 128] times the rows' ``scale``, as bf16 into columns c0 +
        [0, 128): through fp32 (CVT 0, the product), or by integer operations and one bf16
        multiply by 2^120 x scale (CVT 1: exact for scales up to 2^7) or two (CVT 2)."""
        if CVT == 0:
            v = (x.to(gl.float8e4nv, bitcast=True).to(gl.float32) * scale[:, None]).to(gl.bfloat16)
        elif CVT == 1:
            c = (scale * 1.329227995784916e36).to(gl.bfloat16)[:, None].broadcast_to(x.shape)
            v = gl.inline_asm_elementwise(_E4M3_HALVES, "=r,=r,r,r,r", [x, c], gl.bfloat16, True, 4)
        else:
            c = scale.to(gl.bfloat16)[:, None].broadcast_to(x.shape)
            v = gl.inline_asm_elementwise(_E4M3_HALVES2, "=r,=r,r,r,r", [x, c], gl.bfloat16, True, 4)
        dst.slice(c0, 128, dim=1).store(v)

    @gluon.jit
    def _producer(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                  k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
                  SPLIT: gl.constexpr, CVT: gl.constexpr):
        """The product's fp8 producer with the copies of columns 256-511 in a second group
        (SPLIT) and the conversion CVT (:func:`_convert`)."""
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
            s2 = gl.load(sc + 2, mask=valid_d, other=0.0)
            s3 = gl.load(sc + 3, mask=valid_d, other=0.0)
            idx_t = gl.convert_layout(idx_d, gl.SliceLayout(1, tail_l))
            valid_t = (idx_t >= 0) & (idx_t < n_kv)
            row_t = gl.where(valid_t, idx_t, 0).to(gl.int64)
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            dst = k_nope.index(st)
            lo, hi = _fp8_staging(dst)
            src = c8_ptr + gl.multiple_of(row * stride_c8, 16)[:, None] + cols[None, :]
            for c in gl.static_range(2):
                _async_load(lo.slice(c * 128, 128, dim=1), src + c * 128, mask=valid[:, None])
            _async_load(k_tail.index(st), pe_ptr + gl.multiple_of(row_t * stride_pe, 8)[:, None] + cols_t[None, :],
                        mask=valid_t[:, None])
            if SPLIT:
                async_copy.commit_group()
            for c in gl.static_range(2):
                _async_load(hi.slice(c * 128, 128, dim=1), src + (256 + c * 128), mask=valid[:, None])
            async_copy.commit_group()
            kn = (j + 1) * BLOCK_K + lanes
            idx = gl.load(idx_row + kn, mask=kn < topk, other=-1)
            if SPLIT:
                async_copy.wait_group(1)
                _barrier()  # every thread's bytes of columns 0-255 have landed
                _convert(lo.slice(0, 128, dim=1).load(deq_l), dst, 0, s0, CVT)
                _convert(lo.slice(128, 128, dim=1).load(deq_l), dst, 128, s1, CVT)
                async_copy.wait_group(0)
                _barrier()  # columns 256-511 have landed and the first byte tile is read
            else:
                async_copy.wait_group(0)
                _barrier()
                _convert(lo.slice(0, 128, dim=1).load(deq_l), dst, 0, s0, CVT)
                _convert(lo.slice(128, 128, dim=1).load(deq_l), dst, 128, s1, CVT)
                _barrier()
            _convert(hi.slice(0, 128, dim=1).load(deq_l), dst, 256, s2, CVT)
            last = hi.slice(128, 128, dim=1).load(deq_l)
            _barrier()
            _convert(last, dst, 384, s3, CVT)
            fence_async_shared()
            _barrier()
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def overlap_kernel(
        q_ptr, c8_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_c8, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, VALUE_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        SPLIT: gl.constexpr, CVT: gl.constexpr, num_warps: gl.constexpr,
    ):
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done = _allocate(
            BLOCK_K, NUM_STAGES, 1)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_softmax_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                  h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                  q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                                  BLOCK_K, NUM_STAGES)),
            (_value_partition, (out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                                alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_producer, (c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                         k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, SPLIT, CVT)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_variant(variant, q, c8, scales, rope, idx):
    """(out, max_logits, lse) of one launch of ``overlap_kernel``."""
    split, cvt = VARIANTS[variant]
    cfg = F.SM90_GLUON
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    overlap_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, c8, scales, rope, idx, out, ml, lse, c8.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E,
        q.stride(0), q.stride(1), c8.stride(0), scales.stride(0), rope.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], VALUE_REGS=cfg["VALUE_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], SPLIT=split, CVT=cvt, num_warps=cfg["num_warps"],
        maxnreg=cfg["maxnreg"])
    return out, ml, lse


def problem(t, n_rows, topk, seed, device="cuda", holes=False):
    """q [t, 128, 576], an fp8_ds_mla cache of n_rows random rows as (c8, scales, rope)
    views, and idx [t, topk] (with ``holes``: -1, out-of-range and negative entries, an
    empty row and a half-valid row)."""
    from flashdsa.api import quantize_mla_cache
    from flashdsa.layout import MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views

    g = torch.Generator(device=device).manual_seed(seed)
    # rows over several decades, so that some tiles get small scales and subnormal e4m3 values
    rows = torch.randn(n_rows, 576, device=device, dtype=torch.bfloat16, generator=g)
    rows = rows * torch.exp2(torch.randint(-12, 4, (n_rows, 1), device=device, generator=g)).to(rows.dtype)
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
    """Outputs equal to the product's bit for bit, on indices with every kind of invalid
    slot, topk not a multiple of the block, one block."""
    ok = True
    for t, n_rows, topk, holes in ((37, 3001, 1000, True), (9, 100, 64, False), (5, 300, 100, True),
                                   (256, 65536, 2048, True)):
        q, views, idx = problem(t, n_rows, topk, t + n_rows, holes=holes)
        want = F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
        for v in VARIANTS:
            got = run_variant(v, q, *views, idx)
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
        for _ in range(2):  # twice, alternating, so that a drift of the clock shows
            for name, fn in runs:
                ms = bench_ms(fn)
                row[f"{name}_ms"] = min(row.get(f"{name}_ms", 1e9), round(ms, 4))
        for name, _ in runs:
            row[f"{name}_x_bf16"] = round(tflop / row[f"{name}_ms"] * 1e3 / ceil["bf16_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers, spills and SASS size, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        q, views, idx = problem(4, 1000, 256, 0, device="cpu")
        with capture_launches() as launches:
            for v in VARIANTS:
                run_variant(v, q, *views, idx)
            F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
    for v, row in zip(list(VARIANTS) + ["product"], build_launches(launches, keep_going=True)):
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
    print("wrote", write_result("probe_fp8_overlap", results))


if __name__ == "__main__":
    main()
