"""Experiment (issue 15): the Hopper sparse MLA forward with a block of gathered rows of its
own for each consumer warpgroup ("ping-pong"), against the product's Gluon kernel
(flashdsa/ops/sparse_mla/fwd_sm90.py), the Triton kernel and the float64 reference.

    python -m benchmarks.probe_gluon_pingpong [--quick]     # H200: check, then time
    python -m benchmarks.probe_gluon_pingpong --build       # CPU: compile for sm_90, registers and spills

The product kernel splits every block's [64 heads, 64 rows] score tile between its two
consumer warpgroups (32 rows each). The row maxima and the probabilities then cross
between the warpgroups twice a block, and its profile (docs/benchmarks_sparse_mla.md)
shows the tensor cores waiting on those barriers. Here each consumer warpgroup is its own
partition of 4 warps and takes whole blocks: warpgroup 0 the even ones (stage 0),
warpgroup 1 the odd ones (stage 1). The producer (the default partition) copies q, then
runs the product's gather partition. Warpgroup w holds the d_v columns [256 w, 256 w + 256)
of the output. For each pair of blocks, each warpgroup:
  1. waits for its block and computes s = q . k^T (an m64n64 tile), masked;
  2. hands its row maxima to the other warpgroup (a small buffer and an mbarrier) and takes
     theirs: both reach the same new running max m (the old one and both blocks' row maxima);
  3. computes p = exp2(s - m) and its row sums, and hands p (bf16, in the rope columns of
     its own stage: only q . k reads them, and it is done) and the sums over (a second
     mbarrier);
  4. rescales its half of the output, runs p_own . v_own from registers, then, once the
     other's p is there, p_other . v_other from shared memory, and frees both stages
     (empty: two arrivals each). Both warpgroups add the two blocks' row sums in block
     order, so they keep the same l; warpgroup 0 writes lse and max_logits.
The top-k list is padded with -1 to an even number of blocks, so every pair is whole.
Shared memory: q 72 KB + 2 stages of 72 KB + 1 KB of maxima and sums (a third stage would
not fit, so the gather of a pair starts when both warpgroups are done with the last).

The split design (``split_kernel``, variants "split*") keeps the two stages but gives each
half of a stage its own ready and free barrier: the left half (columns [0, 256): q . k's
first part and warpgroup 0's v) and the right half (columns [256, 576): the rest of q . k,
warpgroup 1's v, and the rope columns). Each half is read last by one warpgroup, which
frees it, so the producer refills block 2i+2's left half as soon as warpgroup 0 has done
p0 . v0 with it, while the other products of the pair still run. The row max is chained
instead of exchanged: warpgroup 0 takes its block's max and starts p0 . v0 at once;
warpgroup 1 takes the max of that and its block's (the pair's final max) and hands it
back, and warpgroup 0 rescales its output and the p0 it stores for warpgroup 1. p0 goes
to stage 0's rope columns, p1 to an 8 KB buffer of its own (stage 1's right half is freed
before warpgroup 0 reads p1). Shared memory: 230,848 bytes.
Results: ``probe_gluon_pingpong.json`` under $OUT (device runs) or benchmarks/results/.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.bench_sparse_mla import D_QK, D_V
from benchmarks.common import measure_ceilings, write_result
from benchmarks.probe_gluon_fwd import check, speed
from flashdsa.ops.common import LN2_C, LOG2E
from flashdsa.ops.sparse_mla import fwd_sm90 as G

BLOCK_K = 64
# the launch's registers a thread (65536 / 384, rounded down to a multiple of 8) and each
# consumer warpgroup's after it; the producer (the default partition) gets the rest,
# 3 x 168 - 2 x CONSUMER_REGS (56 at 224)
PINGPONG = dict(maxnreg=168, CONSUMER_REGS=224, EARLY_QK=False)

if G.GLUON_AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                         warpgroup_mma_wait)

    # a consumer warpgroup's [64 heads, BLOCK_K] score tile and [64 heads, 256] output columns
    S_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_K, 16]))
    O_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, 256, 16]))
    P_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT.value, k_width=2))  # p from registers
    ROW_S = gl.constexpr(gl.SliceLayout(1, S_LAYOUT.value))
    COL_S = gl.constexpr(gl.SliceLayout(0, S_LAYOUT.value))
    ROW_O = gl.constexpr(gl.SliceLayout(1, O_LAYOUT.value))
    COL_O = gl.constexpr(gl.SliceLayout(0, O_LAYOUT.value))

    @gluon.jit
    def _pp_store(acc, m_i, l_i, out_ptr, ml_ptr, lse_ptr, pid_t, pid_h, stride_ot, stride_oh, stride_lt,
                  PARITY: gl.constexpr, BLOCK_K: gl.constexpr):
        """A consumer warpgroup's epilogue: its 256 output columns, normalized by the row
        sums ``l_i`` (both warpgroups' blocks); warpgroup 0 also writes lse and max_logits."""
        has = l_i > 0.0
        inv = gl.convert_layout(1.0 / gl.where(has, l_i, 1.0), ROW_O)  # rows with no valid index: acc is 0
        heads_o = pid_h * 64 + gl.arange(0, 64, ROW_O)
        gl.store(out_ptr + pid_t.to(gl.int64) * stride_ot + heads_o[:, None] * stride_oh
                 + (PARITY * 256 + gl.arange(0, 256, COL_O))[None, :], (acc * inv[:, None]).to(gl.bfloat16))
        if PARITY == 0:
            l_off = pid_t.to(gl.int64) * stride_lt + pid_h * 64 + gl.arange(0, 64, ROW_S)
            gl.store(lse_ptr + l_off, gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2_C, float("inf")))
            gl.store(ml_ptr + l_off, m_i * LN2_C)

    @gluon.jit
    def _pp_attend(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h, h_q,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                   q_nope, q_tail, k_nope, k_tail, ready, empty, handed_m, handed_p, q_bar, m_mine, l_mine, m_other,
                   l_other,
                   PARITY: gl.constexpr, BLOCK_K: gl.constexpr):
        """Consumer warpgroup PARITY: blocks 2 i + PARITY from stage PARITY, the d_v columns
        [256 PARITY, 256 PARITY + 256) of the output; warpgroup 0 also writes
        lse and max_logits. Its blocks' row maxima and sums go to ``m_mine`` / ``l_mine``
        [64], the other's come from ``m_other`` / ``l_other``."""
        OTHER: gl.constexpr = 1 - PARITY

        mbarrier.wait(q_bar, 0)  # q, copied by the producer

        m_i = gl.full([64], float("-inf"), gl.float32, ROW_S)
        l_i = gl.zeros([64], gl.float32, ROW_S)
        acc = gl.zeros([64, 256], gl.float32, O_LAYOUT)
        kn = k_nope.index(PARITY)  # this warpgroup's stage; the other's is stage OTHER
        kt = k_tail.index(PARITY)
        v_own = kn.slice(PARITY * 256, 256, dim=1)
        v_other = k_nope.index(OTHER).slice(PARITY * 256, 256, dim=1)
        n_pairs = gl.cdiv(topk, 2 * BLOCK_K)
        for i in range(n_pairs):
            phase = i & 1
            kk = (2 * i + PARITY) * BLOCK_K + gl.arange(0, BLOCK_K, layout=COL_S)
            idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
            mbarrier.wait(ready.index(PARITY), phase)
            fence_async_shared()  # the producer's copies, read next by wgmma
            s = warpgroup_mma(q_nope, kn.permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, S_LAYOUT),
                              use_acc=False, is_async=True)
            s = warpgroup_mma(q_tail, kt.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            valid = (idx >= 0) & (idx < n_kv)
            s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            # the row maxima first: both warpgroups then take the same new max
            m_mine.store(gl.max(s, 1))
            G._barrier()
            mbarrier.arrive(handed_m.index(PARITY), count=1)
            mbarrier.wait(handed_m.index(OTHER), phase)
            m_new = gl.maximum(m_i, gl.maximum(gl.max(s, 1), m_other.load(ROW_S)))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while all masked
            alpha = gl.exp2(m_i - m_use)
            m_i = m_new
            p = gl.exp2(s - m_use[:, None])
            l_own = gl.sum(p, 1)
            p16 = p.to(gl.bfloat16)
            # hand p (read by the other's wgmma: the async proxy) and its row sums over
            kt.store(p16)
            l_mine.store(l_own)
            fence_async_shared()
            G._barrier()
            mbarrier.arrive(handed_p.index(PARITY), count=1)
            acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p16, P_LAYOUT), v_own, acc, is_async=True)
            mbarrier.wait(handed_p.index(OTHER), phase)
            l_oth = l_other.load(ROW_S)
            if PARITY == 0:  # the even block's sum first in both warpgroups: the same l in both
                l_i = l_i * alpha + l_own + l_oth
            else:
                l_i = l_i * alpha + l_oth + l_own
            acc = warpgroup_mma(k_tail.index(OTHER), v_other, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(0), count=1)
            mbarrier.arrive(empty.index(1), count=1)

        _pp_store(acc, m_i, l_i, out_ptr, ml_ptr, lse_ptr, pid_t, pid_h, stride_ot, stride_oh, stride_lt, PARITY,
                  BLOCK_K)

    @gluon.jit
    def _pp_produce(q_ptr, kv_ptr, idx_row, n_kv, topk, h_q, pid_t, pid_h, stride_qt, stride_qh, stride_kv,
                    q_nope, q_tail, k_nope, k_tail, ready, empty, q_bar, BLOCK_K: gl.constexpr,
                    NUM_STAGES: gl.constexpr):
        """The producer (the default partition, 4 warps): q of this token's 64 heads into
        shared memory (each thread's copies arrive on q_bar), then the product's gather
        partition."""
        h_n, h_t = G._row_range(pid_h * 64, 64, 4)
        G._issue_rows(q_ptr + pid_t.to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, 4)
        async_copy.mbarrier_arrive(q_bar, increment_count=False)
        G._gather_partition(kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty, BLOCK_K,
                            NUM_STAGES)

    @gluon.jit
    def pingpong_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr, n_kv, topk, h_q, qk_scale,
                        stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
                        BLOCK_K: gl.constexpr, num_warps: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        WG0: gl.constexpr = 0, WG1: gl.constexpr = 1,
                        NUM_STAGES: gl.constexpr = 2):
        """WG0, WG1, NUM_STAGES: the partitions' constants (a partition's constexpr
        arguments must come as constexprs, written out in the call)."""
        gl.static_assert(num_warps == 4, "the default partition is the producer warpgroup")
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        q_nope = gl.allocate_shared_memory(gl.bfloat16, [64, 512],
                                           gl.NVMMASharedLayout.get_default_for([64, 512], gl.bfloat16))
        q_tail = gl.allocate_shared_memory(gl.bfloat16, [64, 64],
                                           gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16))
        k_nope = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, 512],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_K, 512], gl.bfloat16))
        k_tail = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, 64],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_K, 64], gl.bfloat16))
        vec_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        m_0 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        l_0 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        m_1 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        l_1 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        handed_m = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        handed_p = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ready.index(i), count=128)   # the producer threads' copy arrivals
            mbarrier.init(empty.index(i), count=2)     # both consumer warpgroups
            mbarrier.init(handed_m.index(i), count=1)
            mbarrier.init(handed_p.index(i), count=1)
        mbarrier.init(q_bar, count=128)  # the producer threads' copy arrivals
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_pp_produce, (q_ptr, kv_ptr, idx_row, n_kv, topk, h_q, pid_t, pid_h, stride_qt, stride_qh, stride_kv,
                           q_nope, q_tail, k_nope, k_tail, ready, empty, q_bar, BLOCK_K, NUM_STAGES)),
            (_pp_attend, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h, h_q,
                          stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, q_nope, q_tail, k_nope, k_tail,
                          ready, empty, handed_m, handed_p, q_bar, m_0, l_0, m_1, l_1, WG0, BLOCK_K)),
            (_pp_attend, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h, h_q,
                          stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, q_nope, q_tail, k_nope, k_tail,
                          ready, empty, handed_m, handed_p, q_bar, m_1, l_1, m_0, l_0, WG1, BLOCK_K)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])

    @gluon.jit
    def _sp_issue(ptr, idx, idx_t, n_rows, stride, half, tail, COL0: gl.constexpr, WITH_TAIL: gl.constexpr):
        """cp.async of the rows ``idx`` (``idx_t``: the same in the tail's layout): the
        columns [COL0, COL0 + 256) into ``half`` [rows, 256] and, WITH_TAIL, the columns
        [512, 576) into ``tail`` [rows, 64]. Invalid indices read nothing and leave zeros."""
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        valid = (idx >= 0) & (idx < n_rows)
        base = ptr + gl.where(valid, idx, 0).to(gl.int64) * stride + COL0
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, nope_l))
        for c in gl.static_range(2):
            G._async_load(half.slice(c * 128, 128, dim=1), base[:, None] + (c * 128 + cols)[None, :],
                          mask=valid[:, None])
        if WITH_TAIL:
            valid_t = (idx_t >= 0) & (idx_t < n_rows)
            base_t = ptr + gl.where(valid_t, idx_t, 0).to(gl.int64) * stride + 512
            cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
            G._async_load(tail, base_t[:, None] + cols_t[None, :], mask=valid_t[:, None])

    @gluon.jit
    def _sp_produce(q_ptr, kv_ptr, idx_row, n_kv, topk, h_q, pid_t, pid_h, stride_qt, stride_qh, stride_kv,
                    q_left, q_right, q_tail, k_left, k_right, k_tail, ready, free, q_bar, BLOCK_K: gl.constexpr):
        """The producer (the default partition, 4 warps): q, then each pair of blocks in
        half stages, in the order the consumers free them: block 2i's left half (stage 0,
        columns [0, 256)), block 2i+1's right half (stage 1, columns [256, 576)), block 2i's
        right half, block 2i+1's left half. Half h = 2 x stage + (0 left, 1 right) has its
        own ready and free barrier."""
        h_n, h_t = G._row_range(pid_h * 64, 64, 4)
        q_row = q_ptr + pid_t.to(gl.int64) * stride_qt
        _sp_issue(q_row, h_n, h_t, h_q, stride_qh, q_left, q_tail, 0, False)
        _sp_issue(q_row, h_n, h_t, h_q, stride_qh, q_right, q_tail, 256, True)
        async_copy.mbarrier_arrive(q_bar, increment_count=False)
        n_pairs = gl.cdiv(topk, 2 * BLOCK_K)
        for i in range(n_pairs):
            ph = (i & 1) ^ 1  # the first wait of each half passes (its phase before 0)
            a_n, a_t = G._load_slots(idx_row, 2 * i * BLOCK_K, topk, BLOCK_K, 4)
            b_n, b_t = G._load_slots(idx_row, (2 * i + 1) * BLOCK_K, topk, BLOCK_K, 4)
            mbarrier.wait(free.index(0), ph)
            _sp_issue(kv_ptr, a_n, a_t, n_kv, stride_kv, k_left.index(0), k_tail.index(0), 0, False)
            async_copy.mbarrier_arrive(ready.index(0), increment_count=False)
            mbarrier.wait(free.index(3), ph)
            _sp_issue(kv_ptr, b_n, b_t, n_kv, stride_kv, k_right.index(1), k_tail.index(1), 256, True)
            async_copy.mbarrier_arrive(ready.index(3), increment_count=False)
            mbarrier.wait(free.index(1), ph)
            _sp_issue(kv_ptr, a_n, a_t, n_kv, stride_kv, k_right.index(0), k_tail.index(0), 256, True)
            async_copy.mbarrier_arrive(ready.index(1), increment_count=False)
            mbarrier.wait(free.index(2), ph)
            _sp_issue(kv_ptr, b_n, b_t, n_kv, stride_kv, k_left.index(1), k_tail.index(1), 0, False)
            async_copy.mbarrier_arrive(ready.index(2), increment_count=False)

    @gluon.jit
    def _sp_qk_left(q_left, kl, ready, phase, BLOCK_K: gl.constexpr):
        """Warpgroup 0's q . k over the left half of stage 0 (issued as soon as it is there)."""
        mbarrier.wait(ready.index(0), phase)
        fence_async_shared()
        return warpgroup_mma(q_left, kl.permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, S_LAYOUT),
                             use_acc=False, is_async=True)

    @gluon.jit
    def _sp_qk_right(s, q_right, q_tail, kr, kt, ready, phase):
        """The rest of warpgroup 0's q . k: the right half of stage 0 and its rope columns."""
        mbarrier.wait(ready.index(1), phase)
        fence_async_shared()
        s = warpgroup_mma(q_right, kr.permute((1, 0)), s, is_async=True)
        return warpgroup_mma(q_tail, kt.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _sp_pair0(s, acc, m_i, l_i, i, idx_row, topk, n_kv, qk_scale, q_left, q_right, q_tail, k_left, k_right,
                  k_tail, p1_smem, ready, free, sync, m_0, m_1, NEXT: gl.constexpr, BLOCK_K: gl.constexpr):
        """Warpgroup 0's pair i, from its block's q . k ``s`` (issued): softmax with its own
        max, p0 . v0 at once, then the pair's final max from warpgroup 1, p0 rescaled and
        handed over, and p1 . v1. NEXT: the next pair's q . k is issued behind p1 . v1 and
        returned (else ``s`` itself). Returns (s, acc, m_i, l_i)."""
        phase = i & 1
        kk = 2 * i * BLOCK_K + gl.arange(0, BLOCK_K, layout=COL_S)
        idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        valid = (idx >= 0) & (idx < n_kv)
        s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while all masked
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_0.store(m_new)
        G._barrier()
        mbarrier.arrive(sync.index(0), count=1)
        acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), P_LAYOUT), k_left.index(0), acc, is_async=True)
        mbarrier.wait(sync.index(1), phase)
        m_fin = m_1.load(ROW_S)
        scale = gl.exp2(m_new - gl.where(m_fin == float("-inf"), 0.0, m_fin))
        k_tail.index(0).store((p * scale[:, None]).to(gl.bfloat16))  # q . k is done with the rope columns
        fence_async_shared()
        G._barrier()
        mbarrier.arrive(sync.index(2), count=1)
        l_i = l_i * scale
        m_i = m_fin
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index(0), count=1)  # stage 0's left half: nothing else reads it
        acc = acc * gl.convert_layout(scale, ROW_O)[:, None]
        mbarrier.wait(sync.index(3), phase)
        acc = warpgroup_mma(p1_smem, k_left.index(1), acc, is_async=True)
        if NEXT:  # the next pair's left q . k goes on behind p1 . v1
            nxt = _sp_qk_left(q_left, k_left.index(0), ready, phase ^ 1, BLOCK_K)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index(2), count=1)  # stage 1's left half
        mbarrier.arrive(sync.index(4), count=1)  # p1 read
        if NEXT:
            nxt = _sp_qk_right(nxt, q_right, q_tail, k_right.index(0), k_tail.index(0), ready, phase ^ 1)
        else:
            nxt = s
        return nxt, acc, m_i, l_i

    @gluon.jit
    def _sp_pair1(acc, m_i, l_i, i, idx_row, topk, n_kv, qk_scale, q_left, q_right, q_tail, k_left, k_right,
                  k_tail, p1_smem, ready, free, sync, m_0, m_1, BLOCK_K: gl.constexpr):
        """Warpgroup 1's pair i: q . k of its block (right half first: the producer fills it
        first), the pair's final max from warpgroup 0's and its own, p1 . v1 and p1 handed
        over, then p0 . v0. Returns (acc, m_i, l_i)."""
        phase = i & 1
        kk = (2 * i + 1) * BLOCK_K + gl.arange(0, BLOCK_K, layout=COL_S)
        idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)
        mbarrier.wait(ready.index(3), phase)
        fence_async_shared()
        s = warpgroup_mma(q_right, k_right.index(1).permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, S_LAYOUT),
                          use_acc=False, is_async=True)
        s = warpgroup_mma(q_tail, k_tail.index(1).permute((1, 0)), s, is_async=True)
        mbarrier.wait(ready.index(2), phase)
        fence_async_shared()
        s = warpgroup_mma(q_left, k_left.index(1).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        valid = (idx >= 0) & (idx < n_kv)
        s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
        mbarrier.wait(sync.index(0), phase)
        m_new = gl.maximum(m_0.load(ROW_S), gl.max(s, 1))  # warpgroup 0's max holds the running one
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        m_1.store(m_new)
        G._barrier()
        mbarrier.arrive(sync.index(1), count=1)
        acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
        p16 = p.to(gl.bfloat16)
        acc = warpgroup_mma(gl.convert_layout(p16, P_LAYOUT), k_right.index(1), acc, is_async=True)
        mbarrier.wait(sync.index(4), phase ^ 1)  # warpgroup 0 has read the last pair's p1
        p1_smem.store(p16)
        fence_async_shared()
        G._barrier()
        mbarrier.arrive(sync.index(3), count=1)
        mbarrier.wait(sync.index(2), phase)
        acc = warpgroup_mma(k_tail.index(0), k_right.index(0), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index(3), count=1)  # stage 1's right half
        mbarrier.arrive(free.index(1), count=1)  # stage 0's right half (and p0)
        return acc, m_i, l_i

    @gluon.jit
    def _sp_attend(idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                   stride_ot, stride_oh, stride_lt, q_left, q_right, q_tail, k_left, k_right, k_tail, p1_smem,
                   ready, free, sync, q_bar, m_0, m_1, l_0, l_1, PARITY: gl.constexpr, BLOCK_K: gl.constexpr,
                   EARLY_QK: gl.constexpr):
        """Consumer warpgroup PARITY of the split design: blocks 2 i + PARITY from stage
        PARITY, the d_v columns [256 PARITY, 256 PARITY + 256) of the output. The row max is
        chained, not exchanged: warpgroup 0 takes its block's max and starts p0 . v at once;
        warpgroup 1 takes the max of that and its own block (the pair's final max), then
        warpgroup 0 rescales. sync: 0 warpgroup 0's max, 1 the final max, 2 p0 stored (in
        stage 0's rope columns), 3 p1 stored (p1_smem), 4 p1 read, 5 / 6 the row sums at
        the end. EARLY_QK: warpgroup 0 issues the next pair's q . k behind its last p . v
        of a pair, so that the tensor cores go on while it waits and arrives."""

        mbarrier.wait(q_bar, 0)  # q, copied by the producer
        m_i = gl.full([64], float("-inf"), gl.float32, ROW_S)
        l_i = gl.zeros([64], gl.float32, ROW_S)
        acc = gl.zeros([64, 256], gl.float32, O_LAYOUT)
        n_pairs = gl.cdiv(topk, 2 * BLOCK_K)
        if PARITY == 0:
            kl = k_left.index(0)
            kr = k_right.index(0)
            kt = k_tail.index(0)
            if EARLY_QK:
                if n_pairs > 0:  # the first pair's q . k here, each later one behind the pair before
                    s = _sp_qk_right(_sp_qk_left(q_left, kl, ready, 0, BLOCK_K), q_right, q_tail, kr, kt, ready, 0)
                    for i in range(n_pairs - 1):
                        s, acc, m_i, l_i = _sp_pair0(s, acc, m_i, l_i, i, idx_row, topk, n_kv, qk_scale, q_left,
                                                     q_right, q_tail, k_left, k_right, k_tail, p1_smem, ready, free,
                                                     sync, m_0, m_1, True, BLOCK_K)
                    s, acc, m_i, l_i = _sp_pair0(s, acc, m_i, l_i, n_pairs - 1, idx_row, topk, n_kv, qk_scale,
                                                 q_left, q_right, q_tail, k_left, k_right, k_tail, p1_smem, ready,
                                                 free, sync, m_0, m_1, False, BLOCK_K)
            else:
                for i in range(n_pairs):
                    s = _sp_qk_right(_sp_qk_left(q_left, kl, ready, i & 1, BLOCK_K), q_right, q_tail, kr, kt, ready,
                                     i & 1)
                    s, acc, m_i, l_i = _sp_pair0(s, acc, m_i, l_i, i, idx_row, topk, n_kv, qk_scale, q_left,
                                                 q_right, q_tail, k_left, k_right, k_tail, p1_smem, ready, free,
                                                 sync, m_0, m_1, False, BLOCK_K)
        else:
            for i in range(n_pairs):
                acc, m_i, l_i = _sp_pair1(acc, m_i, l_i, i, idx_row, topk, n_kv, qk_scale, q_left, q_right, q_tail,
                                          k_left, k_right, k_tail, p1_smem, ready, free, sync, m_0, m_1, BLOCK_K)

        # each warpgroup summed its own blocks' rows, both at the same final max
        if PARITY == 0:
            l_0.store(l_i)
            G._barrier()
            mbarrier.arrive(sync.index(5), count=1)
            mbarrier.wait(sync.index(6), 0)
        else:
            l_1.store(l_i)
            G._barrier()
            mbarrier.arrive(sync.index(6), count=1)
            mbarrier.wait(sync.index(5), 0)
        l_i = l_0.load(ROW_S) + l_1.load(ROW_S)
        _pp_store(acc, m_i, l_i, out_ptr, ml_ptr, lse_ptr, pid_t, pid_h, stride_ot, stride_oh, stride_lt, PARITY,
                  BLOCK_K)

    @gluon.jit
    def split_kernel(q_ptr, kv_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr, n_kv, topk, h_q, qk_scale,
                     stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh, stride_lt,
                     BLOCK_K: gl.constexpr, num_warps: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                     EARLY_QK: gl.constexpr, WG0: gl.constexpr = 0, WG1: gl.constexpr = 1):
        """The split design's kernel (see the module docstring); WG0 / WG1: the consumer
        partitions' parities, written out as constexprs."""
        gl.static_assert(num_warps == 4, "the default partition is the producer warpgroup")
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        half_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 256], gl.bfloat16)
        tail_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
        q_left = gl.allocate_shared_memory(gl.bfloat16, [64, 256], half_l)
        q_right = gl.allocate_shared_memory(gl.bfloat16, [64, 256], half_l)
        q_tail = gl.allocate_shared_memory(gl.bfloat16, [64, 64], tail_l)
        k_left = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, 256], half_l)
        k_right = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, 256], half_l)
        k_tail = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_K, 64], tail_l)
        p1_smem = gl.allocate_shared_memory(gl.bfloat16, [64, 64], tail_l)
        vec_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        m_0 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        m_1 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        l_0 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        l_1 = gl.allocate_shared_memory(gl.float32, [64], vec_l)
        ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        sync = gl.allocate_shared_memory(gl.int64, [7, 1], mbarrier.MBarrierLayout())
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(4):
            mbarrier.init(ready.index(i), count=128)  # the producer threads' copy arrivals
            mbarrier.init(free.index(i), count=1)     # the one warpgroup that reads the half last
        for i in gl.static_range(7):
            mbarrier.init(sync.index(i), count=1)
        mbarrier.init(q_bar, count=128)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_sp_produce, (q_ptr, kv_ptr, idx_row, n_kv, topk, h_q, pid_t, pid_h, stride_qt, stride_qh, stride_kv,
                           q_left, q_right, q_tail, k_left, k_right, k_tail, ready, free, q_bar, BLOCK_K)),
            (_sp_attend, (idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                          stride_ot, stride_oh, stride_lt, q_left, q_right, q_tail, k_left, k_right, k_tail, p1_smem,
                          ready, free, sync, q_bar, m_0, m_1, l_0, l_1, WG0, BLOCK_K, EARLY_QK)),
            (_sp_attend, (idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                          stride_ot, stride_oh, stride_lt, q_left, q_right, q_tail, k_left, k_right, k_tail, p1_smem,
                          ready, free, sync, q_bar, m_0, m_1, l_0, l_1, WG1, BLOCK_K, EARLY_QK)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


def run_pingpong(q, kv, idx, sm_scale, config=None, split=False):
    """Same contract as fwd_sm90.run_sparse_mla_fwd_sm90 (q [T, h_q, 576], kv [N, 576],
    idx [T, topk]); the top-k list is padded with -1 to a multiple of 2 x BLOCK_K.
    ``split``: the split design (half stages, chained row max) instead of the first one."""
    cfg = dict(PINGPONG, **(config or {}))
    t_q, h_q, _ = q.shape
    pad = -idx.shape[1] % (2 * BLOCK_K)
    if pad:
        idx = F.pad(idx, (0, pad), value=-1)
    out = torch.empty(t_q, h_q, D_V, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(ml)
    if t_q == 0:
        return out, ml, lse
    kernel = split_kernel if split else pingpong_kernel
    kernel[(h_q // G.BLOCK_H * t_q, )](
        q, kv, idx, out, ml, lse, kv.shape[0], idx.shape[1], h_q, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1), ml.stride(0),
        BLOCK_K=BLOCK_K, num_warps=4, CONSUMER_REGS=cfg["CONSUMER_REGS"], maxnreg=cfg["maxnreg"],
        **(dict(EARLY_QK=cfg["EARLY_QK"]) if split else {}))
    return out, ml, lse


# the kernels compared (check and speed of benchmarks.probe_gluon_fwd): the product's Gluon
# kernel, the first ping-pong design and the split one, each at two register splits
VARIANTS = {"gluon": lambda q, kv, idx, s: G.run_sparse_mla_fwd_sm90(q, kv, idx, s),
            "pingpong": lambda q, kv, idx, s: run_pingpong(q, kv, idx, s),
            "pingpong_c232": lambda q, kv, idx, s: run_pingpong(q, kv, idx, s, dict(CONSUMER_REGS=232)),
            "split": lambda q, kv, idx, s: run_pingpong(q, kv, idx, s, split=True),
            "split_c216": lambda q, kv, idx, s: run_pingpong(q, kv, idx, s, dict(CONSUMER_REGS=216), split=True),
            "split_early": lambda q, kv, idx, s: run_pingpong(q, kv, idx, s, dict(EARLY_QK=True), split=True)}


def build_report():
    """Compile the ping-pong kernel for sm_90 here (no GPU): registers, spills, shared memory."""
    from benchmarks.sm90_build import build, capture_launches

    g = torch.Generator().manual_seed(0)
    rows = []
    for name, cfg, split in (("pingpong", {}, False), ("pingpong_c232", dict(CONSUMER_REGS=232), False),
                             ("split", {}, True), ("split_c216", dict(CONSUMER_REGS=216), True),
                             ("split_early", dict(EARLY_QK=True), True)):
        q = torch.randn(8, 128, D_QK, generator=g, dtype=torch.bfloat16)
        kv = torch.randn(1024, D_QK, generator=g, dtype=torch.bfloat16)
        idx = torch.randint(0, 1024, (8, 2048), dtype=torch.int32, generator=g)
        with capture_launches() as launches:
            run_pingpong(q, kv, idx, 0.04, cfg, split)
        for r in build(launches, 90, keep_going=True):
            rows.append(dict(variant=name, **r))
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="speed at s_kv 8K, h_q 128 only")
    ap.add_argument("--build", action="store_true", help="compile for sm_90 on this machine and report")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = ap.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    runs = {n: VARIANTS[n] for n in args.variants.split(",")}
    if args.build:
        build_report()
        return
    results = {"ceilings": measure_ceilings(), "variants": list(runs)}
    print("ceilings", results["ceilings"], flush=True)
    try:
        check(runs, results)
        ok = {n: run for n, run in runs.items()
              if all("error" not in r[n] and r[n]["out_nan"] == 0 for r in results["check"])}
        speed(ok, results, args.quick)
    finally:
        print("written", write_result("probe_gluon_pingpong", results))


if __name__ == "__main__":
    main()
