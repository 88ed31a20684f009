"""Paged sparse MLA decode (SPEC 4) on the Triton sparse MLA kernel.

The paged cache is a flat list of rows addressed by physical slot, so decode is the
prefill kernel run over ``b * s_q`` query tokens with the cache as its kv rows. For the
fp8_ds_mla format the kernel reads the e4m3 bytes, the 4 fp32 scales and the bf16 rope
values through three typed views of the cache and dequantizes each gathered tile in
registers. When ``b * s_q`` head-block programs cannot fill the GPU, the top-k range is
split over programs (split-k) and a combine kernel merges the partial softmaxes.
"""
from __future__ import annotations

import torch
import triton

from .mla_cache import D_NOPE, FP8_BYTES, ROPE_OFF, SCALE_OFF, byte_views
from .sparse_mla import _launch, default_config


def choose_n_split(n_programs: int, topk: int, block_k: int, n_sm: int) -> int:
    """Splits of the top-k range so that about 2 programs per SM run, each keeping at
    least 2 BLOCK_K steps (below that the combine costs more than it saves)."""
    if n_programs >= n_sm:
        return 1
    return max(1, min(triton.cdiv(2 * n_sm, n_programs), triton.cdiv(topk, 2 * block_k)))


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      d_v: int = 512, kv_format: str = "bf16", n_split: int | None = None,
                      config: dict | None = None):
    """Sparse attention of decode queries over a paged latent cache (validated inputs;
    use ``flashdsa.api.sparse_mla_decode``).

    q [b, s_q, h_q, d_qk]; kv_cache [num_blocks, 64, (1,) 576] bf16 ("bf16") or
    [num_blocks, 64, (1,) 656] uint8 ("fp8_ds_mla", then d_qk 576 and d_v 512);
    indices [b, s_q, topk] int32 physical slots, -1 or >= num_blocks * 64 unused.
    ``n_split`` None picks split-k from the grid size. Returns
    ``(out [b, s_q, h_q, d_v] q.dtype, lse [b, s_q, h_q] fp32 natural log)``."""
    b, s_q, h_q, d_qk = q.shape
    topk = indices.shape[-1]
    qf = q.reshape(b * s_q, h_q, d_qk)
    if qf.stride(-1) != 1:
        qf = qf.contiguous()
    idx = indices.reshape(b * s_q, topk)
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    d_tail = d_qk - d_v
    if kv_format == "fp8_ds_mla":
        rows = kv_cache.reshape(-1, FP8_BYTES)
        c8, sc, pe = byte_views(rows)
        kv_v, scale, tail, fp8 = c8, sc[:, SCALE_OFF:], pe[:, ROPE_OFF:], True
        assert d_qk == D_NOPE + 64 and d_v == D_NOPE
    else:
        rows = kv_cache.reshape(-1, kv_cache.shape[-1])
        kv_v, scale, tail, fp8 = rows, None, (rows[:, d_v:] if d_tail > 0 else None), False
    cfg = dict(default_config(q.device, h_q, d_v, fp8))
    if config:
        cfg.update(config)
    if n_split is None:
        n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        n_prog = triton.cdiv(h_q, cfg["BLOCK_H"]) * b * s_q
        n_split = choose_n_split(n_prog, topk, cfg["BLOCK_K"], n_sm)
    out, _, lse = _launch(qf, kv_v, tail, scale, idx, rows.shape[0], sm_scale, d_v, d_tail, fp8,
                          n_split, cfg)
    return out.reshape(b, s_q, h_q, d_v), lse.reshape(b, s_q, h_q)
