"""Launchers of the indexer KL loss kernels: block sizes, tile constexprs and the host
functions :func:`indexer_kl_fwd` / :func:`indexer_kl_bwd` (inputs assumed validated).
"""
from __future__ import annotations

import torch
import triton

from ..common import LOG2E, capability, interpreted, last_dim_contiguous, reduce_slots_fixed_order
from .kernels import (indexer_kl_bwd_kernel, indexer_kl_fwd_kernel, indexer_kl_warmup_bwd_kernel,
                      indexer_kl_warmup_fwd_kernel)

# Block sizes and launch settings, one entry per kind of problem.
# BLOCK_K: key rows per step. When the loss recomputes the target, the attention tile is
# [next_pow2(H), BLOCK_K] with q of all heads resident in shared memory (72 KB bf16 at H 64,
# 144 KB at H 128), plus per pipeline stage a kv tile [BLOCK_K, 576] (36 KB at 32 rows) and an
# indexer key tile [BLOCK_K, 128].
#   "sm90": H <= 64, target recomputed: 32 rows, 4 warps, 2 stages.
#   "sm90_h128": H up to 128: 1 stage of 32 rows with 8 warps (2 stages need 249 KB of shared
#       memory, more than the 227 KB an sm_90 block may use).
#   "sm90_probs": the target p given (no attention tile; only the indexer's [64, 128] q is
#       resident), so a block of 64 rows fits with 2 stages.
#   "sm80": GPUs before Hopper (the A100's 163 KB of shared memory), H <= 64, target
#       recomputed: 16 rows, 8 warps, 1 stage (built to fit, not tuned: docs/testing.md). At
#       H 128 the resident q alone (144 KB) leaves too little; those GPUs take "sm90_h128"
#       and the launch fails for lack of shared memory.
#   "small": the interpreter, CPU tensors, and widths below the real ones (d_qk <= 128 or
#       d_I < 64), e.g. the tests' tiny shapes.
# The query-tiled warm-up kernels (few heads, see query_block) hold an attention tile of at
# most 64 rows, as the row kernel at H 64, so they take the H <= 64 entries.
# How the sm90 entries were chosen (benchmarks/bench_indexer_loss.py --sweep): docs/training.md.
CONFIGS = {
    "sm90": dict(BLOCK_K=32, num_warps=4, num_stages=2),
    "sm90_h128": dict(BLOCK_K=32, num_warps=8, num_stages=1),
    "sm90_probs": dict(BLOCK_K=64, num_warps=4, num_stages=2),
    "sm80": dict(BLOCK_K=16, num_warps=8, num_stages=1),
    "small": dict(BLOCK_K=16, num_warps=4, num_stages=1),
}


def _config(q: torch.Tensor | None, iq: torch.Tensor, tiled: bool = False) -> dict:
    """Block sizes; ``q`` None: the target p is given (no attention tile); ``tiled``: the
    query-tiled warm-up kernels."""
    if not iq.is_cuda or interpreted() or (q is not None and q.shape[2] <= 128) or iq.shape[2] < 64:
        return dict(CONFIGS["small"])
    h_q = None if q is None else (64 if tiled else q.shape[1])
    return config_for(h_q, capability(iq.device))


