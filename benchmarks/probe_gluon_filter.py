"""Experiment (issue 17): the threshold top-k's filter pass in Gluon, against the product's
Triton filter (flashdsa/ops/indexer/scores.py, MODE SCORES_SLOTS) and the logits kernel.

    python -m benchmarks.probe_gluon_filter            # H200: check, then time (4096 queries x 8K-128K)
    python -m benchmarks.probe_gluon_filter --build    # CPU: compile for sm_90, registers and main loop

The Triton filter's main loop has 8 barriers a key tile against the logits kernel's 2
(``python -m benchmarks.sm90_build``): Triton's coalescing pass gives its two stores a
layout of their own, and four tensors of the epilogue (slot counts, score keys, store
mask, index pointers) cross into it through shared memory every tile. Here the epilogue
stays in the layout of the wgmma accumulator: each of the program's 4 query rows gets an
m64n64 wgmma of its own (its 64 heads), the head sum of a row is a reduction along the
accumulator's columns, and the slot counts, keys, masks and stores of that row live in the
accumulator's row slice (one key a row of the MMA), which a store takes as it is.
Everything else is the product's filter: 64-key tiles, the ragged rows' ranges, the
per-(row, split, column) slots of SC entries and their counts, the keys' index = position.

The check runs the product's threshold top-k with this filter in place of its own
(the sample, the select and the fallback unchanged) and compares the selected sets and
the filter's slot counts with the product's. Ragged (prefill) rows with 64 heads of 128
e4m3 values only: the others keep the product's filter.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from unittest import mock

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.indexer import scores as Sc  # noqa: E402
from flashdsa.ops.indexer import threshold as Th  # noqa: E402
from flashdsa.ops.sparse_mla.fwd_sm90 import GLUON_AVAILABLE  # noqa: E402

if GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                         warpgroup_mma_wait)

    from flashdsa.ops.sparse_mla.fwd_sm90 import _async_load, _barrier

TOPK = 2048
BLOCK_N = triton.language.constexpr(64)      # keys a tile: the wgmma's M
NUM_STAGES = triton.language.constexpr(3)    # key tiles in flight (8 KB each)

if GLUON_AVAILABLE:
    ACC_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32]))
    KEY_L = gl.constexpr(gl.SliceLayout(1, ACC_L.value))    # [BLOCK_N]: one key a row of the MMA
    HEAD_L = gl.constexpr(gl.SliceLayout(0, ACC_L.value))   # [64]: the heads
    LD_L = gl.constexpr(gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0]))   # [rows, 128] e4m3: 16 B a thread

    @gluon.jit
    def _issue_keys(k_ptr, stride_k, n0, hi, dst):
        """cp.async of key rows [n0, n0 + BLOCK_N) (those < hi; zeros past it) into ``dst``."""
        offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD_L))
        d = gl.arange(0, 128, layout=gl.SliceLayout(0, LD_L))
        _async_load(dst, k_ptr + offs.to(gl.int64)[:, None] * stride_k + d[None, :], mask=(offs < hi)[:, None])

    @gluon.jit
    def _row(pid_q, j, S, ks_ptr, ke_ptr, thr_ptr, w_ptr, stride_ws, n_split, pid_s):
        """Query row j of the program: (valid, ks, ke, thr, its first slot, w [64])."""
        r = pid_q * 4 + j
        ok = r < S
        ks = gl.load(ks_ptr + r, mask=ok, other=0)
        ke = gl.load(ke_ptr + r, mask=ok, other=0)
        thr = gl.load(thr_ptr + r, mask=ok, other=0)
        heads = gl.arange(0, 64, layout=HEAD_L)
        w = gl.load(w_ptr + r.to(gl.int64) * stride_ws + heads, mask=(heads < 64) & ok, other=0.0)
        sbase = (r.to(gl.int64) * n_split + pid_s) * BLOCK_N
        return ok, ks, ke, thr, sbase, w

    @gluon.jit
    def _keep(acc, w, kscale, offs, hi, ok, ks, ke, thr, sbase, cnt, SC, bkey_ptr, bidx_ptr):
        """One row's epilogue of a tile: the weighted ReLU head sum, its score keys, the kept
        ones into the row's slots; returns the updated counts."""
        s = gl.sum(gl.maximum(acc, 0.0) * w[None, :], axis=1) * kscale
        b = s.to(gl.int32, bitcast=True)
        key = gl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        keep = (offs >= ks) & (offs < ke) & (offs < hi) & ok & (key >= thr)
        col = gl.arange(0, BLOCK_N, layout=KEY_L)
        ptr = (sbase + col) * SC + cnt
        store = keep & (cnt < SC)
        gl.store(bkey_ptr + ptr, key, mask=store)
        gl.store(bidx_ptr + ptr, offs, mask=store)
        return cnt + keep.to(gl.int32)

    @gluon.jit
    def gluon_filter_kernel(q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, thr_ptr, bkey_ptr, bidx_ptr, cnt_ptr,
                            S, S_kv, split_len, n_split, SC, stride_qs, stride_qh, stride_k, stride_ws,
                            OVERLAP: gl.constexpr, num_warps: gl.constexpr):
        """Grid (query blocks of 4 rows, key splits of ``split_len``), one warpgroup; the
        latest rows first (their ranges are the longest). OVERLAP: see VARIANTS."""
        gl.static_assert(num_warps == 4, "one warpgroup: the m64 wgmma")
        pid_q = gl.num_programs(0) - 1 - gl.program_id(0)
        pid_s = gl.program_id(1)
        n_start = pid_s * split_len
        n_end = gl.minimum(n_start + split_len, S_kv)
        smem_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
        q_smem = gl.allocate_shared_memory(gl.float8e4nv, [4, 64, 128], smem_l)
        k_smem = gl.allocate_shared_memory(gl.float8e4nv, [NUM_STAGES, BLOCK_N, 128], smem_l)

        # the 4 rows' q [64 heads, 128] into shared memory
        h = gl.arange(0, 64, layout=gl.SliceLayout(1, LD_L))
        d = gl.arange(0, 128, layout=gl.SliceLayout(0, LD_L))
        for j in gl.static_range(4):
            r = pid_q * 4 + j
            _async_load(q_smem.index(j), q_ptr + r.to(gl.int64) * stride_qs + h[:, None] * stride_qh + d[None, :],
                        mask=(r < S) & (h < 64)[:, None])
        async_copy.commit_group()

        ok0, ks0, ke0, thr0, sb0, w0 = _row(pid_q, 0, S, ks_ptr, ke_ptr, thr_ptr, w_ptr, stride_ws, n_split, pid_s)
        ok1, ks1, ke1, thr1, sb1, w1 = _row(pid_q, 1, S, ks_ptr, ke_ptr, thr_ptr, w_ptr, stride_ws, n_split, pid_s)
        ok2, ks2, ke2, thr2, sb2, w2 = _row(pid_q, 2, S, ks_ptr, ke_ptr, thr_ptr, w_ptr, stride_ws, n_split, pid_s)
        ok3, ks3, ke3, thr3, sb3, w3 = _row(pid_q, 3, S, ks_ptr, ke_ptr, thr_ptr, w_ptr, stride_ws, n_split, pid_s)
        # the tiles of this split that meet some row's range (the product's block_range)
        big = 2147483647
        lo = gl.minimum(gl.minimum(gl.where(ok0 & (ke0 > ks0), ks0, big), gl.where(ok1 & (ke1 > ks1), ks1, big)),
                        gl.minimum(gl.where(ok2 & (ke2 > ks2), ks2, big), gl.where(ok3 & (ke3 > ks3), ks3, big)))
        hi = gl.maximum(gl.maximum(gl.where(ok0 & (ke0 > ks0), ke0, 0), gl.where(ok1 & (ke1 > ks1), ke1, 0)),
                        gl.maximum(gl.where(ok2 & (ke2 > ks2), ke2, 0), gl.where(ok3 & (ke3 > ks3), ke3, 0)))
        lo = (gl.maximum(lo, n_start) // BLOCK_N) * BLOCK_N
        hi = gl.minimum(hi, n_end)
        n_tiles = gl.maximum(gl.cdiv(hi - lo, BLOCK_N), 0)

        for t in gl.static_range(NUM_STAGES - 1):
            _issue_keys(k_ptr, stride_k, lo + t * BLOCK_N, hi, k_smem.index(t))   # past the last tile: nothing
            async_copy.commit_group()
        cnt0 = gl.zeros([BLOCK_N], gl.int32, KEY_L)
        cnt1 = gl.zeros([BLOCK_N], gl.int32, KEY_L)
        cnt2 = gl.zeros([BLOCK_N], gl.int32, KEY_L)
        cnt3 = gl.zeros([BLOCK_N], gl.int32, KEY_L)
        for i in range(n_tiles):
            st = i % NUM_STAGES
            n0 = lo + i * BLOCK_N
            offs = n0 + gl.arange(0, BLOCK_N, layout=KEY_L)
            kscale = gl.load(ksc_ptr + offs, mask=offs < hi, other=0.0)
            async_copy.wait_group(NUM_STAGES - 2)   # tile i (and q) landed; later tiles may still fly
            _barrier()                               # every thread's copies; everyone done with tile i - 1
            fence_async_shared()                     # read next by wgmma (the async proxy)
            nxt = i + NUM_STAGES - 1
            _issue_keys(k_ptr, stride_k, lo + nxt * BLOCK_N, hi, k_smem.index(nxt % NUM_STAGES))
            async_copy.commit_group()
            kt = k_smem.index(st)
            zero = gl.zeros([BLOCK_N, 64], gl.float32, ACC_L)
            if OVERLAP:
                # two rows' MMAs in flight at a time: the next row's runs during this row's epilogue
                a0 = warpgroup_mma(kt, q_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
                a1 = warpgroup_mma(kt, q_smem.index(1).permute((1, 0)), zero, use_acc=False, is_async=True)
                a0 = warpgroup_mma_wait(num_outstanding=1, deps=(a0, ))
                cnt0 = _keep(a0, w0, kscale, offs, hi, ok0, ks0, ke0, thr0, sb0, cnt0, SC, bkey_ptr, bidx_ptr)
                a2 = warpgroup_mma(kt, q_smem.index(2).permute((1, 0)), zero, use_acc=False, is_async=True)
                a1 = warpgroup_mma_wait(num_outstanding=1, deps=(a1, ))
                cnt1 = _keep(a1, w1, kscale, offs, hi, ok1, ks1, ke1, thr1, sb1, cnt1, SC, bkey_ptr, bidx_ptr)
                a3 = warpgroup_mma(kt, q_smem.index(3).permute((1, 0)), zero, use_acc=False, is_async=True)
                a2 = warpgroup_mma_wait(num_outstanding=1, deps=(a2, ))
                cnt2 = _keep(a2, w2, kscale, offs, hi, ok2, ks2, ke2, thr2, sb2, cnt2, SC, bkey_ptr, bidx_ptr)
                a3 = warpgroup_mma_wait(num_outstanding=0, deps=(a3, ))
                cnt3 = _keep(a3, w3, kscale, offs, hi, ok3, ks3, ke3, thr3, sb3, cnt3, SC, bkey_ptr, bidx_ptr)
            else:
                # the 4 rows' MMAs, then the 4 epilogues
                a0 = warpgroup_mma(kt, q_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
                a1 = warpgroup_mma(kt, q_smem.index(1).permute((1, 0)), zero, use_acc=False, is_async=True)
                a2 = warpgroup_mma(kt, q_smem.index(2).permute((1, 0)), zero, use_acc=False, is_async=True)
                a3 = warpgroup_mma(kt, q_smem.index(3).permute((1, 0)), zero, use_acc=False, is_async=True)
                a0, a1, a2, a3 = warpgroup_mma_wait(num_outstanding=0, deps=(a0, a1, a2, a3))
                cnt0 = _keep(a0, w0, kscale, offs, hi, ok0, ks0, ke0, thr0, sb0, cnt0, SC, bkey_ptr, bidx_ptr)
                cnt1 = _keep(a1, w1, kscale, offs, hi, ok1, ks1, ke1, thr1, sb1, cnt1, SC, bkey_ptr, bidx_ptr)
                cnt2 = _keep(a2, w2, kscale, offs, hi, ok2, ks2, ke2, thr2, sb2, cnt2, SC, bkey_ptr, bidx_ptr)
                cnt3 = _keep(a3, w3, kscale, offs, hi, ok3, ks3, ke3, thr3, sb3, cnt3, SC, bkey_ptr, bidx_ptr)
        async_copy.wait_group(0)
        col = gl.arange(0, BLOCK_N, layout=KEY_L)
        gl.store(cnt_ptr + sb0 + col, cnt0, mask=ok0 & (col < BLOCK_N))
        gl.store(cnt_ptr + sb1 + col, cnt1, mask=ok1 & (col < BLOCK_N))
        gl.store(cnt_ptr + sb2 + col, cnt2, mask=ok2 & (col < BLOCK_N))
        gl.store(cnt_ptr + sb3 + col, cnt3, mask=ok3 & (col < BLOCK_N))


def serves(p) -> bool:
    """Whether the Gluon filter takes problem ``p``: ragged rows, 64 heads of 128 e4m3 values,
    the sm90 blocks (64 keys, 4 rows a program)."""
    return (not p.paged and p.q.dtype == torch.float8_e4m3fn and tuple(p.q.shape[1:]) == (64, 128)
            and p.cfg["BLOCK_N"] == BLOCK_N.value and p.cfg["BLOCK_Q"] == 4)


def launch_filter(p, mode, split, pos_stride=1, out=None, thr=None, bkey=None, bidx=None, cnt=None, sc=0,
                  overlap=True):
    """flashdsa.ops.indexer.scores.launch_scores with the Gluon filter for the slots mode of
    the problems it serves (:func:`serves`), the product's kernel for everything else."""
    if mode != Sc.SCORES_SLOTS or pos_stride != 1 or not serves(p):
        return Sc.launch_scores(p, mode, split, pos_stride, out, thr, bkey, bidx, cnt, sc)
    n_split, split_len = split
    gluon_filter_kernel[(p.n_prog(), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, thr, bkey, bidx, cnt, p.rows, p.n_pos, split_len, n_split, sc,
        p.q.stride(0), p.q.stride(1), p.k.stride(0), p.w.stride(0), OVERLAP=overlap, num_warps=4)


# The Gluon variants compared: "gluon": two rows' MMAs in flight, the next row's running
# during a row's epilogue (2 accumulators live; 224 registers, no spills on Triton 3.6);
# "gluon_all4": the 4 rows' MMAs, then the 4 epilogues (4 accumulators live; 255
# registers and 56 bytes of spills on 3.6).
VARIANTS = {"gluon": launch_filter, "gluon_all4": partial(launch_filter, overlap=False)}


def prefill_problem(s_q: int, s_kv: int, seed: int):
    """The last s_q tokens of a causal sequence of s_kv (bench_indexer's prefill shape),
    random e4m3 inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q8 = torch.randn(s_q, 64, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k8 = torch.randn(s_kv, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    ksc = torch.rand(s_kv, device="cuda", generator=g) + 0.5
    w = torch.randn(s_q, 64, device="cuda", generator=g)
    ke = torch.arange(s_kv - s_q + 1, s_kv + 1, device="cuda", dtype=torch.int32)
    ks = torch.zeros_like(ke)
    return (q8, k8, ksc, w, ks, ke), Sc.ragged_problem(q8, k8, ksc, w, ks, ke)


def filter_buffers(p):
    """The product's filter inputs and buffers for ``p`` (threshold_topk's slots mode)."""
    bn = p.cfg["BLOCK_N"]
    split = Sc.choose_split(p.n_prog(), p.n_pos, bn, p.q.device, 4 * bn)
    cap = Th.candidate_capacity(TOPK, p.n_pos, True)
    sc = triton.cdiv(cap, split[0] * bn) + 16
    thr = Th.sample_thresholds(p, TOPK)
    n = p.rows * split[0] * bn
    return split, sc, thr, n


def _slots(launch, p, split, sc, thr, n):
    """(counts [n], keys [n, sc], indices [n, sc]) of one filter ``launch`` on ``p``, into
    buffers poisoned beforehand (-7 counts, -1 indices)."""
    cnt = torch.full((n, ), -7, dtype=torch.int32, device="cuda")
    bkey = torch.zeros(n * sc, dtype=torch.int32, device="cuda")
    bidx = torch.full((n * sc, ), -1, dtype=torch.int32, device="cuda")
    launch(p, Sc.SCORES_SLOTS, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)
    return cnt, bkey.view(n, sc), bidx.view(n, sc)


def check(results) -> bool:
    """Each variant against the product's filter (slot counts, entries) and the product's
    threshold top-k run with it (selected sets), at odd sizes and bench_indexer's 4096 x 32K."""
    rows = []
    for seed, (s_q, s_kv) in enumerate([(4096, 32768), (333, 9000), (1000, 20000), (7, 5000)]):
        _, p = prefill_problem(s_q, s_kv, seed)
        split, sc, thr, n = filter_buffers(p)
        c0, k0, i0 = _slots(Sc.launch_scores, p, split, sc, thr, n)
        filled = torch.arange(sc, device="cuda")[None, :] < c0.clamp(max=sc)[:, None]
        want = Th.select_topk(p, TOPK, 4 * p.cfg["BLOCK_N"], method="threshold")
        row = dict(s_q=s_q, s_kv=s_kv, n_split=split[0])
        for name, launch in VARIANTS.items():
            c1, k1, i1 = _slots(launch, p, split, sc, thr, n)
            both = filled & (c0 == c1)[:, None]   # entries of slots that kept as many in both
            with mock.patch.object(Th, "launch_scores", launch):
                have = Th.select_topk(p, TOPK, 4 * p.cfg["BLOCK_N"], method="threshold")
            same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(want.cpu(), have.cpu())]
            row[name] = dict(slots_same_count=float((c0 == c1).float().mean()),
                             entries_same=float(((k0 == k1) & (i0 == i1))[both].float().mean()) if both.any() else 1.0,
                             max_key_diff=int((k0 - k1)[both].abs().max()) if both.any() else 0,
                             topk_rows_same=sum(same) / len(same))
        rows.append(row)
        print(row, flush=True)
    results["check"] = rows
    ok = all(r[n]["slots_same_count"] > 0.999 and r[n]["topk_rows_same"] > 0.999 for r in rows for n in VARIANTS)
    results["check_passed"] = ok
    print("check passed" if ok else "CHECK FAILED", flush=True)
    return ok


def speed(results):
    """Milliseconds at 4096 queries x 8K / 32K / 128K: the logits, each filter alone, and the
    threshold top-k with each filter."""
    rows = []
    for s_kv in (8192, 32768, 131072):
        (q8, k8, ksc, w, ks, ke), p = prefill_problem(4096, s_kv, 0)
        split, sc, thr, n = filter_buffers(p)
        cnt = torch.empty(n, dtype=torch.int32, device="cuda")
        bkey = torch.empty(n * sc, dtype=torch.int32, device="cuda")
        bidx = torch.empty(n * sc, dtype=torch.int32, device="cuda")
        row = dict(s_kv=s_kv, logits_ms=bench_ms(lambda: Sc.indexer_logits(q8, k8, ksc, w, ks, ke)))
        for name, launch in {"triton": Sc.launch_scores, **VARIANTS}.items():
            row[f"filter_{name}_ms"] = bench_ms(lambda launch=launch: launch(
                p, Sc.SCORES_SLOTS, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc))
            with mock.patch.object(Th, "launch_scores", launch):
                row[f"topk_{name}_ms"] = t = bench_ms(lambda: Th.select_topk(
                    p, TOPK, 4 * p.cfg["BLOCK_N"], method="threshold", mode=Sc.SCORES_SLOTS))
            row[f"topk_{name}_over_logits"] = t / row["logits_ms"]
        rows.append(row)
        print(row, flush=True)
        del q8, k8, p, bkey, bidx, cnt
    results["speed"] = rows
    print_table(rows, list(rows[0].keys()))


def build_report():
    """Compile the Gluon filter for sm_90 here (no GPU): registers, spills, its main loop."""
    from benchmarks.sm90_build import build, capture_launches, dispatch_as

    g = torch.Generator().manual_seed(0)
    with dispatch_as(90):
        q8 = torch.randn(64, 64, 128, generator=g).to(torch.float8_e4m3fn)
        k8 = torch.randn(32768, 128, generator=g).to(torch.float8_e4m3fn)
        ke = torch.arange(32768 - 63, 32769, dtype=torch.int32)
        p = Sc.ragged_problem(q8, k8, torch.rand(32768, generator=g), torch.randn(64, 64, generator=g),
                              torch.zeros_like(ke), ke)
        n = p.rows * p.cfg["BLOCK_N"]
        buf = torch.zeros(n * 64, dtype=torch.int32)
        thr = torch.zeros(p.rows, dtype=torch.int32)
        with capture_launches() as launches:
            for launch in VARIANTS.values():
                launch(p, Sc.SCORES_SLOTS, (1, 32768), thr=thr, bkey=buf, bidx=buf, cnt=buf[:n], sc=64)
            Sc.launch_scores(p, Sc.SCORES_SLOTS, (1, 32768), thr=thr, bkey=buf, bidx=buf, cnt=buf[:n], sc=64)
    rows = build(launches, 90, keep_going=True)
    for r in rows:
        print(r, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="compile for sm_90 on this machine and report")
    args = ap.parse_args()
    if not GLUON_AVAILABLE:
        raise SystemExit("this Triton has no Gluon")
    if args.build:
        build_report()
        return
    results = {"ceilings": measure_ceilings()}
    print("ceilings", results["ceilings"], flush=True)
    try:
        if check(results):
            speed(results)
    finally:
        print("written", write_result("probe_gluon_filter", results))


if __name__ == "__main__":
    main()
