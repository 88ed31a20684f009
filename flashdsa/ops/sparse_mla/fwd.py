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

Nothing of size s_q x topk x d_qk is materialized: each program holds one
[BLOCK_K, d_qk] tile of gathered rows at a time.

The launcher :func:`run_over_rows` runs the kernel over any flat list of rows addressed
by index: the prefill's kv (:func:`run_sparse_mla_fwd`) or a paged cache addressed by
physical slot (flashdsa.ops.sparse_mla.decode), whose fp8_ds_mla format has its own
kernel (fwd_fp8.py). It launches the kernel in one of three ways:
  - plain: one pass, the outputs written directly;
  - with probabilities (``probs_dtype``, the training forward): each block's p and its
    per-head max also go to a scratch, and :func:`sparse_mla_probs_reduce_kernel`, a
    separate kernel, reads them back and sums them over the heads;
  - split-k (``n_split`` > 1, decode with few queries): the top-k range is split over
    programs whose fp32 partial results :func:`sparse_mla_combine_kernel` merges.

Module split of the op: fwd.py (this: the bf16/fp32 forward kernel, the probabilities
reduction, the split-k combine, the launcher), fwd_fp8.py (the fp8_ds_mla kernel),
decode.py (paged decode), bwd.py (backward), op.py (custom ops and autograd).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..common import (
    LN2_C,
    LOG2E,
    LOG2E_C,
    capability,
    e4m3_byte,
    e4m3_to_f32,
    fp8_native,
    has_tma,
    interpreted,
    last_dim_contiguous,
    nvidia_compiled,
    pdl_launch,
    pdl_prologue,
)
from .fwd_fp8 import sparse_mla_fwd_fp8_kernel
from .fwd_sm90 import gluon_fwd_supported, run_sparse_mla_fwd_sm90

# Block sizes per GPU family, for the fast shape (d_qk 576, d_v 512, h_q >= 64); the
# defaults of default_config, any key can be overridden by the ``config`` argument.
#   BLOCK_H: heads per program (64 = one wgmma M tile on Hopper; 8 warps split d_v in two
#     halves of 256 so the fp32 accumulator [64, 512] costs 128 registers a thread).
#   BLOCK_K: gathered rows per step. num_warps, num_stages: Triton's launch options
#     (num_stages: software pipelining depth of the gathers; each stage holds a
#     [BLOCK_K, 576] tile in shared memory, q takes another 72 KB).
#   ASM_STORE: with probabilities, store the per-block maxima by inline PTX from the
#     registers that hold them (_store_in_place) where the p tile goes through tl.store.
#   TMA_STORE: with probabilities, store the p tile by TMA (Hopper and later, when the
#     tile's rows stay inside one query's heads and the row pitch is a multiple of 16 bytes).
#   REDUCE_WARPS: warps of sparse_mla_probs_reduce_kernel (1: the sum over the heads stays
#     inside one warp; 2 when absent).
#   INT_DECODE (fp8 only, not in the table): decode the e4m3 bytes with integer operations;
#     default: where Triton has no e4m3 type on the device (before sm_89).
# The sweeps behind these choices are in docs/benchmarks_sparse_mla.md. "sm80" is sized for
# the A100's 163 KB of shared memory; "sm100" for Blackwell, where Triton's build of the
# "sm90" blocks needs more than the 227 KB a block can have (BLOCK_K 32 fits: see
# docs/testing.md; not tuned on a B200); "small" serves tiny shapes and the interpreter.
CONFIGS = {
    "sm90": dict(BLOCK_H=64, BLOCK_K=64, num_warps=8, num_stages=2, ASM_STORE=True, TMA_STORE=True, REDUCE_WARPS=1),
    "sm90_fp8": dict(BLOCK_H=64, BLOCK_K=64, num_warps=8, num_stages=2),
    "sm100": dict(BLOCK_H=64, BLOCK_K=32, num_warps=8, num_stages=2, ASM_STORE=True, TMA_STORE=True,
                  REDUCE_WARPS=1),
    "sm80": dict(BLOCK_H=64, BLOCK_K=32, num_warps=8, num_stages=2, ASM_STORE=True),
    "small": dict(BLOCK_H=64, BLOCK_K=32, num_warps=4, num_stages=2),
}


