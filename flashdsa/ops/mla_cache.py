"""Triton kernels for the fp8_ds_mla latent cache format (SPEC 4; layout in flashdsa.layout,
reference in flashdsa.reference.mla_cache): 656 bytes a token = 512 e4m3 bytes (4 tiles of
128), 4 power-of-two fp32 scales, 64 bf16 rope values.

One program converts ``BLOCK_R`` rows. The byte buffer is passed three times, as its e4m3
(or uint8), fp32 and bf16 views (flashdsa.layout.mla_byte_views), the fp32 and bf16 ones
offset to the scales and the rope values, so every field is loaded and stored with its own
type.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import MLA_D_NOPE, MLA_D_ROPE, MLA_FP8_BYTES, MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views
from .common import e4m3_byte, e4m3_to_f32, fp8_native, last_dim_contiguous

BLOCK_R = 16  # rows per program: [16, 512] fp32 is 64 registers a thread at 4 warps


@triton.jit
def _quantize_mla_cache_kernel(kv_ptr, c8_ptr, sc_ptr, pe_ptr, n_rows, stride_kv,
                               stride_c8, stride_sc, stride_pe, BLOCK_R: tl.constexpr):
    """Rows kv [n_rows, 576] -> e4m3 bytes (c8_ptr), 4 scales (sc_ptr), 64 bf16 rope values (pe_ptr)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    r64 = r.to(tl.int64)
    offs = tl.arange(0, 512)
    x = tl.load(kv_ptr + r64[:, None] * stride_kv + offs[None, :], mask=r_mask[:, None], other=0.0)
    x3 = tl.reshape(x.to(tl.float32), (BLOCK_R, 4, 128))  # [BLOCK_R, tile, 128]
    amax = tl.maximum(tl.max(tl.abs(x3), 2), 1e-4)  # [BLOCK_R, 4]
    # scale = 2^ceil(log2(amax / 448)) done on the bits (exact; log2/exp2 are approximate):
    # a normal positive float with a zero mantissa is already a power of two, else bump
    # the exponent and clear the mantissa.
    bits = (amax / 448.0).to(tl.int32, bitcast=True)
    pow_bits = tl.where((bits & 0x7FFFFF) != 0, ((bits >> 23) + 1) << 23, bits)
    scale = pow_bits.to(tl.float32, bitcast=True)
    y = x3 / scale[:, :, None]  # exact: scale is a power of two
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    y8 = e4m3_byte(tl.reshape(y, (BLOCK_R, 512))).to(tl.uint8)
    tl.store(c8_ptr + r64[:, None] * stride_c8 + offs[None, :], y8, mask=r_mask[:, None])
    offs4 = tl.arange(0, 4)
    tl.store(sc_ptr + r64[:, None] * stride_sc + offs4[None, :], scale, mask=r_mask[:, None])
    offs_pe = tl.arange(0, 64)
    pe = tl.load(kv_ptr + r64[:, None] * stride_kv + 512 + offs_pe[None, :], mask=r_mask[:, None], other=0.0)
    tl.store(pe_ptr + r64[:, None] * stride_pe + offs_pe[None, :], pe.to(tl.bfloat16), mask=r_mask[:, None])


@triton.jit
def _dequantize_mla_cache_kernel(c8_ptr, sc_ptr, pe_ptr, out_ptr, n_rows,
                                 stride_c8, stride_sc, stride_pe, stride_out, BLOCK_R: tl.constexpr,
                                 INT_DECODE: tl.constexpr = False):
    """e4m3 bytes (c8_ptr), 4 scales (sc_ptr), 64 bf16 rope values (pe_ptr) -> rows out [n_rows, 576]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    r64 = r.to(tl.int64)
    offs = tl.arange(0, 512)
    c8_ptrs = c8_ptr + r64[:, None] * stride_c8 + offs[None, :]
    sc = tl.load(sc_ptr + r64[:, None] * stride_sc + tl.arange(0, 4)[None, :], mask=r_mask[:, None], other=0.0)
    if INT_DECODE:  # c8_ptr holds uint8
        xf = e4m3_to_f32(tl.load(c8_ptrs, mask=r_mask[:, None], other=0).to(tl.int32))
    else:  # c8_ptr holds e4m3
        xf = tl.load(c8_ptrs, mask=r_mask[:, None], other=0.0).to(tl.float32)
    x = tl.reshape(tl.reshape(xf, (BLOCK_R, 4, 128)) * sc[:, :, None], (BLOCK_R, 512))
    tl.store(out_ptr + r64[:, None] * stride_out + offs[None, :], x.to(out_ptr.dtype.element_ty), mask=r_mask[:, None])
    offs_pe = tl.arange(0, 64)
    pe = tl.load(pe_ptr + r64[:, None] * stride_pe + offs_pe[None, :], mask=r_mask[:, None], other=0.0)
    tl.store(out_ptr + r64[:, None] * stride_out + 512 + offs_pe[None, :], pe.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None])


def quantize_mla_cache(kv: torch.Tensor) -> torch.Tensor:
    """Rows ``kv [..., 576]`` (any float dtype) -> fp8_ds_mla bytes ``[..., 656]`` uint8."""
    lead = kv.shape[:-1]
    rows = last_dim_contiguous(kv.reshape(-1, kv.shape[-1]))
    n = rows.shape[0]
    out = torch.empty(n, MLA_FP8_BYTES, dtype=torch.uint8, device=kv.device)
    if n:
        _, sc, pe = mla_byte_views(out)
        sc, pe = sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]
        _quantize_mla_cache_kernel[(triton.cdiv(n, BLOCK_R),)](
            rows, out, sc, pe, n, rows.stride(0), out.stride(0), sc.stride(0), pe.stride(0),
            BLOCK_R=BLOCK_R, num_warps=4)
    return out.reshape(*lead, MLA_FP8_BYTES)


def dequantize_mla_cache(cache: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         int_decode: bool | None = None) -> torch.Tensor:
    """fp8_ds_mla bytes ``[..., 656]`` -> rows ``[..., 576]`` in ``dtype``. ``int_decode``
    (default: where the device lacks e4m3) decodes the bytes with integer operations."""
    lead = cache.shape[:-1]
    rows = cache.reshape(-1, MLA_FP8_BYTES)
    if rows.stride(0) != MLA_FP8_BYTES or rows.stride(1) != 1:  # the typed views need whole rows
        rows = rows.contiguous()
    n = rows.shape[0]
    out = torch.empty(n, MLA_D_NOPE + MLA_D_ROPE, dtype=dtype, device=cache.device)
    if n:
        c8, sc, pe = mla_byte_views(rows)
        if int_decode is None:
            int_decode = not fp8_native(cache.device)
        if int_decode:
            c8 = rows
        sc, pe = sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]
        _dequantize_mla_cache_kernel[(triton.cdiv(n, BLOCK_R),)](
            c8, sc, pe, out, n, c8.stride(0), sc.stride(0), pe.stride(0), out.stride(0),
            BLOCK_R=BLOCK_R, INT_DECODE=bool(int_decode), num_warps=4)
    return out.reshape(*lead, MLA_D_NOPE + MLA_D_ROPE)
