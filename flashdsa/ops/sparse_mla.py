"""Triton sparse MLA attention forward (FlashMLA ``flash_mla_sparse_fwd`` semantics, SPEC 3).

One program handles one query token and a block of ``BLOCK_H`` query heads (MQA: all
heads share the one latent kv head), so each selected kv row is gathered once per
program and reused by every head of the block. The top-k list is walked in blocks of
``BLOCK_K`` rows gathered by index; invalid indices (-1 or >= n_kv) are masked out of
the load (no memory is touched) and get logit -inf. Softmax is online, in fp32 and in
base 2 (sm_scale * log2(e) folded into one multiplier).

d_qk = 576 is not a power of two, so the q.k dot is split into the value part (the
first d_v = 512 dims, which is also the value ``V``) and the tail (the 64 rope dims):

    s   = q[:, :d_v] @ kv[rows, :d_v]^T + q[:, d_v:] @ kv[rows, d_v:]^T      [BLOCK_H, BLOCK_K]
    acc = acc * alpha + p @ kv[rows, :d_v]                                    [BLOCK_H, d_v]

The same kernel serves paged decode (flashdsa.ops.sparse_mla_decode): the cache is a
flat list of rows addressed by physical slot, optionally in the 656-byte fp8_ds_mla
format (dequantized to bf16 in registers), and the top-k range may be split over
programs (split-k) whose fp32 partial results a small combine kernel merges.

Nothing of size s_q x topk x d_qk is materialized: each program holds one
[BLOCK_K, d_qk] tile of gathered rows at a time.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .mla_cache import _e4m3_to_f32, fp8_native

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Block sizes per GPU family, for the fast shape (d_qk 576, d_v 512, h_q >= 64).
# BLOCK_H: heads per program (64 = one wgmma M tile on Hopper; 8 warps split d_v in two
# halves of 256 so the fp32 accumulator [64, 512] costs 128 registers a thread).
# BLOCK_K: gathered rows per step; num_stages: software pipelining depth of the gathers
# (each stage holds a [BLOCK_K, 576] tile in shared memory, q takes another 72 KB).
# PV_LAG: see _sparse_mla_fwd_kernel (q.k split between the two warpgroups instead of
# computed by both, for a second gather of the value rows).
# Chosen by the --sweep of benchmarks/bench_sparse_mla.py and bench_sparse_mla_decode.py on an
# H200 (docs/benchmarks_sparse_mla.md): BLOCK_K 64 with 2 stages beat every PV_LAG variant
# (PV_LAG at BLOCK_K 64 needs 360 KB of shared memory at 2 stages) and, for fp8, SCALE_FOLD.
# The sm80 row only respects the A100's 163 KB of shared memory (not measured).
CONFIGS = {
    "sm90": dict(BLOCK_H=64, BLOCK_K=64, num_warps=8, num_stages=2, PV_LAG=False, ASM_STORE=True, TMA_STORE=True,
                 REDUCE_WARPS=1),
    "sm90_fp8": dict(BLOCK_H=64, BLOCK_K=64, num_warps=8, num_stages=2, PV_LAG=False, SCALE_FOLD=False),
    "sm80": dict(BLOCK_H=64, BLOCK_K=32, num_warps=8, num_stages=2, PV_LAG=False, ASM_STORE=True),
    "small": dict(BLOCK_H=64, BLOCK_K=32, num_warps=4, num_stages=2, PV_LAG=False),
}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _nvidia_compiled() -> bool:
    """Whether kernels are compiled for an NVIDIA GPU (PTX available), not interpreted."""
    return not _interpreted() and torch.version.hip is None


def _has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can store through TMA descriptors (NVIDIA sm_90 and later,
    compiled, not interpreted)."""
    return device.type == "cuda" and _nvidia_compiled() and torch.cuda.get_device_capability(device)[0] >= 9


def default_config(device: torch.device, h_q: int, d_v: int, fp8: bool = False) -> dict:
    """Block sizes for a problem; tiny/odd shapes get small blocks."""
    if d_v > 256 and device.type == "cuda" and not _interpreted():
        major, _ = torch.cuda.get_device_capability(device)
        cfg = dict(CONFIGS[("sm90_fp8" if fp8 else "sm90") if major >= 9 else "sm80"])
    else:
        cfg = dict(CONFIGS["small"])
    cfg["BLOCK_H"] = min(cfg["BLOCK_H"], max(16, triton.next_power_of_2(h_q)))
    if _interpreted():
        cfg["num_stages"] = 1
    return cfg


@triton.jit
def _row_mask(valid, col_mask, EVEN: tl.constexpr):
    """[BLOCK_K, 1] row mask, and the column mask only where the block overhangs the data
    (an all-true [BLOCK_K, D] mask costs registers and blocks vectorization hints)."""
    if EVEN:
        return valid[:, None]
    else:
        return valid[:, None] & col_mask[None, :]


