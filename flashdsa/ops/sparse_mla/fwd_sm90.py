"""Hopper (sm_90) sparse MLA forward in Gluon: the prefill fast path (SPEC 3).

Same contract as the Triton kernel in fwd.py (one query token and a block of 64 heads a
program, the top-k list walked in blocks of ``BLOCK_K`` gathered rows, online softmax in
base 2), with what Triton's language cannot express:

- warp specialization: a producer partition of 4 warps gathers the selected rows by
  cp.async into a ring of ``NUM_STAGES`` shared-memory stages (invalid indices copy
  nothing and leave zeros) and signals each stage on an mbarrier as its copies land;
  the consumers never compute a gather address;
- two consumer warpgroups in different roles (TileLang's pipelined DSA kernel assigns them
  so). The softmax warpgroup computes the whole score tile s = q . k^T [64 heads,
  BLOCK_K rows] (one m64n64 product a block, so q is read from shared memory once), runs
  the online softmax with each row inside the warpgroup (row max and sum by shuffles, no
  exchange), writes p (bf16) over the stage's rope columns, which only its q . k reads,
  and alpha beside it, signals the value warpgroup on an mbarrier and computes
  p @ v over d_v columns 0-255; the value warpgroup rescales its accumulator by alpha and
  computes p @ v over columns 256-511. Each frees the stage with one arrival. While the
  value warpgroup multiplies block j, the softmax warpgroup is on block j + 1's q . k and
  softmax, so the softmax overlaps MMAs without more stages;
- all products are asynchronous wgmma with their operands in shared memory (q stays
  resident: [64, 512] and [64, 64] tiles); each accumulator [64, 256] is 128 fp32
  registers a thread;
- registers move between the partitions (``setmaxnreg``): the value warpgroup runs on
  ``VALUE_REGS`` a thread, the producer on ``PRODUCER_REGS``, the softmax warpgroup on
  what is left under ``maxnreg`` x 12 warps.

Shared memory at BLOCK_K 64 and 2 stages: q 72 KB + 2 x 72 KB of rows = 216 KB (227 KB
is the limit), so one program runs per SM.

The fp8_ds_mla rows of the paged decode (flashdsa.layout: 512 e4m3 values in 4 tiles of
128 with an fp32 scale each, then 64 bf16 rope values) run the same program with another
producer: it copies a block's e4m3 bytes by cp.async into the upper half of the stage
that will hold its bf16 rows, the rope values into the stage's tail and the scales into
registers, waits for its copies, and dequantizes in place (scaled in fp32, stored as
bf16), each overwrite of the staged bytes behind a barrier of the partition; the
consumers see bf16 rows as before.

Only the fast shapes run here: bf16 q, d_qk 576, d_v 512, h_q a multiple of 64, no
probabilities, no split-k. Everything else takes the Triton kernels (see
:func:`gluon_fwd_supported` and :func:`gluon_fp8_supported`).
"""
from __future__ import annotations

import re

import torch
import triton

from ..common import LN2_C, LOG2E, capability, interpreted

# The Gluon API these kernels are written against (warp_specialize taking a list of
# (function, arguments) pairs, the Hopper mbarrier and wgmma modules) is Triton 3.6's,
# built and run there and built with 3.9; earlier Tritons take the Triton kernels.
GLUON_MIN_TRITON = (3, 6)


def _triton_version(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


try:  # Gluon ships with Triton; without it the Triton kernels serve every GPU
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                         warpgroup_mma_wait)
    # cp.async of a pointer tensor into shared memory: async_load in newer Tritons (3.9), the older name in 3.6
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # a barrier of the running partition's warps: gl.barrier in newer Tritons (3.9), thread_barrier in 3.6
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    # a shared-memory view as another dtype and shape: reinterpret in newer Tritons (3.9), _reinterpret in 3.6
    from triton.experimental.gluon.language._core import shared_memory_descriptor as _smem_desc
    _NEW_REINTERPRET = gl.constexpr(hasattr(_smem_desc, "reinterpret"))
    GLUON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    GLUON_AVAILABLE = False

