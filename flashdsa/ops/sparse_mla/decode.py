"""Paged sparse MLA decode (SPEC 4) on the sparse MLA forward kernels.

The paged cache is a flat list of rows addressed by physical slot, so decode is the
prefill forward (fwd.run_over_rows) over ``b * s_q`` query tokens with the cache as its
rows. For the fp8_ds_mla format (flashdsa.layout) the fp8 kernel (fwd_fp8.py) reads the
e4m3 bytes, the 4 fp32 scales and the bf16 rope values through three typed views of the
cache and dequantizes each gathered tile in registers. When ``b * s_q`` head-block
programs cannot fill the GPU, the top-k range is split over programs (split-k) and a
combine kernel merges the partial softmaxes. On Hopper, enough queries to need no split
take the Gluon forward (fwd_sm90.py), which reads the cache the same way: bf16 rows by
cp.async, fp8_ds_mla rows through its dequantizing producer.

Module split of the op: fwd.py (forward kernel and launcher), fwd_fp8.py (fp8_ds_mla
kernel), decode.py (this), bwd.py (backward), op.py (custom ops and autograd).
"""
from __future__ import annotations

import torch
import triton

from ...layout import MLA_D_NOPE, MLA_D_ROPE, MLA_FP8_BYTES, MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views
from ..common import capability, interpreted, last_dim_contiguous, num_sms
from .fwd import KvRows, resolve_config, run_over_rows
from .fwd_sm90 import gluon_fp8_supported, gluon_fwd_supported, run_sparse_mla_decode_sm90_fp8, run_sparse_mla_fwd_sm90

# One query token over bf16 rows on Hopper: 16 heads a program (8 head blocks x 16 splits
# of 128 heads) instead of one wgmma tile of 64 (2 x 32): the same number of programs
# with half the splits, so half the fp32 partials the combine reads. Each head block
# reads every selected row, so 8 blocks read them 8 times: from L2 while they fit
# (ONE_QUERY_MAX_TOPK rows of 576 bf16 are 19 MB), from memory beyond (a dense decode of
# 64K or 128K positions through this kernel is slower with 16 heads). Measured in
# docs/benchmarks_sparse_mla.md; with more queries, or fp8 rows, 64 heads stay faster.
ONE_QUERY_SM90 = dict(BLOCK_H=16, num_warps=4)
ONE_QUERY_MAX_TOPK = 16384


def one_query_config(device: torch.device, t_q: int, topk: int, fp8: bool, config: dict | None) -> dict | None:
    """``config`` with the one-query blocks put under it where they apply (see ONE_QUERY_SM90)."""
    if (t_q != 1 or topk > ONE_QUERY_MAX_TOPK or fp8 or device.type != "cuda" or interpreted()
            or capability(device)[0] != 9):
        return config
    return {**ONE_QUERY_SM90, **(config or {})}


def choose_n_split(n_programs: int, topk: int, block_k: int, n_sm: int) -> int:
    """Splits of the top-k range so that about 2 programs per SM run, each keeping at
    least 2 BLOCK_K steps (below that the combine costs more than it saves), or one
    BLOCK_K step when that still leaves more than half the SMs idle (one query token of
    128 heads in blocks of 64 on 132 SMs: 2 head blocks x 32 splits; in blocks of 16:
    8 x 16)."""
    if n_programs >= n_sm:
        return 1
    n_split = max(1, min(triton.cdiv(2 * n_sm, n_programs), triton.cdiv(topk, 2 * block_k)))
    if 2 * n_programs * n_split < n_sm:
        n_split = max(1, min(triton.cdiv(n_sm, n_programs), triton.cdiv(topk, block_k)))
    return n_split


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      d_v: int = 512, kv_format: str = "bf16", n_split: int | None = None,
                      config: dict | None = None):
    """Sparse attention of decode queries over a paged latent cache (validated inputs;
    use ``flashdsa.sparse_mla_decode``).

    q [b, s_q, h_q, d_qk]; kv_cache [num_blocks, 64, (1,) 576] bf16 ("bf16") or
    [num_blocks, 64, (1,) 656] uint8 ("fp8_ds_mla", then d_qk 576 and d_v 512);
    indices [b, s_q, topk] int32 physical slots, -1 or >= num_blocks * 64 unused.
    ``n_split`` None picks split-k from the grid size. Returns
    ``(out [b, s_q, h_q, d_v] q.dtype, lse [b, s_q, h_q] fp32 natural log)``."""
    b, s_q, h_q, d_qk = q.shape
    topk = indices.shape[-1]
    qf = last_dim_contiguous(q.reshape(b * s_q, h_q, d_qk))
    idx = last_dim_contiguous(indices.reshape(b * s_q, topk))
    fp8 = kv_format == "fp8_ds_mla"
    if fp8:
        assert d_qk == MLA_D_NOPE + MLA_D_ROPE and d_v == MLA_D_NOPE
        c8, sc, pe = mla_byte_views(kv_cache.reshape(-1, MLA_FP8_BYTES))
        rows = KvRows(c8, pe[:, MLA_ROPE_OFF:], sc[:, MLA_SCALE_OFF:], c8.shape[0])
    else:
        flat = kv_cache.reshape(-1, kv_cache.shape[-1])
        rows = KvRows(flat, flat[:, d_v:] if d_qk > d_v else None, None, flat.shape[0])
    cfg = resolve_config(q.device, h_q, d_v, fp8, one_query_config(q.device, b * s_q, topk, fp8, config))
    if n_split is None:
        n_prog = triton.cdiv(h_q, cfg["BLOCK_H"]) * b * s_q
        n_split = choose_n_split(n_prog, topk, cfg["BLOCK_K"], num_sms(q.device))
    # enough queries to fill the GPU without split-k (a prefill chunk, a large decode batch)
    # on Hopper: the Gluon forward (fwd_sm90.py)
    gluon = n_split == 1 and config is None
    if gluon and fp8 and gluon_fp8_supported(qf, rows.values, rows.tail, d_v) is None:
        out, _, lse = run_sparse_mla_decode_sm90_fp8(qf, rows.values, rows.scales, rows.tail, idx, sm_scale)
    elif gluon and not fp8 and gluon_fwd_supported(qf, rows.values, d_v) is None:
        out, _, lse = run_sparse_mla_fwd_sm90(qf, rows.values, idx, sm_scale)
    else:
        out, _, lse = run_over_rows(qf, idx, rows, sm_scale, d_v, n_split, cfg)
    return out.reshape(b, s_q, h_q, d_v), lse.reshape(b, s_q, h_q)
