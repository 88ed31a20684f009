"""Experiment: the Hopper Gluon forward over fp8_ds_mla rows (issue 15, item 2), on one H200.

    python -m benchmarks.probe_gluon_fp8

A candidate kernel, not in the product: the attention partition of the Gluon forward
(flashdsa/ops/sparse_mla/fwd_sm90.py, unchanged) fed by a producer partition that
dequantizes the gathered rows: each block's 512 e4m3 bytes a row are loaded, scaled by
their tile's fp32 scale and stored as bf16 into the stage (st.shared, then a proxy fence),
the 64 bf16 rope values go by cp.async. The stage's ready barrier then takes one arrival
from the producer (after its stores) and one asynchronous arrival per producer thread
(its copies).

1. Exactness against the float64 reference decode (flashdsa.reference.sparse_mla_decode
   on the fp8_ds_mla cache) with slots of every kind, outputs poisoned with NaN.
2. Speed at batch 128, s_q 1 and 2, context 32K (no split-k needed): the Triton fp8
   kernel and the Gluon bf16 path on the same (dequantized) rows beside it.
Results: ``probe_gluon_fp8.json`` under $OUT (device runs) or benchmarks/results/.
"""
from __future__ import annotations

import torch

from benchmarks.bench_sparse_mla_decode import D_QK, D_V, H_Q, SM_SCALE, flops, graph_ms, make_problem
from benchmarks.common import measure_ceilings, print_table, write_result
from flashdsa.layout import MLA_FP8_BYTES, MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views
from flashdsa.ops.common import LOG2E
from flashdsa.ops.sparse_mla.fwd_sm90 import (
    BLOCK_H,
    GLUON_AVAILABLE,
    SM90_GLUON,
    _allocate,
    _async_load,
    _attend_partition,
    _barrier,
    _row_range,
)

if GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    @gluon.jit
    def _fp8_gather_partition(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                              k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
                              TILE: gl.constexpr):
        """The producer (4 warps): block j's rows dequantized into stage j % NUM_STAGES.

        A row's 512 e4m3 bytes go in pieces of TILE columns, 16 bytes a load; the next
        piece's loads are issued before this one is converted and stored, and a block's
        first piece before the wait for its stage, so the gathers' latency overlaps."""
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        gl.static_assert(TILE <= 128, "a piece takes one scale: at most one 128-column tile")
        N_T: gl.constexpr = 512 // TILE
        cols = gl.arange(0, TILE, layout=gl.SliceLayout(0, deq_l))
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        n_blocks = gl.cdiv(topk, BLOCK_K)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, deq_l))
            idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
            valid = (idx >= 0) & (idx < n_kv)
            row = gl.where(valid, idx, 0).to(gl.int64)
            # a row is 656 bytes: its offsets are multiples of 16 bytes (8 bf16, 16 e4m3)
            src = c8_ptr + gl.multiple_of(row * stride_c8, 16)[:, None] + cols[None, :]
            sc_row = sc_ptr + row * stride_sc
            x = gl.load(src, mask=valid[:, None], other=0.0)
            kt = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, tail_l))
            idx_t = gl.load(idx_row + kt, mask=kt < topk, other=-1)
            valid_t = (idx_t >= 0) & (idx_t < n_kv)
            row_t = gl.where(valid_t, idx_t, 0).to(gl.int64)
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            off_t = gl.multiple_of(row_t * stride_pe, 8)
            _async_load(k_tail.index(st), pe_ptr + off_t[:, None] + cols_t[None, :], mask=valid_t[:, None])
            dst = k_nope.index(st)
            for t in gl.static_range(N_T):
                if t + 1 < N_T:
                    x_next = gl.load(src + (t + 1) * TILE, mask=valid[:, None], other=0.0)
                scale = gl.load(sc_row + (t * TILE) // 128, mask=valid, other=0.0)
                dst.slice(t * TILE, TILE, dim=1).store((x.to(gl.float32) * scale[:, None]).to(gl.bfloat16))
                if t + 1 < N_T:
                    x = x_next
            fence_async_shared()  # the stores are read next by wgmma (the async proxy)
            _barrier()  # every producer thread's stores are done
            mbarrier.arrive(ready.index(st), count=1)
            async_copy.mbarrier_arrive(ready.index(st), increment_count=False)

    @gluon.jit
    def sparse_mla_fwd_sm90_fp8_kernel(
        q_ptr, c8_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_c8, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        TILE: gl.constexpr,
    ):
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        # ready: the producer's stores (one arrival) + its 128 threads' copies
        q_nope, q_tail, k_nope, k_tail, ready, empty = _allocate(BLOCK_K, NUM_STAGES, 129)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_attend_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                 h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                 q_nope, q_tail, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, num_warps)),
            (_fp8_gather_partition, (c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                                     k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, TILE)),
        ], [4], [PRODUCER_REGS])


CONFIG = dict(SM90_GLUON, PRODUCER_REGS=80, TILE=128)
# producer variants checked and timed: (TILE, PRODUCER_REGS); those that lost are in
# docs/benchmarks_sparse_mla.md
VARIANTS = [(128, 80)]


