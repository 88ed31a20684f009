"""Experiment (issue 15): the fp8_ds_mla producer of the Hopper forward as one flat pipeline of pieces.

The product's dequantizing producer (flashdsa/ops/sparse_mla/fwd_sm90.py,
``_fp8_gather_partition``) keeps the next 128-column piece of a block in flight while it
converts one, but each block starts with dependent round trips to memory: the block's
indices, then its first piece (issued only after the previous block's last store), and
each piece's scale is loaded just before the piece is scaled. Nsight Compute has the fp8
rows' kernel at 3.58 long-scoreboard stalls an instruction (2.53 over bf16 rows), and
the fp8 rows take 0.532 ms against 0.387 over bf16 rows at batch 128, s_q 2, 32K.

Here the producer runs the pieces of all its blocks as one sequence, DEPTH pieces ahead
across block boundaries: a block's indices are loaded a block ahead, its four scales with
them, and the next block's first pieces are issued while this block's last ones convert.
The consumers are the product's (``_attend_partition``), the shared memory and barriers
the product's, so the outputs must equal the product's bit for bit.

    python -m benchmarks.probe_fp8_pipeline --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_fp8_pipeline           # H200: check against the product, then time

Variants: (PIECE columns, DEPTH pieces ahead, producer registers). Timed at batch 128 x
s_q 2 and 1 over a 32K context (the issue's decode shape) and at 4096 queries (an
engine prefill chunk over an fp8 cache), h_q 128, topk 2048, with the bf16 rows' kernel
on the same rows dequantized as the bound this producer can reach, and the bf16 matmul
ceiling of the same run. Results: ``probe_fp8_pipeline.json`` under $OUT or
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.sparse_mla import fwd_sm90 as F  # noqa: E402

# (PIECE, DEPTH, BITS): DEPTH 0 is the product's producer; BITS converts by bit operations.
# The producer keeps the product's 88 registers (the most that leaves the consumers 208).
VARIANTS = ((128, 0, True), (128, 0, False), (64, 0, True), (128, 1, True), (64, 1, True))
H_Q, SM_SCALE = 128, 0.1352

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    from flashdsa.ops.sparse_mla.fwd_sm90 import _allocate, _async_load, _attend_partition, _barrier

    # 4 e4m3 bytes -> 4 bf16 scaled by a power of two, without conversion instructions: each
    # byte's sign goes to bit 15 of a 16-bit lane and its 7 other bits to bits 4-10, which
    # reads as a bf16 equal to the e4m3 value times 2^-120 (subnormals included; the e4m3
    # NaN reads as 480 times 2^-120); one packed multiply by 2^120 (0x7B80) restores the
    # value exactly and a second by the scale (exact for a power of two)
    _E4M3_TO_BF16 = gl.constexpr("""{
    .reg .b32 t0, t1, u0, u1, k, z;
    mov.b32 k, 0x7B807B80;
    mov.b32 z, 0x80008000;
    prmt.b32 t0, $2, 0, 0x1404;
    prmt.b32 t1, $2, 0, 0x3424;
    shr.b32 u0, t0, 4;
    shr.b32 u1, t1, 4;
    and.b32 u0, u0, 0x07F007F0;
    and.b32 u1, u1, 0x07F007F0;
    and.b32 t0, t0, 0x80008000;
    and.b32 t1, t1, 0x80008000;
    or.b32 t0, t0, u0;
    or.b32 t1, t1, u1;
    fma.rn.bf16x2 t0, t0, k, z;
    fma.rn.bf16x2 t1, t1, k, z;
    fma.rn.bf16x2 $0, t0, $3, z;
    fma.rn.bf16x2 $1, t1, $4, z;
    }""")

    @gluon.jit
    def _dequant(x, scale, BITS: gl.constexpr):
        """e4m3 [rows, cols] times the rows' power-of-two ``scale`` [ROWS], as bf16."""
        if BITS:
            # the asm broadcasts the [ROWS, 1] scales over the columns
            y = gl.inline_asm_elementwise(_E4M3_TO_BF16, "=r,=r,r,r,r",
                                          [x.to(gl.uint8, bitcast=True), scale.to(gl.bfloat16)[:, None]],
                                          dtype=gl.bfloat16, is_pure=True, pack=4)
        else:
            y = (x.to(gl.float32) * scale[:, None]).to(gl.bfloat16)
        return y

    @gluon.jit
    def _pieces_fp8_partition(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                              k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
                              PIECE: gl.constexpr, BITS: gl.constexpr):
        """The product's ``_fp8_gather_partition`` with the conversion of :func:`_dequant`."""
        N_PIECES: gl.constexpr = 512 // PIECE
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        cols = gl.arange(0, PIECE, layout=gl.SliceLayout(0, deq_l))
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        n_blocks = gl.cdiv(topk, BLOCK_K)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, deq_l))
            idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
            valid = (idx >= 0) & (idx < n_kv)
            row = gl.where(valid, idx, 0).to(gl.int64)
            src = c8_ptr + gl.multiple_of(row * stride_c8, 16)[:, None] + cols[None, :]
            sc_row = sc_ptr + row * stride_sc
            x = gl.load(src, mask=valid[:, None], other=0.0)
            row_t = gl.convert_layout(row, gl.SliceLayout(1, tail_l))
            valid_t = gl.convert_layout(valid, gl.SliceLayout(1, tail_l))
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            _async_load(k_tail.index(st), pe_ptr + gl.multiple_of(row_t * stride_pe, 8)[:, None] + cols_t[None, :],
                        mask=valid_t[:, None])
            dst = k_nope.index(st)
            for p in gl.static_range(N_PIECES):
                if p + 1 < N_PIECES:
                    x_next = gl.load(src + (p + 1) * PIECE, mask=valid[:, None], other=0.0)
                scale = gl.load(sc_row + (p * PIECE) // 128, mask=valid, other=0.0)
                dst.slice(p * PIECE, PIECE, dim=1).store(_dequant(x, scale, BITS))
                if p + 1 < N_PIECES:
                    x = x_next
            fence_async_shared()
            _barrier()
            mbarrier.arrive(ready.index(st), count=1)
            async_copy.mbarrier_arrive(ready.index(st), increment_count=False)

    @gluon.jit
    def _piece(c8_ptr, sc_ptr, idx, n_kv, stride_c8, stride_sc, cols, p: gl.constexpr, PIECE: gl.constexpr):
        """Piece ``p`` (columns p * PIECE + [0, PIECE)) of rows ``idx`` as e4m3, and its tile
        scale; nothing is read for invalid indices."""
        valid = (idx >= 0) & (idx < n_kv)
        row = gl.where(valid, idx, 0).to(gl.int64)
        src = c8_ptr + gl.multiple_of(row * stride_c8, 16)[:, None] + (p * PIECE + cols)[None, :]
        scale = gl.load(sc_ptr + row * stride_sc + (p * PIECE) // 128, mask=valid, other=0.0)
        return gl.load(src, mask=valid[:, None], other=0.0), scale

    @gluon.jit
    def _flat_fp8_partition(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                            k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
                            PIECE: gl.constexpr, DEPTH: gl.constexpr, BITS: gl.constexpr):
        """The dequantizing partition (4 warps), pieces (with their scales) DEPTH ahead across
        blocks, a block's indices loaded a block ahead; the ready-barrier protocol of the
        product's (one arrival after the stores, and each thread's rope copies)."""
        gl.static_assert(PIECE <= 128, "a piece takes one scale")
        N_PIECES: gl.constexpr = 512 // PIECE
        gl.static_assert(DEPTH >= 1 and DEPTH <= 3 and DEPTH < N_PIECES, "1-3 pieces ahead, within a block")
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        cols = gl.arange(0, PIECE, layout=gl.SliceLayout(0, deq_l))
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        lanes = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, deq_l))
        n_blocks = gl.cdiv(topk, BLOCK_K)

        idx = gl.load(idx_row + lanes, mask=lanes < topk, other=-1)
        a, a_s = _piece(c8_ptr, sc_ptr, idx, n_kv, stride_c8, stride_sc, cols, 0, PIECE)
        b, b_s = a, a_s
        d, d_s = a, a_s
        if DEPTH >= 2:
            b, b_s = _piece(c8_ptr, sc_ptr, idx, n_kv, stride_c8, stride_sc, cols, 1, PIECE)
        if DEPTH >= 3:
            d, d_s = _piece(c8_ptr, sc_ptr, idx, n_kv, stride_c8, stride_sc, cols, 2, PIECE)
        kn = BLOCK_K + lanes
        idx_n = gl.load(idx_row + kn, mask=kn < topk, other=-1)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            idx_t = gl.convert_layout(idx, gl.SliceLayout(1, tail_l))
            valid_t = (idx_t >= 0) & (idx_t < n_kv)
            row_t = gl.where(valid_t, idx_t, 0).to(gl.int64)
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            _async_load(k_tail.index(st), pe_ptr + gl.multiple_of(row_t * stride_pe, 8)[:, None] + cols_t[None, :],
                        mask=valid_t[:, None])
            dst = k_nope.index(st)
            for p in gl.static_range(N_PIECES):
                if p + DEPTH < N_PIECES:
                    c, c_s = _piece(c8_ptr, sc_ptr, idx, n_kv, stride_c8, stride_sc, cols, p + DEPTH, PIECE)
                else:
                    c, c_s = _piece(c8_ptr, sc_ptr, idx_n, n_kv, stride_c8, stride_sc, cols, p + DEPTH - N_PIECES,
                                    PIECE)
                dst.slice(p * PIECE, PIECE, dim=1).store(_dequant(a, a_s, BITS))
                if DEPTH == 1:
                    a, a_s = c, c_s
                if DEPTH == 2:
                    a, a_s = b, b_s
                    b, b_s = c, c_s
                if DEPTH == 3:
                    a, a_s = b, b_s
                    b, b_s = d, d_s
                    d, d_s = c, c_s
            fence_async_shared()
            _barrier()  # every thread of this partition has stored its pieces
            mbarrier.arrive(ready.index(st), count=1)
            async_copy.mbarrier_arrive(ready.index(st), increment_count=False)
            idx = idx_n
            kn = (j + 2) * BLOCK_K + lanes
            idx_n = gl.load(idx_row + kn, mask=kn < topk, other=-1)

    @gluon.jit
    def fp8_pipeline_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        PIECE: gl.constexpr, DEPTH: gl.constexpr, BITS: gl.constexpr,
    ):
        """The product's fp8_ds_mla program with the flat producer (DEPTH > 0) or the
        product's producer (DEPTH 0), converting by :func:`_dequant`."""
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty = _allocate(BLOCK_K, NUM_STAGES, 129)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        if DEPTH > 0:
            gl.warp_specialize([
                (_attend_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                     h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                     q_nope, q_tail, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, num_warps)),
                (_flat_fp8_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                       k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, PIECE, DEPTH, BITS)),
            ], [4], [PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_attend_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                     h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                     q_nope, q_tail, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, num_warps)),
                (_pieces_fp8_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc,
                                         stride_pe, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, PIECE, BITS)),
            ], [4], [PRODUCER_REGS])


