"""Experiment (issue 18): the warm-up KL forward with a block of query rows a program.

    python -m benchmarks.probe_kl_tiled            # H200: check, then time against the product kernel
    TRITON_INTERPRET=1 python -m benchmarks.probe_kl_tiled --check-only --small   # CPU logic check

The product's warm-up KL kernel (flashdsa/ops/indexer_loss/kernels.py) runs one program
per query row and walks its whole causal range, so every query re-reads every earlier
latent row and indexer key: at 8 heads (the quality study's model) about 94 GB a layer of
L2 reads at 8K x 4 (docs/quality_study.md). The candidate here (forward and backward) takes QB
consecutive query rows a program (QB x heads = 64 rows of the attention tile, QB x
indexer heads of the index tile): each gathered key row then serves QB queries, which
divides that traffic by QB. Per block of key rows r:
    a = q[(t, h)] @ kv[r]^T                    [QB * H, BK]
    p = mean_h exp2(a - lse[t, h])             [QB, BK]  (a head-sum inside each query's rows)
    z = iq[(t, j)] @ ik[r]^T                   [QB * H_I, BK]
    I = sum_j relu(z) * w[t, j]                [QB, BK]
with each query's own causal range [ks[t], ke[t]) as the mask, and the product kernel's
running sums per query. Results: ``probe_kl_tiled.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result
from flashdsa.ops.common import LOG2E, LOG2E_C
from flashdsa.ops.indexer_loss.kernels import _kl_accumulate
from flashdsa.ops.indexer_loss.launch import _split, indexer_kl_bwd, indexer_kl_fwd


@triton.jit
def _program_tiles(q_ptr, lse_ptr, iq_ptr, w_ptr, ks_ptr, ke_ptr, T, n_kv, n_heads, n_iheads,
                   stride_qt, stride_qh, stride_lt, stride_iqt, stride_iqh, stride_wt,
                   QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr,
                   BLOCK_H: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr):
    """This program's QB query rows: the attention tile's q rows (query, head) and their
    lse (base 2), the index tile's rows (query, indexer head) and weights, each query's
    range [ks, ke) and the union [lo, hi) the program walks."""
    # the longest causal ranges first, so the short ones fill the tail
    t0 = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64) * QB
    # attention rows (query i, head h) = i * BLOCK_H + h
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
    lse2 = tl.load(lse_ptr + tm * stride_lt + hm, mask=mrow, other=float("inf")) * LOG2E_C
    # indexer rows (query i, head j) = i * BLOCK_HI + j
    offs_n = tl.arange(0, QB * BLOCK_HI)
    tn = t0 + offs_n // BLOCK_HI
    jn = offs_n % BLOCK_HI
    nrow = (tn < T) & (jn < n_iheads)
    offs_d = tl.arange(0, BLOCK_DI)
    iq = tl.load(iq_ptr + tn[:, None] * stride_iqt + jn[:, None] * stride_iqh + offs_d[None, :],
                 mask=nrow[:, None] & (offs_d < DI)[None, :], other=0.0)
    w = tl.load(w_ptr + tn * stride_wt + jn, mask=nrow, other=0.0).to(tl.float32)
    # each query's range, and the union the program walks
    tq = t0 + tl.arange(0, QB)
    qmask = tq < T
    ks = tl.load(ks_ptr + tq, mask=qmask, other=0).to(tl.int64)
    ke = tl.load(ke_ptr + tq, mask=qmask, other=0).to(tl.int64)
    live = qmask & (ke > ks)
    lo = tl.maximum(tl.min(tl.where(live, ks, n_kv), axis=0), 0)
    hi = tl.minimum(tl.max(tl.where(live, ke, 0), axis=0), n_kv)
    return q_h, q_t, lse2, iq, w, tn, jn, nrow, tq, qmask, ks, ke, lo, hi


@triton.jit
def _block_scores(q_h, q_t, lse2, iq, w, kv_ptr, ik_ptr, stride_kvr, stride_ikr, k0, hi, ks, ke, qk_scale, inv_h,
                  QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr,
                  BLOCK_H: tl.constexpr, DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """Key rows k0 + [0, BLOCK_K): the target p [QB, BK], index scores s [QB, BK] (-inf
    where invalid), the validity mask, the index logits z [QB * H_I, BK], the rows and
    their ik [BK, DI]."""
    offs_a = tl.arange(0, D_HEAD)
    offs_b = tl.arange(0, BLOCK_DT)
    offs_d = tl.arange(0, BLOCK_DI)
    rows = k0 + tl.arange(0, BLOCK_K)
    inb = rows < hi
    kv_row = kv_ptr + tl.where(inb, rows, 0)[:, None] * stride_kvr
    kv_h = tl.load(kv_row + offs_a[None, :], mask=inb[:, None], other=0.0)
    kv_t = tl.load(kv_row + D_HEAD + offs_b[None, :], mask=inb[:, None] & (offs_b < D_TAIL)[None, :], other=0.0)
    a = tl.dot(q_h, tl.trans(kv_h), input_precision=DOT_PREC)
    a = tl.dot(q_t, tl.trans(kv_t), a, input_precision=DOT_PREC) * qk_scale
    pr = tl.where(lse2[:, None] < float("inf"), tl.exp2(a - lse2[:, None]), 0.0)
    p = tl.sum(tl.reshape(pr, [QB, BLOCK_H, BLOCK_K]), axis=1) * inv_h
    valid = (rows[None, :] >= ks[:, None]) & (rows[None, :] < ke[:, None]) & inb[None, :]
    p = tl.where(valid, p, 0.0)
    ik = tl.load(ik_ptr + tl.where(inb, rows, 0)[:, None] * stride_ikr + offs_d[None, :],
                 mask=inb[:, None] & (offs_d < DI)[None, :], other=0.0)
    z = tl.dot(iq, tl.trans(ik), input_precision=DOT_PREC)
    s = tl.sum(tl.reshape(tl.maximum(z, 0.0) * w[:, None], [QB, BLOCK_HI, BLOCK_K]), axis=1)
    s = tl.where(valid, s, float("-inf"))
    return p, s, valid, z, rows, inb, ik


@triton.jit
def kl_fwd_tiled_kernel(
    q_ptr, kv_ptr, lse_ptr, iq_ptr, ik_ptr, w_ptr, ks_ptr, ke_ptr, kl_ptr, stats_ptr,
    T, n_kv, n_heads, n_iheads, qk_scale, inv_h,
    stride_qt, stride_qh, stride_kvr, stride_lt, stride_iqt, stride_iqh, stride_ikr, stride_wt,
    QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    q_h, q_t, lse2, iq, w, tn, jn, nrow, tq, qmask, ks, ke, lo, hi = _program_tiles(
        q_ptr, lse_ptr, iq_ptr, w_ptr, ks_ptr, ke_ptr, T, n_kv, n_heads, n_iheads,
        stride_qt, stride_qh, stride_lt, stride_iqt, stride_iqh, stride_wt,
        QB, D_HEAD, D_TAIL, BLOCK_DT, BLOCK_H, DI, BLOCK_DI, BLOCK_HI)
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
    zt = tl.sum(z_sum, axis=1)
    mt = tl.max(m, axis=1)
    mt_safe = tl.where(mt == float("-inf"), 0.0, mt)
    lt = tl.sum(l * tl.exp(m - mt_safe[:, None]), axis=1)
    lse_i = tl.where(lt > 0, mt_safe + tl.log(tl.where(lt > 0, lt, 1.0)), float("-inf"))
    zt_safe = tl.where(zt > 0, zt, 1.0)
    kl = tl.sum(plogp, axis=1) / zt_safe - tl.log(zt_safe) - tl.sum(p_i, axis=1) / zt_safe + lse_i
    kl = tl.where(zt > 0, kl, 0.0)
    tl.store(kl_ptr + tq, kl, mask=qmask)
    tl.store(stats_ptr + tq * 2, zt, mask=qmask)
    tl.store(stats_ptr + tq * 2 + 1, lse_i, mask=qmask)


@triton.jit
def kl_bwd_tiled_kernel(
    q_ptr, kv_ptr, lse_ptr, iq_ptr, ik_ptr, w_ptr, ks_ptr, ke_ptr, dkl_ptr, stats_ptr, diq_ptr, dik_ptr, dw_ptr,
    T, n_kv, n_heads, n_iheads, qk_scale, inv_h,
    stride_qt, stride_qh, stride_kvr, stride_lt, stride_iqt, stride_iqh, stride_ikr, stride_wt,
    stride_diqt, stride_diqh, stride_dikr, stride_dwt,
    QB: tl.constexpr, D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_H: tl.constexpr,
    DI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The backward of the warm-up KL for the same tiles, the target recomputed; with
    g = dKL * (softmax(I) - p / Z) per query and key: dw += sum relu(z) g, dz = (z > 0) g w,
    diq += dz @ ik, and dik[r] += dz^T @ iq summed over the block's QB queries before its
    one fp32 atomic add."""
    q_h, q_t, lse2, iq, w, tn, jn, nrow, tq, qmask, ks, ke, lo, hi = _program_tiles(
        q_ptr, lse_ptr, iq_ptr, w_ptr, ks_ptr, ke_ptr, T, n_kv, n_heads, n_iheads,
        stride_qt, stride_qh, stride_lt, stride_iqt, stride_iqh, stride_wt,
        QB, D_HEAD, D_TAIL, BLOCK_DT, BLOCK_H, DI, BLOCK_DI, BLOCK_HI)
    zt = tl.load(stats_ptr + tq * 2, mask=qmask, other=0.0)
    lse_i = tl.load(stats_ptr + tq * 2 + 1, mask=qmask, other=float("-inf"))
    dkl = tl.load(dkl_ptr + tq, mask=qmask, other=0.0)
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
        dz = tl.where(z > 0, g_n * w[:, None], 0.0).to(ik.dtype)  # [QB * H_I, BK]
        acc_iq = tl.dot(dz, ik, acc_iq, input_precision=DOT_PREC)
        dk = tl.dot(tl.trans(dz), iq, input_precision=DOT_PREC)  # [BK, DI]
        tl.atomic_add(dik_ptr + rows[:, None] * stride_dikr + offs_d[None, :], dk,
                      mask=inb[:, None] & mask_d[None, :], sem="relaxed")
    tl.store(diq_ptr + tn[:, None] * stride_diqt + jn[:, None] * stride_diqh + offs_d[None, :],
             acc_iq.to(diq_ptr.dtype.element_ty), mask=nrow[:, None] & mask_d[None, :])
    tl.store(dw_ptr + tn * stride_dwt + jn, acc_w, mask=nrow)


