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

dkv collects contributions from every query that selected row r. Two kernels, so
that no program holds both the dq accumulator [BLOCK_H, 576] and a dkv tile
[BLOCK_K, 576] in fp32 registers at once (together about 216 registers a thread
at BLOCK_H 64, BLOCK_K 32, 8 warps: they would spill):

  1. ``sparse_mla_bwd_dq_kernel``: one program per (query, head block): walks the
     top-k list in blocks of BLOCK_K gathered rows, recomputes s and P, computes
     dP and dS, accumulates dq in registers and writes P and dS (in the input dtype,
     the precision they have as tensor-core operands anyway) to a scratch buffer
     [chunk, h, topk].
  2. ``sparse_mla_bwd_dkv_kernel``: one program per (query, head block) again,
     q and dout resident, reads P and dS back block by block and forms the dkv tile
     dS^T q + P^T dout [BLOCK_K, 576] with two tensor-core products, then either
       - atomically adds it to an fp32 dkv (default; the order of the adds varies
         from run to run, so the result does too, in the last bits), or
       - (deterministic=True) stores it to a per-(head block, query, slot) fp32
         buffer that ``sparse_mla_bwd_reduce_kernel`` sums row by row in a fixed
         order (stable sort of the indices: ascending query, then slot, then head
         block). Costs memory: chunk * n_head_blocks * topk * d_qk * 4 bytes.

The scratch traffic (P and dS written and read once, 8 bytes per (t, h, j) in bf16)
is about 1 ms at s_q 4096, h 64, topk 2048 on an H200, against ~15 ms of math.
Queries are processed in chunks so that the scratch stays under ``scratch_bytes``.

FLOPs (convention of the benchmarks): 2.5 x the forward's 2*s_q*h*topk*(d_qk + d_v);
the exact count of the five products is 2*s_q*h*topk*(3*d_qk + 2*d_v), 2.53 x.

Invalid indices (-1 or >= s_kv) are masked out of every load and store: they touch
no memory and contribute nothing. A query with no valid index (lse = +inf) gets
dq = 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Block sizes. BLOCK_H: heads per program (64 = one wgmma M tile on Hopper).
# dq kernel: BLOCK_K_DQ gathered rows per step; the fp32 accumulator [64, 576] costs 144
#   registers a thread at 8 warps; shared memory holds q (72 KB) and dout (64 KB) plus
#   num_stages tiles [BLOCK_K, 576] bf16 (36 KB at 32 rows): 2 stages of 32 rows fit in
#   the 227 KB of an H100/H200 SM, 2 of 64 do not.
# dkv kernel: BLOCK_K_DKV slots per step are the M of its two products (64 = one wgmma
#   tile); the fp32 tile [64, 576] costs 144 registers at 8 warps. HB_PER_PROG_DKV head
#   blocks share one program (and one atomic add per tile) with q/dout re-read from L2.
# Chosen on an H200 with benchmarks/bench_sparse_mla_bwd.py (docs/training.md has the
# sweep); "small" is for tiny shapes and the interpreter.
CONFIGS = {
    "sm90": dict(BLOCK_H=64, BLOCK_K_DQ=32, BLOCK_K_DKV=64, warps_dq=8, warps_dkv=8, stages_dq=2, stages_dkv=2,
                 HB_PER_PROG_DKV=1),
    "small": dict(BLOCK_H=16, BLOCK_K_DQ=16, BLOCK_K_DKV=16, warps_dq=4, warps_dkv=4, stages_dq=1, stages_dkv=1,
                  HB_PER_PROG_DKV=1),
}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(q: torch.Tensor, d_v: int) -> dict:
    big = q.is_cuda and not _interpreted() and d_v > 128
    cfg = dict(CONFIGS["sm90" if big else "small"])
    h = q.shape[1]
    cfg["BLOCK_H"] = min(64, max(16, triton.next_power_of_2(h)))
    return cfg


