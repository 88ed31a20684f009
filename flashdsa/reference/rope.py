"""Rotary position embedding with YaRN frequency scaling (DeepSeek-V3 / V3.2 convention).

MLA rotates its 64 rope dims *interleaved* (pairs (2i, 2i+1)); the lightning indexer
rotates the first 64 of its 128 dims *half-split* (pairs (i, i + 32), NeoX style).
Both use the same frequencies.
"""
from __future__ import annotations

import math

import torch


def _correction_dim(num_rotations: float, dim: int, base: float, original_seq_len: int) -> float:
    # The dim index whose wavelength fits ``num_rotations`` times into the original context.
    return dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, rope_theta: float = 10000.0, rope_factor: float = 1.0,
                  original_seq_len: int = 4096, max_seq_len: int = 4096,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse frequencies [dim // 2]. When ``max_seq_len > original_seq_len`` YaRN
    interpolates: low-frequency dims (many positions per turn) are divided by
    ``rope_factor``, high-frequency dims (more than ``beta_fast`` turns over the original
    context) are kept, with a linear ramp between."""
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if max_seq_len > original_seq_len:
        low = max(math.floor(_correction_dim(beta_fast, dim, rope_theta, original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(beta_slow, dim, rope_theta, original_seq_len)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: keep the frequency, 0: interpolate fully
        inv_freq = inv_freq / rope_factor * (1 - keep) + inv_freq * keep
    return inv_freq.to(dtype)


def yarn_mscale(rope_factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if rope_factor <= 1 else 0.1 * mscale * math.log(rope_factor) + 1.0


def yarn_softmax_scale(qk_head_dim: int, rope_factor: float = 1.0, mscale: float = 1.0,
                       original_seq_len: int = 4096, max_seq_len: int = 4096) -> float:
    """qk_head_dim^-0.5, times mscale^2 when the model runs beyond its original context
    (about 0.13523 for DeepSeek-V3.2: 192^-0.5 * (0.1 ln 40 + 1)^2)."""
    scale = qk_head_dim ** -0.5
    if max_seq_len > original_seq_len:
        scale *= yarn_mscale(rope_factor, mscale) ** 2
    return scale


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos and sin of positions x frequencies: each [T, dim // 2], in inv_freq's dtype."""
    angles = positions.to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x [T, ..., d]`` by per-token angles (``cos``/``sin`` [T, d // 2]).

    interleaved=True rotates pairs (x[2i], x[2i+1]) (MLA); False rotates pairs
    (x[i], x[i + d/2]) (indexer). Computed in at least fp32, returned in x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.to(ct).view(shape), sin.to(ct).view(shape)
    xf = x.to(ct)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
