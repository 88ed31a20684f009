"""Blockwise indexer KL losses (SPEC 5) in Triton: never [H, T, T] nor [T, T].

Both stages share one pair of kernels; one program handles one query row t and walks
its candidate set in blocks of BLOCK_K key rows:
  - warm-up (``DENSE``): the causal range [ks[t], ke[t]) of contiguous rows;
  - sparse: the selected slots indices[t, :] (gathered rows, -1 or >= S invalid).

Forward (``indexer_kl_fwd_kernel``), per block of key rows r:
    a    = q[t] @ kv[r]^T                    [H, BK]  (all attention heads in one tile)
    p    = mean_h exp2(a * sm_scale*log2e - lse[t,h]*log2e)   [BK]  (target, detached)
    zT   = ik[r] @ iq[t]^T                   [BK, H_I]
    I    = sum_j relu(zT[:, j]) * w[t,j]     [BK]
and running sums: Z = sum p, sum p log p, sum p I, and an online logsumexp of I. At the
end KL_t = (sum p log p)/Z - log Z - (sum p I)/Z + lse_I. The sparse stage takes p from
the attention forward (``sparse_mla_fwd(..., return_probs=True)``, :func:`sparse_kl_loss_from_probs`:
then no q.kv here at all) or computes and stores it (:func:`sparse_kl_loss`; p [T, topk]
fp32 is O(T * topk), as the indices), so its backward needs no attention recompute; the
warm-up cannot store p ([T, T]) and recomputes it.

The index-score tile has the slots as rows (the M dimension of the MMA) and the indexer
heads as columns, so the per-slot sum over heads stays inside each warp (its rows' threads);
heads as rows would spread that sum over the warps, through shared memory, every step
(the backward's dw, a sum over slots, does cross the warps; a [BK, H_I] register
accumulator reduced once at the end spilled at the H200 block sizes, per the sm_90 build).

Backward (``indexer_kl_bwd_kernel``), per block, with g = dL_t * (softmax(I) - p/Z):
    dw[t]   += sum_r relu(zT) * g[:, None]   [H_I]
    dzT      = (zT > 0) * g[:, None] * w     [BK, H_I]
    diq[t]  += dzT^T @ ik[r]                 [H_I, d_I]
    dik[r]  += dzT @ iq[t]                   [BK, d_I]   (fp32 atomics)

Indexer precision in training: the indexer's q and k enter in bf16 (tensor cores,
fp32 accumulation), weights in fp32; not FP8. FP8 rounding has zero gradient almost
everywhere (it would need a straight-through estimator and re-quantizing per step),
while bf16 is the rest of the model's training precision and the indexer costs
little next to the attention recompute here (H_I * d_I = 8192 vs H * d_qk = 36864
multiply-adds per (t, s) at 64 heads). Inference keeps FP8 (Hadamard-rotated, SPEC 1)
which approximates the same bf16 score.

d_qk (576) is split into a power-of-two head (512) and a tail (64) for the tiles.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.losses import _reduce, check_loss_inputs
from .sparse_mla_bwd import _reduce_deterministic

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Globals read inside @triton.jit code must be tl.constexpr (compiled Triton rejects plain
# floats; the interpreter does not notice).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

# BLOCK_K: key rows per step. The attention tile is [next_pow2(H), BLOCK_K] with q of
# all heads resident in shared memory (72 KB bf16 at H 64, 144 KB at H 128), plus per
# stage a kv tile [BLOCK_K, 576] (36 KB at 32 rows) and an indexer key tile [BLOCK_K, 128].
# Fastest in the H200 sweep (benchmarks/bench_indexer_loss.py --sweep, 2026-11-28): at H 64
# 32 rows, 4 warps, 2 stages; at H 128 only 32 rows, 8 warps, 1 stage fits the 227 KB
# (2 stages need 249 KB). "sm90_probs": the target p given (no attention tile; only the
# indexer's [64, 128] q is resident): fastest of 5 variants in the H200 sweep of 2026-12-01
# (fwd 0.47 ms, bwd 2.39 ms at 4096 x 2048 slots; 32 rows: 0.83 / 2.99 ms), although its
# backward spills 64 bytes in the sm_90 build.
# "small": interpreter and tiny shapes.
CONFIGS = {
    "sm90": dict(BLOCK_K=32, num_warps=4, num_stages=2),
    "sm90_h128": dict(BLOCK_K=32, num_warps=8, num_stages=1),
    "sm90_probs": dict(BLOCK_K=64, num_warps=4, num_stages=2),
    "small": dict(BLOCK_K=16, num_warps=4, num_stages=1),
}


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(q: torch.Tensor | None, iq: torch.Tensor) -> dict:
    """Block sizes; ``q`` None: the target p is given (no attention tile)."""
    if not iq.is_cuda or _interpreted() or (q is not None and q.shape[2] <= 128) or iq.shape[2] < 64:
        return dict(CONFIGS["small"])
    if q is None:
        return dict(CONFIGS["sm90_probs"])
    return dict(CONFIGS["sm90" if q.shape[1] <= 64 else "sm90_h128"])


def _split(d: int) -> tuple[int, int]:
    """d = head + tail with head the largest power of two <= d."""
    head = 1 << (d.bit_length() - 1)
    return head, d - head


@triton.jit
def _block_rows(idx_ptr, stride_it, t, k0, ks, ke, topk, n_kv, BLOCK_K: tl.constexpr, DENSE: tl.constexpr):
    """Key rows of slots k0 .. k0+BLOCK_K of row t, and which are valid. [BK] int64, [BK] bool."""
    offs = k0 + tl.arange(0, BLOCK_K)
    if DENSE:
        rows = ks + offs
        valid = (rows < ke) & (rows >= 0) & (rows < n_kv)  # a range past [0, S) counts its rows in it
    else:
        rows = tl.load(idx_ptr + t * stride_it + offs, mask=offs < topk, other=-1)
        valid = (rows >= 0) & (rows < n_kv)
    return tl.where(valid, rows, 0).to(tl.int64), valid


@triton.jit
def _attn_logits2(q_h, q_t, kv_ptr, stride_kvr, rows, valid, qk_scale,
                  D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Attention logits of all heads against the gathered rows, in base 2
    (sm_scale * log2(e) * q.kv). [H, BK] fp32."""
    offs_a = tl.arange(0, D_HEAD)
    offs_b = tl.arange(0, BLOCK_DT)
    kv_row = kv_ptr + rows[:, None] * stride_kvr
    kv_h = tl.load(kv_row + offs_a[None, :], mask=valid[:, None], other=0.0)  # [BK, DH]
    kv_t = tl.load(kv_row + D_HEAD + offs_b[None, :], mask=valid[:, None] & (offs_b < D_TAIL)[None, :], other=0.0)
    a = tl.dot(q_h, tl.trans(kv_h), input_precision=DOT_PREC)
    a = tl.dot(q_t, tl.trans(kv_t), a, input_precision=DOT_PREC)
    return a * qk_scale