def flat_fp8(q, c8, scales, rope, idx, sm_scale, piece, depth, bits):
    """As ``F.run_sparse_mla_decode_sm90_fp8`` with the flat producer; also the compiled kernel."""
    cfg = F.SM90_GLUON_FP8
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    k = fp8_pipeline_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, c8, scales, rope, idx, out, ml, lse, c8.shape[0], idx.shape[1], h_q, sm_scale * F.LOG2E,
        q.stride(0), q.stride(1), c8.stride(0), scales.stride(0), rope.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], PIECE=piece, DEPTH=depth, BITS=bits, maxnreg=cfg["maxnreg"])
    return (out, ml, lse), k


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
        for piece, depth, bits in VARIANTS:
            got, _ = flat_fp8(q, *views, idx, SM_SCALE, piece, depth, bits)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            row = dict(t=t, n_rows=n_rows, topk=topk, holes=holes, piece=piece, depth=depth, bits=bits, equal=same)
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
        for piece, depth, bits in VARIANTS:
            name = f"p{piece}_d{depth}_{'bits' if bits else 'cvt'}"
            _, k = flat_fp8(q, *views, idx, SM_SCALE, piece, depth, bits)
            row[f"{name}_spills"] = k.n_spills
            runs.append((name, lambda piece=piece, depth=depth, bits=bits: flat_fp8(q, *views, idx, SM_SCALE, piece,
                                                                                    depth, bits)))
        for name, fn in runs:
            ms = bench_ms(fn)
            row[f"{name}_ms"] = round(ms, 4)
            row[f"{name}_x_bf16"] = round(tflop / ms * 1e3 / ceil["bf16_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers and spills of each variant, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        q, views, _, idx = problem(4, 1000, 256, 0, device="cpu")
        with capture_launches() as launches:
            for piece, depth, bits in VARIANTS:
                flat_fp8(q, *views, idx, SM_SCALE, piece, depth, bits)
    for (piece, depth, bits), row in zip(VARIANTS, build_launches(launches, keep_going=True)):
        row.pop("loop", None)
        print(dict(piece=piece, depth=depth, bits=bits, **row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="build for sm_90 on this machine (CPU) and report")
    args = ap.parse_args()
    if args.build:
        build()
        return
    ceil = measure_ceilings()
    results = {"ceilings": ceil, "check": [], "speed": []}
    if check(results["check"]):
        speed(results["speed"], ceil)
        print_table(results["speed"], [c for c in results["speed"][0] if c.endswith("_ms") or c == "tokens"])
    print("wrote", write_result("probe_fp8_pipeline", results))


if __name__ == "__main__":
    main()