def default_config(device: torch.device, h_q: int, d_v: int, fp8: bool = False) -> dict:
    """Block sizes for a problem; tiny/odd shapes get small blocks."""
    if d_v > 256 and device.type == "cuda" and not interpreted():
        major, _ = capability(device)
        if major < 9:
            cfg = dict(CONFIGS["sm80"])
        else:
            cfg = dict(CONFIGS["sm90_fp8" if fp8 else "sm100" if major >= 10 else "sm90"])
    else:
        cfg = dict(CONFIGS["small"])
    cfg["BLOCK_H"] = min(cfg["BLOCK_H"], max(16, triton.next_power_of_2(h_q)))
    if interpreted():
        cfg["num_stages"] = 1
    return cfg


def resolve_config(device: torch.device, h_q: int, d_v: int, fp8: bool, config: dict | None) -> dict:
    """:func:`default_config` with the keys of ``config`` (if any) put over it."""
    cfg = dict(default_config(device, h_q, d_v, fp8))
    if config:
        cfg.update(config)
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
    block-wide barriers; the PTX store skips that trip. An element held by several threads
    is stored by each (same value, same address). PTX: CUDA only."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.f32 [$1], $2; } mov.u32 $0, 0;",
            "=r,l,f,r", [ptrs.to(tl.int64), vals, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptrs, vals, mask=mask)


@triton.jit
def sparse_mla_fwd_kernel(
    q_ptr, kv_ptr, tail_ptr, idx_ptr,  # inputs
    out_ptr, ml_ptr, lse_ptr,  # outputs (partials when SPLIT)
    n_kv, topk, h_q, k_per_split, qk_scale,  # qk_scale = sm_scale * log2(e)
    stride_qt, stride_qh,  # q [T, h_q, d_qk], last dim contiguous
    stride_kv, stride_tail,  # row strides of the value rows and of the tail rows
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
    PROBS: tl.constexpr = False,  # also store each block's p and max for sparse_mla_probs_reduce_kernel
    PROBS_FP8: tl.constexpr = False,  # that p scratch in e4m3 (half the bytes of fp16)
    PROBS_INT: tl.constexpr = False,  # PROBS_FP8 bytes by integer encoding (no e4m3 type: before sm_89)
    ASM_STORE: tl.constexpr = False,  # PROBS: the maxima stored by inline PTX (_store_in_place)
    TMA_STORE: tl.constexpr = False,  # PROBS: the p tile stored by TMA through ps_desc (Hopper)
    ps_ptr=None, ms_ptr=None,  # PROBS: scratch p [T, h_q, topk] fp16 / e4m3, m [T, n_blk, h_q] fp32
    ps_desc=None,  # TMA_STORE: descriptor of ps_ptr as [T * h_q, topk], blocks [BLOCK_H, BLOCK_K]
    stride_pst=0, stride_psh=0, stride_mst=0, stride_msb=0,
    PDL: tl.constexpr = False,  # programmatic dependent launch: flashdsa.ops.common.pdl_prologue
):
    pdl_prologue(PDL)
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
        kv_v = tl.load(kv_ptr + rows[:, None] * stride_kv + offs_dv[None, :],
                       mask=_row_mask(valid, dv_mask, BLOCK_DV == D_V), other=0.0)  # [BLOCK_K, BLOCK_DV]
        kv_v = kv_v.to(dot_dtype)
        # [BLOCK_H, BLOCK_K] fp32, base-2 logits. The tail is a separate dot whose scaled
        # result is added: dot(..., acc=s) (or a bare add, which the compiler folds into
        # one) makes the first dot feed another dot, and Triton lays such a dot out with all
        # warps along M, i.e. replicated across warpgroups when BLOCK_H is 64. (s still feeds
        # p @ V the same way; docs/benchmarks_sparse_mla.md says what that costs.)
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
        acc = tl.dot(p.to(dot_dtype), kv_v, acc * alpha[:, None], input_precision=DOT_PREC)
        if PROBS:  # after the p @ V issue (async), which runs meanwhile; p relative to this
            # block's max, rescaled by exp2(m_use - lse2) in sparse_mla_probs_reduce_kernel
            if PROBS_FP8 and PROBS_INT:
                p_st = e4m3_byte(p * 256.0).to(tl.uint8)
            elif PROBS_FP8:  # e4m3 of 256 p: p <= 1 stays below 448, 2^-14 and up keep 3 mantissa bits
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
        lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * LN2_C, float("inf"))
        tl.store(lse_ptr + l_off, lse, mask=h_mask)
        tl.store(ml_ptr + l_off, m_i * LN2_C, mask=h_mask)