def run_fp8(q, cache, idx, sm_scale, config=None):
    """q [T, h_q, 576] bf16, cache [num_blocks, 64, 1, 656] uint8 (fp8_ds_mla), idx [T, topk]
    physical slots -> (out [T, h_q, 512] bf16, max_logits, lse)."""
    cfg = dict(CONFIG, **(config or {}))
    t_q, h_q, _ = q.shape
    c8, sc, pe = mla_byte_views(cache.reshape(-1, MLA_FP8_BYTES))
    sc, pe = sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]
    out = torch.empty(t_q, h_q, D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(ml)
    sparse_mla_fwd_sm90_fp8_kernel[(h_q // BLOCK_H * t_q, )](
        q, c8, sc, pe, idx, out, ml, lse, c8.shape[0], idx.shape[1], h_q, sm_scale * LOG2E,
        q.stride(0), q.stride(1), c8.stride(0), sc.stride(0), pe.stride(0), idx.stride(0), out.stride(0),
        out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], TILE=cfg["TILE"], maxnreg=cfg["maxnreg"])
    return out, ml, lse


def check(results):
    from flashdsa import api
    from flashdsa.reference.sparse_mla import sparse_mla_decode as ref_decode
    from tests.utils import rel_err

    rows = []
    for seed, (b, s_q, ctx) in enumerate([(3, 2, 5000), (2, 1, 40000), (40, 2, 3000)]):
        q, cache_bf16, idx = make_problem(b, ctx, s_q, seed=seed)
        g = torch.Generator(device="cuda").manual_seed(seed)
        kind = torch.randint(0, 8, idx.shape, device="cuda", generator=g)
        n_slots = cache_bf16.shape[0] * cache_bf16.shape[1]
        idx = torch.where(kind == 0, -1, idx)
        idx = torch.where(kind == 1, n_slots + 7, idx)
        idx = torch.where(kind == 2, idx.roll(1, dims=2), idx)
        idx[0, 0] = -1
        cache = api.quantize_mla_cache(cache_bf16)
        r_out, r_lse = ref_decode(q.double(), cache, idx, SM_SCALE, D_V, "fp8_ds_mla",
                                    compute_dtype=torch.float64)
        t_out, _ = api.sparse_mla_decode(q, cache, idx, SM_SCALE, D_V, kv_format="fp8_ds_mla")
        fin = torch.isfinite(r_lse)
        row = dict(b=b, s_q=s_q, ctx=ctx, triton_err=rel_err(t_out, r_out))
        for tile, regs in VARIANTS:
            torch.empty(1 << 28, device="cuda").fill_(float("nan"))
            out, _, lse = run_fp8(q.reshape(b * s_q, H_Q, D_QK), cache, idx.reshape(b * s_q, -1).contiguous(),
                                  SM_SCALE, dict(TILE=tile, PRODUCER_REGS=regs))
            out, lse = out.view(b, s_q, H_Q, D_V), lse.view(b, s_q, H_Q)
            row[f"gluon_{tile}_{regs}"] = dict(
                err=rel_err(out, r_out), lse_err=(lse.double() - r_lse)[fin].abs().max().item(),
                nan=int(torch.isnan(out).sum()),
                empty_ok=bool((out[0, 0] == 0).all() and (lse[0, 0] == float("inf")).all()))
        rows.append(row)
        print(row, flush=True)
    ok = all(v["nan"] == 0 and v["empty_ok"] and v["err"] <= 1.25 * r["triton_err"] + 1e-5 and v["lse_err"] < 1e-3
             for r in rows for k, v in r.items() if k.startswith("gluon_"))
    results["check"], results["check_passed"] = rows, ok
    print("check passed" if ok else "CHECK FAILED", flush=True)
    return ok


def speed(results):
    from flashdsa import api

    ceiling = results["ceilings"]["bf16_matmul_tflops"]
    rows = []
    for b, s_q in ((128, 2), (128, 1)):
        q, cache_bf16, idx = make_problem(b, 32768, s_q)
        cache = api.quantize_mla_cache(cache_bf16)
        f = flops(b, s_q)
        qf, idf = q.reshape(b * s_q, H_Q, D_QK), idx.reshape(b * s_q, -1).contiguous()
        row = dict(b=b, s_q=s_q, ctx=32768)
        fns = [("triton_fp8", lambda: api.sparse_mla_decode(q, cache, idx, SM_SCALE, D_V, kv_format="fp8_ds_mla")),
               ("gluon_bf16", lambda: api.sparse_mla_decode(q, cache_bf16, idx, SM_SCALE, D_V))]
        fns += [(f"gluon_fp8_{tile}_{regs}", lambda tile=tile, regs=regs: run_fp8(
            qf, cache, idf, SM_SCALE, dict(TILE=tile, PRODUCER_REGS=regs))) for tile, regs in VARIANTS]
        for name, fn in fns:
            ms = graph_ms(fn)
            row[name + "_ms"], row[name + "_x"] = ms, f / ms * 1e-9 / ceiling
        rows.append(row)
        print(row, flush=True)
    results["speed"] = rows
    print_table(rows, list(rows[0].keys()))


def main():
    results = {"ceilings": measure_ceilings(), "config": CONFIG}
    print("ceilings", results["ceilings"], flush=True)
    try:
        check(results)
        speed(results)
    finally:
        print("written", write_result("probe_gluon_fp8", results))


if __name__ == "__main__":
    main()
