"""Experiment (issue 15): the Hopper sparse MLA producer prefetches the next block's rows
into L2.

With two stages (q 72 KB + 2 x 72 KB of 227 KB of shared memory) the producer gathers
block j only once block j - 2's stage is free, and each of its copies waits on the row's
latency from wherever it lies. At 64K rows (75 MB of bf16 rows, more than the 50 MB L2)
and in the decode (a 4.8 GB cache at batch 128 x 32K) most rows come from HBM, and the
prefill at 64K runs 8% (h_q 128) to 30% (h_q 64) slower than at 8K
(``issue15/sparse_mla_best3_1824.json``). Here, right after issuing block j's copies, the
producer loads block j + 1's indices (as the product does) and issues one
``cp.async.bulk.prefetch.L2`` per row of block j + 1 (1152 bytes of a bf16 row, the 656
bytes of an fp8_ds_mla row), so that its copies a block later hit L2. Nothing else
changes, so the outputs must equal the product's bit for bit.

    python -m benchmarks.probe_gluon_prefetch --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_prefetch           # H200: check, then time

Results: ``probe_gluon_prefetch.json`` under $OUT or benchmarks/results/.
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
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    from flashdsa.ops.sparse_mla.fwd_sm90 import (_allocate, _async_load, _barrier, _dequant_tile, _fp8_staging,
                                                  _issue_rows, _load_slots, _softmax_partition, _value_partition)

    @gluon.jit
    def _prefetch_rows(base_ptr, idx, n_kv, stride, NBYTES: gl.constexpr):
        """One L2 bulk prefetch of NBYTES from each valid row ``idx`` of ``base_ptr``."""
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        i = gl.convert_layout(idx, lay)
        ok = (i >= 0) & (i < n_kv)
        ptr = base_ptr + gl.where(ok, i, 0).to(gl.int64) * stride
        if NBYTES == 1152:
            gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global"
                                      " [$1], 1152; mov.u32 $0, 0; }", "=r,l,r", [ptr, ok.to(gl.int32)],
                                      gl.int32, False, 1)
        else:
            gl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global"
                                      " [$1], 656; mov.u32 $0, 0; }", "=r,l,r", [ptr, ok.to(gl.int32)],
                                      gl.int32, False, 1)

    @gluon.jit
    def _gather_prefetch(kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty,
                         BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        n_blocks = gl.cdiv(topk, BLOCK_K)
        idx_n, idx_t = _load_slots(idx_row, 0, topk, BLOCK_K, 4)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            _issue_rows(kv_ptr, idx_n, idx_t, n_kv, stride_kv, k_nope.index(st), k_tail.index(st), 4)
            async_copy.mbarrier_arrive(ready.index(st), increment_count=False)
            idx_n, idx_t = _load_slots(idx_row, (j + 1) * BLOCK_K, topk, BLOCK_K, 4)
            _prefetch_rows(kv_ptr, idx_t, n_kv, stride_kv, 1152)

    @gluon.jit
    def _fp8_prefetch(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                      k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's fp8 producer with the L2 prefetch of the next block's rows."""
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
            async_copy.commit_group()
            for c in gl.static_range(2):
                _async_load(hi.slice(c * 128, 128, dim=1), src + (256 + c * 128), mask=valid[:, None])
            async_copy.commit_group()
            kn = (j + 1) * BLOCK_K + lanes
            idx = gl.load(idx_row + kn, mask=kn < topk, other=-1)
            _prefetch_rows(c8_ptr, idx, n_kv, stride_c8, 656)
            async_copy.wait_group(1)
            _barrier()
            _dequant_tile(lo.slice(0, 128, dim=1).load(deq_l), dst, 0, s0)
            _dequant_tile(lo.slice(128, 128, dim=1).load(deq_l), dst, 128, s1)
            async_copy.wait_group(0)
            _barrier()
            _dequant_tile(hi.slice(0, 128, dim=1).load(deq_l), dst, 256, s2)
            last = hi.slice(128, 128, dim=1).load(deq_l)
            _barrier()
            _dequant_tile(last, dst, 384, s3)
            fence_async_shared()
            _barrier()
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def _producer(kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                  k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, FP8: gl.constexpr):
        if FP8:
            _fp8_prefetch(kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                          k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES)
        else:
            _gather_prefetch(kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty,
                             BLOCK_K, NUM_STAGES)

    @gluon.jit
    def prefetch_kernel(
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
            (_softmax_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                  h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                  q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                                  BLOCK_K, NUM_STAGES)),
            (_value_partition, (out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                                alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_producer, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                         k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, FP8)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_prefetch(q, kv, idx, scales=None, rope=None):
    cfg = F.SM90_GLUON
    fp8 = scales is not None
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    prefetch_kernel[(h_q // F.BLOCK_H * t_q, )](
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
    """Outputs equal to the product's bit for bit (every kind of invalid index, topk not a
    multiple of the block, one block, a row past the last)."""
    ok = True
    for t, n_kv, h_q, topk in ((37, 3001, 128, 1000), (9, 100, 64, 64), (5, 300, 64, 40), (64, 65536, 128, 2048)):
        q, kv, idx = bf16_problem(t, n_kv, h_q, topk, t + n_kv, holes=True)
        same = all(torch.equal(a, b) for a, b in zip(run_prefetch(q, kv, idx),
                                                     F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)))
        ok &= same
        results.append(dict(t=t, n_kv=n_kv, h_q=h_q, topk=topk, rows="bf16", equal=same))
        print(results[-1], flush=True)
    for t, n_rows, topk in ((37, 3001, 1000), (256, 65536, 2048)):
        q, views, idx = fp8_problem(t, n_rows, topk, t + n_rows, holes=True)
        same = all(torch.equal(a, b) for a, b in zip(run_prefetch(q, views[0], idx, views[1], views[2]),
                                                     F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)))
        ok &= same
        results.append(dict(t=t, n_rows=n_rows, topk=topk, rows="fp8_ds_mla", equal=same))
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
                    ("prefetch", lambda: run_prefetch(q, kv, idx))], 2 * t * h_q * 2048 * 1088 / 1e12, ceil)
        results.append(row)
        print(row, flush=True)
        del q, kv, idx
    q, views, idx = fp8_problem(256, 128 * 32768, 2048, 0)
    row = dict(case="decode fp8 b128 s_q2 32K")
    _time(row, [("product", lambda: F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)),
                ("prefetch", lambda: run_prefetch(q, views[0], idx, views[1], views[2]))],
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
            run_prefetch(q, kv, idx)
            run_prefetch(q8, views[0], idx8, views[1], views[2])
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
    print("wrote", write_result("probe_gluon_prefetch", results))


if __name__ == "__main__":
    main()