@triton.jit
def _store_in_place(ptrs, vals, mask, ASM: tl.constexpr):
    """tl.store(ptrs, vals, mask) of fp32 values; with ASM by one st.global per element from
    the registers that hold it. tl.store first moves a tensor from its compute layout (here
    a slice of the wgmma accumulator) to a coalesced one through shared memory, between two
    block-wide barriers: for the maxima of each block of the forward's loop that cost 0.04 ms
    more at h_q 64 (of 4.2) and 0.09 at h_q 128 with the p tile by tl.store (H200,
    2026-12-02, benchmarks/results/probe_probs_store.json as of commit 01f52fc; the current
    one has "p tile by tl.store, maxima by PTX" against "both by tl.store": 0.05 / 0.05 ms).
    An element held by several threads is stored by each
    (same value, same address). PTX: CUDA only."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.f32 [$1], $2; } mov.u32 $0, 0;",
            "=r,l,f,r", [ptrs.to(tl.int64), vals, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptrs, vals, mask=mask)


@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr, kv_ptr, tail_ptr, scale_ptr, idx_ptr,  # inputs (scale_ptr: unused here, see the fp8 kernel)
    out_ptr, ml_ptr, lse_ptr,  # outputs (partials when SPLIT)
    n_kv, topk, h_q, k_per_split, qk_scale,  # qk_scale = sm_scale * log2(e)
    stride_qt, stride_qh,  # q [T, h_q, d_qk], last dim contiguous
    stride_kv, stride_tail, stride_scale,  # row strides (in elements of each pointer's type)
    stride_it,  # indices [T, topk], last dim contiguous
    stride_os, stride_ot, stride_oh,  # out [(n_split,) T, h_q, d_v]
    stride_ls, stride_lt,  # lse / max_logits [(n_split,) T, h_q]
    D_V: tl.constexpr, D_TAIL: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # compute the dots in fp32 (fp32 inputs, or the CPU interpreter)
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 dots (tf32 would lose 3 digits), else "tf32" (ignored)
    SPLIT: tl.constexpr,  # write normalized fp32 partials + base-2 lse for the combine kernel
    OFFS64: tl.constexpr,  # row offsets need int64 (big paged caches); int32 saves registers
    PV_LAG: tl.constexpr = False,  # do block i's p @ V in step i + 1 (see below)
    PROBS: tl.constexpr = False,  # also store each block's p and max for _probs_reduce_kernel
    PROBS_FP8: tl.constexpr = False,  # that p scratch in e4m3 (half the bytes of fp16)
    ASM_STORE: tl.constexpr = False,  # PROBS: the maxima stored by inline PTX (_store_in_place)
    TMA_STORE: tl.constexpr = False,  # PROBS: the p tile stored by TMA through ps_desc (Hopper)
    ps_ptr=None, ms_ptr=None,  # PROBS: scratch p [T, h_q, topk] fp16 / e4m3, m [T, n_blk, h_q] fp32
    ps_desc=None,  # TMA_STORE: descriptor of ps_ptr as [T * h_q, topk], blocks [BLOCK_H, BLOCK_K]
    stride_pst=0, stride_psh=0, stride_mst=0, stride_msb=0,
):
    pid_h = tl.program_id(0)  # head blocks vary fastest: programs of one token run together
    pid_t = tl.program_id(1)  # and share its gathered rows through L2
    pid_s = tl.program_id(2)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_k = tl.arange(0, BLOCK_K)
    h_mask = offs_h < h_q
    dv_mask = offs_dv < D_V

    # q pieces stay resident for the whole loop: [BLOCK_H, BLOCK_DV] and [BLOCK_H, BLOCK_DT]
    q_rows = q_ptr + pid_t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh
    q_v = tl.load(q_rows + offs_dv[None, :], mask=h_mask[:, None] & dv_mask[None, :], other=0.0)
    if UPCAST:
        q_v = q_v.to(tl.float32)
        dot_dtype = tl.float32
    else:
        dot_dtype = q_v.dtype
    if D_TAIL > 0:
        offs_dt = tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt < D_TAIL
        q_t = tl.load(q_rows + D_V + offs_dt[None, :], mask=h_mask[:, None] & dt_mask[None, :], other=0.0)
        q_t = q_t.to(dot_dtype)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)

    # PV_LAG: Triton gives a dot whose result feeds another dot (s -> p -> p @ V) all warps
    # along M; with BLOCK_H 64 < 16 * num_warps the two warpgroups then both compute the
    # whole s (the q.k half of the work done twice). Carrying p to the next step breaks
    # that chain in the IR (s -> p -> loop yield), so s is split between the warpgroups,
    # at the price of gathering the value rows of block i again in step i + 1.
    if PV_LAG:
        # state after step i: acc relative to the max before block i, p_prev = block i's
        # probabilities relative to m_i, alpha_prev = the rescale between the two
        p_prev = tl.zeros([BLOCK_H, BLOCK_K], dtype=dot_dtype)
        alpha_prev = tl.zeros([BLOCK_H], dtype=tl.float32)
        if OFFS64:
            rows_prev = tl.zeros([BLOCK_K], dtype=tl.int64)
        else:
            rows_prev = tl.zeros([BLOCK_K], dtype=tl.int32)
        valid_prev = offs_k < 0

    k_start = pid_s * k_per_split
    k_end = tl.minimum(topk, k_start + k_per_split)
    idx_row = idx_ptr + pid_t.to(tl.int64) * stride_it
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        idx = tl.load(idx_row + kk, mask=kk < k_end, other=-1)  # [BLOCK_K]
        valid = (idx >= 0) & (idx < n_kv)
        if OFFS64:
            rows = idx.to(tl.int64)  # slot * row stride overflows int32 for big caches
        else:
            rows = idx
        if PV_LAG:  # finish the previous block: acc now relative to m_i
            v_prev = tl.load(kv_ptr + rows_prev[:, None] * stride_kv + offs_dv[None, :],
                             mask=_row_mask(valid_prev, dv_mask, BLOCK_DV == D_V), other=0.0)
            acc = tl.dot(p_prev, v_prev.to(dot_dtype), acc * alpha_prev[:, None], input_precision=DOT_PREC)
        kv_v = tl.load(kv_ptr + rows[:, None] * stride_kv + offs_dv[None, :],
                       mask=_row_mask(valid, dv_mask, BLOCK_DV == D_V), other=0.0)  # [BLOCK_K, BLOCK_DV]
        kv_v = kv_v.to(dot_dtype)
        # [BLOCK_H, BLOCK_K] fp32, base-2 logits. The tail is a separate dot whose scaled
        # result is added: dot(..., acc=s) (or a bare add, which the compiler folds into
        # one) makes the first dot feed another dot, and such a dot is laid out with all
        # warps along M, i.e. replicated across warpgroups when BLOCK_H is 64 (see PV_LAG)
        s = tl.dot(q_v, tl.trans(kv_v), input_precision=DOT_PREC) * qk_scale
        if D_TAIL > 0:
            kv_t = tl.load(tail_ptr + rows[:, None] * stride_tail + offs_dt[None, :],
                           mask=_row_mask(valid, dt_mask, BLOCK_DT == D_TAIL), other=0.0)
            s += tl.dot(q_t, tl.trans(kv_t.to(dot_dtype)), input_precision=DOT_PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf while all masked
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_LAG:
            alpha_prev = alpha
            p_prev = p.to(dot_dtype)
            rows_prev = rows
            valid_prev = valid
        else:
            acc = tl.dot(p.to(dot_dtype), kv_v, acc * alpha[:, None], input_precision=DOT_PREC)
        if PROBS:  # after the p @ V issue (async), which runs meanwhile; p relative to this
            # block's max, rescaled by exp2(m_use - lse2) in _probs_reduce_kernel
            if PROBS_FP8:  # e4m3 of 256 p: p <= 1 stays below 448, 2^-14 and up keep 3 mantissa bits
                p_st = (p * 256.0).to(tl.float8e4nv)
            else:
                p_st = p.to(tl.float16)
            if TMA_STORE:  # asynchronous: it runs on while the loop goes on; the slots past
                # topk are clipped by the descriptor's bounds (h_q is a multiple of BLOCK_H)
                ps_desc.store([pid_t * h_q + pid_h * BLOCK_H, k0], p_st)
            else:
                tl.store(ps_ptr + pid_t.to(tl.int64) * stride_pst + offs_h[:, None] * stride_psh + kk[None, :],
                         p_st, mask=h_mask[:, None] & (kk < k_end)[None, :])
            _store_in_place(ms_ptr + pid_t.to(tl.int64) * stride_mst + (k0 // BLOCK_K) * stride_msb + offs_h, m_use,
                            h_mask, ASM_STORE)
        m_i = m_new
    if PV_LAG:
        v_prev = tl.load(kv_ptr + rows_prev[:, None] * stride_kv + offs_dv[None, :],
                         mask=_row_mask(valid_prev, dv_mask, BLOCK_DV == D_V), other=0.0)
        acc = tl.dot(p_prev, v_prev.to(dot_dtype), acc * alpha_prev[:, None], input_precision=DOT_PREC)

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]  # rows with no valid index: acc is 0
    o_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + pid_t.to(tl.int64) * stride_ot
              + offs_h[:, None] * stride_oh + offs_dv[None, :])
    l_off = pid_s.to(tl.int64) * stride_ls + pid_t.to(tl.int64) * stride_lt + offs_h
    if SPLIT:
        tl.store(o_ptrs, out, mask=h_mask[:, None] & dv_mask[None, :])
        lse2 = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + l_off, lse2, mask=h_mask)
        tl.store(ml_ptr + l_off, m_i, mask=h_mask)
    else:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & dv_mask[None, :])
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
        tl.store(lse_ptr + l_off, lse, mask=h_mask)
        tl.store(ml_ptr + l_off, m_i * 0.6931471805599453, mask=h_mask)


@triton.jit
def _probs_reduce_kernel(ps_ptr, ms_ptr, lse_ptr, pr_ptr, h_q, topk, scale,
                         stride_pst, stride_psh, stride_mst, stride_msb, stride_lt, stride_prt,
                         BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """probs[t, j] = scale * sum_h p_blk[h, j] * exp2(m_blk[h] - lse2[h]) for the slots j of
    one forward block: the forward's per-block probabilities (relative to each block's max)
    rescaled by the final lse and averaged over the heads (scale = 1 / h_q, and 1 / 256 for
    the e4m3 scratch). One program per (block, query), all heads."""
    pid_j = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = pid_j * BLOCK_K + tl.arange(0, BLOCK_K)
    h_mask = offs_h < h_q
    j_mask = offs_j < topk
    lse = tl.load(lse_ptr + t * stride_lt + offs_h, mask=h_mask, other=float("inf"))
    has = lse < float("inf")  # heads of a row with no valid slot: lse +inf, probs 0
    lse2 = tl.where(has, lse, 0.0) * 1.4426950408889634
    m = tl.load(ms_ptr + t * stride_mst + pid_j * stride_msb + offs_h, mask=h_mask, other=0.0)
    f = tl.where(has, tl.math.exp2(m - lse2), 0.0) * scale
    p = tl.load(ps_ptr + t * stride_pst + offs_h[:, None] * stride_psh + offs_j[None, :],
                mask=h_mask[:, None] & j_mask[None, :], other=0.0)
    tl.store(pr_ptr + t * stride_prt + offs_j, tl.sum(p.to(tl.float32) * f[:, None], 0), mask=j_mask)


@triton.jit
def _load_e4m3_f32(c8_ptr, rows, valid, stride_c8, offs_c, TILE: tl.constexpr, INT_DECODE: tl.constexpr):
    """fp32 values of one 128-wide e4m3 tile of rows ``rows``: [BLOCK_K, 128] (0 where invalid)."""
    ptrs = c8_ptr + rows[:, None] * stride_c8 + TILE * 128 + offs_c[None, :]
    if INT_DECODE:  # uint8 bytes (no e4m3 type on this GPU)
        xf = _e4m3_to_f32(tl.load(ptrs, mask=valid[:, None], other=0).to(tl.int32))
    else:
        xf = tl.load(ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    return xf


@triton.jit
def _dequant_tile(c8_ptr, sc_ptr, rows, valid, stride_c8, stride_sc, offs_c, TILE: tl.constexpr,
                  dot_dtype: tl.constexpr, INT_DECODE: tl.constexpr):
    """Rows ``rows`` of one 128-wide e4m3 tile times their fp32 scales: [BLOCK_K, 128]."""
    xf = _load_e4m3_f32(c8_ptr, rows, valid, stride_c8, offs_c, TILE, INT_DECODE)
    sc = tl.load(sc_ptr + rows * stride_sc + TILE, mask=valid, other=0.0)  # [BLOCK_K]
    return (xf * sc[:, None]).to(dot_dtype)


@triton.jit
def _fp8_tile(c8_ptr, rows, valid, stride_c8, offs_c, TILE: tl.constexpr, dot_dtype: tl.constexpr,
              INT_DECODE: tl.constexpr):
    """One 128-wide e4m3 tile of rows ``rows`` converted (exactly) to ``dot_dtype``, unscaled."""
    ptrs = c8_ptr + rows[:, None] * stride_c8 + TILE * 128 + offs_c[None, :]
    if INT_DECODE:
        x = _e4m3_to_f32(tl.load(ptrs, mask=valid[:, None], other=0).to(tl.int32)).to(dot_dtype)
    else:
        x = tl.load(ptrs, mask=valid[:, None], other=0.0).to(dot_dtype)
    return x


@triton.jit
def _tile_scale(sc_ptr, rows, valid, stride_sc, TILE: tl.constexpr):
    """The fp32 scale of tile ``TILE`` of each row: [BLOCK_K] (0 for invalid rows)."""
    return tl.load(sc_ptr + rows * stride_sc + TILE, mask=valid, other=0.0)


@triton.jit
def _sparse_mla_fp8_kernel(
    q_ptr, c8_ptr, tail_ptr, scale_ptr, idx_ptr,
    out_ptr, ml_ptr, lse_ptr,
    n_kv, topk, h_q, k_per_split, qk_scale,
    stride_qt, stride_qh,
    stride_kv, stride_tail, stride_scale,
    stride_it,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, OFFS64: tl.constexpr,
    PV_LAG: tl.constexpr = False,
    SCALE_FOLD: tl.constexpr = False,  # apply the tile scales to s and p, not to the tiles
    INT_DECODE: tl.constexpr = False,  # c8_ptr is uint8, decoded with integer ops (pre-sm_89)
):
    """The fp8_ds_mla variant of _sparse_mla_fwd_kernel (d_qk 576, d_v 512 fixed).

    The value part is handled as 4 tiles of 128 dims, each dequantized with its own
    per-row scale right after its load, with 4 accumulators [BLOCK_H, 128]: dequantizing
    a whole [BLOCK_K, 512] tile at once (reshape to [BLOCK_K, 4, 128]) kept too many fp32
    values live next to the accumulator and spilled."""
    pid_h = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, 128)
    offs_dt = tl.arange(0, 64)
    offs_k = tl.arange(0, BLOCK_K)
    h_mask = offs_h < h_q
    q_rows = q_ptr + pid_t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh
    q0 = tl.load(q_rows + 0 + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    q1 = tl.load(q_rows + 128 + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    q2 = tl.load(q_rows + 256 + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    q3 = tl.load(q_rows + 384 + offs_c[None, :], mask=h_mask[:, None], other=0.0)
    qt = tl.load(q_rows + 512 + offs_dt[None, :], mask=h_mask[:, None], other=0.0)
    if UPCAST:
        dot_dtype = tl.float32
    else:
        dot_dtype = q0.dtype
    q0, q1, q2, q3, qt = q0.to(dot_dtype), q1.to(dot_dtype), q2.to(dot_dtype), q3.to(dot_dtype), qt.to(dot_dtype)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc1 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc2 = tl.zeros([BLOCK_H, 128], tl.float32)
    acc3 = tl.zeros([BLOCK_H, 128], tl.float32)
    if PV_LAG:  # as in _sparse_mla_fwd_kernel: p @ V of block i in step i + 1
        p_prev = tl.zeros([BLOCK_H, BLOCK_K], dtype=dot_dtype)
        alpha_prev = tl.zeros([BLOCK_H], dtype=tl.float32)
        if OFFS64:
            rows_prev = tl.zeros([BLOCK_K], dtype=tl.int64)
        else:
            rows_prev = tl.zeros([BLOCK_K], dtype=tl.int32)
        valid_prev = offs_k < 0
    k_start = pid_s * k_per_split
    k_end = tl.minimum(topk, k_start + k_per_split)
    idx_row = idx_ptr + pid_t.to(tl.int64) * stride_it
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        idx = tl.load(idx_row + kk, mask=kk < k_end, other=-1)
        valid = (idx >= 0) & (idx < n_kv)
        if OFFS64:
            rows = idx.to(tl.int64)
        else:
            rows = idx
        if PV_LAG:
            w0 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 0, dot_dtype, INT_DECODE)
            acc0 = tl.dot(p_prev, w0, acc0 * alpha_prev[:, None], input_precision=DOT_PREC)
            w1 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 1, dot_dtype, INT_DECODE)
            acc1 = tl.dot(p_prev, w1, acc1 * alpha_prev[:, None], input_precision=DOT_PREC)
            w2 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 2, dot_dtype, INT_DECODE)
            acc2 = tl.dot(p_prev, w2, acc2 * alpha_prev[:, None], input_precision=DOT_PREC)
            w3 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 3, dot_dtype, INT_DECODE)
            acc3 = tl.dot(p_prev, w3, acc3 * alpha_prev[:, None], input_precision=DOT_PREC)
        # scaled partial dots summed (not chained through acc=): see _sparse_mla_fwd_kernel
        if SCALE_FOLD:
            # q . (sc * x8) = sc * (q . x8), and p @ (sc * x8) = (p * sc) @ x8 with sc a
            # per-row (per-column of s) scale: [BLOCK_H, BLOCK_K] multiplies instead of
            # [BLOCK_K, 512] ones on the tiles
            v0 = _fp8_tile(c8_ptr, rows, valid, stride_kv, offs_c, 0, dot_dtype, INT_DECODE)
            sc0 = _tile_scale(scale_ptr, rows, valid, stride_scale, 0)
            s = tl.dot(q0, tl.trans(v0), input_precision=DOT_PREC) * (sc0 * qk_scale)[None, :]
            v1 = _fp8_tile(c8_ptr, rows, valid, stride_kv, offs_c, 1, dot_dtype, INT_DECODE)
            sc1 = _tile_scale(scale_ptr, rows, valid, stride_scale, 1)
            s += tl.dot(q1, tl.trans(v1), input_precision=DOT_PREC) * (sc1 * qk_scale)[None, :]
            v2 = _fp8_tile(c8_ptr, rows, valid, stride_kv, offs_c, 2, dot_dtype, INT_DECODE)
            sc2 = _tile_scale(scale_ptr, rows, valid, stride_scale, 2)
            s += tl.dot(q2, tl.trans(v2), input_precision=DOT_PREC) * (sc2 * qk_scale)[None, :]
            v3 = _fp8_tile(c8_ptr, rows, valid, stride_kv, offs_c, 3, dot_dtype, INT_DECODE)
            sc3 = _tile_scale(scale_ptr, rows, valid, stride_scale, 3)
            s += tl.dot(q3, tl.trans(v3), input_precision=DOT_PREC) * (sc3 * qk_scale)[None, :]
        else:
            v0 = _dequant_tile(c8_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 0, dot_dtype, INT_DECODE)
            s = tl.dot(q0, tl.trans(v0), input_precision=DOT_PREC) * qk_scale
            v1 = _dequant_tile(c8_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 1, dot_dtype, INT_DECODE)
            s += tl.dot(q1, tl.trans(v1), input_precision=DOT_PREC) * qk_scale
            v2 = _dequant_tile(c8_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 2, dot_dtype, INT_DECODE)
            s += tl.dot(q2, tl.trans(v2), input_precision=DOT_PREC) * qk_scale
            v3 = _dequant_tile(c8_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 3, dot_dtype, INT_DECODE)
            s += tl.dot(q3, tl.trans(v3), input_precision=DOT_PREC) * qk_scale
        kt = tl.load(tail_ptr + rows[:, None] * stride_tail + offs_dt[None, :], mask=valid[:, None], other=0.0)
        s += tl.dot(qt, tl.trans(kt.to(dot_dtype)), input_precision=DOT_PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_LAG:
            p_prev = p.to(dot_dtype)
            alpha_prev = alpha
            rows_prev = rows
            valid_prev = valid
        elif SCALE_FOLD:
            acc0 = tl.dot((p * sc0[None, :]).to(dot_dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
            acc1 = tl.dot((p * sc1[None, :]).to(dot_dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
            acc2 = tl.dot((p * sc2[None, :]).to(dot_dtype), v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
            acc3 = tl.dot((p * sc3[None, :]).to(dot_dtype), v3, acc3 * alpha[:, None], input_precision=DOT_PREC)
        else:
            p = p.to(dot_dtype)
            acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
            acc3 = tl.dot(p, v3, acc3 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    if PV_LAG:
        w0 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 0, dot_dtype, INT_DECODE)
        acc0 = tl.dot(p_prev, w0, acc0 * alpha_prev[:, None], input_precision=DOT_PREC)
        w1 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 1, dot_dtype, INT_DECODE)
        acc1 = tl.dot(p_prev, w1, acc1 * alpha_prev[:, None], input_precision=DOT_PREC)
        w2 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 2, dot_dtype, INT_DECODE)
        acc2 = tl.dot(p_prev, w2, acc2 * alpha_prev[:, None], input_precision=DOT_PREC)
        w3 = _dequant_tile(c8_ptr, scale_ptr, rows_prev, valid_prev, stride_kv, stride_scale, offs_c, 3, dot_dtype, INT_DECODE)
        acc3 = tl.dot(p_prev, w3, acc3 * alpha_prev[:, None], input_precision=DOT_PREC)

    has = l_i > 0.0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    o_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + pid_t.to(tl.int64) * stride_ot
              + offs_h[:, None] * stride_oh + offs_c[None, :])
    l_off = pid_s.to(tl.int64) * stride_ls + pid_t.to(tl.int64) * stride_lt + offs_h
    o_ty = out_ptr.dtype.element_ty
    tl.store(o_ptrs + 0, (acc0 * inv[:, None]).to(o_ty), mask=h_mask[:, None])
    tl.store(o_ptrs + 128, (acc1 * inv[:, None]).to(o_ty), mask=h_mask[:, None])
    tl.store(o_ptrs + 256, (acc2 * inv[:, None]).to(o_ty), mask=h_mask[:, None])
    tl.store(o_ptrs + 384, (acc3 * inv[:, None]).to(o_ty), mask=h_mask[:, None])
    if SPLIT:
        lse2 = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + l_off, lse2, mask=h_mask)
        tl.store(ml_ptr + l_off, m_i, mask=h_mask)
    else:
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
        tl.store(lse_ptr + l_off, lse, mask=h_mask)
        tl.store(ml_ptr + l_off, m_i * 0.6931471805599453, mask=h_mask)


@triton.jit
def _combine_splits_kernel(
    po_ptr, plse_ptr, pml_ptr,  # partials: out [S, T, h_q, d_v] fp32, lse2/max2 [S, T, h_q]
    out_ptr, ml_ptr, lse_ptr,  # out [T, h_q, d_v], max_logits / lse [T, h_q]
    n_split, h_q,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    stride_ot, stride_oh,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse2_s - max lse2): each split's
    output is already normalized by its own sum, so its weight is its share of the total."""
    h = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D_V
    l_ptrs = offs_s * stride_ls + t * stride_lt + h
    lse2 = tl.load(plse_ptr + l_ptrs, mask=offs_s < n_split, other=float("-inf"))
    mx2 = tl.max(tl.load(pml_ptr + l_ptrs, mask=offs_s < n_split, other=float("-inf")), 0)
    big = tl.max(lse2, 0)
    big_use = tl.where(big == float("-inf"), 0.0, big)
    w_sum = tl.sum(tl.math.exp2(lse2 - big_use), 0)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s in range(0, n_split):
        w = tl.math.exp2(tl.load(plse_ptr + s * stride_ls + t * stride_lt + h) - big_use)
        o = tl.load(po_ptr + s * stride_ps + t * stride_pt + h * stride_ph + offs_d, mask=d_mask, other=0.0)
        acc += w * o
    has = w_sum > 0.0
    out = acc / tl.where(has, w_sum, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    lse = tl.where(has, (big + tl.math.log2(tl.where(has, w_sum, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(lse_ptr + t * h_q + h, lse)  # lse / max_logits: contiguous [T, h_q]
    tl.store(ml_ptr + t * h_q + h, mx2 * 0.6931471805599453)


def _launch(q, kv_v, kv_tail, kv_scale, idx, n_kv, sm_scale, d_v, d_tail, kv_fp8, n_split=1,
            config=None, probs_dtype=None, scratch_bytes=1 << 30):
    """Run the kernel on q [T, h_q, d_qk] and indices [T, topk] over rows kv_v [N, >= d_v]
    (+ tail rows [N, >= d_tail], + fp32 scales [N, >= 4] when kv_fp8).

    Returns (out [T, h_q, d_v] q.dtype, max_logits [T, h_q] fp32, lse [T, h_q] fp32), and
    with ``probs_dtype`` (the scratch's: float16 or float8_e4m3fn; bf16/fp32 rows, no split)
    also probs [T, topk] fp32, the head-mean
    attention probability of each slot (queries in chunks whose fp16 scratch fits
    ``scratch_bytes``)."""
    t_q, h_q, _ = q.shape
    topk = idx.shape[1]
    cfg = dict(default_config(q.device, h_q, d_v, kv_fp8))
    if config:
        cfg.update(config)
    block_h, block_k = cfg["BLOCK_H"], cfg["BLOCK_K"]
    upcast = q.dtype == torch.float32 or _interpreted()
    prec = "ieee" if upcast else "tf32"
    block_dv = triton.next_power_of_2(d_v)
    block_dt = max(16, triton.next_power_of_2(d_tail)) if d_tail > 0 else 16
    n_hb = triton.cdiv(h_q, block_h)
    out = torch.empty(t_q, h_q, d_v, dtype=q.dtype, device=q.device)
    max_logits = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    probs = probs_dtype is not None
    if probs and (kv_fp8 or n_split > 1):
        raise ValueError("probs: only for bf16/fp32 rows without split-k (the training forward)")
    if t_q == 0:
        return (out, max_logits, lse) + ((torch.zeros(0, topk, device=q.device),) if probs else ())
    # split-k: each split gets a whole number of BLOCK_K steps
    n_steps = triton.cdiv(topk, block_k)
    n_split = max(1, min(n_split, n_steps))
    k_per_split = triton.cdiv(n_steps, n_split) * block_k
    n_split = triton.cdiv(topk, k_per_split)
    tail = kv_tail if kv_tail is not None else kv_v
    scale = kv_scale if kv_scale is not None else kv_v
    # int32 row offsets while every (row, byte) of kv stays below 2^31 elements
    offs64 = max(kv_v.stride(0), tail.stride(0), scale.stride(0)) * max(n_kv, 1) >= 2 ** 31 - 1024
    if kv_fp8:
        kernel = _sparse_mla_fp8_kernel
        int_decode = bool(cfg.get("INT_DECODE", not fp8_native(q.device)))
        if int_decode:
            kv_v = kv_v.view(torch.uint8)
        meta = dict(OFFS64=offs64, PV_LAG=bool(cfg.get("PV_LAG", False)), BLOCK_H=block_h, BLOCK_K=block_k,
                    SCALE_FOLD=bool(cfg.get("SCALE_FOLD", False)), INT_DECODE=int_decode, UPCAST=upcast, DOT_PREC=prec,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        kernel = _sparse_mla_fwd_kernel
        meta = dict(OFFS64=offs64, PV_LAG=bool(cfg.get("PV_LAG", False)), D_V=d_v, D_TAIL=d_tail,
                    BLOCK_DV=block_dv, BLOCK_DT=block_dt,
                    BLOCK_H=block_h, BLOCK_K=block_k, UPCAST=upcast, DOT_PREC=prec,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if n_split == 1:
        args = (n_kv, topk, h_q, k_per_split, sm_scale * LOG2E,
                q.stride(0), q.stride(1), kv_v.stride(0), tail.stride(0), scale.stride(0), idx.stride(0),
                0, out.stride(0), out.stride(1), 0, lse.stride(0))
        if not probs:
            kernel[(n_hb, t_q, 1)](q, kv_v, tail, scale, idx, out, max_logits, lse, *args, SPLIT=False, **meta)
            return out, max_logits, lse
        # Transient scratch: each block's p (fp16 or e4m3: 2 or 1 bytes per (query, head,
        # slot)) and its per-head max, for a chunk of queries at a time (reused by the next
        # chunk: the launches run in stream order), reduced over the heads by a second
        # kernel. Reading it back inside the forward instead left the forward's programs (one
        # per SM) waiting on loads: 7.3 ms instead of 4.2 (H200, 2026-12-01, h_q 64).
        fp8 = probs_dtype == torch.float8_e4m3fn
        chunk = max(1, min(t_q, scratch_bytes // (h_q * topk * (1 if fp8 else 2))))
        p_scr = torch.empty(chunk, h_q, topk, dtype=probs_dtype, device=q.device)
        # a block's maxima side by side: [chunk, h_q, n_steps] (64 strided 4-byte stores a
        # block) made the forward with e4m3 probs 5.10 ms at h_q 64 (commit 2ff20dd,
        # benchmarks/results/indexer_loss.json) against 4.97 with the same tl.store
        # (probe_probs_store.json of commit 01f52fc, "maxima by tl.store"; H200, 2026-12-02)
        m_scr = torch.empty(chunk, n_steps, h_q, dtype=torch.float32, device=q.device)
        pr = torch.empty(t_q, topk, dtype=torch.float32, device=q.device)
        # The p tile by TMA (Hopper and later): the tile's rows must not run into the next
        # query's (whole head blocks) and the row pitch must be a multiple of 16 bytes.
        tma = (bool(cfg.get("TMA_STORE", False)) and _has_tma(q.device) and h_q % block_h == 0
               and topk * p_scr.element_size() % 16 == 0)
        # The maxima by inline PTX only beside tl.store's p tile: beside the TMA store they
        # cost 0.1 ms more than by tl.store (h_q 64 and 128; H200, 2026-12-02,
        # benchmarks/results/probe_probs_store.json, "TMA, maxima by PTX").
        asm = bool(cfg.get("ASM_STORE", False)) and not tma and _nvidia_compiled()
        desc = TensorDescriptor.from_tensor(p_scr.view(chunk * h_q, topk), [block_h, block_k]) if tma else None
        extra = dict(PROBS=True, PROBS_FP8=fp8, ASM_STORE=asm, TMA_STORE=tma, ps_ptr=p_scr, ms_ptr=m_scr,
                     ps_desc=desc, stride_pst=p_scr.stride(0), stride_psh=p_scr.stride(1),
                     stride_mst=m_scr.stride(0), stride_msb=m_scr.stride(1))
        for c0 in range(0, t_q, chunk):
            c1 = min(t_q, c0 + chunk)  # views of the chunk's rows, same strides
            kernel[(n_hb, c1 - c0, 1)](q[c0:c1], kv_v, tail, scale, idx[c0:c1], out[c0:c1], max_logits[c0:c1],
                                       lse[c0:c1], *args, SPLIT=False, **meta, **extra)
            # REDUCE_WARPS: 2 warps took 0.27 ms at h_q 64 for 1 GiB of fp16 scratch (3.9 TB/s; 4
            # warps 0.45 ms), as much for the 0.5 GiB of e4m3; 1 warp (the sm90 config, no
            # cross-warp sum) made the whole forward 0.11-0.15 ms faster at h_q 64 (H200,
            # 2026-12-01 and 02, benchmarks/results/probe_probs_store.json: "reduction in 2 warps")
            _probs_reduce_kernel[(n_steps, c1 - c0)](
                p_scr, m_scr, lse[c0:c1], pr[c0:c1], h_q, topk, (1.0 / 256 if fp8 else 1.0) / h_q,
                p_scr.stride(0), p_scr.stride(1), m_scr.stride(0), m_scr.stride(1), lse.stride(0), pr.stride(0),
                BLOCK_H=max(16, triton.next_power_of_2(h_q)), BLOCK_K=block_k,
                num_warps=cfg.get("REDUCE_WARPS", 2))
        return out, max_logits, lse, pr
    p_out = torch.empty(n_split, t_q, h_q, d_v, dtype=torch.float32, device=q.device)
    p_lse = torch.empty(n_split, t_q, h_q, dtype=torch.float32, device=q.device)
    p_ml = torch.empty(n_split, t_q, h_q, dtype=torch.float32, device=q.device)
    kernel[(n_hb, t_q, n_split)](
        q, kv_v, tail, scale, idx, p_out, p_ml, p_lse,
        n_kv, topk, h_q, k_per_split, sm_scale * LOG2E,
        q.stride(0), q.stride(1), kv_v.stride(0), tail.stride(0), scale.stride(0), idx.stride(0),
        p_out.stride(0), p_out.stride(1), p_out.stride(2), p_lse.stride(0), p_lse.stride(1),
        SPLIT=True, **meta)
    _combine_splits_kernel[(h_q, t_q)](
        p_out, p_lse, p_ml, out, max_logits, lse, n_split, h_q,
        p_out.stride(0), p_out.stride(1), p_out.stride(2), p_lse.stride(0), p_lse.stride(1),
        out.stride(0), out.stride(1),
        D_V=d_v, BLOCK_DV=block_dv, BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4)
    return out, max_logits, lse


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                   d_v: int = 512, n_split: int = 1, config: dict | None = None, return_probs: bool = False,
                   scratch_bytes: int = 1 << 30, probs_dtype: torch.dtype = torch.float16):
    """Sparse MLA forward (SPEC 3) on validated inputs (use ``flashdsa.sparse_mla_fwd``).

    q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk] (same float dtype), indices [s_q, 1, topk] int32
    with -1 or >= s_kv invalid. Returns ``(out [s_q, h_q, d_v] q.dtype, max_logits [s_q, h_q]
    fp32, lse [s_q, h_q] fp32 natural log)``; a row with no valid index gives out 0,
    max_logits -inf, lse +inf. ``n_split`` > 1 splits each row's top-k over that many
    programs (for few tokens); ``config`` overrides the block sizes (see CONFIGS).

    ``return_probs``: a fourth output, probs [s_q, topk] fp32 = mean over heads of the
    attention probability of each slot (0 at invalid slots): the sparse-stage target of
    the indexer loss (SPEC 5), taken from the softmax this kernel computes anyway. Costs a
    transient fp16 scratch of h_q * topk * 2 bytes per query (plus 4 bytes per (query, head,
    block)), written once and read back once by the same program; queries run in chunks
    whose scratch fits ``scratch_bytes`` (1 GiB: 4096 queries at h_q 64, topk 2048).
    ``probs_dtype``: the scratch's type, torch.float16 (2^-11 relative rounding) or
    torch.float8_e4m3fn (1 byte, a quarter of the forward's extra time on an H200, 2^-4
    relative rounding of each head's probability, values below 2^-14 of their block's max
    lost).
    """
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv2 = kv[:, 0]
    if kv2.stride(-1) != 1:
        kv2 = kv2.contiguous()
    idx = indices[:, 0]
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    d_qk = q.shape[-1]
    d_tail = d_qk - d_v
    tail = kv2[:, d_v:] if d_tail > 0 else None
    return _launch(q, kv2, tail, None, idx, kv.shape[0], sm_scale, d_v, d_tail, False, n_split, config,
                   probs_dtype=probs_dtype if return_probs else None, scratch_bytes=scratch_bytes)
