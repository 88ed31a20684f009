"""Experiment (issue 15): the bf16 producer holds part of the next block in registers.

With two stages (q 72 KB + 2 x 72 KB of 227 KB of shared memory) the producer can start
block j + 1's gather only once block j - 1's stage is free, and every byte of it then
waits on the rows' latency; at 64K rows (75 MB, more than the 50 MB L2) many come from
HBM, and the prefill there runs 8% (h_q 128) to 30% (h_q 64) slower than at 8K. The
producer has registers to spare (88 a thread): here it loads columns 0-127 of block j + 1
into registers (32 registers a thread, plain global loads) right after issuing block
j's copies, and once the stage frees it stores them and copies only columns 128-575 by
cp.async: a fifth of each block is in flight a block early. The stage is ready after the copies (128 asynchronous arrivals) and the stores
(one arrival after a fence and a barrier of the partition). Producer registers 104 (96
spill 32 bytes on Triton 3.6), the value warpgroup 160, the softmax warpgroup the rest. The same rows, so the outputs
must equal the product's bit for bit.

    python -m benchmarks.probe_gluon_regstage --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_regstage           # H200: check, then time

Results: ``probe_gluon_regstage.json`` under $OUT or benchmarks/results/.
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
PRODUCER_REGS = 104

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    from flashdsa.ops.sparse_mla.fwd_sm90 import (_allocate, _async_load, _barrier, _load_slots,
                                                  _softmax_partition, _value_partition)

    @gluon.jit
    def _early(kv_ptr, idx, n_kv, stride_kv):
        """Columns 0-127 of rows ``idx`` into registers; zeros for invalid rows."""
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        valid = (idx >= 0) & (idx < n_kv)
        base = kv_ptr + gl.where(valid, idx, 0).to(gl.int64) * stride_kv
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, nope_l))
        return gl.load(base[:, None] + cols[None, :], mask=valid[:, None], other=0.0)

    @gluon.jit
    def _gather_regstage(kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty,
                         BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        n_blocks = gl.cdiv(topk, BLOCK_K)
        idx_n, idx_t = _load_slots(idx_row, 0, topk, BLOCK_K, 4)
        x = _early(kv_ptr, idx_n, n_kv, stride_kv)
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, nope_l))
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        for j in range(n_blocks):
            st = j % NUM_STAGES
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            kn = k_nope.index(st)
            kn.slice(0, 128, dim=1).store(x)
            fence_async_shared()
            valid = (idx_n >= 0) & (idx_n < n_kv)
            base = kv_ptr + gl.where(valid, idx_n, 0).to(gl.int64) * stride_kv
            for c in gl.static_range(1, 4):
                _async_load(kn.slice(c * 128, 128, dim=1), base[:, None] + (c * 128 + cols)[None, :],
                            mask=valid[:, None])
            valid_t = (idx_t >= 0) & (idx_t < n_kv)
            base_t = kv_ptr + gl.where(valid_t, idx_t, 0).to(gl.int64) * stride_kv + 512
            _async_load(k_tail.index(st), base_t[:, None] + cols_t[None, :], mask=valid_t[:, None])
            async_copy.mbarrier_arrive(ready.index(st), increment_count=False)
            _barrier()  # every thread's stores are fenced
            mbarrier.arrive(ready.index(st), count=1)
            idx_n, idx_t = _load_slots(idx_row, (j + 1) * BLOCK_K, topk, BLOCK_K, 4)
            x = _early(kv_ptr, idx_n, n_kv, stride_kv)

    @gluon.jit
    def regstage_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, VALUE_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
    ):
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        # ready: 128 asynchronous arrivals (the copies) and one after the stores
        q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done = _allocate(
            BLOCK_K, NUM_STAGES, 129)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_softmax_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                  h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                  q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                                  BLOCK_K, NUM_STAGES)),
            (_value_partition, (out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                                alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_gather_regstage, (kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty,
                                BLOCK_K, NUM_STAGES)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_regstage(q, kv, idx):
    cfg = F.SM90_GLUON
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    regstage_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, kv, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        VALUE_REGS=cfg["VALUE_REGS"], PRODUCER_REGS=PRODUCER_REGS, maxnreg=cfg["maxnreg"])
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


def check(results) -> bool:
    """Outputs equal to the product's bit for bit (every kind of invalid index, topk not a
    multiple of the block, one block, a partial block)."""
    ok = True
    for t, n_kv, h_q, topk in ((37, 3001, 128, 1000), (9, 100, 64, 64), (5, 300, 64, 40), (64, 65536, 128, 2048)):
        q, kv, idx = bf16_problem(t, n_kv, h_q, topk, t + n_kv, holes=True)
        same = all(torch.equal(a, b) for a, b in zip(run_regstage(q, kv, idx),
                                                     F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)))
        ok &= same
        results.append(dict(t=t, n_kv=n_kv, h_q=h_q, topk=topk, equal=same))
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
                    ("regstage", lambda: run_regstage(q, kv, idx))], 2 * t * h_q * 2048 * 1088 / 1e12, ceil)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers and spills, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        q, kv, idx = bf16_problem(4, 1000, 128, 256, 0, device="cpu")
        with capture_launches() as launches:
            run_regstage(q, kv, idx)
    for row in build_launches(launches, keep_going=True):
        row.pop("loop", None)
        print(row, flush=True)


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
    print("wrote", write_result("probe_gluon_regstage", results))


if __name__ == "__main__":
    main()
