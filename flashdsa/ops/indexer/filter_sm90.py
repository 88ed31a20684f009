"""Hopper (sm_90) Gluon kernel of the threshold top-k's filter pass over ragged (prefill)
rows: the scores of every key of each row's range, and the keys at or above the row's
threshold kept in per-(row, split, column) slots, exactly as ``indexer_scores_kernel`` in
its SCORES_SLOTS mode (flashdsa/ops/indexer/scores.py) does it; the select and the
fallback (flashdsa/ops/indexer/threshold.py) read the slots of either.

Why a kernel of its own: the Triton filter moves its epilogue (slot counts, score keys,
store masks, index pointers) from the layout of the head sum into the layout of its
stores through shared memory, a round trip between two barriers for each of four tensors
every key tile. Here the epilogue stays in the layout of the wgmma accumulator: each of a
program's 4 query rows gets an m64n64 wgmma of its own (64 keys x its 64 heads), a row's
head sum is a reduction along the accumulator's columns (within a quad of threads), and
the counts, keys, masks and stores of that row live in the accumulator's row slice (one
key a row of the MMA), which a store takes as it is. The next row's MMA runs during a
row's epilogue, so two accumulators are live at a time.

Serves ragged rows of 64 heads of 128 e4m3 values with the sm90 block sizes (64 keys a
tile, 4 query rows a program): :func:`gluon_filter_supported` says why not otherwise, and
the threshold top-k then runs the Triton filter.
"""
from __future__ import annotations

import torch

from ..sparse_mla import fwd_sm90
from ..sparse_mla.fwd_sm90 import GLUON_AVAILABLE
from .scores import Problem

BLOCK_N = 64      # keys a tile: the wgmma's M
BLOCK_Q = 4       # query rows a program, one m64n64 wgmma each
HEADS, DIM = 64, 128
STAGES = 3        # key tiles in flight (8 KB each)

if GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    from ..sparse_mla.fwd_sm90 import _async_load, _barrier

    _BN = gl.constexpr(BLOCK_N)
    # the accumulator [keys, heads] of one row's wgmma; a key's 64 heads lie in one quad
    ACC_L = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32]))
    KEY_L = gl.constexpr(gl.SliceLayout(1, ACC_L.value))    # [BLOCK_N]: one key a row of the MMA
    HEAD_L = gl.constexpr(gl.SliceLayout(0, ACC_L.value))   # [HEADS]
    LD_L = gl.constexpr(gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0]))   # [rows, 128] e4m3: 16 B a thread

    @gluon.jit
    def _issue_keys(k_ptr, stride_k, n0, hi, dst):
        """cp.async of key rows [n0, n0 + BLOCK_N) that are < hi (zeros for the rest) into ``dst``."""
        offs = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(1, LD_L))
        d = gl.arange(0, 128, layout=gl.SliceLayout(0, LD_L))
        _async_load(dst, k_ptr + offs.to(gl.int64)[:, None] * stride_k + d[None, :], mask=(offs < hi)[:, None])

    @gluon.jit
    def _row(pid_q, j, S, ks_ptr, ke_ptr, thr_ptr, w_ptr, stride_ws, n_split, pid_s):
        """Query row j of the program: (valid, ks, ke, thr, its first slot column, w [64])."""
        r = pid_q * 4 + j
        ok = r < S
        ks = gl.load(ks_ptr + r, mask=ok, other=0)
        ke = gl.load(ke_ptr + r, mask=ok, other=0)
        thr = gl.load(thr_ptr + r, mask=ok, other=0)
        heads = gl.arange(0, 64, layout=HEAD_L)
        w = gl.load(w_ptr + r.to(gl.int64) * stride_ws + heads, mask=(heads < 64) & ok, other=0.0)
        sbase = (r.to(gl.int64) * n_split + pid_s) * _BN
        return ok, ks, ke, thr, sbase, w

    @gluon.jit
    def _keep(acc, w, kscale, offs, hi, ok, ks, ke, thr, sbase, cnt, SC, bkey_ptr, bidx_ptr):
        """One row's epilogue of a tile: the weighted ReLU head sum times the keys' scales,
        its int32 score keys, those at or above the threshold into the row's slots (column
        c of the tile into slot column c, at its running count); returns the new counts."""
        s = gl.sum(gl.maximum(acc, 0.0) * w[None, :], axis=1) * kscale
        b = s.to(gl.int32, bitcast=True)
        key = gl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        keep = (offs >= ks) & (offs < ke) & (offs < hi) & ok & (key >= thr)
        col = gl.arange(0, _BN, layout=KEY_L)
        ptr = (sbase + col) * SC + cnt
        store = keep & (cnt < SC)
        gl.store(bkey_ptr + ptr, key, mask=store)
        gl.store(bidx_ptr + ptr, offs, mask=store)
        return cnt + keep.to(gl.int32)

    @gluon.jit
    def indexer_filter_sm90_kernel(q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, thr_ptr, bkey_ptr, bidx_ptr,
                                   cnt_ptr, S, S_kv, split_len, n_split, SC, stride_qs, stride_qh, stride_k,
                                   stride_ws, STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Grid (query blocks of 4 rows, key splits of ``split_len``), one warpgroup a
        program, the latest rows first (their ranges are the longest). Writes every slot
        count of its rows and split (cnt [rows * n_split * 64]); entries past SC are
        counted, not stored (the select flags the row)."""
        gl.static_assert(num_warps == 4, "one warpgroup: the m64 wgmma")
        pid_q = gl.num_programs(0) - 1 - gl.program_id(0)
        pid_s = gl.program_id(1)
        n_start = pid_s * split_len
        n_end = gl.minimum(n_start + split_len, S_kv)
        smem_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
        q_smem = gl.allocate_shared_memory(gl.float8e4nv, [4, 64, 128], smem_l)
        k_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, _BN, 128], smem_l)

        # the 4 rows' q [64 heads, 128] into shared memory (the first commit group)
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
        # the tiles of this split that meet some row's range (as block_range in scores.py)
        big = 2147483647
        lo = gl.minimum(gl.minimum(gl.where(ok0 & (ke0 > ks0), ks0, big), gl.where(ok1 & (ke1 > ks1), ks1, big)),
                        gl.minimum(gl.where(ok2 & (ke2 > ks2), ks2, big), gl.where(ok3 & (ke3 > ks3), ks3, big)))
        hi = gl.maximum(gl.maximum(gl.where(ok0 & (ke0 > ks0), ke0, 0), gl.where(ok1 & (ke1 > ks1), ke1, 0)),
                        gl.maximum(gl.where(ok2 & (ke2 > ks2), ke2, 0), gl.where(ok3 & (ke3 > ks3), ke3, 0)))
        lo = (gl.maximum(lo, n_start) // _BN) * _BN
        hi = gl.minimum(hi, n_end)
        n_tiles = gl.maximum(gl.cdiv(hi - lo, _BN), 0)

        for t in gl.static_range(STAGES - 1):
            _issue_keys(k_ptr, stride_k, lo + t * _BN, hi, k_smem.index(t))   # past the last tile: nothing read
            async_copy.commit_group()
        cnt0 = gl.zeros([_BN], gl.int32, KEY_L)
        cnt1 = gl.zeros([_BN], gl.int32, KEY_L)
        cnt2 = gl.zeros([_BN], gl.int32, KEY_L)
        cnt3 = gl.zeros([_BN], gl.int32, KEY_L)
        for i in range(n_tiles):
            st = i % STAGES
            offs = lo + i * _BN + gl.arange(0, _BN, layout=KEY_L)
            kscale = gl.load(ksc_ptr + offs, mask=offs < hi, other=0.0)
            async_copy.wait_group(STAGES - 2)   # tile i (and q) landed; later tiles may still fly
            _barrier()                           # every thread's copies landed; all done with tile i - 1
            fence_async_shared()                 # read next by the wgmma (the async proxy)
            nxt = i + STAGES - 1
            _issue_keys(k_ptr, stride_k, lo + nxt * _BN, hi, k_smem.index(nxt % STAGES))
            async_copy.commit_group()
            kt = k_smem.index(st)
            zero = gl.zeros([_BN, 64], gl.float32, ACC_L)
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
        async_copy.wait_group(0)
        col = gl.arange(0, _BN, layout=KEY_L)
        gl.store(cnt_ptr + sb0 + col, cnt0, mask=ok0 & (col < _BN))
        gl.store(cnt_ptr + sb1 + col, cnt1, mask=ok1 & (col < _BN))
        gl.store(cnt_ptr + sb2 + col, cnt2, mask=ok2 & (col < _BN))
        gl.store(cnt_ptr + sb3 + col, cnt3, mask=ok3 & (col < _BN))


def gluon_filter_supported(p: Problem) -> str | None:
    """None when the Gluon filter takes problem ``p`` on its device, else why not."""
    why = fwd_sm90.gluon_device(p.q.device)
    if why is not None:
        return why
    if p.paged:
        return "the Gluon filter takes ragged (prefill) rows; paged rows take the Triton filter"
    if p.q.dtype != torch.float8_e4m3fn or tuple(p.q.shape[1:]) != (HEADS, DIM) or p.k.dtype != torch.float8_e4m3fn:
        return f"the Gluon filter takes e4m3 queries [rows, {HEADS}, {DIM}] and keys [S_kv, {DIM}]"
    if p.cfg["BLOCK_N"] != BLOCK_N or p.cfg["BLOCK_Q"] != BLOCK_Q:
        return f"the Gluon filter runs BLOCK_N {BLOCK_N}, BLOCK_Q {BLOCK_Q} (this config: other block sizes)"
    if p.q.stride(2) != 1 or p.k.stride(1) != 1 or p.w.stride(1) != 1:
        return "the Gluon filter takes q8, k8 and weights with a contiguous last dimension"
    return None


def run_filter_sm90(p: Problem, split: tuple[int, int], thr: torch.Tensor, bkey: torch.Tensor, bidx: torch.Tensor,
                    cnt: torch.Tensor, sc: int) -> None:
    """The SCORES_SLOTS pass of ``launch_scores`` (same arguments and buffers) with the
    Gluon kernel; the caller has checked :func:`gluon_filter_supported`."""
    n_split, split_len = split
    indexer_filter_sm90_kernel[(p.n_prog(), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, thr, bkey, bidx, cnt, p.rows, p.n_pos, split_len, n_split, sc,
        p.q.stride(0), p.q.stride(1), p.k.stride(0), p.w.stride(0), STAGES=STAGES, num_warps=4)


def filter_launcher(p: Problem):
    """The filter pass that the threshold top-k runs for ``p``: the Gluon kernel where it
    serves, else None (the Triton filter)."""
    return run_filter_sm90 if GLUON_AVAILABLE and gluon_filter_supported(p) is None else None
