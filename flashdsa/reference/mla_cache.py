"""The paged MLA latent cache formats (SPEC 4), in plain PyTorch (kernels: flashdsa.ops.mla_cache).

Pages hold ``PAGE_SIZE`` = 64 tokens; decode addresses rows by physical slot
(``block_table[b, pos // 64] * 64 + pos % 64``), -1 = unused (the paged decode itself:
flashdsa.reference.sparse_mla.sparse_mla_decode).

Formats of one cached token (the 576-wide row ``[c (512) | k_pe (64)]``):
- "bf16": 576 bf16 values; cache [num_blocks, 64, 1, 576] bf16.
- "fp8_ds_mla": 656 bytes (byte layout in flashdsa.layout); cache [num_blocks, 64, 1, 656]
  uint8: c as e4m3 in 4 tiles of 128 dims, the 4 tiles' fp32 scales, each a power of two
  (scale = 2^ceil(log2(max(amax, 1e-4) / 448))), then k_pe as 64 bf16 values.
"""
from __future__ import annotations

import torch

from ..layout import MLA_D_NOPE, MLA_FP8_BYTES, MLA_N_TILES, MLA_TILE
from .norm import rms_norm
from .quant import AMAX_FLOOR, FP8_MAX
from .rope import apply_rope

_SCALE_BYTES = slice(MLA_D_NOPE, MLA_D_NOPE + 4 * MLA_N_TILES)  # bytes of the fp32 scales


def mla_cache_scales(c: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales of ``c [..., 512]`` per tile of 128: [..., 4].

    The rounding up to a power of two is done in float64, where log2 of an fp32 value
    just above a power of two is not rounded down onto it (in fp32 it can be)."""
    amax = c.float().unflatten(-1, (MLA_N_TILES, MLA_TILE)).abs().amax(-1).clamp_min(AMAX_FLOOR)
    return torch.exp2(torch.ceil(torch.log2(amax.double() / FP8_MAX))).float()


def quantize_mla_cache(kv: torch.Tensor) -> torch.Tensor:
    """bf16/float rows ``kv [..., 576]`` -> fp8_ds_mla bytes ``[..., 656]`` uint8."""
    lead = kv.shape[:-1]
    c, pe = kv[..., :MLA_D_NOPE].float(), kv[..., MLA_D_NOPE:]
    scale = mla_cache_scales(c)  # [..., 4]
    c8 = (c.unflatten(-1, (MLA_N_TILES, MLA_TILE)) / scale[..., None]).clamp(-FP8_MAX, FP8_MAX)
    c8 = c8.flatten(-2).to(torch.float8_e4m3fn)
    out = torch.empty(*lead, MLA_FP8_BYTES, dtype=torch.uint8, device=kv.device)
    out[..., :MLA_D_NOPE] = c8.view(torch.uint8)
    out[..., _SCALE_BYTES] = scale.contiguous().view(torch.uint8)
    out[..., _SCALE_BYTES.stop:] = pe.to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize_mla_cache(cache: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp8_ds_mla bytes ``[..., 656]`` -> rows ``[..., 576]`` in ``dtype`` (exact in bf16:
    an e4m3 value times a power of two needs 4 significant bits)."""
    c8 = cache[..., :MLA_D_NOPE].contiguous().view(torch.float8_e4m3fn)
    scale = cache[..., _SCALE_BYTES].contiguous().view(torch.float32)  # [..., 4]
    pe = cache[..., _SCALE_BYTES.stop:].contiguous().view(torch.bfloat16)
    c = (c8.float().unflatten(-1, (MLA_N_TILES, MLA_TILE)) * scale[..., None]).flatten(-2)
    return torch.cat([c.to(dtype), pe.to(dtype)], dim=-1)


def latent_rows(kv_pe: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    """The latent cache rows [T, c + r] of MLA's kv_a projection output ``kv_pe [T, c + r]``
    (c = weight's size): the latent RMS-normalized times ``weight``, then k_pe rotated by
    ``cos``/``sin`` [T, r // 2] (pairs 2i, 2i + 1), each rounded to kv_pe's dtype, as
    :meth:`flashdsa.layers.MLA.project` computes them."""
    c = weight.shape[0]
    k_pe = apply_rope(kv_pe[:, None, c:], cos, sin, interleaved=True)[:, 0]
    return torch.cat([rms_norm(kv_pe[:, :c], weight, eps), k_pe], dim=-1)


def write_latent_rows(cache: torch.Tensor, kv_format: str, kv_pe: torch.Tensor, weight: torch.Tensor, eps: float,
                      cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> None:
    """Store :func:`latent_rows` at physical ``slots [T]`` (< 0: skipped) of one layer's
    paged latent cache ``cache [num_blocks, 64, 1, W]`` ("bf16": any float dtype, W = c +
    r; "fp8_ds_mla": uint8, W = 656), in place."""
    flat = cache.view(-1, cache.shape[-1])
    ok = slots >= 0
    rows = latent_rows(kv_pe[ok], weight, eps, cos[ok], sin[ok])
    flat[slots[ok].long()] = quantize_mla_cache(rows) if kv_format == "fp8_ds_mla" else rows.to(flat.dtype)


def cache_rows(kv_cache: torch.Tensor, kv_format: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """All physical rows of a paged cache, [num_blocks * 64, 1, 576], dequantized if fp8."""
    if kv_format == "fp8_ds_mla":
        rows = dequantize_mla_cache(kv_cache.reshape(-1, MLA_FP8_BYTES), dtype or torch.bfloat16)
    elif kv_format == "bf16":
        rows = kv_cache.reshape(-1, kv_cache.shape[-1])
        rows = rows.to(dtype) if dtype is not None else rows
    else:
        raise ValueError(f"kv_format: expected 'bf16' or 'fp8_ds_mla', got {kv_format!r}")
    return rows[:, None, :]
