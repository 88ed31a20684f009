"""Experiment (issue 17): the indexer logits in Gluon on sm_90, after the product's Gluon filter.

Nsight Compute (benchmarks/ncu_indexer.py, H200 2026-12-04 10:06 UTC) has the Triton
logits kernel (flashdsa/ops/indexer/scores.py, SCORES_STORE) at 127 registers a thread:
two programs of 8 warps an SM, 1.26 eligible warps a scheduler, the tensor pipe busy
49.9% of the cycles. Each program waits on its key tile's MMA before that tile's epilogue
(ReLU, weights, head sum, scale, store), and two programs an SM do not hide the wait.

Here the logits take the structure of the product's Gluon filter
(flashdsa/ops/indexer/filter_sm90.py): one warpgroup a program of 4 query rows, an
m64n64 wgmma a row (64 keys x its 64 heads), the next row's MMA in flight during a row's
epilogue, the epilogue in the accumulator's layout. Its epilogue stores the row's 64
scores (-inf outside the row's range) where the filter compares and appends; tiles of
the split outside every row's range get -inf, as in the Triton kernel.

    python -m benchmarks.probe_gluon_logits --build   # CPU: registers, spills and main loop for sm_90
    python -m benchmarks.probe_gluon_logits           # H200: check against the Triton kernel, then time

The check compares the scores with the product's logits (the same products summed in
another order: the largest difference within 1e-5 of the largest score; the -inf entries
exactly) at odd sizes, on ragged and empty ranges and at bench_indexer's 4096 x 32K. The
timing: both kernels at 4096 queries x 8K, 16K, 32K, 128K (the Gluon kernel with 3 and 4
key tiles in flight), against the fp8 matmul ceiling of the same run.
Results: ``probe_gluon_logits.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.indexer import filter_sm90 as F  # noqa: E402
from flashdsa.ops.indexer import scores as Sc  # noqa: E402

STAGE_VARIANTS = (3, 4)   # key tiles in flight (the product's filter: 3)

if F.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    from flashdsa.ops.sparse_mla.fwd_sm90 import _async_load, _barrier

    _BN = F._BN

    @gluon.jit
    def _row(pid_q, j, S, ks_ptr, ke_ptr, w_ptr, stride_ws, out_ptr, stride_os):
        """Query row j of the program: (valid, ks, ke, w [64], its output row)."""
        r = pid_q * 4 + j
        ok = r < S
        ks = gl.load(ks_ptr + r, mask=ok, other=0)
        ke = gl.load(ke_ptr + r, mask=ok, other=0)
        heads = gl.arange(0, 64, layout=F.HEAD_L)
        w = gl.load(w_ptr + r.to(gl.int64) * stride_ws + heads, mask=(heads < 64) & ok, other=0.0)
        return ok, ks, ke, w, out_ptr + r.to(gl.int64) * stride_os

    @gluon.jit
    def _store(acc, w, kscale, offs, n_end, ok, ks, ke, out_row):
        """One row's epilogue of a tile: the weighted ReLU head sum times the keys' scales,
        -inf outside the row's [ks, ke), stored for the keys of the split."""
        s = gl.sum(gl.maximum(acc, 0.0) * w[None, :], axis=1) * kscale
        s = gl.where((offs >= ks) & (offs < ke), s, float("-inf"))
        gl.store(out_row + offs, s, mask=ok & (offs < n_end))

    @gluon.jit
    def _fill(out_row, ok, a, b):
        """-inf into keys [a, b) of one row, a tile at a time."""
        for n0 in range(a, b, _BN):
            offs = n0 + gl.arange(0, _BN, layout=F.KEY_L)
            gl.store(out_row + offs, gl.full([_BN], float("-inf"), gl.float32, F.KEY_L), mask=ok & (offs < b))

    @gluon.jit
    def indexer_logits_sm90_kernel(q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr, S, S_kv, split_len,
                                   stride_qs, stride_qh, stride_k, stride_ws, stride_os,
                                   STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Grid (query blocks of 4 rows, key splits of ``split_len``), one warpgroup a
        program, the latest rows first. Writes out [S, S_kv] fp32 for its rows and split."""
        gl.static_assert(num_warps == 4, "one warpgroup: the m64 wgmma")
        pid_q = gl.num_programs(0) - 1 - gl.program_id(0)
        pid_s = gl.program_id(1)
        n_start = pid_s * split_len
        n_end = gl.minimum(n_start + split_len, S_kv)
        smem_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
        q_smem = gl.allocate_shared_memory(gl.float8e4nv, [4, 64, 128], smem_l)
        k_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, _BN, 128], smem_l)

        h = gl.arange(0, 64, layout=gl.SliceLayout(1, F.LD_L))
        d = gl.arange(0, 128, layout=gl.SliceLayout(0, F.LD_L))
        for j in gl.static_range(4):
            r = pid_q * 4 + j
            _async_load(q_smem.index(j), q_ptr + r.to(gl.int64) * stride_qs + h[:, None] * stride_qh + d[None, :],
                        mask=(r < S) & (h < 64)[:, None])
        async_copy.commit_group()

        ok0, ks0, ke0, w0, o0 = _row(pid_q, 0, S, ks_ptr, ke_ptr, w_ptr, stride_ws, out_ptr, stride_os)
        ok1, ks1, ke1, w1, o1 = _row(pid_q, 1, S, ks_ptr, ke_ptr, w_ptr, stride_ws, out_ptr, stride_os)
        ok2, ks2, ke2, w2, o2 = _row(pid_q, 2, S, ks_ptr, ke_ptr, w_ptr, stride_ws, out_ptr, stride_os)
        ok3, ks3, ke3, w3, o3 = _row(pid_q, 3, S, ks_ptr, ke_ptr, w_ptr, stride_ws, out_ptr, stride_os)
        big = 2147483647
        lo = gl.minimum(gl.minimum(gl.where(ok0 & (ke0 > ks0), ks0, big), gl.where(ok1 & (ke1 > ks1), ks1, big)),
                        gl.minimum(gl.where(ok2 & (ke2 > ks2), ks2, big), gl.where(ok3 & (ke3 > ks3), ks3, big)))
        hi = gl.maximum(gl.maximum(gl.where(ok0 & (ke0 > ks0), ke0, 0), gl.where(ok1 & (ke1 > ks1), ke1, 0)),
                        gl.maximum(gl.where(ok2 & (ke2 > ks2), ke2, 0), gl.where(ok3 & (ke3 > ks3), ke3, 0)))
        lo = (gl.maximum(lo, n_start) // _BN) * _BN
        hi = gl.minimum(hi, n_end)
        if hi <= lo:   # no row's range meets this split: all of it is -inf
            lo = n_end
            hi = n_end
        n_tiles = gl.maximum(gl.cdiv(hi - lo, _BN), 0)

        for t in gl.static_range(STAGES - 1):
            F._issue_keys(k_ptr, stride_k, lo + t * _BN, hi, k_smem.index(t))
            async_copy.commit_group()
        for i in range(n_tiles):
            st = i % STAGES
            offs = lo + i * _BN + gl.arange(0, _BN, layout=F.KEY_L)
            kscale = gl.load(ksc_ptr + offs, mask=offs < hi, other=0.0)
            async_copy.wait_group(STAGES - 2)
            _barrier()
            fence_async_shared()
            nxt = i + STAGES - 1
            F._issue_keys(k_ptr, stride_k, lo + nxt * _BN, hi, k_smem.index(nxt % STAGES))
            async_copy.commit_group()
            kt = k_smem.index(st)
            zero = gl.zeros([_BN, 64], gl.float32, F.ACC_L)
            a0 = warpgroup_mma(kt, q_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
            a1 = warpgroup_mma(kt, q_smem.index(1).permute((1, 0)), zero, use_acc=False, is_async=True)
            a0 = warpgroup_mma_wait(num_outstanding=1, deps=(a0, ))
            _store(a0, w0, kscale, offs, n_end, ok0, ks0, ke0, o0)
            a2 = warpgroup_mma(kt, q_smem.index(2).permute((1, 0)), zero, use_acc=False, is_async=True)
            a1 = warpgroup_mma_wait(num_outstanding=1, deps=(a1, ))
            _store(a1, w1, kscale, offs, n_end, ok1, ks1, ke1, o1)
            a3 = warpgroup_mma(kt, q_smem.index(3).permute((1, 0)), zero, use_acc=False, is_async=True)
            a2 = warpgroup_mma_wait(num_outstanding=1, deps=(a2, ))
            _store(a2, w2, kscale, offs, n_end, ok2, ks2, ke2, o2)
            a3 = warpgroup_mma_wait(num_outstanding=0, deps=(a3, ))
            _store(a3, w3, kscale, offs, n_end, ok3, ks3, ke3, o3)
        async_copy.wait_group(0)
        # the rest of this split lies outside every row's range
        hi_t = gl.minimum(gl.cdiv(hi, _BN) * _BN, n_end)
        _fill(o0, ok0, n_start, lo)
        _fill(o1, ok1, n_start, lo)
        _fill(o2, ok2, n_start, lo)
        _fill(o3, ok3, n_start, lo)
        _fill(o0, ok0, hi_t, n_end)
        _fill(o1, ok1, hi_t, n_end)
        _fill(o2, ok2, hi_t, n_end)
        _fill(o3, ok3, hi_t, n_end)


def gluon_logits(q8, k8, k_scale, w, ks, ke, n_split=None, stages=F.STAGES):
    """[S, S_kv] fp32 scores as ``flashdsa.ops.indexer.indexer_logits``, by the Gluon kernel
    (e4m3 q8 [S, 64, 128] and k8 [S_kv, 128], contiguous last dimensions) with ``stages``
    key tiles in flight."""
    s, s_kv = q8.shape[0], k8.shape[0]
    out = torch.empty(s, s_kv, dtype=torch.float32, device=q8.device)
    if s == 0 or s_kv == 0:
        return out
    p = Sc.ragged_problem(q8, k8, k_scale, w, ks, ke)
    n_split, split_len = Sc.choose_split(p.n_prog(), s_kv, F.BLOCK_N, q8.device, 4 * F.BLOCK_N, n_split)
    indexer_logits_sm90_kernel[(p.n_prog(), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, out, s, s_kv, split_len,
        p.q.stride(0), p.q.stride(1), p.k.stride(0), p.w.stride(0), out.stride(0), STAGES=stages, num_warps=4)
    return out


def inputs(s_q, s_kv, seed, ranges="causal", device="cuda"):
    """e4m3 queries and keys; ``ranges`` "causal" (the last s_q tokens of a sequence of
    s_kv) or "ragged" (random ranges, some empty)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q8 = torch.randn(s_q, 64, 128, device=device, generator=g).to(torch.float8_e4m3fn)
    k8 = torch.randn(s_kv, 128, device=device, generator=g).to(torch.float8_e4m3fn)
    ksc = torch.rand(s_kv, device=device, generator=g) + 0.5
    w = torch.randn(s_q, 64, device=device, generator=g)
    if ranges == "causal":
        ke = torch.arange(s_kv - s_q + 1, s_kv + 1, device=device, dtype=torch.int32).clamp(min=0)
        ks = torch.zeros_like(ke)
    else:
        a = torch.randint(0, s_kv, (2, s_q), device=device, generator=g, dtype=torch.int32)
        ks, ke = a.min(0).values, a.max(0).values
        ke[::7] = ks[::7]   # empty rows
    return q8, k8, ksc, w, ks, ke


def check(results) -> bool:
    ok = True
    for s_q, s_kv, ranges in ((333, 9001, "ragged"), (70, 130, "ragged"), (1000, 20000, "causal"),
                              (4096, 32768, "causal")):
        inp = inputs(s_q, s_kv, s_q + s_kv, ranges)
        want = Sc.indexer_logits(*inp)
        got = gluon_logits(*inp)
        for st in STAGE_VARIANTS:   # every variant timed below gives the same scores
            assert torch.equal(gluon_logits(*inp, stages=st), got), st
        fin = torch.isfinite(want)
        same_inf = bool(torch.equal(fin, torch.isfinite(got)))
        # the head sums' order differs: the largest difference against the largest score
        err = float((got - want)[fin].abs().max() / want[fin].abs().max()) if fin.any() else 0.0
        row = dict(s_q=s_q, s_kv=s_kv, ranges=ranges, same_inf=same_inf, max_rel_diff=err)
        row["ok"] = same_inf and err < 1e-5
        ok &= row["ok"]
        results.append(row)
        print(row, flush=True)
    return ok


def speed(results, ceil):
    for s_kv in (8192, 16384, 32768, 131072):
        inp = inputs(4096, s_kv, 0)
        tflop = 2 * int((inp[5] - inp[4]).clamp(min=0).sum()) * 64 * 128 / 1e12
        row = {"s_kv": s_kv}
        runs = [("triton", lambda: Sc.indexer_logits(*inp))]
        runs += [(f"gluon_{st}stages", lambda st=st: gluon_logits(*inp, stages=st)) for st in STAGE_VARIANTS]
        for name, fn in runs:
            ms = bench_ms(fn)
            row[f"{name}_ms"] = ms
            row[f"{name}_x_fp8"] = round(tflop / ms * 1e3 / ceil["fp8_matmul_tflops"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """The kernel's registers, spills and main loop, built for sm_90 (no GPU needed)."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import capture_launches, dispatch_as

    with dispatch_as(90):
        inp = inputs(64, 32768, 0, device="cpu")
        with capture_launches() as launches:
            for st in STAGE_VARIANTS:
                gluon_logits(*inp, stages=st)
    for st, row in zip(STAGE_VARIANTS, build_launches(launches)):
        print(dict(stages=st, **row), flush=True)


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
        print_table(results["speed"], list(results["speed"][0].keys()))
    print("wrote", write_result("probe_gluon_logits", results))


if __name__ == "__main__":
    main()
