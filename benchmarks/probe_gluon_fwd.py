"""The Hopper Gluon sparse MLA forward (flashdsa/ops/sparse_mla/fwd_sm90.py) against the
float64 reference and against the Triton kernel, on one H200.

    python -m benchmarks.probe_gluon_fwd [--quick]

1. Exactness: adversarial indices (duplicates, -1 holes, out-of-range and negative
   values, an empty row, a half-valid row, odd topk) at h_q 64 and 128, outputs poisoned
   with NaN through the caching allocator first; each variant's ||out - ref|| / ||ref||
   beside the Triton kernel's, lse and max_logits against the reference.
2. Speed: the prefill shapes of bench_sparse_mla (s_q 4096, topk 2048, s_kv 8K and 64K,
   h_q 128 and 64), every variant and the Triton kernel, with the ceilings of this run.
Results: ``probe_gluon_fwd.json`` under $OUT (device runs) or benchmarks/results/.

The experiment here (not yet run on a GPU): ``early``, the product's attention partition
with the q.k product of block j + 1 issued right behind p @ v of block j (the tensor cores
go from one to the other without the consumers' wait, arrive and barrier between them),
the stage of block j freed once that q.k has completed (wgmma completes in order). It
issues one q.k past the last block (on a stale stage, its result unused) so that the loop
keeps one shape.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_sparse_mla import D_QK, D_V, S_Q, SM_SCALE, TOPK, flops, make_inputs
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result
from flashdsa.ops.common import LN2_C, LOG2E
from flashdsa.ops.sparse_mla import fwd_sm90 as G

if G.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                         warpgroup_mma_init, warpgroup_mma_wait)

    @gluon.jit
    def _attend_early(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                      h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                      q_nope, q_tail, k_nope, k_tail, ready, empty,
                      BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_K // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, 256, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        h_n, h_t = G._row_range(pid_h * 64, 64, num_warps)
        G._issue_rows(q_ptr + pid_t.to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, num_warps)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        G._barrier()

        m_i = gl.full([64], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([64], gl.float32, row_s)
        acc = warpgroup_mma_init(gl.zeros([64, 512], gl.float32, o_layout))
        n_blocks = gl.cdiv(topk, BLOCK_K)
        mbarrier.wait(ready.index(0), 0)
        fence_async_shared()
        s = warpgroup_mma(q_nope, k_nope.index(0).permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        s = warpgroup_mma(q_tail, k_tail.index(0).permute((1, 0)), s, is_async=True)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=col_s)
            idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
            s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
            # p @ v of block j - 1 has completed (it was issued before this q.k): its stage is free
            mbarrier.arrive(empty.index((j + NUM_STAGES - 1) % NUM_STAGES), count=1, pred=j > 0)
            valid = (idx >= 0) & (idx < n_kv)
            sv = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(sv, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(sv - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(p_op, k_nope.index(st), acc, is_async=True)
            nxt = (j + 1) % NUM_STAGES
            mbarrier.wait(ready.index(nxt), ((j + 1) // NUM_STAGES) & 1, pred=j + 1 < n_blocks)
            fence_async_shared()
            s = warpgroup_mma(q_nope, k_nope.index(nxt).permute((1, 0)),
                              gl.zeros([64, BLOCK_K], gl.float32, s_layout), use_acc=False, is_async=True)
            s = warpgroup_mma(q_tail, k_tail.index(nxt).permute((1, 0)), s, is_async=True)
        s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))

        has = l_i > 0.0
        inv = gl.convert_layout(1.0 / gl.where(has, l_i, 1.0), row_o)
        out = (acc * inv[:, None]).to(gl.bfloat16)
        heads_o = pid_h * 64 + gl.arange(0, 64, row_o)
        gl.store(out_ptr + pid_t.to(gl.int64) * stride_ot + heads_o[:, None] * stride_oh
                 + gl.arange(0, 512, col_o)[None, :], out)
        l_off = pid_t.to(gl.int64) * stride_lt + pid_h * 64 + gl.arange(0, 64, row_s)
        gl.store(lse_ptr + l_off, gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2_C, float("inf")))
        gl.store(ml_ptr + l_off, m_i * LN2_C)

    @gluon.jit
    def early_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr, n_kv, topk, h_q, qk_scale,
                     stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
                     BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
                     PRODUCER_REGS: gl.constexpr):
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope, q_tail, k_nope, k_tail, ready, empty = G._allocate(BLOCK_K, NUM_STAGES, 128)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_attend_early, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                             h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                             q_nope, q_tail, k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, num_warps)),
            (G._gather_partition, (kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty,
                                   BLOCK_K, NUM_STAGES)),
        ], [4], [PRODUCER_REGS])


def run_early(q, kv, idx, sm_scale, config=None):
    """The ``early`` variant, same contract as fwd_sm90.run_sparse_mla_fwd_sm90."""
    cfg = dict(G.SM90_GLUON, **(config or {}))
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(ml)
    early_kernel[(h_q // G.BLOCK_H * t_q, )](
        q, kv, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], maxnreg=cfg["maxnreg"])
    return out, ml, lse


def _run(v):
    """The runner of variant ``v``: the ``early`` kernel, or the product's with ``v`` as config."""
    if v.get("kernel") == "early":
        return lambda q, kv, idx, scale: run_early(q, kv, idx, scale, {k: x for k, x in v.items() if k != "kernel"})
    return lambda q, kv, idx, scale: G.run_sparse_mla_fwd_sm90(q, kv, idx, scale, v)