D_V = 512
D_TAIL = 64
BLOCK_H = 64
# BLOCK_K: gathered rows a step; NUM_STAGES: shared-memory stages of gathered rows;
# num_warps: the softmax warpgroup's (the value warpgroup's 4 and the producer's 4 come on
# top); maxnreg: registers a thread at launch (65536 / 384 threads, rounded down to a
# multiple of 8); VALUE_REGS and PRODUCER_REGS: the workers' shares after the launch (the
# softmax warpgroup takes the rest, at most 256). The value warpgroup spills below 160; the
# dequantizing producer of fp8_ds_mla rows needs 88 or more.
SM90_GLUON = dict(BLOCK_K=64, NUM_STAGES=2, num_warps=4, maxnreg=168, VALUE_REGS=160, PRODUCER_REGS=88)


def gluon_device(device: torch.device) -> str | None:
    """None when the Gluon kernels can run on ``device``, else why not."""
    if not GLUON_AVAILABLE:
        return "this Triton has no Gluon (triton.experimental.gluon)"
    if _triton_version(triton.__version__) < GLUON_MIN_TRITON:
        return (f"the Gluon kernels need Triton >= {'.'.join(map(str, GLUON_MIN_TRITON))}, "
                f"found {triton.__version__}")
    if device.type != "cuda" or interpreted():
        return "the Gluon kernels run on CUDA tensors, compiled (not in the Triton interpreter)"
    if capability(device) != (9, 0):
        return "the Gluon kernels are built for sm_90 (Hopper) GPUs"
    return None


def _q_supported(q: torch.Tensor, d_v: int) -> str | None:
    """None when the Gluon kernels take these queries (q [T, h_q, d_qk]), else why not."""
    why = gluon_device(q.device)
    if why:
        return why
    if d_v != D_V or q.shape[-1] != D_V + D_TAIL:
        return f"the Gluon kernel takes d_qk {D_V + D_TAIL} and d_v {D_V}, got {q.shape[-1]} and {d_v}"
    if q.shape[1] % BLOCK_H:
        return f"the Gluon kernel takes h_q a multiple of {BLOCK_H}, got {q.shape[1]}"
    return None


# cp.async copies 16 bytes: the rows must start on 16-byte boundaries the compiler can see
# (Triton marks pointers and integers divisible by 16 as such)
_ALIGNMENT = ("the Gluon kernel copies 16-byte pieces: q and kv need 16-byte aligned storage, row strides "
              "that are multiples of 16 elements and a contiguous last dim")


def gluon_fwd_supported(q: torch.Tensor, kv: torch.Tensor, d_v: int) -> str | None:
    """None when the Gluon kernel can run this forward (q [T, h_q, d_qk], kv [N, ..., d_qk]),
    else why not (for errors and the dispatch)."""
    if q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
        return gluon_device(q.device) or f"the Gluon kernel takes bf16 q and kv, got {q.dtype} and {kv.dtype}"
    why = _q_supported(q, d_v)
    if why:
        return why
    if (q.data_ptr() % 16 or kv.data_ptr() % 16 or q.stride(0) % 16 or q.stride(1) % 16 or kv.stride(0) % 16
            or q.stride(2) != 1 or kv.stride(-1) != 1):
        return _ALIGNMENT
    return None


def gluon_fp8_supported(q: torch.Tensor, c8: torch.Tensor, rope: torch.Tensor, d_v: int) -> str | None:
    """None when the Gluon kernel can run a decode over fp8_ds_mla rows (q [T, h_q, 576]
    bf16; the cache's e4m3 view ``c8`` [N, 512+] and bf16 rope view ``rope`` [N, 64+] of
    flashdsa.layout.mla_byte_views), else why not."""
    if q.dtype != torch.bfloat16:
        return gluon_device(q.device) or f"the Gluon kernel takes bf16 q, got {q.dtype}"
    why = _q_supported(q, d_v)
    if why:
        return why
    if (q.data_ptr() % 16 or c8.data_ptr() % 16 or rope.data_ptr() % 16 or q.stride(0) % 16 or q.stride(1) % 16
            or c8.stride(0) % 16 or rope.stride(0) % 8 or q.stride(2) != 1):
        return _ALIGNMENT
    return None