def query_block(h_q: int, h_i: int) -> int:
    """Query rows a program of the warm-up kernels takes: QB > 1 (the query-tiled kernels)
    when QB queries' attention rows (QB x next_pow2(h_q)) and index rows (QB x
    next_pow2(h_i)) fit tiles of 16 to 64 rows, so each key row read serves QB queries
    (e.g. 8 at 8 heads and 8 indexer heads); else 1, the one-row-a-program kernels
    (V3.2's 64 indexer heads)."""
    bh, bhi = triton.next_power_of_2(h_q), triton.next_power_of_2(h_i)
    qb = min(64 // bh, 64 // bhi)
    return qb if qb >= 2 and qb * bh >= 16 and qb * bhi >= 16 else 1


def _tiled_meta(q, iq, qb):
    """Tile constexprs of the query-tiled warm-up kernels: the attention and index tiles'
    head blocks unpadded (QB of them fill the tile)."""
    meta = _meta(q, iq)
    meta.update(QB=qb, BLOCK_H=triton.next_power_of_2(q.shape[1]), BLOCK_HI=triton.next_power_of_2(iq.shape[1]))
    return meta


def config_for(h_q: int | None, capability: tuple[int, int]) -> dict:
    """The table's entry for a GPU of compute ``capability`` at the real widths: ``h_q``
    query heads of the attention whose target the loss recomputes (None: the target is
    given)."""
    if h_q is None:
        return dict(CONFIGS["sm90_probs"])
    if h_q <= 64:
        return dict(CONFIGS["sm90" if capability >= (9, 0) else "sm80"])
    return dict(CONFIGS["sm90_h128"])


def _split(d: int) -> tuple[int, int]:
    """d = head + tail with head the largest power of two <= d."""
    head = 1 << (d.bit_length() - 1)
    return head, d - head


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
    iq, ik, w = last_dim_contiguous(iq), last_dim_contiguous(ik), last_dim_contiguous(w)
    q = last_dim_contiguous(q) if q is not None else None
    kv2 = last_dim_contiguous(kv.reshape(kv.shape[0], kv.shape[-1])) if kv is not None else None
    lse = lse.float().contiguous() if lse is not None else None
    dense = indices is None
    if dense:
        idx = None
        ks, ke = ks.contiguous(), ke.contiguous()
        topk = 0
    else:
        idx = last_dim_contiguous(indices.reshape(indices.shape[0], -1))
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
    qb = query_block(q.shape[1], iq.shape[1]) if dense else 1
    cfg = _config(q, iq, tiled=qb > 1) | dict(config or {})
    compute_lse = not given and lse is None
    lse_out = torch.empty((T, q.shape[1]) if compute_lse else (0, 0), dtype=torch.float32, device=dev)
    if compute_lse:
        lse = lse_out
    kl = torch.empty(T, dtype=torch.float32, device=dev)
    stats = torch.empty(T, 2, dtype=torch.float32, device=dev)
    if qb > 1:
        indexer_kl_warmup_fwd_kernel[(triton.cdiv(T, qb),)](
            q, kv2, lse, iq, ik, w, ks, ke, kl, stats, lse_out if compute_lse else kl,
            T, ik.shape[0], q.shape[1], iq.shape[1], sm_scale * LOG2E, 1.0 / q.shape[1],
            *_row_args(q, kv2, lse, iq, ik, w, None)[:-1], **_tiled_meta(q, iq, qb), BLOCK_K=cfg["BLOCK_K"],
            COMPUTE_LSE=compute_lse, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return kl, stats, kl.new_empty(T, 0), lse_out
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
    stored to an fp32 buffer [chunk, slots, d_I] and summed per key in a fixed order
    (:func:`flashdsa.ops.common.reduce_slots_fixed_order`), for queries in chunks whose
    buffer fits ``scratch_bytes``: bitwise reproducible."""
    if indices is not None:
        q = kv = lse = None  # the sparse target is in p
    q, kv2, lse, iq, ik, w, idx, ks, ke, dense, topk = _prep(q, kv, lse, iq, ik, w, indices, ks, ke)
    T = iq.shape[0]
    qb = query_block(q.shape[1], iq.shape[1]) if dense and not deterministic else 1
    cfg = _config(q, iq, tiled=qb > 1) | dict(config or {})
    dkl = dkl.float().contiguous()
    if topk:
        p = p.float().contiguous()
    diq = torch.empty_like(iq)
    dik = torch.zeros(ik.shape, dtype=torch.float32, device=ik.device)
    dw = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    if qb > 1:
        indexer_kl_warmup_bwd_kernel[(triton.cdiv(T, qb),)](
            q, kv2, lse, iq, ik, w, ks, ke, dkl, stats, diq, dik, dw,
            T, ik.shape[0], q.shape[1], iq.shape[1], sm_scale * LOG2E, 1.0 / q.shape[1],
            *_row_args(q, kv2, lse, iq, ik, w, None)[:-1], dkl.stride(0), diq.stride(0), diq.stride(1),
            dik.stride(0), dw.stride(0), **_tiled_meta(q, iq, qb), BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return diq, dik.to(ik.dtype), dw.to(w.dtype)
    meta = dict(**_meta(q, iq), BLOCK_K=cfg["BLOCK_K"], DENSE=dense,
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
            reduce_slots_fixed_order(buf[None, :c1 - c0], slots, dik)
    return diq, dik.to(ik.dtype), dw.to(w.dtype)
