"""Experiment (issue 15): two dequantizing producers for the fp8_ds_mla decode.

The Gluon decode over fp8_ds_mla rows (flashdsa/ops/sparse_mla/fwd_sm90.py) runs the same
consumers as over bf16 rows, behind a producer that loads each gathered row's e4m3 bytes,
scales them and stores them to shared memory as bf16. At batch 128, s_q 2, 32K it took
0.532 ms against 0.387 ms over a bf16 cache (H200, 2026-12-03 17:50 UTC,
docs/benchmarks_sparse_mla.md): the producer, not the consumers, sets the pace. It holds
two 128-column pieces of a block in flight, as many as its registers allow.

Here a second producer partition of 4 warps takes every other block: with two stages,
producer p owns stage p (blocks j with j % 2 == p), so the two convert blocks j and j + 1
at the same time, each with its own loads in flight, and the consumers take the stages
in turn as before. A CTA then has 16 warps: the launch gives each thread
``65536 / 512 = 128`` registers, and after the producers shrink to PRODUCER_REGS the
consumers grow to ``256 - PRODUCER_REGS`` (208 today with one producer of 88).

    python -m benchmarks.probe_fp8_producers --build   # CPU: registers and spills of each variant (sm_90)
    python -m benchmarks.probe_fp8_producers           # H200: bitwise check against the product, timings

On the GPU each variant must give the product kernel's outputs bit for bit (the same
conversion of each element and the same consumers), on adversarial slots (repeats, -1,
past the cache, an empty row) and on the timed inputs; then each is timed in a CUDA graph
at batch 128 and 32, s_q 2 and 1, context 32K, beside the product's kernel and its bf16
path. Results: ``probe_fp8_producers.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.layout import MLA_FP8_BYTES, MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views  # noqa: E402
from flashdsa.ops.common import LOG2E  # noqa: E402
from flashdsa.ops.sparse_mla import fwd_sm90 as F  # noqa: E402

VARIANTS = (56, 72, 88)   # PRODUCER_REGS of each of the two producers
SM_SCALE = 576 ** -0.5

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def fp8_two_producers_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        PIECE: gl.constexpr,
    ):
        """The product's fp8 program with two producer partitions, one a stage."""
        gl.static_assert(NUM_STAGES == 2, "two producers, a stage each")
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty = F._allocate(BLOCK_K, NUM_STAGES, 129)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (F._attend_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                   h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                   q_nope, q_tail, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, num_warps)),
            (F._fp8_gather_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                       k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, PIECE, 0, 2)),
            (F._fp8_gather_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                       k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, PIECE, 1, 2)),
        ], [4, 4], [PRODUCER_REGS, PRODUCER_REGS])


def run_two_producers(q, c8, scales, rope, idx, sm_scale, producer_regs):
    """As fwd_sm90.run_sparse_mla_decode_sm90_fp8, with the two-producer program."""
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    cfg = F.SM90_GLUON_FP8
    fp8_two_producers_kernel[(h_q // F.BLOCK_H * t_q, )](
        q, c8, scales, rope, idx, out, ml, lse, c8.shape[0], idx.shape[1], h_q, sm_scale * LOG2E,
        q.stride(0), q.stride(1), c8.stride(0), scales.stride(0), rope.stride(0),
        idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=producer_regs, PIECE=cfg["PIECE"], maxnreg=65536 // (32 * (cfg["num_warps"] + 8)))
    return out, ml, lse


def runners():
    """name -> fn(q, c8, scales, rope, idx): the product's fp8 kernel, then each variant."""
    out = {"product": lambda *a: F.run_sparse_mla_decode_sm90_fp8(*a, SM_SCALE)}
    for r in VARIANTS:
        out[f"two_producers_{r}"] = lambda *a, r=r: run_two_producers(*a, SM_SCALE, r)
    return out


def build() -> None:
    """Registers and spills of the product's fp8 program and each variant, built for sm_90."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches

    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 128, 576, generator=g, dtype=torch.bfloat16)
    idx = torch.randint(0, 1024, (8, 2048), dtype=torch.int32, generator=g)
    c8, sc, pe = mla_byte_views(torch.zeros(1024, MLA_FP8_BYTES, dtype=torch.uint8))
    rows = []
    for name, fn in runners().items():
        with capture_launches() as launches:
            fn(q, c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:], idx)
        for row in build_launches(launches, keep_going=True):
            rows.append(dict(variant=name, **row))
            print(rows[-1], flush=True)


def graph_ms(fn) -> float:
    from benchmarks.bench_sparse_mla_decode import graph_ms as g

    return g(fn)


def gpu() -> None:
    import flashdsa
    from tests.ops.test_sparse_mla_gluon import _adversarial_slots

    ceil = measure_ceilings()
    print(ceil, flush=True)
    rows = []
    run = runners()
    for bsz, s_q, ctx in ((128, 2, 32768), (128, 1, 32768), (32, 2, 32768), (4, 2, 32768)):
        g = torch.Generator(device="cuda").manual_seed(bsz * 10 + s_q)
        blocks = bsz * ctx // 64
        bf = torch.randn(blocks, 64, 1, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        cache = flashdsa.quantize_mla_cache(bf)
        n = blocks * 64
        # each sequence's 2048 slots among its own ctx slots
        base = (torch.arange(bsz, device="cuda", dtype=torch.int32) * ctx).view(bsz, 1, 1)
        idx = torch.randint(0, ctx, (bsz, s_q, 2048), device="cuda", dtype=torch.int32, generator=g) + base
        q = torch.randn(bsz * s_q, 128, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        c8, sc, pe = mla_byte_views(cache.reshape(-1, MLA_FP8_BYTES))
        args = (q, c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:])
        flat = idx.view(bsz * s_q, 2048)
        adv = _adversarial_slots(flat.clone(), n, bsz)
        flops = 2 * bsz * s_q * 128 * 2048 * (576 + 512)
        row = dict(batch=bsz, s_q=s_q, context=ctx)
        want = run["product"](*args, flat)
        want_adv = run["product"](*args, adv)
        for name, fn in run.items():
            try:
                got = fn(*args, flat)
                got_adv = fn(*args, adv)
                row[f"{name}_bitwise"] = all(torch.equal(a, b) for a, b in zip(got, want)) and \
                    all(torch.equal(a, b) for a, b in zip(got_adv, want_adv))
                ms = graph_ms(lambda fn=fn: fn(*args, flat))
                row[f"{name}_ms"] = ms
                row[f"{name}_x_bf16"] = round(flops / ms / 1e9 / ceil["bf16_matmul_tflops"], 4)
            except Exception as e:  # a variant that fails is recorded, not fatal
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        kv = bf.view(-1, 576)
        ms = graph_ms(lambda: F.run_sparse_mla_fwd_sm90(q, kv, flat, SM_SCALE))   # the same rows in bf16
        row["bf16_rows_ms"] = ms
        row["bf16_rows_x_bf16"] = round(flops / ms / 1e9 / ceil["bf16_matmul_tflops"], 4)
        rows.append(row)
        print(row, flush=True)
    print_table(rows, [k for k in rows[0] if not k.endswith("bitwise")])
    print("wrote", write_result("probe_fp8_producers", {"ceilings": ceil, "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="store_true", help="build each variant for sm_90 (CPU) and report its resources")
    args = ap.parse_args()
    build() if args.build else gpu()


if __name__ == "__main__":
    main()
