"""Block-wise FP8 (e4m3) activation quantization, as the indexer uses it (SPEC 1)."""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # keeps all-zero blocks from producing a zero scale


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = "ue8m0"):
    """Quantize ``x [..., D]`` to e4m3 with one fp32 scale per block of ``block_size``
    along the last dim.

    scale = max(|x|, 1e-4) / 448 over the block; with ``scale_fmt="ue8m0"`` it is rounded
    up to a power of two (so the scale is exactly representable as a bare exponent).
    Returns ``(x_fp8 [..., D] float8_e4m3fn, scale [..., D // block_size] float32)`` with
    ``x ~= x_fp8.float() * scale`` blockwise.
    """
    d = x.shape[-1]
    if d % block_size:
        raise ValueError(f"x: last dim {d} must be a multiple of block_size={block_size}")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
    blocks = x.float().unflatten(-1, (d // block_size, block_size))  # [..., nb, bs]
    amax = blocks.abs().amax(-1).clamp_min(AMAX_FLOOR)
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale


def act_dequant(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """Inverse of :func:`act_quant`: ``x_fp8 [..., D]`` times its block scales, in fp32."""
    d = x_fp8.shape[-1]
    blocks = x_fp8.float().unflatten(-1, (d // block_size, block_size))
    return (blocks * scale.float().unsqueeze(-1)).flatten(-2)
