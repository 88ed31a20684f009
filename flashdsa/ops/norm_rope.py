"""Inference kernels for the model's small per-token ops: RMSNorm, MLA's interleaved
RoPE and the RoPE angles' cos/sin, one launch each where the torch versions take 7, 9
and 4 (casts, power, mean, rsqrt, products, stack; cast, product, cos, sin). At decode sizes each launch costs more than its work, so these set
the projections' time at batch 1 (issue 16). Forward only, no autograd: the modules use
them under ``torch.no_grad`` / inference mode on a GPU (flashdsa.backend.fused_inference).

Numerics follow the torch versions (flashdsa.layers.RMSNorm, flashdsa.reference.rope):
fp32 math, rounded once to the input dtype; only the order of the sum of squares differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .common import interpreted, round_as


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, stride_x, stride_y, eps, D: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """y [r] = x [r] * rsqrt(mean(x [r]^2) + eps) * w, fp32, rounded to y's dtype."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D_PAD)
    m = (r < n_rows)[:, None] & (d < D)[None, :]
    rr = r.to(tl.int64)
    x = tl.load(x_ptr + rr[:, None] * stride_x + d[None, :], mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * inv[:, None] * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rr[:, None] * stride_y + d[None, :], round_as(y, ty).to(ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., D] (last dim contiguous) over its last dim, times ``weight [D]``."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n = x2.shape[0]
    if n:
        d_pad = triton.next_power_of_2(d)
        block = max(1, min(16, 4096 // d_pad))
        rms_norm_kernel[(triton.cdiv(n, block),)](x2, weight, y, n, x2.stride(0), y.stride(0), eps, D=d,
                                                  D_PAD=d_pad, BLOCK=block, num_warps=4 if d_pad <= 2048 else 8)
    return y.view(x.shape)


@triton.jit
def rope_interleaved_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads, stride_xt, stride_xh, stride_cs,
                            stride_yt, stride_yh, R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token t = program 0, heads of block program 1: y [t, h, 2i : 2i + 2] = the pair
    (x1, x2) = x [t, h, 2i : 2i + 2] rotated by angle i: (x1 cos - x2 sin, x1 sin + x2 cos).
    Each head's R values are loaded and stored as one contiguous row and split into their
    pairs in registers. y [T, n_heads, R] with a contiguous last dim."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, R)
    m = (h < n_heads)[:, None]
    x = tl.load(x_ptr + t * stride_xt + h[:, None] * stride_xh + j[None, :], mask=m, other=0.0).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, R // 2, 2]))
    i = tl.arange(0, R // 2)
    c = tl.load(cos_ptr + t * stride_cs + i)[None, :]
    s = tl.load(sin_ptr + t * stride_cs + i)[None, :]
    ty = y_ptr.dtype.element_ty
    y = tl.reshape(tl.join(round_as(x1 * c - x2 * s, ty), round_as(x1 * s + x2 * c, ty)), [BLOCK_H, R])
    tl.store(y_ptr + t * stride_yt + h[:, None] * stride_yh + j[None, :], y.to(ty), mask=m)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """MLA's RoPE of x [T, H, R] (any strides; R / 2 a power of two) by cos/sin
    [T, R / 2] fp32: pairs (2i, 2i + 1) rotated; returns a new contiguous [T, H, R], or
    ``out`` (a [T, H, R] tensor of x's dtype with a contiguous last dim, for example the
    tail of a wider row) written in place. A program takes one token's heads in blocks of
    about 2048 values (several programs a token, so that a decode step's few tokens
    still spread over SMs)."""
    t, h, r = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(t, h, r, dtype=x.dtype, device=x.device) if out is None else out
    if t:
        block_h = max(1, min(triton.next_power_of_2(h), 2048 // r))
        rope_interleaved_kernel[(t, triton.cdiv(h, block_h))](x, cos, sin, y, h, x.stride(0), x.stride(1),
                                                              cos.stride(0), y.stride(0), y.stride(1), R=r,
                                                              BLOCK_H=block_h, num_warps=4)
    return y


@triton.jit
def rope_cos_sin_kernel(pos_ptr, inv_ptr, cos_ptr, sin_ptr, n, scale, HALF: tl.constexpr,
                        HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SCALED: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """cos/sin [t, i] = cos/sin(float(pos [t]) * inv [i]) (* scale when SCALED), fp32, by
    libdevice's cosf/sinf on a GPU: full-range argument reduction, as torch's kernels
    (the PTX approximations are unusable for angles of up to 10^5 radians). The
    interpreter, which has no libdevice, takes tl.cos / tl.sin (numpy's)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, HALF_PAD)
    m = (t < n)[:, None] & (i < HALF)[None, :]
    pos = tl.load(pos_ptr + t, mask=t < n, other=0).to(tl.float32)
    a = pos[:, None] * tl.load(inv_ptr + i, mask=i < HALF, other=0.0)[None, :]
    if INTERPRET:
        c = tl.cos(a)
        s = tl.sin(a)
    else:
        c = libdevice.cos(a)
        s = libdevice.sin(a)
    if SCALED:
        c = c * scale
        s = s * scale
    off = t.to(tl.int64)[:, None] * HALF + i[None, :]
    tl.store(cos_ptr + off, c, mask=m)
    tl.store(sin_ptr + off, s, mask=m)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0):
    """(cos, sin), each [T, R / 2] fp32 contiguous, of positions [T] (integer) times
    inv_freq [R / 2] fp32, times ``scale``: flashdsa.reference.rope_cos_sin in one launch."""
    t, half = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty(t, half, dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    if t:
        half_pad = triton.next_power_of_2(half)
        block_t = max(1, min(64, 2048 // half_pad))
        rope_cos_sin_kernel[(triton.cdiv(t, block_t),)](positions.contiguous(), inv_freq, cos, sin, t, scale,
                                                        HALF=half, HALF_PAD=half_pad, BLOCK_T=block_t,
                                                        SCALED=scale != 1.0, INTERPRET=interpreted(), num_warps=4)
    return cos, sin