# configurations of the Gluon kernel to compare (keys of fwd_sm90.SM90_GLUON over its
# defaults; the empty one is the product's). The variants measured on the way to the
# product's design are in docs/benchmarks_sparse_mla.md ("Hopper: the Gluon forward").
VARIANTS = [dict(), dict(kernel="early")]


def _name(v):
    return "gluon" + "".join(f"_{k}{v[k]}" for k in sorted(v))


def adversarial(s_q, s_kv, h, topk, seed):
    """q, kv, indices with every kind of slot the kernels must take: valid rows, rows
    listed twice, -1 holes, rows >= s_kv and < -1, a row with no valid slot (query 0), a
    row whose second half is invalid (query 1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s_q, h, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 1, D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, s_kv, (s_q, 1, topk), device="cuda", dtype=torch.int32, generator=g)
    kind = torch.randint(0, 10, (s_q, 1, topk), device="cuda", generator=g)
    idx = torch.where(kind == 0, -1, idx)
    idx = torch.where(kind == 1, s_kv + torch.randint(0, 1000, idx.shape, device="cuda", generator=g).int(), idx)
    idx = torch.where(kind == 2, -2 - torch.randint(0, 1000, idx.shape, device="cuda", generator=g).int(), idx)
    idx = torch.where(kind == 3, idx.roll(1, dims=2), idx)  # duplicates of a neighbour
    idx[0] = -1
    idx[1, :, topk // 2:] = s_kv
    return q, kv, idx


def poison():
    """Fill the caching allocator's free blocks with NaN, so an output element the kernel
    does not write reads NaN."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.empty(min(free // 2, 8 << 30) // 4, device="cuda")
    x.fill_(float("nan"))
    del x


def check(variants, results):
    from flashdsa.ops.sparse_mla import run_sparse_mla_fwd
    from flashdsa.reference.sparse_mla import sparse_mla_fwd as ref_fwd

    rows = []
    for seed, (s_q, s_kv, h, topk) in enumerate([(37, 5000, 64, 2048), (29, 70000, 128, 2048), (19, 3000, 128, 1000),
                                                (23, 777, 64, 130), (16, 65536, 128, 2048)]):
        q, kv, idx = adversarial(s_q, s_kv, h, topk, seed)
        r_out, r_ml, r_lse = ref_fwd(q.double(), kv.double(), idx, SM_SCALE, D_V)
        row = dict(s_q=s_q, s_kv=s_kv, h_q=h, topk=topk)

        def err(out, ml, lse):
            fin = torch.isfinite(r_lse)
            e = dict(out=((out.double() - r_out).norm() / r_out.norm()).item(),
                     out_nan=int(torch.isnan(out).sum()),
                     lse=(lse.double() - r_lse)[fin].abs().max().item(),
                     ml=(ml.double() - r_ml)[fin].abs().max().item(),
                     empty_ok=bool((lse[~fin] == float("inf")).all() and (ml[~fin] == float("-inf")).all()
                                   and (out[0] == 0).all()))
            return e

        poison()
        row["triton"] = err(*run_sparse_mla_fwd(q, kv, idx, SM_SCALE, D_V, impl="triton"))
        for v in variants:
            poison()
            row[_name(v)] = err(*_run(v)(q, kv[:, 0], idx[:, 0], SM_SCALE))
        rows.append(row)
        print(row, flush=True)
    results["check"] = rows
    ok = all(r[_name(v)]["out_nan"] == 0 and r[_name(v)]["empty_ok"]
             and r[_name(v)]["out"] <= 2 * r["triton"]["out"] + 1e-3 for r in rows for v in variants)
    results["check_passed"] = ok
    print("check passed" if ok else "CHECK FAILED", flush=True)
    return ok


def speed(variants, results, quick):
    from flashdsa.ops.sparse_mla import run_sparse_mla_fwd

    ceiling = results["ceilings"]["bf16_matmul_tflops"]
    rows = []
    shapes = [(8192, 128)] if quick else [(8192, 128), (8192, 64), (65536, 128), (65536, 64)]
    for s_kv, h in shapes:
        q, kv, idx = make_inputs(S_Q, s_kv, h)
        f = flops(S_Q, h, TOPK)
        row = dict(s_kv=s_kv, h_q=h)
        ms = bench_ms(lambda: run_sparse_mla_fwd(q, kv, idx, SM_SCALE, D_V, impl="triton"))
        row["triton_ms"], row["triton_x"] = ms, f / ms * 1e-9 / ceiling
        kv2, idx2 = kv[:, 0], idx[:, 0]
        for v in variants:
            ms = bench_ms(lambda: _run(v)(q, kv2, idx2, SM_SCALE))
            row[_name(v) + "_ms"], row[_name(v) + "_x"] = ms, f / ms * 1e-9 / ceiling
        rows.append(row)
        print(row, flush=True)
        del q, kv, idx
    results["speed"] = rows
    print_table(rows, list(rows[0].keys()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="speed at s_kv 8K, h_q 128 only")
    args = ap.parse_args()
    results = {"ceilings": measure_ceilings(), "variants": VARIANTS}
    print("ceilings", results["ceilings"], flush=True)
    try:
        check(VARIANTS, results)
        speed(VARIANTS, results, args.quick)
    finally:
        print("written", write_result("probe_gluon_fwd", results))


if __name__ == "__main__":
    main()
