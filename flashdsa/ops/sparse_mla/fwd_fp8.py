"""The sparse MLA forward kernel over fp8_ds_mla rows (the 656-byte latent cache format of
SPEC 4, flashdsa.layout): the paged decode's kernel for that format.

It is :func:`flashdsa.ops.sparse_mla.fwd.sparse_mla_fwd_kernel` with d_qk 576 and d_v 512
fixed and the value part read as 4 e4m3 tiles of 128 dims, each dequantized to the dot
dtype with its per-row fp32 scale right after its load. The launcher
(:func:`flashdsa.ops.sparse_mla.fwd.run_over_rows`) passes the cache's bytes through three
typed views: e4m3 bytes (``kv_ptr``), fp32 scales (``scale_ptr``) and bf16 rope values
(``tail_ptr``), each already offset to its field.

Module split of the op: fwd.py (bf16/fp32 forward kernel, probabilities reduction, split-k
combine, launcher), fwd_fp8.py (this kernel), decode.py (paged decode), bwd.py (backward),
op.py (custom ops and autograd).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import LN2_C, e4m3_to_f32, pdl_prologue


@triton.jit
def _load_e4m3_f32(c8_ptr, rows, valid, stride_c8, offs_c, TILE: tl.constexpr, INT_DECODE: tl.constexpr):
    """fp32 values of one 128-wide e4m3 tile of rows ``rows``: [BLOCK_K, 128] (0 where invalid)."""
    ptrs = c8_ptr + rows[:, None] * stride_c8 + TILE * 128 + offs_c[None, :]
    if INT_DECODE:  # uint8 bytes (no e4m3 type on this GPU)
        xf = e4m3_to_f32(tl.load(ptrs, mask=valid[:, None], other=0).to(tl.int32))
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
def sparse_mla_fwd_fp8_kernel(
    q_ptr, kv_ptr, tail_ptr, scale_ptr, idx_ptr,  # kv_ptr: the e4m3 bytes, tail_ptr: bf16 rope, scale_ptr: fp32
    out_ptr, ml_ptr, lse_ptr,  # outputs (partials when SPLIT)
    n_kv, topk, h_q, k_per_split, qk_scale,  # qk_scale = sm_scale * log2(e)
    stride_qt, stride_qh,
    stride_kv, stride_tail, stride_scale,  # row strides (in elements of each pointer's type)
    stride_it,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, OFFS64: tl.constexpr,
    INT_DECODE: tl.constexpr = False,  # kv_ptr is uint8, decoded with integer ops (pre-sm_89)
    PDL: tl.constexpr = False,  # programmatic dependent launch: flashdsa.ops.common.pdl_prologue
):
    """Grid, loop and outputs as sparse_mla_fwd_kernel. The value part is handled as 4 tiles
    of 128 dims with 4 accumulators [BLOCK_H, 128]: dequantizing a whole [BLOCK_K, 512] tile
    at once (reshape to [BLOCK_K, 4, 128]) keeps too many fp32 values live next to the
    accumulator and spills."""
    pdl_prologue(PDL)
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
        # scaled partial dots summed (not chained through acc=): see sparse_mla_fwd_kernel
        v0 = _dequant_tile(kv_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 0, dot_dtype, INT_DECODE)
        s = tl.dot(q0, tl.trans(v0), input_precision=DOT_PREC) * qk_scale
        v1 = _dequant_tile(kv_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 1, dot_dtype, INT_DECODE)
        s += tl.dot(q1, tl.trans(v1), input_precision=DOT_PREC) * qk_scale
        v2 = _dequant_tile(kv_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 2, dot_dtype, INT_DECODE)
        s += tl.dot(q2, tl.trans(v2), input_precision=DOT_PREC) * qk_scale
        v3 = _dequant_tile(kv_ptr, scale_ptr, rows, valid, stride_kv, stride_scale, offs_c, 3, dot_dtype, INT_DECODE)
        s += tl.dot(q3, tl.trans(v3), input_precision=DOT_PREC) * qk_scale
        kt = tl.load(tail_ptr + rows[:, None] * stride_tail + offs_dt[None, :], mask=valid[:, None], other=0.0)
        s += tl.dot(qt, tl.trans(kt.to(dot_dtype)), input_precision=DOT_PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(dot_dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PREC)
        acc3 = tl.dot(p, v3, acc3 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

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
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * LN2_C, float("inf"))
        tl.store(lse_ptr + l_off, lse, mask=h_mask)
        tl.store(ml_ptr + l_off, m_i * LN2_C, mask=h_mask)
