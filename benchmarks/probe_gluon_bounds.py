"""Experiment (issue 15): which side of the Hopper sparse MLA forward sets its speed.

The product program (flashdsa/ops/sparse_mla/fwd_sm90.py) is a producer partition
(gathering or dequantizing each block of selected rows into a shared-memory stage) and
two consumer warpgroups (q . k, the online softmax, p @ v). This probe times, at the
issue's shapes, the product beside two programs that keep one side and void the other:

- ``consumers``: the product's consumers; the producer zeroes the stages once, then only
  hands each stage over (waits for it to be free, arrives on its ready barrier) and loads
  nothing: the time of the attention alone, with the stages already full;
- ``producer``: the product's producer (bf16 gather, or the fp8_ds_mla one); the consumers
  only wait for each stage and free it: the time of the gather alone.

If the product takes about as long as ``consumers``, the next step is in the consumers
(their barriers, shared-memory reads, the softmax); if about as long as ``producer``, in
the gather; if much longer than both, in how the two overlap (stages, hand-over). Outputs
of the two voided programs are not meaningful and not checked; the product's path is the
product's own launch. Built for sm_90 (``--build``): 168 registers, no spills on Triton 3.9;
on 3.6 the fp8 ``producer`` program spills 8 bytes (the product's fp8 producer does not);
the ``producer`` programs allocate no q tiles (147.6 KB of shared memory against 222 KB),
still one program an SM.

    python -m benchmarks.probe_gluon_bounds --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_bounds           # H200: time

Results: ``probe_gluon_bounds.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.sparse_mla import fwd_sm90 as F  # noqa: E402

MODES = {"consumers": 1, "producer": 2}
SM_SCALE = 0.1352

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    from flashdsa.ops.sparse_mla.fwd_sm90 import _allocate, _attend_partition, _barrier, _producer_partition

    @gluon.jit
    def _handover_partition(topk, k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """A producer that loads nothing: zeroes every stage once, then signals each block's
        stage ready as soon as it is free."""
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        for i in gl.static_range(NUM_STAGES):
            for c in gl.static_range(4):
                k_nope.index(i).slice(c * 128, 128, dim=1).store(gl.zeros([BLOCK_K, 128], gl.bfloat16, zl))
            k_tail.index(i).store(gl.zeros([BLOCK_K, 64], gl.bfloat16, zl))
        fence_async_shared()
        _barrier()
        for j in range(gl.cdiv(topk, BLOCK_K)):
            st = j % NUM_STAGES
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def _drain_partition(topk, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Consumers that compute nothing: free each stage as soon as it is ready."""
        for j in range(gl.cdiv(topk, BLOCK_K)):
            st = j % NUM_STAGES
            mbarrier.wait(ready.index(st), (j // NUM_STAGES) & 1)
            mbarrier.arrive(empty.index(st), count=1)

    @gluon.jit
    def bounds_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        FP8: gl.constexpr, MODE: gl.constexpr,
    ):
        """The product's program with one side voided: MODE 1 keeps the consumers, MODE 2 the producer."""
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty, m_buf = _allocate(BLOCK_K, NUM_STAGES,
                                                                        1 if FP8 or MODE == 1 else 128)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        if MODE == 1:
            gl.warp_specialize([
                (_attend_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                     h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                     q_nope, q_tail, k_nope, k_tail, ready, empty, m_buf, BLOCK_K, NUM_STAGES,
                                     num_warps)),
                (_handover_partition, (topk, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES)),
            ], [4], [PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_drain_partition, (topk, ready, empty, BLOCK_K, NUM_STAGES)),
                (_producer_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                       k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, FP8)),
            ], [4], [PRODUCER_REGS])


def voided(mode, q, kv, idx, scales=None, rope=None):
    """One launch of ``bounds_kernel`` (``mode`` a key of MODES) with the product's
    configuration for these rows; returns the compiled kernel."""
    fp8 = scales is not None
    cfg = F.SM90_GLUON_FP8 if fp8 else F.SM90_GLUON
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    return bounds_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, kv, scales, rope, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), scales.stride(0) if fp8 else 0, rope.stride(0) if fp8 else 0,
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], FP8=fp8, MODE=MODES[mode], maxnreg=cfg["maxnreg"])


def cases(device="cuda", small=False):
    """(name, q, kv or the fp8 views, idx, TFLOP): the issue's prefill and decode shapes."""
    from benchmarks.bench_sparse_mla import make_inputs
    from benchmarks.bench_sparse_mla_decode import make_problem
    from flashdsa.api import quantize_mla_cache
    from flashdsa.layout import MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views

    s_q = 64 if small else 4096
    for s_kv, h in ((8192, 128), (65536, 128), (65536, 64)):
        q, kv, idx = make_inputs(s_q, min(s_kv, 4096) if small else s_kv, h, device=device)
        yield f"prefill {s_kv // 1024}K h{h}", q, (kv.view(kv.shape[0], 576), ), idx[:, 0], 2 * s_q * h * 2048 * 1088
    b = 4 if small else 128
    q, cache, slots = make_problem(b, 4096 if small else 32768, 2, device=device)
    q, idx, rows = q.flatten(0, 1), slots.flatten(0, 1).contiguous(), cache.reshape(-1, 576)
    flop = 2 * q.shape[0] * q.shape[1] * 2048 * 1088
    yield f"decode bf16 b{b} s_q2", q, (rows, ), idx, flop
    c8, sc, pe = mla_byte_views(quantize_mla_cache(rows.view(rows.shape[0], 1, 1, 576)).view(rows.shape[0], -1))
    yield f"decode fp8 b{b} s_q2", q, (c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]), idx, flop


def product(q, views, idx):
    if len(views) == 3:
        return F.run_sparse_mla_decode_sm90_fp8(q, *views, idx, SM_SCALE)
    return F.run_sparse_mla_fwd_sm90(q, views[0], idx, SM_SCALE)


def speed(results, ceil):
    for name, q, views, idx, flop in cases():
        row = dict(case=name)
        for mode, fn in [("product", lambda: product(q, views, idx)),
                         *[(m, lambda m=m: voided(m, q, views[0], idx, *views[1:])) for m in MODES]]:
            ms = bench_ms(fn)
            row[f"{mode}_ms"] = round(ms, 4)
            row[f"{mode}_x_bf16"] = round(flop / ms / 1e9 / ceil["bf16_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers and spills of the voided programs, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        picked = [c for c in cases("cpu", small=True) if c[0].startswith(("prefill 8K", "decode fp8"))]
        with capture_launches() as launches:
            for _, q, views, idx, _ in picked:
                for m in MODES:
                    voided(m, q, views[0], idx, *views[1:])
    labels = [(c[0], m) for c in picked for m in MODES]
    for (case, m), row in zip(labels, build_launches(launches, keep_going=True)):
        row.pop("loop", None)
        print(dict(case=case, mode=m, **row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="build for sm_90 on this machine (CPU) and report")
    args = ap.parse_args()
    if args.build:
        build()
        return
    ceil = measure_ceilings()
    results = {"ceilings": ceil, "speed": []}
    speed(results["speed"], ceil)
    print_table(results["speed"], ["case"] + [f"{m}_ms" for m in ("product", *MODES)])
    print("wrote", write_result("probe_gluon_bounds", results))


if __name__ == "__main__":
    main()