if GLUON_AVAILABLE:

    @gluon.jit
    def _load_slots(idx_row, k0, topk, BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
        """The row indices of slots [k0, k0 + BLOCK_K) in the two gather layouts (-1 past
        topk). Loaded a step before their rows are gathered, so that the gather does not
        wait on them."""
        kk, kt = _row_range(k0, BLOCK_K, num_warps)
        return gl.load(idx_row + kk, mask=kk < topk, other=-1), gl.load(idx_row + kt, mask=kt < topk, other=-1)

    @gluon.jit
    def _row_range(start, ROWS: gl.constexpr, num_warps: gl.constexpr):
        """Rows start + [0, ROWS) in the two layouts of :func:`_issue_rows`."""
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        return (start + gl.arange(0, ROWS, layout=gl.SliceLayout(1, nope_l)),
                start + gl.arange(0, ROWS, layout=gl.SliceLayout(1, tail_l)))

    @gluon.jit
    def _issue_rows(kv_ptr, idx, idx_t, n_kv, stride_kv, nope_smem, tail_smem, num_warps: gl.constexpr):
        """cp.async of the rows ``idx`` (the same indices in the tail's layout: ``idx_t``)
        into one stage: the first 512 columns into ``nope_smem`` [BLOCK_K, 512], the last
        64 into ``tail_smem`` [BLOCK_K, 64]. Invalid indices (< 0 or >= n_kv) read nothing
        and leave zeros."""
        nope_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        valid = (idx >= 0) & (idx < n_kv)
        base = kv_ptr + gl.where(valid, idx, 0).to(gl.int64) * stride_kv
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, nope_l))
        for c in gl.static_range(512 // 128):
            _async_load(nope_smem.slice(c * 128, 128, dim=1), base[:, None] + (c * 128 + cols)[None, :],
                        mask=valid[:, None])
        valid_t = (idx_t >= 0) & (idx_t < n_kv)
        base_t = kv_ptr + gl.where(valid_t, idx_t, 0).to(gl.int64) * stride_kv + 512
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        _async_load(tail_smem, base_t[:, None] + cols_t[None, :], mask=valid_t[:, None])

    @gluon.jit
    def _gather_partition(kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty,
                     BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The gather partition (4 warps): block j's rows into stage j % NUM_STAGES once the
        consumers have freed it (an mbarrier starts with its phase before 0 complete, so the
        first NUM_STAGES waits pass); each thread's copies arrive on the stage's ready
        barrier when they land. The next block's indices load while this one's copies go."""
        n_blocks = gl.cdiv(topk, BLOCK_K)
        idx_n, idx_t = _load_slots(idx_row, 0, topk, BLOCK_K, 4)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            _issue_rows(kv_ptr, idx_n, idx_t, n_kv, stride_kv, k_nope.index(st), k_tail.index(st), 4)
            async_copy.mbarrier_arrive(ready.index(st), increment_count=False)
            idx_n, idx_t = _load_slots(idx_row, (j + 1) * BLOCK_K, topk, BLOCK_K, 4)

    @gluon.jit
    def _fp8_staging(stage):
        """The upper 32 KB of a [64, 512] bf16 stage as two [64, 256] byte tiles. The stage is
        laid out for wgmma in eight [64, 64] column chunks of 8 KB, so the first tile (the e4m3
        bytes of columns 0-255) lies where bf16 columns 256-383 go and the second (columns
        256-511) where bf16 columns 384-511 go. 16-byte vectors are swizzled by row: 16 rows
        x 2 vectors a warp hit every bank."""
        lay: gl.constexpr = gl.SwizzledSharedLayout(16, 1, 8, [1, 0])
        if _NEW_REINTERPRET:
            v = stage.reinterpret(gl.uint8, [256, 256], lay)
        else:
            v = stage._reinterpret(gl.uint8, [256, 256], lay)
        return v.slice(128, 64, dim=0), v.slice(192, 64, dim=0)

    @gluon.jit
    def _dequant_tile(x, dst, c0: gl.constexpr, scale):
        """e4m3 bytes ``x`` [64, 128] times the rows' tile ``scale``, stored as bf16 into
        columns c0 + [0, 128) of the stage ``dst``."""
        v = x.to(gl.float8e4nv, bitcast=True).to(gl.float32) * scale[:, None]
        dst.slice(c0, 128, dim=1).store(v.to(gl.bfloat16))

    @gluon.jit
    def _fp8_gather_partition(c8_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_c8, stride_sc, stride_pe,
                              k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The dequantizing partition (4 warps) for fp8_ds_mla rows: block j's e4m3 bytes by
        cp.async into the upper half of stage j % NUM_STAGES (:func:`_fp8_staging`), its rope
        values into the stage's tail, its scales into registers (the block's indices, loaded a
        block ahead, moved into their layout); the copies of columns 0-255 and the rope values
        form one group, those of 256-511 a second, so that the first is converted while the
        second is in flight. The bf16 rows are written over the stage: columns 0-255 into the
        lower half, 256-383 over the staged bytes of columns 0-255, 384-511 (read into
        registers first) over the rest, each overwrite behind a barrier of the partition.
        Invalid indices copy nothing and leave zeros (scale 0). One arrival on the stage's
        ready barrier, after a fence for the wgmma that will read the stage."""
        gl.static_assert(BLOCK_K == 64, "a stage's upper half holds the 64 x 512 bytes of a block")
        cp_l: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])      # 4 rows x 128 bytes a warp
        deq_l: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])    # a row a thread pair
        tail_l: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, cp_l))
        cols_t = gl.arange(0, 64, layout=gl.SliceLayout(0, tail_l))
        lanes = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, cp_l))
        n_blocks = gl.cdiv(topk, BLOCK_K)
        idx = gl.load(idx_row + lanes, mask=lanes < topk, other=-1)
        for j in range(n_blocks):
            st = j % NUM_STAGES
            valid = (idx >= 0) & (idx < n_kv)
            row = gl.where(valid, idx, 0).to(gl.int64)
            idx_d = gl.convert_layout(idx, gl.SliceLayout(1, deq_l))
            valid_d = (idx_d >= 0) & (idx_d < n_kv)
            sc = sc_ptr + gl.where(valid_d, idx_d, 0).to(gl.int64) * stride_sc
            s0 = gl.load(sc, mask=valid_d, other=0.0)
            s1 = gl.load(sc + 1, mask=valid_d, other=0.0)
            s2 = gl.load(sc + 2, mask=valid_d, other=0.0)
            s3 = gl.load(sc + 3, mask=valid_d, other=0.0)
            idx_t = gl.convert_layout(idx_d, gl.SliceLayout(1, tail_l))
            valid_t = (idx_t >= 0) & (idx_t < n_kv)
            row_t = gl.where(valid_t, idx_t, 0).to(gl.int64)
            mbarrier.wait(empty.index(st), ((j // NUM_STAGES) & 1) ^ 1)
            dst = k_nope.index(st)
            lo, hi = _fp8_staging(dst)
            # a cache row is 656 bytes: its e4m3 bytes start on 16-byte boundaries
            src = c8_ptr + gl.multiple_of(row * stride_c8, 16)[:, None] + cols[None, :]
            # two copy groups: the bytes of columns 0-255 with the rope values, then those of
            # 256-511, which land while the first are converted (into the lower half)
            for c in gl.static_range(2):
                _async_load(lo.slice(c * 128, 128, dim=1), src + c * 128, mask=valid[:, None])
            _async_load(k_tail.index(st), pe_ptr + gl.multiple_of(row_t * stride_pe, 8)[:, None] + cols_t[None, :],
                        mask=valid_t[:, None])
            async_copy.commit_group()
            for c in gl.static_range(2):
                _async_load(hi.slice(c * 128, 128, dim=1), src + (256 + c * 128), mask=valid[:, None])
            async_copy.commit_group()
            kn = (j + 1) * BLOCK_K + lanes
            idx = gl.load(idx_row + kn, mask=kn < topk, other=-1)  # the next block's, while the copies fly
            async_copy.wait_group(1)
            _barrier()  # every thread's first group has landed
            _dequant_tile(lo.slice(0, 128, dim=1).load(deq_l), dst, 0, s0)
            _dequant_tile(lo.slice(128, 128, dim=1).load(deq_l), dst, 128, s1)
            async_copy.wait_group(0)
            _barrier()  # the second group has landed and the first byte tile is read: 256-383 may overwrite it
            _dequant_tile(hi.slice(0, 128, dim=1).load(deq_l), dst, 256, s2)
            last = hi.slice(128, 128, dim=1).load(deq_l)
            _barrier()  # the second byte tile is read: columns 384-511 may overwrite it
            _dequant_tile(last, dst, 384, s3)
            fence_async_shared()
            _barrier()  # every thread of this partition has stored its rows
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def _producer_partition(kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                            k_nope, k_tail, ready, empty, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr,
                            FP8: gl.constexpr):
        """The producer: the cp.async gather of bf16 rows, or the dequantizing one of fp8_ds_mla rows."""
        if FP8:
            _fp8_gather_partition(kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                  k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES)
        else:
            _gather_partition(kv_ptr, idx_row, n_kv, topk, stride_kv, k_nope, k_tail, ready, empty,
                              BLOCK_K, NUM_STAGES)

    @gluon.jit
    def _store_half(out_ptr, out, pid_t, pid_h, stride_ot, stride_oh, C0: gl.constexpr, o_layout: gl.constexpr):
        """A consumer warpgroup's half of the output: ``out`` [64 heads, 256] bf16 (in the
        accumulator's layout ``o_layout``) into columns C0 + [0, 256) of heads pid_h * 64 +
        [0, 64) of out[pid_t]."""
        heads = pid_h * 64 + gl.arange(0, 64, gl.SliceLayout(1, o_layout))
        cols = C0 + gl.arange(0, 256, gl.SliceLayout(0, o_layout))
        gl.store(out_ptr + pid_t.to(gl.int64) * stride_ot + heads[:, None] * stride_oh + cols[None, :], out)

    @gluon.jit
    def _softmax_partition(q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                           h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                           q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                           BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The softmax warpgroup (the default partition, 4 warps): q into shared memory, then
        for each block: wait for its stage, s = q . k^T over the whole block (m64n64), the
        online softmax with each row in one warpgroup (row max and sum by shuffles), alpha
        into ``alpha_buf`` and p (bf16) over the stage's rope columns, which only this q . k
        reads; signal the value warpgroup (``p_ready``), acc += p @ v over d_v columns
        0-255, free the stage (one of its two arrivals). After the loop: 1 / l into
        ``l_buf`` for the value warpgroup (``done``), then this half of out, lse, max_logits."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_K, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 256, 16])
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        gl.static_assert(BLOCK_K == 64, "p [64, BLOCK_K] takes the place of a stage's [BLOCK_K, 64] rope columns")

        # q of this token's 64 heads: rows pid_h * 64 + [0, 64) of q[pid_t], copied as gathered rows are
        h_n, h_t = _row_range(pid_h * 64, 64, 4)
        _issue_rows(q_ptr + pid_t.to(gl.int64) * stride_qt, h_n, h_t, h_q, stride_qh, q_nope, q_tail, 4)
        async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()  # q is read by wgmma (the async proxy)
        _barrier()

        m_i = gl.full([64], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([64], gl.float32, row_s)
        acc = gl.zeros([64, 256], gl.float32, o_layout)
        for j in range(gl.cdiv(topk, BLOCK_K)):
            st = j % NUM_STAGES
            kk = j * BLOCK_K + gl.arange(0, BLOCK_K, layout=col_s)
            idx = gl.load(idx_row + kk, mask=kk < topk, other=-1)  # for the mask, in the score layout
            mbarrier.wait(ready.index(st), (j // NUM_STAGES) & 1)
            fence_async_shared()  # the producer's copies, read next by wgmma
            kn = k_nope.index(st)
            kt = k_tail.index(st)
            s = warpgroup_mma(q_nope, kn.permute((1, 0)), gl.zeros([64, BLOCK_K], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            s = warpgroup_mma(q_tail, kt.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            valid = (idx >= 0) & (idx < n_kv)
            s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while all masked
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            alpha_buf.index(st).store(alpha)
            kt.store(p.to(gl.bfloat16))  # over the rope columns: the A operand of both p @ v
            fence_async_shared()
            _barrier()  # the warpgroup's p and alpha are in place
            mbarrier.arrive(p_ready.index(st), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(kt, kn.slice(0, 256, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(st), count=1)

        has = l_i > 0.0
        inv = 1.0 / gl.where(has, l_i, 1.0)  # rows with no valid index: acc is 0
        l_buf.store(inv)
        _barrier()
        mbarrier.arrive(done.index(0), count=1)
        _store_half(out_ptr, (acc * gl.convert_layout(inv, row_o)[:, None]).to(gl.bfloat16), pid_t, pid_h,
                    stride_ot, stride_oh, 0, o_layout)
        heads = pid_h * 64 + gl.arange(0, 64, row_s)
        l_off = pid_t.to(gl.int64) * stride_lt + heads
        lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2_C, float("inf"))
        gl.store(lse_ptr + l_off, lse)
        gl.store(ml_ptr + l_off, m_i * LN2_C)

    @gluon.jit
    def _value_partition(out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                         alpha_buf, l_buf, done, BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr):
        """The value warpgroup (a worker, 4 warps): for each block, once the softmax warpgroup
        has signalled its p (``p_ready``): acc *= alpha, acc += p @ v over d_v columns
        256-511, free the stage (the other arrival); after the loop, this half of out scaled
        by the 1 / l the softmax warpgroup leaves in ``l_buf``."""
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 256, 16])
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        acc = gl.zeros([64, 256], gl.float32, o_layout)
        for j in range(gl.cdiv(topk, BLOCK_K)):
            st = j % NUM_STAGES
            mbarrier.wait(p_ready.index(st), (j // NUM_STAGES) & 1)
            fence_async_shared()  # p (this CTA's stores) and the producer's rows, read next by wgmma
            acc = acc * alpha_buf.index(st).load(row_o)[:, None]
            acc = warpgroup_mma(k_tail.index(st), k_nope.index(st).slice(256, 256, dim=1), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index(st), count=1)
        mbarrier.wait(done.index(0), 0)
        _store_half(out_ptr, (acc * l_buf.load(row_o)[:, None]).to(gl.bfloat16), pid_t, pid_h, stride_ot, stride_oh,
                    256, o_layout)

    @gluon.jit
    def _allocate(BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, READY_COUNT: gl.constexpr):
        """The shared memory of a program: q ([64, 512] and [64, 64] bf16 tiles), the ring
        of NUM_STAGES stages of gathered rows ([BLOCK_K, 512] and [BLOCK_K, 64]), each
        stage's alpha [64] fp32 and mbarriers: ready (READY_COUNT arrivals: the producer's),
        p_ready (the softmax warpgroup's one) and empty (one arrival of each consumer
        warpgroup); and 1 / l [64] fp32 with its mbarrier ``done``."""
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
        done = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=READY_COUNT)
            mbarrier.init(empty.index(i), count=2)
            mbarrier.init(p_ready.index(i), count=1)
        mbarrier.init(done.index(0), count=1)
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        alpha_buf = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 64], flat)
        l_buf = gl.allocate_shared_memory(gl.float32, [64], flat)
        return q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done

    @gluon.jit
    def sparse_mla_fwd_sm90_kernel(
        q_ptr, kv_ptr, sc_ptr, pe_ptr, idx_ptr, out_ptr, ml_ptr, lse_ptr,
        n_kv, topk, h_q, qk_scale,
        stride_qt, stride_qh, stride_kv, stride_sc, stride_pe, stride_it, stride_ot, stride_oh, stride_lt,
        BLOCK_K: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr, VALUE_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, FP8: gl.constexpr,
    ):
        """bf16 rows (kv_ptr, FP8 False; sc_ptr and pe_ptr unused) or fp8_ds_mla rows (FP8:
        kv_ptr the e4m3 bytes, sc_ptr the fp32 scales, pe_ptr the bf16 rope values)."""
        gl.static_assert(num_warps == 4, "the default partition is the softmax warpgroup")
        # one program per (token, head block), head blocks fastest: the programs of one token
        # run together and share its gathered rows through L2 (a 1-D grid: no 65535 limit)
        n_hb = h_q // 64
        pid_h = gl.program_id(0) % n_hb
        pid_t = gl.program_id(0) // n_hb
        # ready: one asynchronous arrival per producer thread (its copies); with fp8 rows the
        # producer's one arrival after its stores
        q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done = _allocate(
            BLOCK_K, NUM_STAGES, 1 if FP8 else 128)
        idx_row = idx_ptr + pid_t.to(gl.int64) * stride_it
        gl.warp_specialize([
            (_softmax_partition, (q_ptr, idx_row, out_ptr, ml_ptr, lse_ptr, n_kv, topk, qk_scale, pid_t, pid_h,
                                  h_q, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
                                  q_nope, q_tail, k_nope, k_tail, ready, empty, p_ready, alpha_buf, l_buf, done,
                                  BLOCK_K, NUM_STAGES)),
            (_value_partition, (out_ptr, topk, pid_t, pid_h, stride_ot, stride_oh, k_nope, k_tail, empty, p_ready,
                                alpha_buf, l_buf, done, BLOCK_K, NUM_STAGES)),
            (_producer_partition, (kv_ptr, sc_ptr, pe_ptr, idx_row, n_kv, topk, stride_kv, stride_sc, stride_pe,
                                   k_nope, k_tail, ready, empty, BLOCK_K, NUM_STAGES, FP8)),
        ], [4, 4], [VALUE_REGS, PRODUCER_REGS])


def run_sparse_mla_fwd_sm90(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sm_scale: float,
                            config: dict | None = None):
    """The Gluon forward: q [T, h_q, 576] bf16, kv [N, 576] bf16 rows, idx [T, topk] int32
    (last dims contiguous, validated; :func:`gluon_fwd_supported` holds) -> (out [T, h_q,
    512] bf16, max_logits [T, h_q] fp32, lse [T, h_q] fp32 natural log); ``config``
    overrides keys of SM90_GLUON."""
    return _launch(q, kv, None, None, idx, sm_scale, dict(SM90_GLUON, **(config or {})))


def run_sparse_mla_decode_sm90_fp8(q: torch.Tensor, c8: torch.Tensor, scales: torch.Tensor, rope: torch.Tensor,
                                   idx: torch.Tensor, sm_scale: float, config: dict | None = None):
    """The Gluon forward over fp8_ds_mla rows: q [T, h_q, 576] bf16; the cache's views
    (flashdsa.layout.mla_byte_views, one row a slot): ``c8`` [N, 656] e4m3 (the first 512
    used), ``scales`` [N, 4+] fp32 from the scale offset, ``rope`` [N, 64+] bf16 from the
    rope offset; idx [T, topk] int32 slots (validated; :func:`gluon_fp8_supported` holds)
    -> (out [T, h_q, 512] bf16, max_logits, lse [T, h_q] fp32 natural log); ``config``
    overrides keys of SM90_GLUON."""
    return _launch(q, c8, scales, rope, idx, sm_scale, dict(SM90_GLUON, **(config or {})))


def _launch(q, kv, scales, rope, idx, sm_scale, cfg):
    """One launch of the Gluon program: bf16 rows ``kv`` (``scales`` None), or fp8_ds_mla
    rows (``kv`` the e4m3 view, with their ``scales`` and ``rope`` views)."""
    t_q, h_q, _ = q.shape
    out = torch.empty(t_q, h_q, D_V, dtype=q.dtype, device=q.device)
    max_logits = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    if t_q == 0:
        return out, max_logits, lse
    fp8 = scales is not None
    sparse_mla_fwd_sm90_kernel[(h_q // BLOCK_H * t_q, )](
        q, kv, scales, rope, idx, out, max_logits, lse, kv.shape[0], idx.shape[1], h_q, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), scales.stride(0) if fp8 else 0, rope.stride(0) if fp8 else 0,
        idx.stride(0), out.stride(0), out.stride(1), max_logits.stride(0),
        BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        VALUE_REGS=cfg["VALUE_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"], FP8=fp8, maxnreg=cfg["maxnreg"])
    return out, max_logits, lse