def _tile_meta(q, iq, block_k):
    d_head, d_tail = _split(q.shape[2])
    block_h = triton.next_power_of_2(q.shape[1])
    block_hi = triton.next_power_of_2(iq.shape[1])
    qb = max(1, 64 // block_h)
    if qb * block_hi < 16:
        raise ValueError("the index tile needs at least 16 rows")
    return dict(QB=qb, D_HEAD=d_head, D_TAIL=d_tail, BLOCK_DT=max(16, triton.next_power_of_2(max(d_tail, 1))),
                BLOCK_H=block_h, DI=iq.shape[2], BLOCK_DI=max(16, triton.next_power_of_2(iq.shape[2])),
                BLOCK_HI=block_hi, BLOCK_K=block_k, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")


def kl_bwd_tiled(dkl, q, kv, lse, iq, ik, w, ks, ke, stats, sm_scale, block_k=32, num_warps=4, num_stages=2):
    """(diq, dik, dw) of the warm-up loss, as the product's indexer_kl_bwd with ``indices`` None."""
    T, H, _ = q.shape
    meta = _tile_meta(q, iq, block_k)
    diq = torch.empty_like(iq)
    dik = torch.zeros(ik.shape, dtype=torch.float32, device=ik.device)
    dw = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    kl_bwd_tiled_kernel[(triton.cdiv(T, meta["QB"]),)](
        q, kv, lse, iq, ik, w, ks, ke, dkl.float().contiguous(), stats, diq, dik, dw, T, kv.shape[0], H,
        iq.shape[1], sm_scale * LOG2E, 1.0 / H, q.stride(0), q.stride(1), kv.stride(0), lse.stride(0), iq.stride(0),
        iq.stride(1), ik.stride(0), w.stride(0), diq.stride(0), diq.stride(1), dik.stride(0), dw.stride(0), **meta,
        num_warps=num_warps, num_stages=num_stages)
    return diq, dik.to(ik.dtype), dw.to(w.dtype)


def kl_fwd_tiled(q, kv, lse, iq, ik, w, ks, ke, sm_scale, block_k=32, num_warps=4, num_stages=2):
    """Per-row KL [T] and stats [T, 2] of the warm-up loss, as the product's indexer_kl_fwd
    with ``indices`` None (q [T, H, d_qk], kv [S, d_qk], lse [T, H] natural log, iq
    [T, H_I, d_I], ik [S, d_I], w [T, H_I], ks/ke [T])."""
    T, H, _ = q.shape
    meta = _tile_meta(q, iq, block_k)
    kl = torch.empty(T, dtype=torch.float32, device=q.device)
    stats = torch.empty(T, 2, dtype=torch.float32, device=q.device)
    kl_fwd_tiled_kernel[(triton.cdiv(T, meta["QB"]),)](
        q, kv, lse, iq, ik, w, ks, ke, kl, stats, T, kv.shape[0], H, iq.shape[1], sm_scale * LOG2E,
        1.0 / H, q.stride(0), q.stride(1), kv.stride(0), lse.stride(0), iq.stride(0), iq.stride(1), ik.stride(0),
        w.stride(0), **meta, num_warps=num_warps, num_stages=num_stages)
    return kl, stats


def make_problem(n_seq, seq_len, h, d, h_i, d_i, device, dtype=torch.bfloat16, seed=0):
    """Packed sequences with causal ranges, and the attention's lse (of the same q, kv)."""
    g = torch.Generator(device=device).manual_seed(seed)
    T = n_seq * seq_len
    q = torch.randn(T, h, d, device=device, dtype=dtype, generator=g)
    kv = torch.randn(T, d, device=device, dtype=dtype, generator=g)
    iq = torch.randn(T, h_i, d_i, device=device, dtype=dtype, generator=g)
    ik = torch.randn(T, d_i, device=device, dtype=dtype, generator=g)
    w = torch.randn(T, h_i, device=device, dtype=torch.float32, generator=g)
    t = torch.arange(T, device=device)
    ks = (t // seq_len * seq_len).int()
    ke = (t + 1).int()
    scale = d ** -0.5
    lse = torch.empty(T, h, device=device, dtype=torch.float32)
    for s0 in range(0, T, seq_len):   # per sequence, in chunks of queries
        for c0 in range(s0, s0 + seq_len, 1024):
            c1 = min(c0 + 1024, s0 + seq_len)
            a = torch.einsum("thd,sd->ths", q[c0:c1].float(), kv[s0:c1].float()) * scale
            mask = torch.arange(s0, c1, device=device)[None, None, :] > t[c0:c1, None, None]
            lse[c0:c1] = a.masked_fill(mask, float("-inf")).logsumexp(-1)
    return q, kv, lse, iq, ik, w, ks, ke, scale


def _rel(x, ref):
    """max |x - ref| / max |ref|."""
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def check(shapes, device):
    rows = []
    for n_seq, seq_len, h, d, h_i, d_i in shapes:
        # fp32 under the interpreter, whose bf16 products come out NaN for both kernels
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q, kv, lse, iq, ik, w, ks, ke, scale = make_problem(n_seq, seq_len, h, d, h_i, d_i, device, dtype)
        want_kl, want_stats, p, _ = indexer_kl_fwd(q, kv, lse, iq, ik, w, None, ks, ke, scale)
        kl, stats = kl_fwd_tiled(q, kv, lse, iq, ik, w, ks, ke, scale)
        dkl = torch.randn(q.shape[0], device=device, generator=torch.Generator(device=device).manual_seed(5))
        want = indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, None, ks, ke, want_stats, p, scale)
        got = kl_bwd_tiled(dkl, q, kv, lse, iq, ik, w, ks, ke, want_stats, scale)
        row = dict(n_seq=n_seq, seq_len=seq_len, h=h, d=d, h_i=h_i, d_i=d_i, kl_err=_rel(kl, want_kl),
                   stats_err=_rel(stats, want_stats), **{f"{n}_err": _rel(a, b) for n, a, b in
                                                         zip(("diq", "dik", "dw"), got, want)})
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--small", action="store_true", help="shapes small enough for the interpreter")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.small:
        shapes = [(2, 40, 8, 288, 8, 64), (1, 37, 4, 160, 2, 32)]
    else:
        shapes = [(2, 1000, 8, 288, 8, 64), (1, 777, 64, 576, 64, 128)]
    results = {"check": check(shapes, device)}
    ok = all(v < 2e-2 for r in results["check"] for k, v in r.items() if k.endswith("_err"))
    results["check_passed"] = ok
    print("check passed" if ok else "CHECK FAILED", flush=True)
    if not args.check_only and device == "cuda":
        results["ceilings"] = measure_ceilings()
        rows = []
        # the quality study's layer (4 x 8K, 8 heads of 288, 8 indexer heads of 64), and
        # V3.2's widths at 64 heads (one sequence of 8K)
        for n_seq, seq_len, h, d, h_i, d_i in [(4, 8192, 8, 288, 8, 64), (1, 8192, 64, 576, 64, 128)]:
            q, kv, lse, iq, ik, w, ks, ke, scale = make_problem(n_seq, seq_len, h, d, h_i, d_i, device)
            row = dict(n_seq=n_seq, seq_len=seq_len, h=h, d=d, h_i=h_i, d_i=d_i)
            _, stats, p, _ = indexer_kl_fwd(q, kv, lse, iq, ik, w, None, ks, ke, scale)
            dkl = torch.ones(q.shape[0], device=device)
            row["product_fwd_ms"] = bench_ms(lambda: indexer_kl_fwd(q, kv, lse, iq, ik, w, None, ks, ke, scale))
            row["product_bwd_ms"] = bench_ms(
                lambda: indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, None, ks, ke, stats, p, scale))
            for bk, warps, stages in [(32, 4, 2), (64, 4, 2), (64, 8, 2), (32, 8, 3)]:
                name = f"tiled_{bk}_{warps}_{stages}"
                try:
                    row[name + "_fwd_ms"] = bench_ms(
                        lambda: kl_fwd_tiled(q, kv, lse, iq, ik, w, ks, ke, scale, bk, warps, stages))
                    row[name + "_bwd_ms"] = bench_ms(
                        lambda: kl_bwd_tiled(dkl, q, kv, lse, iq, ik, w, ks, ke, stats, scale, bk, warps, stages))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: recorded, next one
                    row[name + "_error"] = str(e)[:160]
            rows.append(row)
            print(row, flush=True)
        results["speed"] = rows
        print_table(rows, list(rows[0].keys()))
    print("written", write_result("probe_kl_tiled", results))


if __name__ == "__main__":
    main()
