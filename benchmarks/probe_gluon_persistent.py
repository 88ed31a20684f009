"""Experiment (issue 15): the Hopper sparse MLA forward as a persistent program.

The product (flashdsa/ops/sparse_mla/fwd_sm90.py) launches one program per (query token,
64 heads); with 222 KB of shared memory one runs per SM, so at every program boundary the
SM drains: the last block's p @ v, the output stores, then the next program's q load, its
first gather (the producer starts from an empty ring) and its first q . k run with the
tensor cores idle. Prefill at s_q 4096 and h_q 128 is 62 such boundaries an SM.

Here a grid of one program per SM walks the items (token, head block) w = pid, pid + grid,
... with the same three partitions, their rings counted across items:

- the producer goes straight on to the next item's blocks, so its gathers run ahead
  across the boundary;
- the softmax warpgroup issues the next item's q copy as soon as the last q . k of the
  current item has completed (q is read by nothing else), and waits for it only at the
  next item's first q . k;
- 1 / l goes through a buffer per item parity with its own mbarrier; the value warpgroup
  reads it before freeing the item's last stage, so the softmax warpgroup cannot reach
  the item that reuses the buffer first.

bf16 rows only (the prefill and the bf16 decode).

    python -m benchmarks.probe_gluon_persistent --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_gluon_persistent           # H200: check against float64, then time

Results: ``probe_gluon_persistent.json`` under $OUT or benchmarks/results/.
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
VARIANTS = {"persistent": None}

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from flashdsa.ops.sparse_mla.fwd_sm90 import LN2_C, _barrier, _issue_rows, _load_slots, _row_range

    @gluon.jit
    def _gather_items(kv_ptr, idx_ptr, stride_it, n_kv, topk, n_items, n_hb, stride_kv, k_nope, k_tail, ready,
                      empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's gather partition over this program's items, the ring counted across them."""
        n_blocks = gl.cdiv(topk, BLOCK_K)
        g = 0
        for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
            idx_row = idx_ptr + (w // n_hb).to(gl.int64) * stride_it
            idx_n, idx_t = _load_slots(idx_row, 0, topk, BLOCK_K, 4)
            for j in range(n_blocks):
                st = g % NUM_STAGES
                mbarrier.wait(empty.index(st), ((g // NUM_STAGES) & 1) ^ 1)
                _issue_rows(kv_ptr, idx_n, idx_t, n_kv, stride_kv, k_nope.index(st), k_tail.index(st), 4)
                async_copy.mbarrier_arrive(ready.index(st), increment_count=False)
                idx_n, idx_t = _load_slots(idx_row, (j + 1) * BLOCK_K, topk, BLOCK_K, 4)
                g += 1

    @gluon.jit
    def _softmax_items(q_ptr, idx_ptr, stride_it, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, n_items, n_hb,
                       h_q, stride_qt, stride_qh, stride_lt,
                       q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                       stride_ot, stride_oh, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's softmax warpgroup over this program's items; the next item's q is
        copied once the current item's last q . k has completed."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_K, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 256, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        n_blocks = gl.cdiv(topk, BLOCK_K)
        step = gl.num_programs(0)
        w0 = gl.program_id(0)
        h_n, h_t = _row_range((w0 % n_hb) * 64, 64, 4)
        _issue_rows(q_ptr + (w0 // n_hb).to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, 4)
        async_copy.commit_group()
        g = 0
        k = 0
        for w in range(w0, n_items, step):
            pid_h = w % n_hb
            pid_t = w // n_hb
            idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
            async_copy.wait_group(0)
            fence_async_shared()
            _barrier()  # this item's q is in place
            m_i = gl.full([64], float("-inf"), gl.float32, row_s)
            l_i = gl.zeros([64], gl.float32, row_s)
            acc = gl.zeros([64, 256], gl.float32, o_layout)
            for j in range(n_blocks):
                st = g % NUM_STAGES
                kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=col_s)
                idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
                mbarrier.wait(ready.index(st), (g // NUM_STAGES) & 1)
                fence_async_shared()
                kn = k_nope.index(st)
                kt = k_tail.index(st)
                s = warpgroup_mma(q_nope, kn.permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, s_layout),
                                  use_acc=False, is_async=True)
                s = warpgroup_mma(q_tail, kt.permute((1, 0)), s, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
                if j == n_blocks - 1:
                    if w + step < n_items:  # q is free: the next item's copy goes now
                        _barrier()  # every warp's q . k has completed
                        h_n, h_t = _row_range(((w + step) % n_hb) * 64, 64, 4)
                        _issue_rows(q_ptr + ((w + step) // n_hb).to(gl.int64) * stride_qt, h_n, h_t, h_q,
                                    stride_qh, q_nope, q_tail, 4)
                        async_copy.commit_group()
                valid = (idx >= 0) & (idx < n_kv)
                s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(s, 1))
                m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m_i - m_use)
                p = gl.exp2(s - m_use[:, None])
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
                alpha_buf.index(st).store(alpha)
                kt.store(p.to(gl.bfloat16))
                fence_async_shared()
                _barrier()
                mbarrier.arrive(p_ready.index(st), count=1)
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                acc = warpgroup_mma(kt, kn.slice(0, 256, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index(st), count=1)
                g += 1
            has = l_i > 0.0
            inv = 1.0 / gl.where(has, l_i, 1.0)
            l_buf.index(k % 2).store(inv)
            _barrier()
            mbarrier.arrive(done.index(k % 2), count=1)
            out = (acc * gl.convert_layout(inv, row_o)[:, None]).to(gl.bfloat16)
            heads_o = pid_h * 64 + gl.arange(0, 64, row_o)
            o_ptrs = (out_ptr + pid_t.to(gl.int64) * stride_ot + heads_o[:, None] * stride_oh
                      + gl.arange(0, 256, col_o)[None, :])
            gl.store(o_ptrs, out)
            heads = pid_h * 64 + gl.arange(0, 64, row_s)
            l_off = pid_t.to(gl.int64) * stride_lt + heads
            lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2_C, float("inf"))
            gl.store(lse_ptr + l_off, lse)
            gl.store(ml_ptr + l_off, m_i * LN2_C)
            k += 1

    @gluon.jit
    def _value_items(out_ptr, topk, n_items, n_hb, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                     alpha_buf, l_buf, done, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The product's value warpgroup over this program's items; an item's 1 / l is read
        before its last stage is freed."""
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 256, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        n_blocks = gl.cdiv(topk, BLOCK_K)
        g = 0
        k = 0
        for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
            acc = gl.zeros([64, 256], gl.float32, o_layout)
            inv = gl.zeros([64], gl.float32, row_o)
            for j in range(n_blocks):
                st = g % NUM_STAGES
                mbarrier.wait(p_ready.index(st), (g // NUM_STAGES) & 1)
                fence_async_shared()
                acc = acc * alpha_buf.index(st).load(row_o)[:, None]
                acc = warpgroup_mma(k_tail.index(st), k_nope.index(st).slice(256, 256, dim=1), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                if j == n_blocks - 1:
                    mbarrier.wait(done.index(k % 2), (k // 2) & 1)
                    inv = l_buf.index(k % 2).load(row_o)
                mbarrier.arrive(empty.index(st), count=1)
                g += 1
            out = (acc * inv[:, None]).to(gl.bfloat16)
            heads_o = (w % n_hb) * 64 + gl.arange(0, 64, row_o)
            o_ptrs = (out_ptr + (w // n_hb).to(gl.int64) * stride_ot + heads_o[:, None] * stride_oh
                      + (256 + gl.arange(0, 256, col_o))[None, :])
            gl.store(o_ptrs, out)
            k += 1

    @gluon.jit
    def persistent_kernel(
        q_ptr, kv_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale, n_items,
        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, VALUE_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        n_hb = h_q // 64
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [64, 512],
                                           gl.NVMMASharedLayout.get_default_for([64, 512], gl.bfloat16))
        q_tail = gl.allocate_shared_memory(gl.bfloat16, [64, 64],
                                           gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16))
        k_nope = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_K, 512],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_K, 512], gl.bfloat16))
        k_tail = gl.allocate_shared_memory(gl.bfloat16, [NUM_STAGES, BLOCK_K, 64],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_K, 64], gl.bfloat16))
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        p_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=128)
            mbarrier.init(empty.index(i), count=2)
            mbarrier.init(p_ready.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(done.index(i), count=1)
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        alpha_buf = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 64], flat)
        l_buf = gl.allocate_shared_memory(gl.float32, [2, 64], flat)
        gl.warp_specialize([
            (_softmax_items, (q_ptr, idx_ptr, stride_it, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, n_items,
                              n_hb, h_q, stride_qt, stride_qh, stride_lt,
                              q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                              stride_ot, stride_oh, BLOCK_K, NUM_STAGES)),
            (_value_items, (out_ptr, topk, n_items, n_hb, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                            alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_gather_items, (kv_ptr, idx_ptr, stride_it, n_kv, topk, n_items, n_hb, stride_kv, k_nope, k_tail,
                             ready, empty, BLOCK_K, NUM_STAGES)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_variant(variant, q, kv, idx, n_sm=None):
    """(out, max_logits, lse) of one launch of ``persistent_kernel`` (one program an SM) and
    the compiled kernel."""
    cfg = F.SM90_GLUON
    t_q, h_q, _ = q.shape
    n_items = t_q * (h_q // F.BLOCK_H)
    n_sm = n_sm or torch.cuda.get_device_properties(q.device).multi_processor_count
    out = torch.empty(t_q, h_q, F.D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    k = persistent_kernel[(min(n_items, n_sm), )](
        q, kv, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, SM_SCALE * F.LOG2E, n_items,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], VALUE_REGS=cfg["VALUE_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
    return (out, ml, lse), k


def _rel_err(x, ref):
    fin = torch.isfinite(ref)
    return float((x.double() - ref)[fin].norm() / ref[fin].norm())


def adversarial(s_q, s_kv, h_q, topk, seed):
    """q, kv rows [s_kv, 576], idx with valid, repeated, -1, out-of-range and negative
    entries, an empty first row and a half-valid second row."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(s_q, h_q, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(s_kv, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, s_kv, (s_q, topk), device="cuda", generator=g, dtype=torch.int32)
    kind = torch.randint(0, 10, idx.shape, device="cuda", generator=g)
    idx = torch.where(kind == 0, -1, idx)
    idx = torch.where(kind == 1, s_kv + 3, idx)
    idx = torch.where(kind == 2, -5, idx)
    idx = torch.where(kind == 3, idx.roll(1, dims=-1), idx)
    idx[0] = -1
    idx[1, topk // 2:] = s_kv
    return q, kv, idx.contiguous()


def check(results) -> bool:
    """Every variant against the float64 reference, beside the product: out within 1.25x
    the product's error, lse and max_logits to 1e-4, the empty row right, no NaN (outputs
    of a NaN-filled allocation reused)."""
    from flashdsa.reference.sparse_mla import sparse_mla_fwd as ref_fwd
    ok = True
    # the last two give each program several items (one block each in the last)
    for s_q, s_kv, h_q, topk in ((24, 65536, 128, 2048), (24, 65536, 64, 2048), (24, 3000, 128, 1000),
                                 (9, 100, 64, 64), (400, 3000, 128, 1000), (300, 100, 64, 64)):
        q, kv, idx = adversarial(s_q, s_kv, h_q, topk, s_q + s_kv + h_q)
        r_out, r_ml, r_lse = ref_fwd(q.double(), kv.double().view(s_kv, 1, 576), idx.view(s_q, 1, topk), SM_SCALE)
        p_err = _rel_err(F.run_sparse_mla_fwd_sm90(q, kv, idx, SM_SCALE)[0], r_out)
        fin = torch.isfinite(r_lse)
        for v in VARIANTS:
            torch.empty(1 << 28, device="cuda").fill_(float("nan"))
            (out, ml, lse), _ = run_variant(v, q, kv, idx)
            err = _rel_err(out, r_out)
            lse_d = float((lse.double() - r_lse)[fin].abs().max())
            ml_d = float((ml.double() - r_ml)[fin].abs().max())
            empty_ok = bool((out[0] == 0).all() and (lse[0] == float("inf")).all() and (ml[0] == float("-inf")).all())
            good = (not torch.isnan(out).any()) and err <= 1.25 * p_err + 1e-5 and lse_d < 1e-4 and ml_d < 1e-4 \
                and empty_ok
            ok &= good
            row = dict(s_q=s_q, s_kv=s_kv, h_q=h_q, topk=topk, variant=v, out_err=err, product_err=p_err,
                       lse_diff=lse_d, ml_diff=ml_d, empty_row=empty_ok, ok=good)
            results.append(row)
            print(row, flush=True)
    return ok


def cases(device="cuda", small=False):
    """(name, q, (rows, ), idx, flop): the issue's prefill shapes and the bf16 decode."""
    from benchmarks.bench_sparse_mla import make_inputs
    from benchmarks.bench_sparse_mla_decode import make_problem

    s_q = 64 if small else 4096
    for s_kv, h in ((8192, 128), (65536, 128), (8192, 64), (65536, 64)):
        q, kv, idx = make_inputs(s_q, min(s_kv, 4096) if small else s_kv, h, device=device)
        yield f"prefill {s_kv // 1024}K h{h}", q, (kv.view(kv.shape[0], 576), ), idx[:, 0], 2 * s_q * h * 2048 * 1088
    b = 4 if small else 128
    q, cache, slots = make_problem(b, 4096 if small else 32768, 2, device=device)
    q, idx, rows = q.flatten(0, 1), slots.flatten(0, 1).contiguous(), cache.reshape(-1, 576)
    flop = 2 * q.shape[0] * q.shape[1] * 2048 * 1088
    yield f"decode bf16 b{b} s_q2", q, (rows, ), idx, flop


def speed(results, ceil):
    for name, q, views, idx, flop in cases():
        row = dict(case=name)
        runs = [("product", lambda: F.run_sparse_mla_fwd_sm90(q, views[0], idx, SM_SCALE))]
        runs += [(v, lambda v=v: run_variant(v, q, views[0], idx)) for v in VARIANTS]
        for label, fn in runs:
            ms = bench_ms(fn)
            row[f"{label}_ms"] = round(ms, 4)
            row[f"{label}_x_bf16"] = round(flop / ms / 1e9 / ceil["bf16_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers and spills of every variant, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        picked = [c for c in cases("cpu", small=True) if c[0].startswith(("prefill 8K h128", "decode"))]
        labels = []
        with capture_launches() as launches:
            for name, q, views, idx, _ in picked:
                for v in VARIANTS:
                    run_variant(v, q, views[0], idx, n_sm=132)
                    labels.append((name, v))
    for (name, v), row in zip(labels, build_launches(launches, keep_going=True)):
        row.pop("loop", None)
        print(dict(case=name, variant=v, **row), flush=True)


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
    print("checks pass:", ok, flush=True)
    ceil = measure_ceilings()
    results["ceilings"] = ceil
    results["speed"] = []
    speed(results["speed"], ceil)
    print_table(results["speed"], ["case"] + [k for k in results["speed"][0] if k.endswith("_ms")])
    print("wrote", write_result("probe_gluon_persistent", results))


if __name__ == "__main__":
    main()