@triton.jit
def sparse_mla_probs_reduce_kernel(ps_ptr, ms_ptr, lse_ptr, pr_ptr, h_q, topk, scale,
                                   stride_pst, stride_psh, stride_mst, stride_msb, stride_lt, stride_prt,
                                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, P_INT: tl.constexpr = False):
    """probs[t, j] = scale * sum_h p_blk[h, j] * exp2(m_blk[h] - lse2[h]) for the slots j of
    one forward block: the forward's per-block probabilities (relative to each block's max)
    rescaled by the final lse and averaged over the heads (scale = 1 / h_q, and 1 / 256 for
    the e4m3 scratch; P_INT: its bytes decoded with integer operations). One program per
    (block, query), all heads."""
    pid_j = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = pid_j * BLOCK_K + tl.arange(0, BLOCK_K)
    h_mask = offs_h < h_q
    j_mask = offs_j < topk
    lse = tl.load(lse_ptr + t * stride_lt + offs_h, mask=h_mask, other=float("inf"))
    has = lse < float("inf")  # heads of a row with no valid slot: lse +inf, probs 0
    lse2 = tl.where(has, lse, 0.0) * LOG2E_C
    m = tl.load(ms_ptr + t * stride_mst + pid_j * stride_msb + offs_h, mask=h_mask, other=0.0)
    f = tl.where(has, tl.math.exp2(m - lse2), 0.0) * scale
    p = tl.load(ps_ptr + t * stride_pst + offs_h[:, None] * stride_psh + offs_j[None, :],
                mask=h_mask[:, None] & j_mask[None, :], other=0.0)
    if P_INT:
        p = e4m3_to_f32(p.to(tl.int32))
    else:
        p = p.to(tl.float32)
    tl.store(pr_ptr + t * stride_prt + offs_j, tl.sum(p * f[:, None], 0), mask=j_mask)


@triton.jit
def sparse_mla_combine_kernel(
    po_ptr, plse_ptr, pml_ptr,  # partials: out [S, T, h_q, d_v] fp32, lse2/max2 [S, T, h_q]
    out_ptr, ml_ptr, lse_ptr,  # out [T, h_q, d_v], max_logits / lse [T, h_q]
    n_split, h_q,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    stride_ot, stride_oh,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False,
):
    """out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse2_s - max lse2): each split's
    output is already normalized by its own sum, so its weight is its share of the total.
    PDL: see flashdsa.ops.common.pdl_prologue."""
    pdl_prologue(PDL)
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
    lse = tl.where(has, (big + tl.math.log2(tl.where(has, w_sum, 1.0))) * LN2_C, float("inf"))
    tl.store(lse_ptr + t * h_q + h, lse)  # lse / max_logits: contiguous [T, h_q]
    tl.store(ml_ptr + t * h_q + h, mx2 * LN2_C)


class KvRows(NamedTuple):
    """The rows the forward gathers from, addressed by row index (-1 or >= n_rows: skipped).

    values: [N, >= d_v] bf16/fp16/fp32 rows, or the e4m3 bytes (uint8 or float8_e4m3fn
        view) of fp8_ds_mla rows; tail: the remaining d_qk - d_v dims of each row
        [N, >= d_tail] (None when d_qk == d_v); scales: for fp8_ds_mla the 4 fp32 tile
        scales of each row [N, >= 4], None for plain rows. Last dims contiguous."""
    values: torch.Tensor
    tail: torch.Tensor | None
    scales: torch.Tensor | None
    n_rows: int

    @property
    def fp8(self) -> bool:
        return self.scales is not None


def _split_plan(topk: int, block_k: int, n_split: int) -> tuple[int, int]:
    """(n_split, k_per_split): each split gets a whole number of BLOCK_K steps, none is empty."""
    n_steps = triton.cdiv(topk, block_k)
    n_split = max(1, min(n_split, n_steps))
    k_per_split = triton.cdiv(n_steps, n_split) * block_k
    return triton.cdiv(topk, k_per_split), k_per_split