@triton.jit
def sparse_mla_bwd_dq_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, dout_ptr, lse_ptr, dlse_ptr,
    dq_ptr, p_ptr, ds_ptr,
    n_kv, n_heads, topk, sm_scale,
    stride_qt, stride_qh, stride_kvr, stride_it,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_lt,
    stride_dqt, stride_dqh, stride_pt, stride_ph,
    D_V: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DLSE: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would lose 3 digits), else "tf32" (ignored)
):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    mask_h = offs_h < n_heads
    offs_v = tl.arange(0, BLOCK_DV)  # value dims [0, d_v)
    offs_r = tl.arange(0, BLOCK_DT)  # tail dims [d_v, d_qk)
    mask_v = offs_v < D_V
    mask_r = offs_r < D_TAIL

    q_row = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh
    q_v = tl.load(q_row + offs_v[None, :], mask=mask_h[:, None] & mask_v[None, :], other=0.0)  # [BH, DV]
    q_r = tl.load(q_row + D_V + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # [BH, DT]
    do = tl.load(dout_ptr + t * stride_dot + offs_h[:, None] * stride_doh + offs_v[None, :],
                 mask=mask_h[:, None] & mask_v[None, :], other=0.0)  # [BH, DV]
    o = tl.load(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :],
                mask=mask_h[:, None] & mask_v[None, :], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # [BH]
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + t * stride_lt + offs_h, mask=mask_h, other=0.0)
    lse = tl.load(lse_ptr + t * stride_lt + offs_h, mask=mask_h, other=float("inf"))
    # lse = +inf (no valid index, or a padding head) makes every P exactly 0 below.
    lse2 = lse * LOG2E
    qk_scale = sm_scale * LOG2E

    acc_v = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_H, BLOCK_DT], dtype=tl.float32)
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

        p_c = p.to(kv_v.dtype)
        ds_c = ds.to(kv_v.dtype)
        st_mask = mask_h[:, None] & (offs_k < topk)[None, :]
        st_off = t * stride_pt + offs_h[:, None] * stride_ph + offs_k[None, :]
        tl.store(p_ptr + st_off, p_c, mask=st_mask)
        tl.store(ds_ptr + st_off, ds_c, mask=st_mask)

        acc_v = tl.dot(ds_c, kv_v, acc_v, input_precision=DOT_PREC)  # [BH, DV]
        acc_r = tl.dot(ds_c, kv_r, acc_r, input_precision=DOT_PREC)  # [BH, DT]

    dq_row = dq_ptr + t * stride_dqt + offs_h[:, None] * stride_dqh
    tl.store(dq_row + offs_v[None, :], acc_v.to(dq_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_v[None, :])
    tl.store(dq_row + D_V + offs_r[None, :], acc_r.to(dq_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_r[None, :])


@triton.jit
def _dkv_head_block(q_v, q_r, do, p_ptr, ds_ptr, t, offs_h, mask_h, offs_k, in_k, stride_pt, stride_ph,
                    dkv_v, dkv_r, DOT_PREC: tl.constexpr):
    """dkv_v += dS^T q_v + P^T dout and dkv_r += dS^T q_r for one head block. [BK, DV], [BK, DT]."""
    ld_off = t * stride_pt + offs_h[:, None] * stride_ph + offs_k[None, :]
    ld_mask = mask_h[:, None] & in_k[None, :]
    p = tl.load(p_ptr + ld_off, mask=ld_mask, other=0.0)  # [BH, BK]
    ds = tl.load(ds_ptr + ld_off, mask=ld_mask, other=0.0)
    ds_t = tl.trans(ds)  # [BK, BH]
    dkv_v = tl.dot(ds_t, q_v, dkv_v, input_precision=DOT_PREC)
    dkv_v = tl.dot(tl.trans(p), do, dkv_v, input_precision=DOT_PREC)
    dkv_r = tl.dot(ds_t, q_r, dkv_r, input_precision=DOT_PREC)
    return dkv_v, dkv_r


@triton.jit
def _load_q_do(q_ptr, dout_ptr, t, offs_h, mask_h, offs_v, mask_v, offs_r, mask_r,
               stride_qt, stride_qh, stride_dot, stride_doh, D_V: tl.constexpr):
    q_row = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh
    q_v = tl.load(q_row + offs_v[None, :], mask=mask_h[:, None] & mask_v[None, :], other=0.0)  # [BH, DV]
    q_r = tl.load(q_row + D_V + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # [BH, DT]
    do = tl.load(dout_ptr + t * stride_dot + offs_h[:, None] * stride_doh + offs_v[None, :],
                 mask=mask_h[:, None] & mask_v[None, :], other=0.0)  # [BH, DV]
    return q_v, q_r, do


@triton.jit
def sparse_mla_bwd_dkv_kernel(
    q_ptr, idx_ptr, dout_ptr, p_ptr, ds_ptr, dkv_ptr,
    n_kv, n_heads, topk,
    stride_qt, stride_qh, stride_it, stride_dot, stride_doh, stride_pt, stride_ph,
    stride_dkvr, stride_bh, stride_bt, stride_bk,
    D_V: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HB_PER_PROG: tl.constexpr,
    DETERMINISTIC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program per (query, group of HB_PER_PROG head blocks). With one head block its
    q and dout stay in shared memory for the whole top-k walk; with several (h = 128) the
    dkv tile is summed over the group before its one atomic add (half the atomics at
    2 blocks), at the cost of re-reading q and dout (L2) every step."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs_v = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_DT)
    mask_v = offs_v < D_V
    mask_r = offs_r < D_TAIL
    if HB_PER_PROG == 1:
        offs_h0 = g * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h0 = offs_h0 < n_heads
        q_v, q_r, do = _load_q_do(q_ptr, dout_ptr, t, offs_h0, mask_h0, offs_v, mask_v, offs_r, mask_r,
                                  stride_qt, stride_qh, stride_dot, stride_doh, D_V)

    for k0 in range(0, topk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < topk
        idx = tl.load(idx_ptr + t * stride_it + offs_k, mask=in_k, other=-1)
        valid = (idx >= 0) & (idx < n_kv)
        dkv_v = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
        dkv_r = tl.zeros([BLOCK_K, BLOCK_DT], dtype=tl.float32)
        if HB_PER_PROG == 1:
            dkv_v, dkv_r = _dkv_head_block(q_v, q_r, do, p_ptr, ds_ptr, t, offs_h0, mask_h0, offs_k, in_k,
                                           stride_pt, stride_ph, dkv_v, dkv_r, DOT_PREC)
        else:
            for i in tl.static_range(HB_PER_PROG):
                offs_h = (g * HB_PER_PROG + i) * BLOCK_H + tl.arange(0, BLOCK_H)
                mask_h = offs_h < n_heads
                qi_v, qi_r, doi = _load_q_do(q_ptr, dout_ptr, t, offs_h, mask_h, offs_v, mask_v, offs_r, mask_r,
                                             stride_qt, stride_qh, stride_dot, stride_doh, D_V)
                dkv_v, dkv_r = _dkv_head_block(qi_v, qi_r, doi, p_ptr, ds_ptr, t, offs_h, mask_h, offs_k, in_k,
                                               stride_pt, stride_ph, dkv_v, dkv_r, DOT_PREC)
        if DETERMINISTIC:
            # Slot (g, t, j) of the fp32 buffer; padded slots are written too (zeros)
            # but the reduce kernel only reads the valid ones.
            base = dkv_ptr + g * stride_bh + t * stride_bt + offs_k[:, None].to(tl.int64) * stride_bk
            tl.store(base + offs_v[None, :], dkv_v, mask=in_k[:, None] & mask_v[None, :])
            tl.store(base + D_V + offs_r[None, :], dkv_r, mask=in_k[:, None] & mask_r[None, :])
        else:
            rows = tl.where(valid, idx, 0).to(tl.int64)
            base = dkv_ptr + rows[:, None] * stride_dkvr
            tl.atomic_add(base + offs_v[None, :], dkv_v, mask=valid[:, None] & mask_v[None, :], sem="relaxed")
            tl.atomic_add(base + D_V + offs_r[None, :], dkv_r, mask=valid[:, None] & mask_r[None, :], sem="relaxed")


@triton.jit
def sparse_mla_bwd_reduce_kernel(
    buf_ptr, order_ptr, rowptr_ptr, dkv_ptr,
    n_hb, topk, d_qk,
    stride_bh, stride_bt, stride_bk, stride_dkvr,
    BLOCK_D: tl.constexpr,
):
    """dkv[r, dblock] += sum over the sorted slots of row r (fixed order) of buf[hb, slot]."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_qk
    start = tl.load(rowptr_ptr + r)
    end = tl.load(rowptr_ptr + r + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e in range(start, end):
        slot = tl.load(order_ptr + e).to(tl.int64)  # flat t * topk + j within the chunk
        t = slot // topk
        j = slot - t * topk
        for hb in range(0, n_hb):
            acc += tl.load(buf_ptr + hb * stride_bh + t * stride_bt + j * stride_bk + offs_d, mask=mask_d, other=0.0)
    if end > start:
        ptr = dkv_ptr + r * stride_dkvr + offs_d
        tl.store(ptr, tl.load(ptr, mask=mask_d, other=0.0) + acc, mask=mask_d)


def _prepare(q, kv, indices, out, dout, lse, dlse, d_v, config):
    """Shapes, block sizes and last-dim-contiguous views shared by the launches."""
    s_q, h, d_qk = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[-1]
    cfg = dict(default_config(q, d_v))
    if config:
        cfg.update(config)

    def last_c(x):
        return x if x is None or x.stride(-1) == 1 else x.contiguous()
    return dict(
        s_q=s_q, h=h, d_qk=d_qk, s_kv=s_kv, topk=topk, d_v=d_v, d_tail=d_qk - d_v, cfg=cfg,
        n_hb=triton.cdiv(h, cfg["BLOCK_H"]),
        hb_per_prog=min(cfg.get("HB_PER_PROG_DKV", 1), triton.cdiv(h, cfg["BLOCK_H"])),
        n_groups=triton.cdiv(triton.cdiv(h, cfg["BLOCK_H"]), min(cfg.get("HB_PER_PROG_DKV", 1),
                                                                  triton.cdiv(h, cfg["BLOCK_H"]))),
        dot_prec="ieee" if q.dtype == torch.float32 else "tf32",
        block_dv=max(16, triton.next_power_of_2(d_v)),
        block_dt=max(16, triton.next_power_of_2(max(d_qk - d_v, 1))),
        q=last_c(q), kv=last_c(kv.reshape(s_kv, d_qk)), idx=last_c(indices.reshape(s_q, topk)),
        out=last_c(out), dout=last_c(dout), lse=lse.float().contiguous(),
        dlse=None if dlse is None else dlse.float().contiguous(),
    )


def launch_dq(m, c0, c1, dq, p_buf, ds_buf, sm_scale):
    """dq rows [c0, c1) and the P / dS scratch of those queries (rows 0 .. c1-c0 of the buffers)."""
    cfg = m["cfg"]
    qc, ic, oc, doc, lc = (m[k][c0:c1] for k in ("q", "idx", "out", "dout", "lse"))
    dlc = m["dlse"][c0:c1] if m["dlse"] is not None else lc
    kv2 = m["kv"]
    sparse_mla_bwd_dq_kernel[(c1 - c0, m["n_hb"])](
        qc, kv2, ic, oc, doc, lc, dlc, dq[c0:c1], p_buf, ds_buf,
        m["s_kv"], m["h"], m["topk"], sm_scale,
        qc.stride(0), qc.stride(1), kv2.stride(0), ic.stride(0),
        oc.stride(0), oc.stride(1), doc.stride(0), doc.stride(1), lc.stride(0),
        dq.stride(0), dq.stride(1), p_buf.stride(0), p_buf.stride(1),
        D_V=m["d_v"], D_TAIL=m["d_tail"], BLOCK_DV=m["block_dv"], BLOCK_DT=m["block_dt"],
        BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K_DQ"], HAS_DLSE=m["dlse"] is not None, DOT_PREC=m["dot_prec"],
        num_warps=cfg["warps_dq"], num_stages=cfg["stages_dq"],
    )


def launch_dkv(m, c0, c1, p_buf, ds_buf, dkv, det_buf=None):
    """dkv contributions of queries [c0, c1): atomics into dkv [s_kv, d_qk] fp32, or
    (det_buf given) stores into det_buf [n_groups, chunk, topk, d_qk] fp32."""
    cfg = m["cfg"]
    qc, ic, doc = (m[k][c0:c1] for k in ("q", "idx", "dout"))
    deterministic = det_buf is not None
    sb = det_buf.stride() if deterministic else (0, 0, 0, 0)
    sparse_mla_bwd_dkv_kernel[(c1 - c0, m["n_groups"])](
        qc, ic, doc, p_buf, ds_buf, det_buf if deterministic else dkv,
        m["s_kv"], m["h"], m["topk"],
        qc.stride(0), qc.stride(1), ic.stride(0), doc.stride(0), doc.stride(1),
        p_buf.stride(0), p_buf.stride(1),
        dkv.stride(0), sb[0], sb[1], sb[2],
        D_V=m["d_v"], D_TAIL=m["d_tail"], BLOCK_DV=m["block_dv"], BLOCK_DT=m["block_dt"],
        BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K_DKV"], HB_PER_PROG=m["hb_per_prog"],
        DETERMINISTIC=deterministic, DOT_PREC=m["dot_prec"],
        num_warps=cfg["warps_dkv"], num_stages=cfg["stages_dkv"],
    )
    if deterministic:
        _reduce_deterministic(det_buf, ic, dkv, m["n_groups"], c1 - c0)


def sparse_mla_bwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                   dout: torch.Tensor, lse: torch.Tensor, sm_scale: float, d_v: int = 512,
                   dlse: torch.Tensor | None = None, deterministic: bool = False,
                   scratch_bytes: int = 2 << 30, config: dict | None = None):
    """Gradients of sparse MLA attention w.r.t. q and kv.

    Args:
        q: [s_q, h_q, d_qk]; kv: [s_kv, 1, d_qk]; indices: [s_q, 1, topk] int32
            (-1 or >= s_kv invalid); out: [s_q, h_q, d_v] and lse: [s_q, h_q] fp32 from
            the forward; dout: [s_q, h_q, d_v] upstream gradient of out.
        sm_scale, d_v: as in the forward.
        dlse: optional [s_q, h_q] upstream gradient of lse (None = 0).
        deterministic: bitwise reproducible dkv (fixed-order reduction, more memory).
        scratch_bytes: bound on the scratch (P and dS, and the deterministic buffer);
            queries are processed in chunks that fit.
        config: block sizes (see CONFIGS); default by device and shape.

    Returns:
        (dq [s_q, h_q, d_qk] in q.dtype, dkv [s_kv, 1, d_qk] in kv.dtype).
    Inputs are assumed validated (flashdsa.sparse_mla_fwd checks them).
    """
    m = _prepare(q, kv, indices, out, dout, lse, dlse, d_v, config)
    s_q, h, topk, d_qk, s_kv = m["s_q"], m["h"], m["topk"], m["d_qk"], m["s_kv"]
    dq = torch.empty_like(m["q"])
    dkv = torch.zeros(s_kv, d_qk, dtype=torch.float32, device=q.device)

    # Per query: P and dS in the kv dtype, plus (deterministic) the fp32 slot buffer.
    per_query = 2 * h * topk * kv.element_size()
    if deterministic:
        per_query += m["n_groups"] * topk * d_qk * 4
    chunk = max(1, min(s_q, scratch_bytes // max(per_query, 1)))
    p_buf = torch.empty(chunk, h, topk, dtype=kv.dtype, device=q.device)
    ds_buf = torch.empty_like(p_buf)
    det_buf = (torch.empty(m["n_groups"], chunk, topk, d_qk, dtype=torch.float32, device=q.device)
               if deterministic else None)
    for c0 in range(0, s_q, chunk):
        c1 = min(s_q, c0 + chunk)
        launch_dq(m, c0, c1, dq, p_buf, ds_buf, sm_scale)
        launch_dkv(m, c0, c1, p_buf, ds_buf, dkv, det_buf)
    return dq, dkv.to(kv.dtype).view(s_kv, 1, d_qk)


def _reduce_deterministic(buf: torch.Tensor, idx: torch.Tensor, dkv: torch.Tensor, n_hb: int, n: int) -> None:
    """Fixed-order segmented sum of the slot buffer into dkv [s_kv, d_qk] fp32.

    Invalid slots get key s_kv and sort last; a stable sort keeps slots of one row in
    ascending (query, slot) order, so the sum's order depends only on the indices."""
    s_kv, d_qk = dkv.shape
    topk = idx.shape[1]
    flat = idx.reshape(-1).long()
    keys = torch.where((flat >= 0) & (flat < s_kv), flat, torch.full_like(flat, s_kv))
    _, order = torch.sort(keys, stable=True)
    counts = torch.bincount(keys, minlength=s_kv + 1)[:s_kv]
    rowptr = torch.zeros(s_kv + 1, dtype=torch.int64, device=dkv.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    block_d = 64 if d_qk >= 64 else max(16, triton.next_power_of_2(d_qk))
    grid = (s_kv, triton.cdiv(d_qk, block_d))
    sparse_mla_bwd_reduce_kernel[grid](
        buf, order, rowptr, dkv, n_hb, topk, d_qk,
        buf.stride(0), buf.stride(1), buf.stride(2), dkv.stride(0),
        BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2,
    )
