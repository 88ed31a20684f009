"""The paged MLA latent cache formats (SPEC 4) and paged sparse decode, in plain PyTorch.

Pages hold 64 tokens; decode kernels address rows by physical slot
(``block_table[b, pos // 64] * 64 + pos % 64``), -1 = unused.

Formats of one cached token (the 576-wide row ``[c (512) | k_pe (64)]``):
- "bf16": 576 bf16 values; cache [num_blocks, 64, 1, 576] bf16.
- "fp8_ds_mla": 656 bytes; cache [num_blocks, 64, 1, 656] uint8:
    bytes   0..511  c as e4m3, 4 tiles of 128 dims
    bytes 512..527  the 4 tiles' fp32 scales, each a power of two
                    (scale = 2^ceil(log2(max(amax, 1e-4) / 448)))
    bytes 528..655  k_pe, 64 bf16 values, not quantized
"""
from __future__ import annotations

import torch

from .sparse_mla import sparse_mla_fwd

BLOCK_SIZE = 64  # tokens per page
D_NOPE, D_ROPE, TILE = 512, 64, 128
FP8_BYTES = D_NOPE + 4 * (D_NOPE // TILE) + 2 * D_ROPE  # 656
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def mla_cache_scales(c: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales of ``c [..., 512]`` per tile of 128: [..., 4].

    The rounding up to a power of two is done in float64, where log2 of an fp32 value
    just above a power of two is not rounded down onto it (in fp32 it can be)."""
    amax = c.float().unflatten(-1, (D_NOPE // TILE, TILE)).abs().amax(-1).clamp_min(AMAX_FLOOR)
    return torch.exp2(torch.ceil(torch.log2(amax.double() / FP8_MAX))).float()


def quantize_mla_cache(kv: torch.Tensor) -> torch.Tensor:
    """bf16/float rows ``kv [..., 576]`` -> fp8_ds_mla bytes ``[..., 656]`` uint8."""
    lead = kv.shape[:-1]
    c, pe = kv[..., :D_NOPE].float(), kv[..., D_NOPE:]
    scale = mla_cache_scales(c)  # [..., 4]
    c8 = (c.unflatten(-1, (4, TILE)) / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
    c8 = c8.flatten(-2).to(torch.float8_e4m3fn)
    out = torch.empty(*lead, FP8_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :D_NOPE] = c8.view(torch.uint8)
    out[..., D_NOPE:D_NOPE + 16] = scale.contiguous().view(torch.uint8)
    out[..., D_NOPE + 16:] = pe.to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize_mla_cache(cache: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp8_ds_mla bytes ``[..., 656]`` -> rows ``[..., 576]`` in ``dtype`` (exact in bf16:
    an e4m3 value times a power of two needs 4 significant bits)."""
    c8 = cache[..., :D_NOPE].contiguous().view(torch.float8_e4m3fn)
    scale = cache[..., D_NOPE:D_NOPE + 16].contiguous().view(torch.float32)  # [..., 4]
    pe = cache[..., D_NOPE + 16:].contiguous().view(torch.bfloat16)
    c = (c8.float().unflatten(-1, (4, TILE)) * scale[..., None]).flatten(-2)
    return torch.cat([c.to(dtype), pe.to(dtype)], dim=-1)


def cache_rows(kv_cache: torch.Tensor, kv_format: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """All physical rows of a paged cache, [num_blocks * 64, 1, 576], dequantized if fp8."""
    if kv_format == "fp8_ds_mla":
        rows = dequantize_mla_cache(kv_cache.reshape(-1, FP8_BYTES), dtype or torch.bfloat16)
    elif kv_format == "bf16":
        rows = kv_cache.reshape(-1, kv_cache.shape[-1])
        rows = rows.to(dtype) if dtype is not None else rows
    else:
        raise ValueError(f"kv_format: expected 'bf16' or 'fp8_ds_mla', got {kv_format!r}")
    return rows[:, None, :]


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      d_v: int = 512, kv_format: str = "bf16", compute_dtype: torch.dtype | None = None):
    """Paged sparse MLA decode: gather rows by physical slot, then :func:`sparse_mla_fwd`.

    q [b, s_q, h_q, d_qk]; kv_cache as the format says; indices [b, s_q, topk] physical
    slots (-1 or >= num_blocks * 64 = unused). ``compute_dtype`` (e.g. float64) upcasts q
    and the (dequantized) rows before the attention, for error references.
    Returns ``(out [b, s_q, h_q, d_v] in q.dtype, lse [b, s_q, h_q] fp32)``."""
    b, s_q, h_q, d_qk = q.shape
    rows = cache_rows(kv_cache, kv_format, compute_dtype)
    qq = q.reshape(b * s_q, h_q, d_qk)
    if compute_dtype is not None:
        qq = qq.to(compute_dtype)
    elif rows.dtype != qq.dtype:
        rows = rows.to(qq.dtype)
    out, _, lse = sparse_mla_fwd(qq, rows, indices.reshape(b * s_q, 1, -1), sm_scale, d_v)
    return out.to(q.dtype).reshape(b, s_q, h_q, d_v), lse.float().reshape(b, s_q, h_q)