def _kernel_and_inputs(q, idx, rows: KvRows, sm_scale, d_v, cfg):
    """The kernel for these rows, its input arguments (by name) and its compile-time options."""
    d_tail = q.shape[2] - d_v
    tail = rows.tail if rows.tail is not None else rows.values
    upcast = q.dtype == torch.float32 or interpreted()
    row_strides = [rows.values.stride(0), tail.stride(0)] + ([rows.scales.stride(0)] if rows.fp8 else [])
    meta = dict(
        # int32 row offsets while every (row, byte) of kv stays below 2^31 elements
        OFFS64=max(row_strides) * max(rows.n_rows, 1) >= 2 ** 31 - 1024,
        BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], UPCAST=upcast, DOT_PREC="ieee" if upcast else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(q.device))
    ins = dict(q_ptr=q, tail_ptr=tail, idx_ptr=idx, n_kv=rows.n_rows, topk=idx.shape[1], h_q=q.shape[1],
               qk_scale=sm_scale * LOG2E, stride_qt=q.stride(0), stride_qh=q.stride(1),
               stride_tail=tail.stride(0), stride_it=idx.stride(0))
    if rows.fp8:
        int_decode = bool(cfg.get("INT_DECODE", not fp8_native(q.device)))
        values = rows.values.view(torch.uint8) if int_decode else rows.values
        ins.update(kv_ptr=values, stride_kv=values.stride(0), scale_ptr=rows.scales,
                   stride_scale=rows.scales.stride(0))
        return sparse_mla_fwd_fp8_kernel, ins, dict(meta, INT_DECODE=int_decode)
    ins.update(kv_ptr=rows.values, stride_kv=rows.values.stride(0))
    meta.update(D_V=d_v, D_TAIL=d_tail, BLOCK_DV=triton.next_power_of_2(d_v),
                BLOCK_DT=max(16, triton.next_power_of_2(d_tail)) if d_tail > 0 else 16)
    return sparse_mla_fwd_kernel, ins, meta


def _out_args(out, max_logits, lse, split_dim: bool) -> dict:
    """The output arguments of the forward kernels; ``split_dim``: the tensors have a
    leading split axis (the partials), else the split strides are 0."""
    return dict(out_ptr=out, ml_ptr=max_logits, lse_ptr=lse,
                stride_os=out.stride(0) if split_dim else 0, stride_ot=out.stride(-3), stride_oh=out.stride(-2),
                stride_ls=lse.stride(0) if split_dim else 0, stride_lt=lse.stride(-2))


