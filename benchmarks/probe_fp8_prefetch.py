"""Experiment (issue 15): the staged fp8_ds_mla producer without its second load of each block's indices.

The product's fp8_ds_mla producer (flashdsa/ops/sparse_mla/fwd_sm90.py,
``_fp8_gather_partition``) loads a block's indices a block ahead in the layout of its
cp.async copies, but loads them again, at the block's start, in the layout its scales and
rope copies use; the rope copies need that load's result before the producer waits for the
stage and issues the block's copies, so each block starts with one round trip to memory
that nothing hides while the producer is the slower side (the fp8 rows take 0.477 ms
against 0.376 over bf16 rows at batch 128, s_q 2, 32K: about 0.8 us more a block).

Here the indices loaded a block ahead are moved into the other layout at the block's start
(a layout conversion through shared memory, no load), so the scale loads and the rope
copies' addresses wait on no memory. Everything else is the product's, so
the outputs must equal the product's bit for bit.

    python -m benchmarks.probe_fp8_prefetch --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_fp8_prefetch           # H200: check against the product, then time

Timed at batch 128 x s_q 2 and 1 over a 32K context and at 4096 queries, h_q 128, topk
2048, beside the product and the bf16 rows' kernel on the same rows dequantized (the
bound), with the bf16 matmul ceiling of the same run. Results: ``probe_fp8_prefetch.json``
under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.sparse_mla import fwd_sm90 as F  # noqa: E402

H_Q, SM_SCALE = 128, 0.1352
REGS = (88, )   # producer registers: the product's

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    from flashdsa.ops.sparse_mla.fwd_sm90 import (_allocate, _async_load, _attend_partition, _barrier,
                                                  _dequant_tile, _fp8_staging)

    @gluon.jit
    def _prefetch_fp8_partition(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                                k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's staged producer, each block's indices loaded once, a block ahead."""
        cp_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, cp_l))
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        lanes = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, cp_l))
        n_blocks = gl.cdiv(topk, BLOCK_K)
        idx = gl.load(idx_row + lanes, mask=lanes < topk, other=-1)
        for j in range(n_blocks):
            idx_d = gl.convert_layout(idx, gl.SliceLayout(1, deq_l))
            st = j % NUM_STAGES
            valid = (idx >= 0) & (idx < n_kv)
            row = gl.where(valid, idx, 0).to(gl.int64)
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
                _async_load(hi.slice(c * 128, 128, dim=1), src + (256 + c * 128), mask=valid[:, None])
            _async_load(k_tail.index(st), pe_ptr + gl.multiple_of(row_t * stride_pe, 8)[:, None] + cols_t[None, :],
                        mask=valid_t[:, None])
            async_copy.commit_group()
            kn = (j + 1) * BLOCK_K + lanes
            idx = gl.load(idx_row + kn, mask=kn < topk, other=-1)
            async_copy.wait_group(0)
            _barrier()
            _dequant_tile(lo.slice(0, 128, dim=1).load(deq_l), dst, 0, s0)
            _dequant_tile(lo.slice(128, 128, dim=1).load(deq_l), dst, 128, s1)
            _barrier()
            _dequant_tile(hi.slice(0, 128, dim=1).load(deq_l), dst, 256, s2)
            last = hi.slice(128, 128, dim=1).load(deq_l)
            _barrier()
            _dequant_tile(last, dst, 384, s3)
            fence_async_shared()
            _barrier()
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def fp8_prefetch_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    ):
        """The product's fp8_ds_mla program with the prefetching producer."""
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty = _allocate(BLOCK_K, NUM_STAGES, 1)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_attend_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                 h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                 q_nope, q_tail, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, num_warps)),
            (_prefetch_fp8_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                       k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES)),
        ], [4], [PRODUCER_REGS])


def prefetch_fp8(q, c8, scales, rope, idx, sm_scale, regs):
    """As ``F.run_sparse_mla_decode_sm90_fp8`` with the prefetching producer; also the compiled kernel."""
    cfg = F.SM90_GLUON_FP8
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    k = fp8_prefetch_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, c8, scales, rope, idx, out, ml, lse, c8.shape[0], idx.shape[1], h_q, sm_scale * F.LOG2E,
        q.stride(0), q.stride(1), c8.stride(0), scales.stride(0), rope.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=regs, maxnreg=cfg["maxnreg"])
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
        for regs in REGS:
            got, _ = prefetch_fp8(q, *views, idx, SM_SCALE, regs)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            err = float((got[0].float() - want[0].float()).abs().max())
            row = dict(t=t, n_rows=n_rows, topk=topk, holes=holes, regs=regs, equal=same, max_abs_diff_out=err)
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
            _, k = prefetch_fp8(q, *views, idx, SM_SCALE, regs)
            row[f"prefetch_r{regs}_spills"] = k.n_spills
            runs.append((f"prefetch_r{regs}", lambda regs=regs: prefetch_fp8(q, *views, idx, SM_SCALE, regs)))
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
                prefetch_fp8(q, *views, idx, SM_SCALE, regs)
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
    print("wrote", write_result("probe_fp8_prefetch", results))


if __name__ == "__main__":
    main()
