"""Triton backward of sparse MLA attention (absorbed / MQA form, SPEC 3).

Forward (per query t, head h, selected slot j with row r = indices[t, j]):

    s[t,h,j]  = sm_scale * q[t,h] . kv[r]                       (d_qk = 576 wide)
    P[t,h,j]  = exp(s - lse[t,h])                               (lse saved by the forward)
    out[t,h]  = sum_j P[t,h,j] * kv[r, :d_v]                    (d_v = 512 wide)

Backward, with dout = dL/dout and an optional dlse = dL/dlse:

    Delta[t,h] = dout[t,h] . out[t,h] - dlse[t,h]
    dP[t,h,j]  = dout[t,h] . kv[r, :d_v]
    dS[t,h,j]  = sm_scale * P * (dP - Delta)
    dq[t,h]    = sum_j dS[t,h,j] * kv[r]
    dkv[r]    += sum_h dS[t,h,j] * q[t,h]          (all 576 dims)
    dkv[r,:d_v] += sum_h P[t,h,j] * dout[t,h]       (the value part)

dkv collects contributions from every query that selected row r. Four kernels, so that
no program holds more than one large fp32 accumulator (one kernel holding S, dP and the
[64, 576] dq accumulator spills inside its loop at 8 warps):

  0. ``sparse_mla_bwd_preprocess_kernel``: Delta [s_q, h] in fp32.
  1. ``sparse_mla_bwd_ds_kernel``: one program per (query, head block of 64): walks the
     top-k list in blocks of gathered rows, recomputes s and P, computes dP and dS, and
     writes P and dS (in the input dtype, the precision they have as tensor-core operands
     anyway) to a scratch [chunk, h, topk]. q and dout stay in shared memory.
  2. ``sparse_mla_bwd_dq_kernel``: dq = dS @ kv[indices] with the fp32 accumulator
     [64, 576] (144 registers a thread at 8 warps), like the forward's P V product.
  3. ``sparse_mla_bwd_dkv_kernel``: q and dout of the head block resident in shared memory
     as column chunks of 128; per block of 64 slots it forms dS^T q + P^T dout chunk by chunk
     ([64, 128] fp32 tiles) and either
       - atomically adds them to an fp32 dkv (default; the order of the adds varies from run
         to run, so the result does too, in the last bits), or
       - (deterministic=True) stores them to a per-(head block, query, slot) fp32 buffer that
         ``flashdsa.ops.common.reduce_slots_fixed_order`` sums row by row in a fixed order
         (stable sort of the indices: ascending query, then slot, then head block). Costs
         memory: chunk * n_head_blocks * topk * d_qk * 4 bytes.

The scratch traffic is P and dS written once, dS read twice and P once: 8-10 bytes per
(t, h, j) in bf16. Queries are processed in chunks so that the scratch stays under
``scratch_bytes``.

FLOPs (convention of the benchmarks): 2.5 x the forward's 2*s_q*h*topk*(d_qk + d_v);
the exact count of the five products is 2*s_q*h*topk*(3*d_qk + 2*d_v), 2.53 x.

Invalid indices (-1 or >= s_kv) are masked out of every load and store: they touch
no memory and contribute nothing. A query with no valid index (lse = +inf) gets
dq = 0.

Module split of the op: fwd.py (forward kernel and launcher), fwd_fp8.py (fp8_ds_mla
kernel), decode.py (paged decode), bwd.py (this), op.py (custom ops and autograd).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import LOG2E_C, interpreted, last_dim_contiguous, reduce_slots_fixed_order

# Block sizes per kernel: BLOCK_K_<kernel> rows (slots) per step, warps_<kernel> and
# stages_<kernel> its Triton launch options (num_warps, num_stages). BLOCK_H: heads per
# program (64 = one wgmma M tile on Hopper). "sm90" fits Hopper's 227 KB of shared memory
# per block (benchmarks/bench_sparse_mla_bwd.py --sweep picked it; docs/benchmarks_sparse_mla.md):
#   ds  32 rows, 2 stages: q 72 KB + dout 64 KB + 2 x [32, 576] kv tiles
#   dq  64 rows, 2 stages: 2 x ([64, 576] kv + [64, 64] dS)
#   dkv 64 slots, 2 stages: q, dout + P/dS tiles + a [64, 128] fp32 tile
# "small" is for tiny shapes and the interpreter.
CONFIGS = {
    "sm90": dict(BLOCK_H=64, BLOCK_K_DS=32, warps_ds=4, stages_ds=2, BLOCK_K_DQ=64, warps_dq=8, stages_dq=2,
                 BLOCK_K_DKV=64, warps_dkv=4, stages_dkv=2),
    "small": dict(BLOCK_H=16, BLOCK_K_DS=16, warps_ds=4, stages_ds=1, BLOCK_K_DQ=16, warps_dq=4, stages_dq=1,
                  BLOCK_K_DKV=16, warps_dkv=4, stages_dkv=1),
}


# Smaller tiles to fall back to when a launch runs out of shared memory (Triton versions
# differ a little in what they allocate; these leave ~40 KB of headroom).
FALLBACK = dict(BLOCK_K_DS=16, warps_ds=4, stages_ds=3, BLOCK_K_DQ=32, warps_dq=8, stages_dq=2,
                BLOCK_K_DKV=32, warps_dkv=4, stages_dkv=2)


def _launch_with_fallback(kernel, grid, args, consts, m, kind):
    """kernel[grid](*args, **consts, block sizes of ``kind``); on OutOfResources retry once
    with the FALLBACK tiles of that kernel (remembered in m["cfg"])."""
    cfg = m["cfg"]
    k = kind.upper()
    try:
        kernel[grid](*args, **consts, BLOCK_K=cfg[f"BLOCK_K_{k}"], num_warps=cfg[f"warps_{kind}"],
                     num_stages=cfg[f"stages_{kind}"])
    except triton.runtime.errors.OutOfResources:
        for key in (f"BLOCK_K_{k}", f"warps_{kind}", f"stages_{kind}"):
            cfg[key] = FALLBACK[key]
        kernel[grid](*args, **consts, BLOCK_K=cfg[f"BLOCK_K_{k}"], num_warps=cfg[f"warps_{kind}"],
                     num_stages=cfg[f"stages_{kind}"])


def default_config(q: torch.Tensor, d_v: int) -> dict:
    big = q.is_cuda and not interpreted() and d_v > 128
    cfg = dict(CONFIGS["sm90" if big else "small"])
    h = q.shape[1]
    cfg["BLOCK_H"] = min(64, max(16, triton.next_power_of_2(h)))
    return cfg


@triton.jit
def sparse_mla_bwd_preprocess_kernel(
    out_ptr, dout_ptr, dlse_ptr, delta_ptr, n_heads,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_lt,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_H: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta[t, h] = dout[t, h] . out[t, h] - dlse[t, h] (fp32). A kernel of its own so that
    the dq kernel does not hold dout in registers for the elementwise product."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_heads
    offs_v = tl.arange(0, BLOCK_DV)
    m = mask_h[:, None] & (offs_v < D_V)[None, :]
    do = tl.load(dout_ptr + t * stride_dot + offs_h[:, None] * stride_doh + offs_v[None, :], mask=m, other=0.0)
    o = tl.load(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :], mask=m, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # [BH]
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + t * stride_lt + offs_h, mask=mask_h, other=0.0)
    tl.store(delta_ptr + t * stride_lt + offs_h, delta, mask=mask_h)


@triton.jit
def sparse_mla_bwd_ds_kernel(
    q_ptr, kv_ptr, idx_ptr, dout_ptr, lse_ptr, delta_ptr, p_ptr, ds_ptr,
    n_kv, n_heads, topk, sm_scale,
    stride_qt, stride_qh, stride_kvr, stride_it, stride_dot, stride_doh, stride_lt, stride_pt, stride_ph,
    D_V: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would lose 3 digits), else "tf32" (ignored)
):
    """P and dS of one (query, head block) for every selected slot, to the scratch:
    s = q kv^T, P = exp(s - lse), dP = dout V^T, dS = sm_scale P (dP - delta). No
    accumulator lives across the loop, so the gathers can run deep."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    mask_h = offs_h < n_heads
    offs_v = tl.arange(0, BLOCK_DV)  # value dims [0, d_v)
    offs_r = tl.arange(0, BLOCK_DT)  # tail dims [d_v, d_qk)
    mask_v = offs_v < D_V
    mask_r = offs_r < D_TAIL

    # q and dout are only tensor-core operands here: they stay in shared memory.
    q_row = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh
    q_v = tl.load(q_row + offs_v[None, :], mask=mask_h[:, None] & mask_v[None, :], other=0.0)  # [BH, DV]
    q_r = tl.load(q_row + D_V + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # [BH, DT]
    do = tl.load(dout_ptr + t * stride_dot + offs_h[:, None] * stride_doh + offs_v[None, :],
                 mask=mask_h[:, None] & mask_v[None, :], other=0.0)  # [BH, DV]
    delta = tl.load(delta_ptr + t * stride_lt + offs_h, mask=mask_h, other=0.0)  # [BH]
    lse = tl.load(lse_ptr + t * stride_lt + offs_h, mask=mask_h, other=float("inf"))
    # lse = +inf (no valid index, or a padding head) makes every P exactly 0 below.
    lse2 = lse * LOG2E_C
    qk_scale = sm_scale * LOG2E_C

    for k0 in range(0, topk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        idx = tl.load(idx_ptr + t * stride_it + offs_k, mask=offs_k < topk, other=-1)
        valid = (idx >= 0) & (idx < n_kv)
        rows = tl.where(valid, idx, 0).to(tl.int64)
        kv_row = kv_ptr + rows[:, None] * stride_kvr
        kv_v = tl.load(kv_row + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)  # [BK, DV]
        kv_r = tl.load(kv_row + D_V + offs_r[None, :], mask=valid[:, None] & mask_r[None, :], other=0.0)  # [BK, DT]

        s = tl.dot(q_v, tl.trans(kv_v), input_precision=DOT_PREC)  # [BH, BK] fp32
        s = tl.dot(q_r, tl.trans(kv_r), s, input_precision=DOT_PREC)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(valid[None, :] & (lse2[:, None] < float("inf")), p, 0.0)
        dp = tl.dot(do, tl.trans(kv_v), input_precision=DOT_PREC)  # [BH, BK]
        ds = p * (dp - delta[:, None]) * sm_scale

        st_mask = mask_h[:, None] & (offs_k < topk)[None, :]
        st_off = t * stride_pt + offs_h[:, None] * stride_ph + offs_k[None, :]
        tl.store(p_ptr + st_off, p.to(p_ptr.dtype.element_ty), mask=st_mask)
        tl.store(ds_ptr + st_off, ds.to(ds_ptr.dtype.element_ty), mask=st_mask)


@triton.jit
def sparse_mla_bwd_dq_kernel(
    kv_ptr, idx_ptr, ds_ptr, dq_ptr,
    n_kv, n_heads, topk,
    stride_kvr, stride_it, stride_pt, stride_ph, stride_dqt, stride_dqh,
    D_V: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq[t, heads] = dS[t, heads, :] @ kv[indices[t]]: the fp32 accumulator [BH, 576]
    (144 registers a thread at 8 warps) with nothing else held across the loop, like the
    forward's P V product."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_heads
    offs_v = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_DT)
    mask_v = offs_v < D_V
    mask_r = offs_r < D_TAIL

    acc_v = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_H, BLOCK_DT], dtype=tl.float32)
    for k0 in range(0, topk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < topk
        idx = tl.load(idx_ptr + t * stride_it + offs_k, mask=in_k, other=-1)
        valid = (idx >= 0) & (idx < n_kv)
        rows = tl.where(valid, idx, 0).to(tl.int64)
        kv_row = kv_ptr + rows[:, None] * stride_kvr
        kv_v = tl.load(kv_row + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)  # [BK, DV]
        kv_r = tl.load(kv_row + D_V + offs_r[None, :], mask=valid[:, None] & mask_r[None, :], other=0.0)  # [BK, DT]
        ds = tl.load(ds_ptr + t * stride_pt + offs_h[:, None] * stride_ph + offs_k[None, :],
                     mask=mask_h[:, None] & in_k[None, :], other=0.0)  # [BH, BK]
        acc_v = tl.dot(ds, kv_v, acc_v, input_precision=DOT_PREC)
        acc_r = tl.dot(ds, kv_r, acc_r, input_precision=DOT_PREC)

    dq_row = dq_ptr + t * stride_dqt + offs_h[:, None] * stride_dqh
    tl.store(dq_row + offs_v[None, :], acc_v.to(dq_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_v[None, :])
    tl.store(dq_row + D_V + offs_r[None, :], acc_r.to(dq_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])


@triton.jit
def _load_cols(ptr, t, stride_t, offs_h, stride_h, mask_h, c0, n_cols, BLOCK_C: tl.constexpr):
    """[BH, BLOCK_C] tile of row t, columns c0 .. c0 + BLOCK_C (masked at n_cols)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    return tl.load(ptr + t * stride_t + offs_h[:, None] * stride_h + offs_c[None, :],
                   mask=mask_h[:, None] & (offs_c < n_cols)[None, :], other=0.0)


@triton.jit
def _dkv_cols(ds_t, p_t, q_c, do_c, dst, row_off, c0, n_cols, row_mask,
              BLOCK_C: tl.constexpr, WITH_P: tl.constexpr, ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr):
    """dkv[:, c0:c0+C] of the slot block = dS^T q_c (+ P^T dout_c for value columns),
    added atomically to the rows dst + row_off [BK, 1], or stored to them. ds_t, p_t [BK, BH];
    q_c, do_c [BH, C]."""
    acc = tl.dot(ds_t, q_c, input_precision=DOT_PREC)  # [BK, C] fp32
    if WITH_P:
        acc = tl.dot(p_t, do_c, acc, input_precision=DOT_PREC)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    ptrs = dst + row_off + offs_c[None, :]
    m = row_mask[:, None] & (offs_c < n_cols)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=m, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=m)


@triton.jit
def sparse_mla_bwd_dkv_kernel(
    q_ptr, idx_ptr, dout_ptr, p_ptr, ds_ptr, dkv_ptr,
    n_kv, n_heads, topk,
    stride_qt, stride_qh, stride_it, stride_dot, stride_doh, stride_pt, stride_ph,
    stride_dkvr, stride_bh, stride_bt, stride_bk,
    D_V: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_C: tl.constexpr, N_CHUNKS: tl.constexpr,
    BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DETERMINISTIC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query, head block); q and dout of the block stay in shared memory as
    up to 4 column chunks of BLOCK_C (= 128 at d_v 512) so that each dkv product and its
    atomic add work on a [BLOCK_K, 128] fp32 tile (32 registers a thread at 8 warps)
    instead of [BLOCK_K, 512] (which spilled, and whose layout change for the atomics took
    128 KB of shared memory)."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_heads

    q0 = _load_cols(q_ptr, t, stride_qt, offs_h, stride_qh, mask_h, 0, D_V, BLOCK_C)
    do0 = _load_cols(dout_ptr, t, stride_dot, offs_h, stride_doh, mask_h, 0, D_V, BLOCK_C)
    if N_CHUNKS > 1:
        q1 = _load_cols(q_ptr, t, stride_qt, offs_h, stride_qh, mask_h, BLOCK_C, D_V, BLOCK_C)
        do1 = _load_cols(dout_ptr, t, stride_dot, offs_h, stride_doh, mask_h, BLOCK_C, D_V, BLOCK_C)
    if N_CHUNKS > 2:
        q2 = _load_cols(q_ptr, t, stride_qt, offs_h, stride_qh, mask_h, 2 * BLOCK_C, D_V, BLOCK_C)
        do2 = _load_cols(dout_ptr, t, stride_dot, offs_h, stride_doh, mask_h, 2 * BLOCK_C, D_V, BLOCK_C)
        q3 = _load_cols(q_ptr, t, stride_qt, offs_h, stride_qh, mask_h, 3 * BLOCK_C, D_V, BLOCK_C)
        do3 = _load_cols(dout_ptr, t, stride_dot, offs_h, stride_doh, mask_h, 3 * BLOCK_C, D_V, BLOCK_C)
    # tail (rope) columns of q: [BH, BLOCK_DT], column D_V + j
    q_r = _load_cols(q_ptr + D_V, t, stride_qt, offs_h, stride_qh, mask_h, 0, D_TAIL, BLOCK_DT)

    for k0 in range(0, topk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < topk
        idx = tl.load(idx_ptr + t * stride_it + offs_k, mask=in_k, other=-1)
        valid = (idx >= 0) & (idx < n_kv)
        ld_off = t * stride_pt + offs_h[:, None] * stride_ph + offs_k[None, :]
        ld_mask = mask_h[:, None] & in_k[None, :]
        p_t = tl.trans(tl.load(p_ptr + ld_off, mask=ld_mask, other=0.0))  # [BK, BH]
        ds_t = tl.trans(tl.load(ds_ptr + ld_off, mask=ld_mask, other=0.0))
        if DETERMINISTIC:
            # Slot (hb, t, j) of the fp32 buffer; padded slots are written too (zeros)
            # but the reduce kernel only reads the valid ones.
            dst = dkv_ptr + hb * stride_bh + t * stride_bt
            row_off = offs_k[:, None].to(tl.int64) * stride_bk
            row_mask = in_k
        else:
            dst = dkv_ptr
            row_off = tl.where(valid, idx, 0).to(tl.int64)[:, None] * stride_dkvr
            row_mask = valid
        atomic = not DETERMINISTIC
        _dkv_cols(ds_t, p_t, q0, do0, dst, row_off, 0, D_V, row_mask, BLOCK_C, True, atomic, DOT_PREC)
        if N_CHUNKS > 1:
            _dkv_cols(ds_t, p_t, q1, do1, dst, row_off, BLOCK_C, D_V, row_mask, BLOCK_C, True, atomic, DOT_PREC)
        if N_CHUNKS > 2:
            _dkv_cols(ds_t, p_t, q2, do2, dst, row_off, 2 * BLOCK_C, D_V, row_mask, BLOCK_C, True, atomic, DOT_PREC)
            _dkv_cols(ds_t, p_t, q3, do3, dst, row_off, 3 * BLOCK_C, D_V, row_mask, BLOCK_C, True, atomic, DOT_PREC)
        _dkv_cols(ds_t, p_t, q_r, q_r, dst + D_V, row_off, 0, D_TAIL, row_mask, BLOCK_DT, False, atomic, DOT_PREC)


def _prepare(q, kv, indices, out, dout, lse, dlse, d_v, config):
    """Shapes, block sizes and last-dim-contiguous views shared by the launches."""
    s_q, h, d_qk = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[-1]
    cfg = dict(default_config(q, d_v))
    if config:
        cfg.update(config)
    block_dv = max(16, triton.next_power_of_2(d_v))
    if block_dv > 512:
        raise NotImplementedError(f"sparse MLA backward: d_v up to 512 supported, got {d_v}")
    return dict(
        s_q=s_q, h=h, d_qk=d_qk, s_kv=s_kv, topk=topk, d_v=d_v, d_tail=d_qk - d_v, cfg=cfg,
        n_hb=triton.cdiv(h, cfg["BLOCK_H"]),
        dot_prec="ieee" if q.dtype == torch.float32 else "tf32",
        block_dv=block_dv,
        block_c=min(128, block_dv), n_chunks=block_dv // min(128, block_dv),  # 1, 2 or 4 column chunks
        block_dt=max(16, triton.next_power_of_2(max(d_qk - d_v, 1))),
        q=last_dim_contiguous(q), kv=last_dim_contiguous(kv.reshape(s_kv, d_qk)),
        idx=last_dim_contiguous(indices.reshape(s_q, topk)),
        out=last_dim_contiguous(out), dout=last_dim_contiguous(dout), lse=lse.float().contiguous(),
        dlse=None if dlse is None else dlse.float().contiguous(),
    )


def launch_preprocess(m):
    """delta [s_q, h] fp32 = rowsum(dout * out) - dlse."""
    out, dout, dlse = m["out"], m["dout"], m["dlse"]
    delta = torch.empty(m["s_q"], m["h"], dtype=torch.float32, device=out.device)
    bh = 16
    sparse_mla_bwd_preprocess_kernel[(m["s_q"], triton.cdiv(m["h"], bh))](
        out, dout, dlse if dlse is not None else delta, delta, m["h"],
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        D_V=m["d_v"], BLOCK_DV=m["block_dv"], BLOCK_H=bh, HAS_DLSE=dlse is not None, num_warps=4,
    )
    m["delta"] = delta
    return delta


def launch_ds(m, c0, c1, p_buf, ds_buf, sm_scale):
    """P and dS of queries [c0, c1) into rows 0 .. c1-c0 of the scratch. Needs m["delta"]."""
    cfg = m["cfg"]
    qc, ic, doc, lc, dc = (m[k][c0:c1] for k in ("q", "idx", "dout", "lse", "delta"))
    kv2 = m["kv"]
    _launch_with_fallback(sparse_mla_bwd_ds_kernel, (c1 - c0, m["n_hb"]), (
        qc, kv2, ic, doc, lc, dc, p_buf, ds_buf,
        m["s_kv"], m["h"], m["topk"], sm_scale,
        qc.stride(0), qc.stride(1), kv2.stride(0), ic.stride(0), doc.stride(0), doc.stride(1), lc.stride(0),
        p_buf.stride(0), p_buf.stride(1)),
        dict(D_V=m["d_v"], D_TAIL=m["d_tail"], BLOCK_DV=m["block_dv"], BLOCK_DT=m["block_dt"],
             BLOCK_H=cfg["BLOCK_H"], DOT_PREC=m["dot_prec"]), m, "ds")


def launch_dq(m, c0, c1, dq, ds_buf):
    """dq rows [c0, c1) from the dS scratch (rows 0 .. c1-c0)."""
    cfg = m["cfg"]
    ic = m["idx"][c0:c1]
    kv2 = m["kv"]
    _launch_with_fallback(sparse_mla_bwd_dq_kernel, (c1 - c0, m["n_hb"]), (
        kv2, ic, ds_buf, dq[c0:c1],
        m["s_kv"], m["h"], m["topk"],
        kv2.stride(0), ic.stride(0), ds_buf.stride(0), ds_buf.stride(1), dq.stride(0), dq.stride(1)),
        dict(D_V=m["d_v"], D_TAIL=m["d_tail"], BLOCK_DV=m["block_dv"], BLOCK_DT=m["block_dt"],
             BLOCK_H=cfg["BLOCK_H"], DOT_PREC=m["dot_prec"]), m, "dq")


def launch_dkv(m, c0, c1, p_buf, ds_buf, dkv, det_buf=None):
    """dkv contributions of queries [c0, c1): atomics into dkv [s_kv, d_qk] fp32, or
    (det_buf given) stores into det_buf [n_hb, chunk, topk, d_qk] fp32 + fixed-order sum."""
    cfg = m["cfg"]
    qc, ic, doc = (m[k][c0:c1] for k in ("q", "idx", "dout"))
    deterministic = det_buf is not None
    sb = det_buf.stride() if deterministic else (0, 0, 0, 0)
    _launch_with_fallback(sparse_mla_bwd_dkv_kernel, (c1 - c0, m["n_hb"]), (
        qc, ic, doc, p_buf, ds_buf, det_buf if deterministic else dkv,
        m["s_kv"], m["h"], m["topk"],
        qc.stride(0), qc.stride(1), ic.stride(0), doc.stride(0), doc.stride(1),
        p_buf.stride(0), p_buf.stride(1),
        dkv.stride(0), sb[0], sb[1], sb[2]),
        dict(D_V=m["d_v"], D_TAIL=m["d_tail"], BLOCK_C=m["block_c"], N_CHUNKS=m["n_chunks"],
             BLOCK_DT=m["block_dt"], BLOCK_H=cfg["BLOCK_H"], DETERMINISTIC=deterministic, DOT_PREC=m["dot_prec"]),
        m, "dkv")
    if deterministic:
        reduce_slots_fixed_order(det_buf, ic, dkv)


def run_sparse_mla_bwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                   dout: torch.Tensor, lse: torch.Tensor, sm_scale: float, d_v: int = 512,
                   dlse: torch.Tensor | None = None, deterministic: bool = False,
                   scratch_bytes: int = 2 << 30, config: dict | None = None):
    """Gradients of sparse MLA attention w.r.t. q and kv.

    Args:
        q: [s_q, h_q, d_qk]; kv: [s_kv, 1, d_qk]; indices: [s_q, 1, topk] int32
            (-1 or >= s_kv invalid); out: [s_q, h_q, d_v] and lse: [s_q, h_q] fp32 from
            the forward; dout: [s_q, h_q, d_v] upstream gradient of out.
        sm_scale, d_v: as in the forward (d_v <= 512).
        dlse: optional [s_q, h_q] upstream gradient of lse (None = 0).
        deterministic: bitwise reproducible dkv (fixed-order reduction, more memory).
        scratch_bytes: bound on the scratch (P and dS, and the deterministic buffer);
            queries are processed in chunks that fit.
        config: block sizes (see CONFIGS); default by device and shape.

    Returns:
        (dq [s_q, h_q, d_qk] in q.dtype, dkv [s_kv, 1, d_qk] in kv.dtype).
    Inputs are assumed validated (flashdsa.sparse_mla_fwd checks them); the autograd of
    the custom op flashdsa::sparse_mla_fwd (op.py) calls this through flashdsa::sparse_mla_bwd.
    """
    m = _prepare(q, kv, indices, out, dout, lse, dlse, d_v, config)
    s_q, h, topk, d_qk, s_kv = m["s_q"], m["h"], m["topk"], m["d_qk"], m["s_kv"]
    dq = torch.empty_like(m["q"])
    dkv = torch.zeros(s_kv, d_qk, dtype=torch.float32, device=q.device)
    launch_preprocess(m)

    # Per query: P and dS in the kv dtype, plus (deterministic) the fp32 slot buffer.
    per_query = 2 * h * topk * kv.element_size()
    if deterministic:
        per_query += m["n_hb"] * topk * d_qk * 4
    chunk = max(1, min(s_q, scratch_bytes // max(per_query, 1)))
    p_buf = torch.empty(chunk, h, topk, dtype=kv.dtype, device=q.device)
    ds_buf = torch.empty_like(p_buf)
    det_buf = (torch.empty(m["n_hb"], chunk, topk, d_qk, dtype=torch.float32, device=q.device)
               if deterministic else None)
    for c0 in range(0, s_q, chunk):
        c1 = min(s_q, c0 + chunk)
        launch_ds(m, c0, c1, p_buf, ds_buf, sm_scale)
        launch_dq(m, c0, c1, dq, ds_buf)
        launch_dkv(m, c0, c1, p_buf, ds_buf, dkv, det_buf)
    return dq, dkv.to(kv.dtype).view(s_kv, 1, d_qk)
