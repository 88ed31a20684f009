"""The Triton kernels of the indexer KL losses (SPEC 5): never [H, T, T] nor [T, T].

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
end KL_t = (sum p log p)/Z - log Z - (sum p I)/Z + lse_I. The sparse stage either takes p
as given (``ATTN`` off: the head-mean probabilities of the attention forward, then no q.kv
here at all) or computes it and stores it (``STORE_P``; p [T, topk] fp32 is O(T * topk), as
the indices), so its backward needs no attention recompute; the warm-up cannot store p
([T, T]) and recomputes it in the backward. ``COMPUTE_LSE``: no lse given, one more pass
over the logits computes it first.

The index-score tile has the slots as rows (the M dimension of the MMA) and the indexer
heads as columns, so the per-slot sum over heads stays inside each warp (its rows' threads);
heads as rows would spread that sum over the warps, through shared memory, every step.
The backward's dw, a sum over slots, does cross the warps every step: a [BK, H_I] register
accumulator reduced once at the end would spill at the sm90 block sizes.

Backward (``indexer_kl_bwd_kernel``), per block, with g = dL_t * (softmax(I) - p/Z):
    dw[t]   += sum_r relu(zT) * g[:, None]   [H_I]
    dzT      = (zT > 0) * g[:, None] * w     [BK, H_I]
    diq[t]  += dzT^T @ ik[r]                 [H_I, d_I]
    dik[r]  += dzT @ iq[t]                   [BK, d_I]   (fp32 atomics, or with
               ``DETERMINISTIC`` one buffer row per (row, slot), summed later in a fixed order)

Warm-up with few heads (``indexer_kl_warmup_fwd_kernel`` / ``_bwd_kernel``): one program
per QB consecutive query rows (launch.query_block: QB x heads and QB x indexer heads fill
tiles of up to 64 rows), so each key row read serves QB queries instead of one. The
attention tile's rows are (query, head) pairs, p is a head mean inside each query's rows,
each query keeps its own running sums and causal mask, and the program walks the union of
its queries' ranges. The backward sums dik over the QB queries in one product before the
atomic add. The one-row kernels above serve the rest (e.g. V3.2's 64 indexer heads, whose
index tile alone fills 64 rows) and the deterministic backward.

The indexer's q and k enter in bf16 in training (tensor cores, fp32 accumulation), the
weights in fp32; not FP8, whose rounding has zero gradient almost everywhere (see
docs/training.md). d_qk (576) is split into a power-of-two head (512) and a tail (64) for
the tiles.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import LN2_C, LOG2E_C


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
    lse2 = tl.load(lse_ptr + t * stride_lt + offs_h, mask=mask_h, other=float("inf")) * LOG2E_C
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
def _kl_accumulate(p, s, valid, z_sum, plogp, p_i, m, l):
    """One block of the forward's running sums (any tile shape, lanes kept apart): target
    p, index scores s (-inf where invalid) -> (sum p, sum p ln p, sum p I, and the online
    logsumexp of I as its max m and sum l)."""
    pos = p > 0
    z_sum += p
    plogp += tl.where(pos, p * tl.log(tl.where(pos, p, 1.0)), 0.0)
    p_i += p * tl.where(valid, s, 0.0)  # p = 0 wherever s = -inf
    m_new = tl.maximum(m, s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.exp(s - m_safe)
    return z_sum, plogp, p_i, m_new, l


@triton.jit
def _kl_combine(z_sum, plogp, p_i, m, l, AXIS: tl.constexpr):
    """The running sums' lanes (along ``AXIS``) combined: (KL, Z, lse_I) with
    KL = (sum p ln p)/Z - ln Z - (sum p I)/Z + lse_I (0 where Z = 0)."""
    zt = tl.sum(z_sum, axis=AXIS)
    mk = tl.max(m, axis=AXIS, keep_dims=True)
    mk = tl.where(mk == float("-inf"), 0.0, mk)
    lt = tl.sum(l * tl.exp(m - mk), axis=AXIS)
    mt = tl.max(mk, axis=AXIS)
    lse_i = tl.where(lt > 0, mt + tl.log(tl.where(lt > 0, lt, 1.0)), float("-inf"))
    zt_safe = tl.where(zt > 0, zt, 1.0)
    kl = tl.sum(plogp, axis=AXIS) / zt_safe - tl.log(zt_safe) - tl.sum(p_i, axis=AXIS) / zt_safe + lse_i
    return tl.where(zt > 0, kl, 0.0), zt, lse_i


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
def _program_row(iq_ptr, w_ptr, ks_ptr, ke_ptr, n_iheads, topk, stride_iqt, stride_iqh, stride_wt,
                 DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr, DENSE: tl.constexpr):
    """This program's query row t, its indexer q [HI, DI] and weights [HI], and its
    candidate range (ks, ke, n)."""
    t = tl.program_id(0).to(tl.int64)
    if DENSE:
        # Causal rows grow with t: start the longest first so the short ones fill the tail.
        t = tl.num_programs(0) - 1 - t
    iq, w = _load_index_row(iq_ptr, w_ptr, t, n_iheads, stride_iqt, stride_iqh, stride_wt, DI, BLOCK_DI, BLOCK_HI)
    ks, ke, n = _row_range(ks_ptr, ke_ptr, t, topk, DENSE)
    return t, iq, w, ks, ke, n


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
    t, iq, w, ks, ke, n = _program_row(iq_ptr, w_ptr, ks_ptr, ke_ptr, n_iheads, topk, stride_iqt, stride_iqh,
                                       stride_wt, DI, BLOCK_DI, BLOCK_HI, DENSE)
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
        tl.store(lse_out_ptr + t * stride_lt + offs_h, lse2 * LN2_C, mask=offs_h < n_heads)

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
        z_sum, plogp, p_i, m, l = _kl_accumulate(p, s, valid, z_sum, plogp, p_i, m, l)
    kl, zt, lse_i = _kl_combine(z_sum, plogp, p_i, m, l, 0)
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
    BLOCK_K: tl.constexpr, DENSE: tl.constexpr, DOT_PREC: tl.constexpr,
    DETERMINISTIC: tl.constexpr = False,  # dik per (row, slot) into dik_ptr [T, n, d_I] fp32, summed later
    stride_det=0, stride_detj=0,
):
    """Warm-up (DENSE): the target p recomputed from q, kv and lse; sparse: p [T, topk]
    read from p_ptr (stored by the forward, or given)."""
    t, iq, w, ks, ke, n = _program_row(iq_ptr, w_ptr, ks_ptr, ke_ptr, n_iheads, topk, stride_iqt, stride_iqh,
                                       stride_wt, DI, BLOCK_DI, BLOCK_HI, DENSE)
    if DENSE:
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
        if DENSE:
            p = _attn_probs(q_h, q_t, kv_ptr, stride_kvr, rows, valid, lse2, qk_scale, inv_h,
                            D_HEAD, D_TAIL, BLOCK_DT, DOT_PREC)
        else:
            offs = k0 + tl.arange(0, BLOCK_K)
            p = tl.load(p_ptr + t * stride_pt + offs, mask=offs < topk, other=0.0)
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



@triton.jit
def _query_block(q_ptr, lse_ptr, iq_ptr, w_ptr, ks_ptr, ke_ptr, T, n_kv, n_heads, n_iheads,
                 stride_qt, stride_qh, stride_lt, stride_iqt, stride_iqh, stride_wt,
                 QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr,
                 BLOCK_H: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr,
                 LOAD_LSE: tl.constexpr):
    """The QB query rows of this program (warm-up, query-tiled kernels): the attention
    tile's rows (query i, head h) = i * BLOCK_H + h with their q and (``LOAD_LSE``) lse in
    base 2, the index tile's rows (query i, indexer head j) = i * BLOCK_HI + j with their
    q and weights, each query's causal range [ks, ke) and the union [lo, hi) of the
    ranges inside [0, S), which the program walks."""
    # The longest causal ranges first, so the short ones fill the tail.
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64) * QB
    offs_m = tl.arange(0, QB * BLOCK_H)
    tm = t0 + offs_m // BLOCK_H
    hm = offs_m % BLOCK_H
    mrow = (tm < T) & (hm < n_heads)
    q_row = q_ptr + tm * stride_qt + hm * stride_qh
    offs_a = tl.arange(0, D_HEAD)
    offs_b = tl.arange(0, BLOCK_DT)
    q_h = tl.load(q_row[:, None] + offs_a[None, :], mask=mrow[:, None], other=0.0)
    q_t = tl.load(q_row[:, None] + D_HEAD + offs_b[None, :], mask=mrow[:, None] & (offs_b < D_TAIL)[None, :],
                  other=0.0)
    if LOAD_LSE:
        lse2 = tl.load(lse_ptr + tm * stride_lt + hm, mask=mrow, other=float("inf")) * LOG2E_C
    else:
        lse2 = tl.full([QB * BLOCK_H], float("inf"), dtype=tl.float32)
    offs_n = tl.arange(0, QB * BLOCK_HI)
    tn = t0 + offs_n // BLOCK_HI
    jn = offs_n % BLOCK_HI
    nrow = (tn < T) & (jn < n_iheads)
    offs_d = tl.arange(0, BLOCK_DI)
    iq = tl.load(iq_ptr + tn[:, None] * stride_iqt + jn[:, None] * stride_iqh + offs_d[None, :],
                 mask=nrow[:, None] & (offs_d < DI)[None, :], other=0.0)
    w = tl.load(w_ptr + tn * stride_wt + jn, mask=nrow, other=0.0).to(tl.float32)
    tq = t0 + tl.arange(0, QB)
    qmask = tq < T
    ks = tl.load(ks_ptr + tq, mask=qmask, other=0).to(tl.int64)
    ke = tl.load(ke_ptr + tq, mask=qmask, other=0).to(tl.int64)
    live = qmask & (ke > ks)
    lo = tl.maximum(tl.min(tl.where(live, ks, n_kv), axis=0), 0)
    hi = tl.minimum(tl.max(tl.where(live, ke, 0), axis=0), n_kv)
    return q_h, q_t, lse2, mrow, tm, hm, iq, w, tn, jn, nrow, tq, qmask, ks, ke, lo, hi


@triton.jit
def _block_logits2(q_h, q_t, kv_ptr, stride_kvr, k0, hi, qk_scale,
                   D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """Key rows k0 + [0, BLOCK_K) (those < hi read): the attention logits of the tile's rows
    in base 2 [QB * BLOCK_H, BK], the rows and which are below hi."""
    rows = k0 + tl.arange(0, BLOCK_K)
    inb = rows < hi
    offs_a = tl.arange(0, D_HEAD)
    offs_b = tl.arange(0, BLOCK_DT)
    kv_row = kv_ptr + tl.where(inb, rows, 0)[:, None] * stride_kvr
    kv_h = tl.load(kv_row + offs_a[None, :], mask=inb[:, None], other=0.0)
    kv_t = tl.load(kv_row + D_HEAD + offs_b[None, :], mask=inb[:, None] & (offs_b < D_TAIL)[None, :], other=0.0)
    a = tl.dot(q_h, tl.trans(kv_h), input_precision=DOT_PREC)
    a = tl.dot(q_t, tl.trans(kv_t), a, input_precision=DOT_PREC)
    return a * qk_scale, rows, inb


@triton.jit
def _block_scores(q_h, q_t, lse2, iq, w, kv_ptr, ik_ptr, stride_kvr, stride_ikr, k0, hi, ks, ke, qk_scale, inv_h,
                  QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr,
                  BLOCK_H: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """Key rows k0 + [0, BLOCK_K) for the program's QB queries: the target p [QB, BK]
    (a head mean inside each query's rows of the attention tile), the index scores s
    [QB, BK] (-inf where invalid), the validity mask [QB, BK], the index logits z
    [QB * BLOCK_HI, BK], the rows, which are below hi, and their ik [BK, DI]."""
    a, rows, inb = _block_logits2(q_h, q_t, kv_ptr, stride_kvr, k0, hi, qk_scale, D_HEAD, D_TAIL, BLOCK_DT,
                                  BLOCK_K, DOT_PREC)
    pr = tl.where(lse2[:, None] < float("inf"), tl.exp2(a - lse2[:, None]), 0.0)  # padding heads: 0
    p = tl.sum(tl.reshape(pr, [QB, BLOCK_H, BLOCK_K]), axis=1) * inv_h
    valid = (rows[None, :] >= ks[:, None]) & (rows[None, :] < ke[:, None]) & inb[None, :]
    p = tl.where(valid, p, 0.0)
    offs_d = tl.arange(0, BLOCK_DI)
    ik = tl.load(ik_ptr + tl.where(inb, rows, 0)[:, None] * stride_ikr + offs_d[None, :],
                 mask=inb[:, None] & (offs_d < DI)[None, :], other=0.0)
    z = tl.dot(iq, tl.trans(ik), input_precision=DOT_PREC)
    s = tl.sum(tl.reshape(tl.maximum(z, 0.0) * w[:, None], [QB, BLOCK_HI, BLOCK_K]), axis=1)
    return p, tl.where(valid, s, float("-inf")), valid, z, rows, inb, ik


@triton.jit
def indexer_kl_warmup_fwd_kernel(
    q_ptr, kv_ptr, lse_ptr, iq_ptr, ik_ptr, w_ptr, ks_ptr, ke_ptr, kl_ptr, stats_ptr, lse_out_ptr,
    T, n_kv, n_heads, n_iheads, qk_scale, inv_h,
    stride_qt, stride_qh, stride_kvr, stride_lt, stride_iqt, stride_iqh, stride_ikr, stride_wt,
    QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE_LSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """The warm-up forward for QB consecutive queries a program: the same running sums as
    ``indexer_kl_fwd_kernel``, per query, with each gathered key row serving all QB."""
    q_h, q_t, lse2, mrow, tm, hm, iq, w, tn, jn, nrow, tq, qmask, ks, ke, lo, hi = _query_block(
        q_ptr, lse_ptr, iq_ptr, w_ptr, ks_ptr, ke_ptr, T, n_kv, n_heads, n_iheads,
        stride_qt, stride_qh, stride_lt, stride_iqt, stride_iqh, stride_wt,
        QB, D_HEAD, D_TAIL, BLOCK_DT, BLOCK_H, DI, BLOCK_DI, BLOCK_HI, not COMPUTE_LSE)
    if COMPUTE_LSE:
        # One pass over the union range for each (query, head)'s logsumexp (online, base 2),
        # each row masked to its own query's range; stored for the backward.
        ks_m = tl.load(ks_ptr + tm, mask=tm < T, other=0).to(tl.int64)
        ke_m = tl.load(ke_ptr + tm, mask=tm < T, other=0).to(tl.int64)
        m_h = tl.full([QB * BLOCK_H], float("-inf"), dtype=tl.float32)
        l_h = tl.zeros([QB * BLOCK_H], dtype=tl.float32)
        for k0 in range(lo, hi, BLOCK_K):
            a2, rows, inb = _block_logits2(q_h, q_t, kv_ptr, stride_kvr, k0, hi, qk_scale, D_HEAD, D_TAIL, BLOCK_DT,
                                           BLOCK_K, DOT_PREC)
            ok = (rows[None, :] >= ks_m[:, None]) & (rows[None, :] < ke_m[:, None]) & inb[None, :]
            a2 = tl.where(ok, a2, float("-inf"))
            m_new = tl.maximum(m_h, tl.max(a2, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_h = l_h * tl.exp2(m_h - m_safe) + tl.sum(tl.exp2(a2 - m_safe[:, None]), axis=1)
            m_h = m_new
        lse2 = tl.where((l_h > 0) & mrow, m_h + tl.log2(tl.where(l_h > 0, l_h, 1.0)), float("inf"))
        tl.store(lse_out_ptr + tm * stride_lt + hm, lse2 * LN2_C, mask=mrow)

    z_sum = tl.zeros([QB, BLOCK_K], dtype=tl.float32)
    plogp = tl.zeros([QB, BLOCK_K], dtype=tl.float32)
    p_i = tl.zeros([QB, BLOCK_K], dtype=tl.float32)
    m = tl.full([QB, BLOCK_K], float("-inf"), dtype=tl.float32)
    l = tl.zeros([QB, BLOCK_K], dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        p, s, valid, _, _, _, _ = _block_scores(q_h, q_t, lse2, iq, w, kv_ptr, ik_ptr, stride_kvr, stride_ikr, k0, hi,
                                                ks, ke, qk_scale, inv_h, QB, D_HEAD, D_TAIL, BLOCK_DT, BLOCK_H, DI,
                                                BLOCK_DI, BLOCK_HI, BLOCK_K, DOT_PREC)
        z_sum, plogp, p_i, m, l = _kl_accumulate(p, s, valid, z_sum, plogp, p_i, m, l)
    kl, zt, lse_i = _kl_combine(z_sum, plogp, p_i, m, l, 1)
    tl.store(kl_ptr + tq, kl, mask=qmask)
    tl.store(stats_ptr + tq * 2, zt, mask=qmask)
    tl.store(stats_ptr + tq * 2 + 1, lse_i, mask=qmask)


@triton.jit
def indexer_kl_warmup_bwd_kernel(
    q_ptr, kv_ptr, lse_ptr, iq_ptr, ik_ptr, w_ptr, ks_ptr, ke_ptr, dkl_ptr, stats_ptr, diq_ptr, dik_ptr, dw_ptr,
    T, n_kv, n_heads, n_iheads, qk_scale, inv_h,
    stride_qt, stride_qh, stride_kvr, stride_lt, stride_iqt, stride_iqh, stride_ikr, stride_wt,
    stride_dkl, stride_diqt, stride_diqh, stride_dikr, stride_dwt,
    QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The warm-up backward for QB queries a program, the target recomputed: as
    ``indexer_kl_bwd_kernel`` per query, with dik[r] summed over the QB queries (one
    [BK, QB * H_I] @ [QB * H_I, d_I] product) before its one fp32 atomic add."""
    q_h, q_t, lse2, mrow, tm, hm, iq, w, tn, jn, nrow, tq, qmask, ks, ke, lo, hi = _query_block(
        q_ptr, lse_ptr, iq_ptr, w_ptr, ks_ptr, ke_ptr, T, n_kv, n_heads, n_iheads,
        stride_qt, stride_qh, stride_lt, stride_iqt, stride_iqh, stride_wt,
        QB, D_HEAD, D_TAIL, BLOCK_DT, BLOCK_H, DI, BLOCK_DI, BLOCK_HI, True)
    zt = tl.load(stats_ptr + tq * 2, mask=qmask, other=0.0)
    lse_i = tl.load(stats_ptr + tq * 2 + 1, mask=qmask, other=float("-inf"))
    dkl = tl.load(dkl_ptr + tq * stride_dkl, mask=qmask, other=0.0).to(tl.float32)
    inv_z = tl.where(zt > 0, 1.0 / tl.where(zt > 0, zt, 1.0), 0.0)
    lse_i_safe = tl.where(lse_i == float("-inf"), 0.0, lse_i)
    offs_d = tl.arange(0, BLOCK_DI)
    mask_d = offs_d < DI
    acc_iq = tl.zeros([QB * BLOCK_HI, BLOCK_DI], dtype=tl.float32)
    acc_w = tl.zeros([QB * BLOCK_HI], dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        p, s, valid, z, rows, inb, ik = _block_scores(q_h, q_t, lse2, iq, w, kv_ptr, ik_ptr, stride_kvr, stride_ikr,
                                                      k0, hi, ks, ke, qk_scale, inv_h, QB, D_HEAD, D_TAIL, BLOCK_DT,
                                                      BLOCK_H, DI, BLOCK_DI, BLOCK_HI, BLOCK_K, DOT_PREC)
        g = tl.where(valid, tl.exp(s - lse_i_safe[:, None]) - p * inv_z[:, None], 0.0) * dkl[:, None]  # [QB, BK]
        g_n = tl.reshape(tl.broadcast_to(g[:, None, :], [QB, BLOCK_HI, BLOCK_K]), [QB * BLOCK_HI, BLOCK_K])
        acc_w += tl.sum(tl.maximum(z, 0.0) * g_n, axis=1)
        dz = tl.where(z > 0, g_n * w[:, None], 0.0).to(ik.dtype)  # [QB * BLOCK_HI, BK]
        acc_iq = tl.dot(dz, ik, acc_iq, input_precision=DOT_PREC)
        dk = tl.dot(tl.trans(dz), iq, input_precision=DOT_PREC)  # [BK, DI]
        tl.atomic_add(dik_ptr + rows[:, None] * stride_dikr + offs_d[None, :], dk,
                      mask=inb[:, None] & mask_d[None, :], sem="relaxed")
    tl.store(diq_ptr + tn[:, None] * stride_diqt + jn[:, None] * stride_diqh + offs_d[None, :],
             acc_iq.to(diq_ptr.dtype.element_ty), mask=nrow[:, None] & mask_d[None, :])
    tl.store(dw_ptr + tn * stride_dwt + jn, acc_w, mask=nrow)