def _launch_with_probs(kernel, ins, meta, cfg, out, max_logits, lse, k_per_split, probs_dtype, scratch_bytes):
    """The forward plus the head-mean probabilities [T, topk] fp32 (bf16/fp32 rows, one split).

    The forward stores each block's p (fp16 or e4m3: 2 or 1 bytes per (query, head, slot))
    and per-head max to a transient scratch, for a chunk of queries at a time (reused by
    the next chunk: the launches run in stream order); sparse_mla_probs_reduce_kernel then
    reads the chunk's scratch back, rescales it by the final lse and sums it over the heads."""
    q, idx = ins["q_ptr"], ins["idx_ptr"]
    t_q, h_q, topk = q.shape[0], q.shape[1], idx.shape[1]
    block_h, block_k = cfg["BLOCK_H"], cfg["BLOCK_K"]
    n_steps = triton.cdiv(topk, block_k)
    fp8 = probs_dtype == torch.float8_e4m3fn
    chunk = max(1, min(t_q, scratch_bytes // (h_q * topk * (1 if fp8 else 2))))
    p_scr = torch.empty(chunk, h_q, topk, dtype=probs_dtype, device=q.device)
    m_scr = torch.empty(chunk, n_steps, h_q, dtype=torch.float32, device=q.device)  # a block's maxima side by side
    probs = torch.empty(t_q, topk, dtype=torch.float32, device=q.device)
    # The p tile by TMA (Hopper and later): the tile's rows must not run into the next
    # query's (whole head blocks) and the row pitch must be a multiple of 16 bytes.
    tma = (bool(cfg.get("TMA_STORE", False)) and has_tma(q.device) and h_q % block_h == 0
           and topk * p_scr.element_size() % 16 == 0)
    # The maxima by inline PTX only beside tl.store's p tile (beside the TMA store tl.store's are cheaper).
    asm = bool(cfg.get("ASM_STORE", False)) and not tma and nvidia_compiled()
    desc = TensorDescriptor.from_tensor(p_scr.view(chunk * h_q, topk), [block_h, block_k]) if tma else None
    # without the e4m3 type the scratch holds the same bytes, written and read as integers
    p_int = fp8 and not fp8_native(q.device)
    ps = p_scr.view(torch.uint8) if p_int else p_scr
    extra = dict(PROBS=True, PROBS_FP8=fp8, PROBS_INT=p_int, ASM_STORE=asm, TMA_STORE=tma, ps_ptr=ps, ms_ptr=m_scr,
                 ps_desc=desc, stride_pst=p_scr.stride(0), stride_psh=p_scr.stride(1),
                 stride_mst=m_scr.stride(0), stride_msb=m_scr.stride(1))
    for c0 in range(0, t_q, chunk):
        c1 = min(t_q, c0 + chunk)  # views of the chunk's rows, same strides
        chunk_ins = dict(ins, q_ptr=q[c0:c1], idx_ptr=idx[c0:c1])
        kernel[(triton.cdiv(h_q, block_h), c1 - c0, 1)](
            **chunk_ins, **_out_args(out[c0:c1], max_logits[c0:c1], lse[c0:c1], False), k_per_split=k_per_split,
            SPLIT=False, **meta, **extra)
        sparse_mla_probs_reduce_kernel[(n_steps, c1 - c0)](
            ps, m_scr, lse[c0:c1], probs[c0:c1], h_q, topk, (1.0 / 256 if fp8 else 1.0) / h_q,
            p_scr.stride(0), p_scr.stride(1), m_scr.stride(0), m_scr.stride(1), lse.stride(0), probs.stride(0),
            BLOCK_H=max(16, triton.next_power_of_2(h_q)), BLOCK_K=block_k, P_INT=p_int,
            num_warps=cfg.get("REDUCE_WARPS", 2))
    return probs


def _launch_split(kernel, ins, meta, out, max_logits, lse, n_split, k_per_split, block_h):
    """The forward with the top-k range split over ``n_split`` programs per (head block,
    query): fp32 partials (outputs normalized per split, base-2 lse and max), merged into
    out / max_logits / lse by sparse_mla_combine_kernel."""
    t_q, h_q, d_v = out.shape
    p_out = torch.empty(n_split, t_q, h_q, d_v, dtype=torch.float32, device=out.device)
    p_lse = torch.empty(n_split, t_q, h_q, dtype=torch.float32, device=out.device)
    p_ml = torch.empty(n_split, t_q, h_q, dtype=torch.float32, device=out.device)
    kernel[(triton.cdiv(h_q, block_h), t_q, n_split)](
        **ins, **_out_args(p_out, p_ml, p_lse, True), k_per_split=k_per_split, SPLIT=True, **meta)
    sparse_mla_combine_kernel[(h_q, t_q)](
        p_out, p_lse, p_ml, out, max_logits, lse, n_split, h_q,
        p_out.stride(0), p_out.stride(1), p_out.stride(2), p_lse.stride(0), p_lse.stride(1),
        out.stride(0), out.stride(1),
        D_V=d_v, BLOCK_DV=triton.next_power_of_2(d_v), BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4,
        **pdl_launch(out.device))


def run_over_rows(q: torch.Tensor, idx: torch.Tensor, rows: KvRows, sm_scale: float, d_v: int,
                  n_split: int = 1, config: dict | None = None, probs_dtype: torch.dtype | None = None,
                  scratch_bytes: int = 1 << 30):
    """The forward of q [T, h_q, d_qk] over rows ``rows`` selected by idx [T, topk] (last
    dims contiguous; validated inputs).

    Returns (out [T, h_q, d_v] q.dtype, max_logits [T, h_q] fp32, lse [T, h_q] fp32), and
    with ``probs_dtype`` (the scratch's: float16 or float8_e4m3fn; plain rows, one split)
    also probs [T, topk] fp32, the head-mean attention probability of each slot (queries in
    chunks whose scratch fits ``scratch_bytes``). ``n_split`` > 1 splits the top-k range."""
    t_q, h_q, _ = q.shape
    topk = idx.shape[1]
    cfg = resolve_config(q.device, h_q, d_v, rows.fp8, config)
    out = torch.empty(t_q, h_q, d_v, dtype=q.dtype, device=q.device)
    max_logits = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    with_probs = probs_dtype is not None
    if with_probs and (rows.fp8 or n_split > 1):
        raise ValueError("probs: only for bf16/fp32 rows without split-k (the training forward)")
    if t_q == 0:
        return (out, max_logits, lse) + ((torch.zeros(0, topk, device=q.device),) if with_probs else ())
    n_split, k_per_split = _split_plan(topk, cfg["BLOCK_K"], n_split)
    kernel, ins, meta = _kernel_and_inputs(q, idx, rows, sm_scale, d_v, cfg)
    if with_probs:
        probs = _launch_with_probs(kernel, ins, meta, cfg, out, max_logits, lse, k_per_split, probs_dtype,
                                   scratch_bytes)
        return out, max_logits, lse, probs
    if n_split > 1:
        _launch_split(kernel, ins, meta, out, max_logits, lse, n_split, k_per_split, cfg["BLOCK_H"])
    else:
        kernel[(triton.cdiv(h_q, cfg["BLOCK_H"]), t_q, 1)](
            **ins, **_out_args(out, max_logits, lse, False), k_per_split=k_per_split, SPLIT=False, **meta)
    return out, max_logits, lse


def run_sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                       d_v: int = 512, n_split: int = 1, config: dict | None = None, return_probs: bool = False,
                       scratch_bytes: int = 1 << 30, probs_dtype: torch.dtype = torch.float8_e4m3fn,
                       impl: str = "auto"):
    """Sparse MLA forward (SPEC 3) on validated inputs, not differentiable (use
    ``flashdsa.sparse_mla_fwd``, or flashdsa.ops.sparse_mla.sparse_mla_fwd for the
    differentiable custom op).

    q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk] (same float dtype), indices [s_q, 1, topk] int32
    with -1 or >= s_kv invalid. Returns ``(out [s_q, h_q, d_v] q.dtype, max_logits [s_q, h_q]
    fp32, lse [s_q, h_q] fp32 natural log)``; a row with no valid index gives out 0,
    max_logits -inf, lse +inf. ``n_split`` > 1 splits each row's top-k over that many
    programs (for few tokens); ``config`` overrides the block sizes (see CONFIGS).

    ``return_probs``: a fourth output, probs [s_q, topk] fp32 = mean over heads of the
    attention probability of each slot (0 at invalid slots): the sparse-stage target of
    the indexer loss (SPEC 5), taken from the softmax this kernel computes anyway. The
    forward writes each block's probabilities (relative to the block's max) and the
    block's per-head max to a transient scratch of h_q * topk bytes (e4m3) or twice that
    (fp16) per query, plus 4 bytes per (query, head, block); a separate reduction kernel
    reads it back, rescales it by the final lse and averages over the heads. Queries run
    in chunks whose scratch fits ``scratch_bytes``.
    ``impl``: "triton" runs the Triton kernel of this module; "gluon" the Hopper kernel of
    fwd_sm90.py (ValueError where :func:`~flashdsa.ops.sparse_mla.fwd_sm90.gluon_fwd_supported`
    says it cannot, or with probabilities, split-k or a ``config``); "auto" the Gluon kernel
    where it can run, else the Triton one.
    ``probs_dtype``: the scratch's type, torch.float8_e4m3fn (256 p stored: 2^-4 relative
    rounding of each head's probability, values below 2^-14 of their block's max lost) or
    torch.float16 (2^-11 relative rounding).
    """
    q = last_dim_contiguous(q)
    kv2 = last_dim_contiguous(kv[:, 0])
    idx = last_dim_contiguous(indices[:, 0])
    if impl != "triton":
        why = ("it returns no probabilities" if return_probs else "it has no split-k" if n_split > 1
               else "it takes no config" if config else None) or gluon_fwd_supported(q, kv2, d_v)
        if why is None:
            return run_sparse_mla_fwd_sm90(q, kv2, idx, sm_scale)
        if impl == "gluon":
            raise ValueError(f"impl='gluon': {why}")
    tail = kv2[:, d_v:] if q.shape[-1] > d_v else None
    return run_over_rows(q, idx, KvRows(kv2, tail, None, kv.shape[0]), sm_scale, d_v, n_split, config,
                         probs_dtype=probs_dtype if return_probs else None, scratch_bytes=scratch_bytes)