@triton.jit
def _attn_probs(q_h, q_t, kv_ptr, stride_kvr, rows, valid, lse2, qk_scale, inv_h,
                D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """p[j] = (1/H) sum_h exp(a[h, j] - lse[h]) for the gathered rows. [BK] fp32."""
    a2 = _attn_logits2(q_h, q_t, kv_ptr, stride_kvr, rows, valid, qk_scale, D_HEAD, D_TAIL, BLOCK_DT, DOT_PREC)
    pr = tl.exp2(a2 - lse2[:, None])
    pr = tl.where(lse2[:, None] < float("inf"), pr, 0.0)  # padding heads, empty rows
    p = tl.sum(pr, axis=0) * inv_h
    return tl.where(valid, p, 0.0)


@triton.jit
def _index_scores(iq, ik_ptr, stride_ikr, rows, valid, w, DI: tl.constexpr, BLOCK_DI: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """zT = ik[rows] @ iq^T [BK, HI] and I = sum_j relu(zT[:, j]) w[j] [BK] (-inf where invalid),
    and the gathered ik [BK, DI]."""
    offs_d = tl.arange(0, BLOCK_DI)
    ik = tl.load(ik_ptr + rows[:, None] * stride_ikr + offs_d[None, :],
                 mask=valid[:, None] & (offs_d < DI)[None, :], other=0.0)  # [BK, DI]
    z_t = tl.dot(ik, tl.trans(iq), input_precision=DOT_PREC)  # [BK, HI]
    s = tl.sum(tl.maximum(z_t, 0.0) * w[None, :], axis=1)
    return z_t, tl.where(valid, s, float("-inf")), ik


@triton.jit
def _load_attn_row(q_ptr, lse_ptr, t, n_heads, stride_qt, stride_qh, stride_lt,
                   D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr):
    """q of row t, split into head [H, DH] and tail [H, DT] dims, and its lse in base 2 [H]."""
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < n_heads
    offs_a = tl.arange(0, D_HEAD)
    offs_b = tl.arange(0, BLOCK_DT)
    q_row = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh
    q_h = tl.load(q_row + offs_a[None, :], mask=mask_h[:, None], other=0.0)  # [H, DH]
    q_t = tl.load(q_row + D_HEAD + offs_b[None, :], mask=mask_h[:, None] & (offs_b < D_TAIL)[None, :], other=0.0)
    lse2 = tl.load(lse_ptr + t * stride_lt + offs_h, mask=mask_h, other=float("inf")) * _LOG2E
    return q_h, q_t, lse2


@triton.jit
def _load_index_row(iq_ptr, w_ptr, t, n_iheads, stride_iqt, stride_iqh, stride_wt,
                    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr):
    """The indexer's q of row t [HI, DI] and its head weights [HI] fp32."""
    offs_j = tl.arange(0, BLOCK_HI)
    mask_j = offs_j < n_iheads
    offs_d = tl.arange(0, BLOCK_DI)
    iq = tl.load(iq_ptr + t * stride_iqt + offs_j[:, None] * stride_iqh + offs_d[None, :],
                 mask=mask_j[:, None] & (offs_d < DI)[None, :], other=0.0)  # [HI, DI]
    w = tl.load(w_ptr + t * stride_wt + offs_j, mask=mask_j, other=0.0).to(tl.float32)  # [HI]
    return iq, w


@triton.jit
def _row_range(ks_ptr, ke_ptr, t, topk, DENSE: tl.constexpr):
    """(ks, ke, n): the causal range of row t (warm-up) or n = topk slots (sparse)."""
    if DENSE:
        ks = tl.load(ks_ptr + t).to(tl.int64)
        ke = tl.load(ke_ptr + t).to(tl.int64)
        n = ke - ks
    else:
        ks = 0
        ke = 0
        n = topk
    return ks, ke, n


@triton.jit
def indexer_kl_fwd_kernel(
    q_ptr, kv_ptr, lse_ptr, iq_ptr, ik_ptr, w_ptr, idx_ptr, ks_ptr, ke_ptr,
    kl_ptr, stats_ptr, p_ptr, lse_out_ptr,
    n_kv, n_heads, n_iheads, topk, qk_scale, inv_h,
    stride_qt, stride_qh, stride_kvr, stride_lt, stride_iqt, stride_iqh, stride_ikr, stride_wt,
    stride_it, stride_pt,
    D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr,
    BLOCK_K: tl.constexpr, DENSE: tl.constexpr, STORE_P: tl.constexpr, COMPUTE_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ATTN: tl.constexpr = True,  # False: the target p [T, topk] is given in p_ptr (q, kv, lse unused)
):
    t = tl.program_id(0).to(tl.int64)
    if DENSE:
        # Causal rows grow with t: start the longest first so the short ones fill the tail.
        t = tl.num_programs(0) - 1 - t
    iq, w = _load_index_row(iq_ptr, w_ptr, t, n_iheads, stride_iqt, stride_iqh, stride_wt, DI, BLOCK_DI, BLOCK_HI)
    ks, ke, n = _row_range(ks_ptr, ke_ptr, t, topk, DENSE)
    if ATTN:
        q_h, q_t, lse2 = _load_attn_row(q_ptr, lse_ptr, t, n_heads, stride_qt, stride_qh, stride_lt,
                                        D_HEAD, D_TAIL, BLOCK_DT, BLOCK_H)

    if COMPUTE_LSE:
        # No lse from the attention (e.g. torch SDPA ran it): one extra pass over the
        # candidate set for each head's logsumexp (online, base 2), stored for the backward.
        m_h = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_h = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            rows, valid = _block_rows(idx_ptr, stride_it, t, k0, ks, ke, topk, n_kv, BLOCK_K, DENSE)
            a2 = _attn_logits2(q_h, q_t, kv_ptr, stride_kvr, rows, valid, qk_scale, D_HEAD, D_TAIL, BLOCK_DT,
                               DOT_PREC)
            a2 = tl.where(valid[None, :], a2, float("-inf"))
            m_new = tl.maximum(m_h, tl.max(a2, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_h = l_h * tl.exp2(m_h - m_safe) + tl.sum(tl.exp2(a2 - m_safe[:, None]), axis=1)
            m_h = m_new
        offs_h = tl.arange(0, BLOCK_H)
        lse2 = tl.where((l_h > 0) & (offs_h < n_heads), m_h + tl.log2(tl.where(l_h > 0, l_h, 1.0)), float("inf"))
        tl.store(lse_out_ptr + t * stride_lt + offs_h, lse2 * _LN2, mask=offs_h < n_heads)

    z_sum = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum p
    plogp = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum p ln p
    p_i = tl.zeros([BLOCK_K], dtype=tl.float32)    # sum p I
    m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)  # per-lane online logsumexp of I (base e)
    l = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        rows, valid = _block_rows(idx_ptr, stride_it, t, k0, ks, ke, topk, n_kv, BLOCK_K, DENSE)
        offs = k0 + tl.arange(0, BLOCK_K)
        if ATTN:
            p = _attn_probs(q_h, q_t, kv_ptr, stride_kvr, rows, valid, lse2, qk_scale, inv_h, D_HEAD, D_TAIL,
                            BLOCK_DT, DOT_PREC)
            if STORE_P:
                tl.store(p_ptr + t * stride_pt + offs, p, mask=offs < topk)
        else:
            p = tl.where(valid, tl.load(p_ptr + t * stride_pt + offs, mask=offs < topk, other=0.0), 0.0)
        _, s, _ = _index_scores(iq, ik_ptr, stride_ikr, rows, valid, w, DI, BLOCK_DI, DOT_PREC)
        pos = p > 0
        z_sum += p
        plogp += tl.where(pos, p * tl.log(tl.where(pos, p, 1.0)), 0.0)
        p_i += p * tl.where(valid, s, 0.0)  # p = 0 wherever s = -inf
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.exp(s - m_safe)
        m = m_new
    # Combine the BLOCK_K lanes.
    zt = tl.sum(z_sum, axis=0)
    mt = tl.max(m, axis=0)
    mt_safe = tl.where(mt == float("-inf"), 0.0, mt)
    lt = tl.sum(l * tl.exp(m - mt_safe), axis=0)
    lse_i = tl.where(lt > 0, mt_safe + tl.log(tl.where(lt > 0, lt, 1.0)), float("-inf"))
    zt_safe = tl.where(zt > 0, zt, 1.0)
    kl = tl.sum(plogp, axis=0) / zt_safe - tl.log(zt_safe) - tl.sum(p_i, axis=0) / zt_safe + lse_i
    kl = tl.where(zt > 0, kl, 0.0)
    tl.store(kl_ptr + t, kl)
    tl.store(stats_ptr + t * 2, zt)
    tl.store(stats_ptr + t * 2 + 1, lse_i)


@triton.jit
def indexer_kl_bwd_kernel(
    q_ptr, kv_ptr, lse_ptr, iq_ptr, ik_ptr, w_ptr, idx_ptr, ks_ptr, ke_ptr,
    dkl_ptr, stats_ptr, p_ptr, diq_ptr, dik_ptr, dw_ptr,
    n_kv, n_heads, n_iheads, topk, qk_scale, inv_h,
    stride_qt, stride_qh, stride_kvr, stride_lt, stride_iqt, stride_iqh, stride_ikr, stride_wt,
    stride_it, stride_pt, stride_dkl, stride_diqt, stride_diqh, stride_dikr, stride_dwt,
    D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr,
    BLOCK_K: tl.constexpr, DENSE: tl.constexpr, STORE_P: tl.constexpr, DOT_PREC: tl.constexpr,
    DETERMINISTIC: tl.constexpr = False,  # dik per (row, slot) into dik_ptr [T, n, d_I] fp32, summed later
    stride_det=0, stride_detj=0,
):
    """STORE_P: the target p [T, topk] is in p_ptr (sparse stage); else recomputed (warm-up)."""
    t = tl.program_id(0).to(tl.int64)
    if DENSE:
        # Causal rows grow with t: start the longest first so the short ones fill the tail.
        t = tl.num_programs(0) - 1 - t
    iq, w = _load_index_row(iq_ptr, w_ptr, t, n_iheads, stride_iqt, stride_iqh, stride_wt, DI, BLOCK_DI, BLOCK_HI)
    ks, ke, n = _row_range(ks_ptr, ke_ptr, t, topk, DENSE)
    if not STORE_P:
        q_h, q_t, lse2 = _load_attn_row(q_ptr, lse_ptr, t, n_heads, stride_qt, stride_qh, stride_lt,
                                        D_HEAD, D_TAIL, BLOCK_DT, BLOCK_H)
    zt = tl.load(stats_ptr + t * 2)
    lse_i = tl.load(stats_ptr + t * 2 + 1)
    dkl = tl.load(dkl_ptr + t * stride_dkl).to(tl.float32)
    inv_z = tl.where(zt > 0, 1.0 / tl.where(zt > 0, zt, 1.0), 0.0)
    lse_i_safe = tl.where(lse_i == float("-inf"), 0.0, lse_i)
    offs_d = tl.arange(0, BLOCK_DI)
    mask_d = offs_d < DI

    acc_iq = tl.zeros([BLOCK_HI, BLOCK_DI], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_HI], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        rows, valid = _block_rows(idx_ptr, stride_it, t, k0, ks, ke, topk, n_kv, BLOCK_K, DENSE)
        if STORE_P:
            offs = k0 + tl.arange(0, BLOCK_K)
            p = tl.load(p_ptr + t * stride_pt + offs, mask=offs < topk, other=0.0)
        else:
            p = _attn_probs(q_h, q_t, kv_ptr, stride_kvr, rows, valid, lse2, qk_scale, inv_h,
                            D_HEAD, D_TAIL, BLOCK_DT, DOT_PREC)
        z_t, s, ik = _index_scores(iq, ik_ptr, stride_ikr, rows, valid, w, DI, BLOCK_DI, DOT_PREC)
        g = tl.where(valid, tl.exp(s - lse_i_safe) - p * inv_z, 0.0) * dkl  # [BK]
        acc_w += tl.sum(tl.maximum(z_t, 0.0) * g[:, None], axis=0)
        dzt = tl.where(z_t > 0, g[:, None] * w[None, :], 0.0)  # [BK, HI] fp32
        dz_c = dzt.to(ik.dtype)
        acc_iq = tl.dot(tl.trans(dz_c), ik, acc_iq, input_precision=DOT_PREC)  # [HI, DI]
        dk = tl.dot(dz_c, iq, input_precision=DOT_PREC)  # [BK, DI]
        if DETERMINISTIC:  # each slot's own row of the buffer: no two programs meet
            slots = k0 + tl.arange(0, BLOCK_K)
            tl.store(dik_ptr + t * stride_det + slots[:, None] * stride_detj + offs_d[None, :], dk,
                     mask=valid[:, None] & mask_d[None, :])
        else:
            tl.atomic_add(dik_ptr + rows[:, None] * stride_dikr + offs_d[None, :], dk,
                          mask=valid[:, None] & mask_d[None, :], sem="relaxed")
    offs_j = tl.arange(0, BLOCK_HI)
    mask_j = offs_j < n_iheads
    tl.store(diq_ptr + t * stride_diqt + offs_j[:, None] * stride_diqh + offs_d[None, :],
             acc_iq.to(diq_ptr.dtype.element_ty), mask=mask_j[:, None] & mask_d[None, :])
    tl.store(dw_ptr + t * stride_dwt + offs_j, acc_w, mask=mask_j)


def _meta(q, iq):
    """Tile constexprs; ``q`` None (target given): minimal placeholders for the unused attention tile."""
    di = iq.shape[2]
    d_head, d_tail = _split(q.shape[2]) if q is not None else (16, 0)
    fp32 = iq.dtype == torch.float32 or (q is not None and q.dtype == torch.float32)
    return dict(
        D_HEAD=d_head, D_TAIL=d_tail, BLOCK_DT=max(16, triton.next_power_of_2(max(d_tail, 1))),
        BLOCK_H=max(16, triton.next_power_of_2(q.shape[1])) if q is not None else 16,
        DI=di, BLOCK_DI=max(16, triton.next_power_of_2(di)),
        BLOCK_HI=max(16, triton.next_power_of_2(iq.shape[1])),
        # fp32 inputs: exact fp32 products ("tf32" would lose 3 digits); ignored for bf16
        DOT_PREC="ieee" if fp32 else "tf32",
    )


def _row_args(q, kv2, lse, iq, ik, w, idx):
    """The row strides of the kernels' signature (0 for the attention side when it is absent)."""
    attn = (q.stride(0), q.stride(1), kv2.stride(0), lse.stride(0)) if q is not None else (0, 0, 0, 0)
    return (*attn, iq.stride(0), iq.stride(1), ik.stride(0), w.stride(0), idx.stride(0) if idx is not None else 0)


def _attn_side(q, kv2, lse, sm_scale, stand_in):
    """The kernels' attention arguments: pointers (q, kv, lse) and (n_heads, qk_scale, 1/H);
    with ``q`` None (the target p is given) ``stand_in`` fills the pointers the kernel never reads."""
    if q is None:
        return (stand_in, stand_in, stand_in), (1, 1.0, 1.0)
    return (q, kv2, lse), (q.shape[1], sm_scale * LOG2E, 1.0 / q.shape[1])


def _prep(q, kv, lse, iq, ik, w, indices, ks, ke):
    """Contiguous last dims, kv as [S, d_qk], indices as [T, topk]; also whether the
    problem is the warm-up (dense ranges) and topk. ``q``/``kv`` None: the target is given."""
    def last_c(x):
        return x if x is None or x.stride(-1) == 1 else x.contiguous()
    q, iq, ik, w = last_c(q), last_c(iq), last_c(ik), last_c(w)
    kv2 = last_c(kv.reshape(kv.shape[0], kv.shape[-1])) if kv is not None else None
    lse = lse.float().contiguous() if lse is not None else None
    dense = indices is None
    if dense:
        idx = None
        ks, ke = ks.contiguous(), ke.contiguous()
        topk = 0
    else:
        idx = last_c(indices.reshape(indices.shape[0], -1))
        topk = idx.shape[1]
    return q, kv2, lse, iq, ik, w, idx, ks, ke, dense, topk


def indexer_kl_fwd(q, kv, lse, iq, ik, w, indices, ks, ke, sm_scale, config=None, probs=None):
    """Per-row KL [T] fp32, stats [T, 2] (Z, lse_I), the stored target p [T, topk]
    (sparse; an empty tensor for the warm-up) and, when ``lse`` is None, the attention
    lse [T, H] the kernel computed (else an empty tensor). Either ``indices`` (sparse) or
    ``ks``/``ke`` (warm-up) is given. Inputs assumed validated; q, kv, lse are constants.

    ``probs`` [T, topk] (sparse only): the target given, e.g. by ``sparse_mla_fwd(...,
    return_probs=True)``; q, kv, lse and sm_scale are then unused (pass None) and the
    returned p is an empty tensor (the target is ``probs`` itself)."""
    q, kv2, lse, iq, ik, w, idx, ks, ke, dense, topk = _prep(q, kv, lse, iq, ik, w, indices, ks, ke)
    given = probs is not None
    if given:
        probs = probs.float().contiguous()
    T = iq.shape[0]
    dev = iq.device
    cfg = _config(q, iq) | dict(config or {})
    compute_lse = not given and lse is None
    lse_out = torch.empty((T, q.shape[1]) if compute_lse else (0, 0), dtype=torch.float32, device=dev)
    if compute_lse:
        lse = lse_out
    kl = torch.empty(T, dtype=torch.float32, device=dev)
    stats = torch.empty(T, 2, dtype=torch.float32, device=dev)
    p = probs if given else torch.empty(T, topk, dtype=torch.float32, device=dev)
    dummy = kl  # any valid pointer for an argument the kernel does not read
    sidx = idx if idx is not None else ks
    attn_ptrs, (n_heads, qk_scale, inv_h) = _attn_side(q, kv2, lse, sm_scale, dummy)
    indexer_kl_fwd_kernel[(T,)](
        *attn_ptrs, iq, ik, w, sidx, ks if dense else dummy, ke if dense else dummy,
        kl, stats, p, lse_out if compute_lse else kl,
        ik.shape[0], n_heads, iq.shape[1], topk, qk_scale, inv_h,
        *_row_args(q, kv2, lse, iq, ik, w, idx), p.stride(0) if topk else 0,
        **_meta(q, iq), BLOCK_K=cfg["BLOCK_K"], DENSE=dense, STORE_P=not dense and not given,
        COMPUTE_LSE=compute_lse, ATTN=not given, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return kl, stats, (p if not given else p.new_empty(T, 0)), lse_out


def indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, indices, ks, ke, stats, p, sm_scale, config=None,
                   deterministic=False, scratch_bytes=1 << 30):
    """Gradients (diq [T, H_I, d_I] in iq.dtype, dik [S, d_I] in ik.dtype, dw [T, H_I] in
    w.dtype) of sum_t dkl[t] * KL_t. The sparse stage reads its target from ``p`` [T, topk]
    and needs no q, kv, lse (may be None); the warm-up recomputes it from them.

    dik sums over every (row, slot) that scored a key. By default with fp32 atomics, whose
    order (so the last bits) varies from run to run; ``deterministic``: each contribution is
    stored to an fp32 buffer [chunk, slots, d_I] and summed per key in a fixed order (the
    sparse MLA backward's reduction), for queries in chunks whose buffer fits
    ``scratch_bytes``: bitwise reproducible."""
    if indices is not None:
        q = kv = lse = None  # the sparse target is in p
    q, kv2, lse, iq, ik, w, idx, ks, ke, dense, topk = _prep(q, kv, lse, iq, ik, w, indices, ks, ke)
    T = iq.shape[0]
    cfg = _config(q, iq) | dict(config or {})
    dkl = dkl.float().contiguous()
    if topk:
        p = p.float().contiguous()
    diq = torch.empty_like(iq)
    dik = torch.zeros(ik.shape, dtype=torch.float32, device=ik.device)
    dw = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    meta = dict(**_meta(q, iq), BLOCK_K=cfg["BLOCK_K"], DENSE=dense, STORE_P=not dense,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    def launch(c0, c1, buf=None):
        """Rows [c0, c1); dik by atomics, or into ``buf`` per (row, slot)."""
        r = slice(c0, c1)
        qc, lc = (q[r], lse[r]) if q is not None else (None, None)
        sidx = idx[r] if idx is not None else ks[r]
        dummy = dkl
        attn_ptrs, (n_heads, qk_scale, inv_h) = _attn_side(qc, kv2, lc, sm_scale, dummy)
        det = dict(DETERMINISTIC=True, stride_det=buf.stride(0), stride_detj=buf.stride(1)) if buf is not None else {}
        indexer_kl_bwd_kernel[(c1 - c0,)](
            *attn_ptrs, iq[r], ik, w[r], sidx, ks[r] if dense else dummy, ke[r] if dense else dummy,
            dkl[r], stats[r], p[r] if topk else dummy, diq[r], dik if buf is None else buf, dw[r],
            ik.shape[0], n_heads, iq.shape[1], topk, qk_scale, inv_h,
            *_row_args(qc, kv2, lc, iq, ik, w, idx), p.stride(0) if topk else 0, dkl.stride(0),
            diq.stride(0), diq.stride(1), dik.stride(0), dw.stride(0), **meta, **det,
        )

    if not deterministic:
        launch(0, T)
    elif T > 0:
        n_slots = topk if not dense else max(1, int((ke - ks).clamp(min=0).max()))
        chunk = max(1, min(T, scratch_bytes // (n_slots * ik.shape[1] * 4)))
        buf = torch.empty(chunk, n_slots, ik.shape[1], dtype=torch.float32, device=ik.device)
        j = torch.arange(n_slots, device=ik.device)
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            launch(c0, c1, buf)
            if dense:  # slot j of row t is key ks[t] + j while j < ke[t] - ks[t]
                slots = torch.where(j[None, :] < (ke[c0:c1] - ks[c0:c1]).long()[:, None],
                                    ks[c0:c1].long()[:, None] + j[None, :], -1)
            else:
                slots = idx[c0:c1]
            _reduce_deterministic(buf[None, :c1 - c0], slots, dik, 1, c1 - c0)
    return diq, dik.to(ik.dtype), dw.to(w.dtype)


# torch.library registration: opaque to torch.compile, with fake (meta) kernels.

@torch.library.custom_op("flashdsa::indexer_kl_fwd", mutates_args=())
def _indexer_kl_fwd_op(q: Optional[torch.Tensor], kv: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                       iq: torch.Tensor, ik: torch.Tensor, w: torch.Tensor, indices: Optional[torch.Tensor],
                       ks: Optional[torch.Tensor], ke: Optional[torch.Tensor], probs: Optional[torch.Tensor],
                       sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return indexer_kl_fwd(q, kv, lse, iq, ik, w, indices, ks, ke, sm_scale, probs=probs)


@_indexer_kl_fwd_op.register_fake
def _(q, kv, lse, iq, ik, w, indices, ks, ke, probs, sm_scale):
    T = iq.shape[0]
    topk = 0 if indices is None or probs is not None else indices.shape[-1]
    lse_shape = (T, q.shape[1]) if lse is None and probs is None else (0, 0)
    return (iq.new_empty(T, dtype=torch.float32), iq.new_empty(T, 2, dtype=torch.float32),
            iq.new_empty(T, topk, dtype=torch.float32), iq.new_empty(lse_shape, dtype=torch.float32))


@torch.library.custom_op("flashdsa::indexer_kl_bwd", mutates_args=())
def _indexer_kl_bwd_op(dkl: torch.Tensor, q: Optional[torch.Tensor], kv: Optional[torch.Tensor],
                       lse: Optional[torch.Tensor], iq: torch.Tensor, ik: torch.Tensor, w: torch.Tensor,
                       indices: Optional[torch.Tensor], ks: Optional[torch.Tensor], ke: Optional[torch.Tensor],
                       stats: torch.Tensor, p: torch.Tensor, sm_scale: float,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, indices, ks, ke, stats, p, sm_scale,
                          deterministic=deterministic)


@_indexer_kl_bwd_op.register_fake
def _(dkl, q, kv, lse, iq, ik, w, indices, ks, ke, stats, p, sm_scale, deterministic):
    return torch.empty_like(iq), torch.empty_like(ik), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    q, kv, lse, iq, ik, w, indices, ks, ke, probs, sm_scale = inputs
    kl, stats, p, lse_out = output
    ctx.mark_non_differentiable(stats, p, lse_out)
    if indices is not None:  # sparse: the backward reads the target, not the attention
        q = kv = lse = None
        p = probs if probs is not None else p
    elif lse is None:
        lse = lse_out
    ctx.save_for_backward(q, kv, lse, iq, ik, w, indices, ks, ke, stats, p)
    ctx.sm_scale = sm_scale


def _backward(ctx, dkl, dstats, dp, dlse_out):
    q, kv, lse, iq, ik, w, indices, ks, ke, stats, p = ctx.saved_tensors
    diq, dik, dw = _indexer_kl_bwd_op(dkl, q, kv, lse, iq, ik, w, indices, ks, ke, stats, p, ctx.sm_scale,
                                      torch.are_deterministic_algorithms_enabled())
    # The attention side (q, kv, lse or probs) is a detached target: no gradient by design.
    return None, None, None, diq, dik, dw, None, None, None, None, None


torch.library.register_autograd("flashdsa::indexer_kl_fwd", _backward, setup_context=_setup_context)


def warmup_kl_loss(iq, ik, weights, q, kv, lse, sm_scale, ks, ke, reduction="sum"):
    """Blockwise dense warm-up loss sum_t KL(p[t] || softmax(I[t])) over [ks[t], ke[t]).
    Same contract as :func:`flashdsa.reference.losses.warmup_kl_loss`; gradients reach
    iq, ik and weights only. ``lse=None``: computed here (one more pass of q.kv)."""
    check_loss_inputs(iq, ik, weights, q, kv, lse, ks=ks, ke=ke)
    kl = torch.ops.flashdsa.indexer_kl_fwd(q.detach(), kv.detach(), None if lse is None else lse.detach(),
                                           iq, ik, weights, None, ks, ke, None, float(sm_scale))[0]
    return _reduce(kl, reduction)


def sparse_kl_loss(iq, ik, weights, q, kv, lse, sm_scale, indices, reduction="sum"):
    """Blockwise sparse-stage loss over the selected slots ``indices`` [T, 1, topk], its
    target recomputed from the attention's q, kv and lse. Same contract as
    :func:`flashdsa.reference.losses.sparse_kl_loss`. When the attention is flashdsa's,
    :func:`sparse_kl_loss_from_probs` is cheaper (no second q.kv pass)."""
    check_loss_inputs(iq, ik, weights, q, kv, lse, indices=indices)
    kl = torch.ops.flashdsa.indexer_kl_fwd(q.detach(), kv.detach(), None if lse is None else lse.detach(),
                                           iq, ik, weights, indices, None, None, None, float(sm_scale))[0]
    return _reduce(kl, reduction)


def sparse_kl_loss_from_probs(iq, ik, weights, attn_probs, indices, reduction="sum"):
    """Blockwise sparse-stage loss with the target given: ``attn_probs`` [T, topk], the
    head-mean attention probabilities of the slots ``indices`` [T, 1, topk] (what
    ``flashdsa.sparse_mla_fwd(..., return_probs=True)`` returns). Only the index scores are
    computed here. Same contract as :func:`flashdsa.reference.losses.sparse_kl_loss_from_probs`."""
    check_loss_inputs(iq, ik, weights, indices=indices, attn_probs=attn_probs)
    kl = torch.ops.flashdsa.indexer_kl_fwd(None, None, None, iq, ik, weights, indices, None, None,
                                           attn_probs.detach(), 0.0)[0]
    return _reduce(kl, reduction)
