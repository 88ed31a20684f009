"""Triton kernels for the fp8_ds_mla latent cache format (SPEC 4; reference in
flashdsa.reference.mla_cache): 656 bytes a token = 512 e4m3 bytes (4 tiles of 128),
4 power-of-two fp32 scales, 64 bf16 rope values.

One program converts ``BLOCK_R`` rows. The byte buffer is passed three times, viewed as
e4m3 (row stride 656), fp32 (row stride 164, scales at 128..131) and bf16 (row stride
328, rope at 264..327), so every field is loaded and stored with its own type.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

D_NOPE, D_ROPE, N_TILES = 512, 64, 4
FP8_BYTES = 656
SCALE_OFF, ROPE_OFF = D_NOPE // 4, (D_NOPE + 16) // 2  # in fp32 / bf16 elements
BLOCK_R = 16  # rows per program: [16, 512] fp32 is 64 registers a thread at 4 warps


@triton.jit
def e4m3_byte(y):
    """The e4m3 (fn) byte of fp32 ``y`` (|y| <= 448), rounded to nearest, ties to even,
    built with integer arithmetic: int32 in [0, 255].

    Not a float-to-fp8 cast: the bytes then do not depend on how a backend rounds the
    conversion or treats -0 (the CPU interpreter rounds ties away from zero and can lose
    the carry into the exponent; a GPU run gave +0 for -0), and equal torch's cast."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # normal e4m3 (|y| >= 2^-6): keep 3 mantissa bits, ties to even; the carry may bump
    # the exponent. (E << 3 | m) with fp32's exponent bias 127 -> e4m3's bias 7.
    lsb = (mag >> 20) & 1
    normal = ((mag + 0x7FFFF + lsb) >> 20) - ((127 - 7) << 3)
    # subnormal e4m3: k * 2^-9, k = |y| * 512 rounded to an integer, ties to even (adding
    # and subtracting 1.5 * 2^23 rounds an fp32 below 2^22 to an integer); k = 8 is the
    # encoding of 2^-6, so rounding up across the boundary is encoded right too
    k = (tl.abs(y) * 512.0 + 12582912.0) - 12582912.0
    sub = k.to(tl.int32)
    return sign | tl.where(mag < 0x3C800000, sub, normal)  # 0x3C800000: fp32 bits of 2^-6


@triton.jit
def _e4m3_to_f32(b):
    """fp32 value of e4m3 (fn) bytes ``b`` (int32 in [0, 255]) with integer operations.

    The fallback for GPUs whose Triton has no e4m3 type (before sm_89, e.g. the A100):
    normal bytes become an fp32 bit pattern (exponent rebiased 7 -> 127, the 3 mantissa
    bits on top), subnormals are m * 2^-9. The quantizer never writes the NaN bytes."""
    sign = (b & 0x80) << 24
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(e == 0, sub, normal)


def fp8_native(device: torch.device) -> bool:
    """Whether Triton has the e4m3 type on this device (sm_89+; the interpreter too)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def _quantize_mla_cache_kernel(kv_ptr, c8_ptr, sc_ptr, pe_ptr, n_rows, stride_kv,
                               stride_c8, stride_sc, stride_pe, BLOCK_R: tl.constexpr):
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
    tl.store(sc_ptr + r64[:, None] * stride_sc + 128 + offs4[None, :], scale, mask=r_mask[:, None])
    offs_pe = tl.arange(0, 64)
    pe = tl.load(kv_ptr + r64[:, None] * stride_kv + 512 + offs_pe[None, :], mask=r_mask[:, None], other=0.0)
    tl.store(pe_ptr + r64[:, None] * stride_pe + 264 + offs_pe[None, :], pe.to(tl.bfloat16), mask=r_mask[:, None])


@triton.jit
def _dequantize_mla_cache_kernel(c8_ptr, sc_ptr, pe_ptr, out_ptr, n_rows,
                                 stride_c8, stride_sc, stride_pe, stride_out, BLOCK_R: tl.constexpr,
                                 INT_DECODE: tl.constexpr = False):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    r64 = r.to(tl.int64)
    offs = tl.arange(0, 512)
    c8_ptrs = c8_ptr + r64[:, None] * stride_c8 + offs[None, :]
    sc = tl.load(sc_ptr + r64[:, None] * stride_sc + 128 + tl.arange(0, 4)[None, :], mask=r_mask[:, None], other=0.0)
    if INT_DECODE:  # c8_ptr holds uint8
        xf = _e4m3_to_f32(tl.load(c8_ptrs, mask=r_mask[:, None], other=0).to(tl.int32))
    else:  # c8_ptr holds e4m3
        xf = tl.load(c8_ptrs, mask=r_mask[:, None], other=0.0).to(tl.float32)
    x = tl.reshape(tl.reshape(xf, (BLOCK_R, 4, 128)) * sc[:, :, None], (BLOCK_R, 512))
    tl.store(out_ptr + r64[:, None] * stride_out + offs[None, :], x.to(out_ptr.dtype.element_ty), mask=r_mask[:, None])
    offs_pe = tl.arange(0, 64)
    pe = tl.load(pe_ptr + r64[:, None] * stride_pe + 264 + offs_pe[None, :], mask=r_mask[:, None], other=0.0)
    tl.store(out_ptr + r64[:, None] * stride_out + 512 + offs_pe[None, :], pe.to(out_ptr.dtype.element_ty),
             mask=r_mask[:, None])


def byte_views(cache: torch.Tensor):
    """The three typed views of fp8_ds_mla bytes [N, 656]: (e4m3 [N, 656], fp32 [N, 164],
    bf16 [N, 328]) sharing one storage."""
    return cache.view(torch.float8_e4m3fn), cache.view(torch.float32), cache.view(torch.bfloat16)


def quantize_mla_cache(kv: torch.Tensor) -> torch.Tensor:
    """Rows ``kv [..., 576]`` (any float dtype) -> fp8_ds_mla bytes ``[..., 656]`` uint8."""
    lead = kv.shape[:-1]
    rows = kv.reshape(-1, kv.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    out = torch.empty(n, FP8_BYTES, dtype=torch.uint8, device=kv.device)
    if n:
        _, sc, pe = byte_views(out)
        _quantize_mla_cache_kernel[(triton.cdiv(n, BLOCK_R),)](
            rows, out, sc, pe, n, rows.stride(0), out.stride(0), sc.stride(0), pe.stride(0),
            BLOCK_R=BLOCK_R, num_warps=4)
    return out.reshape(*lead, FP8_BYTES)


def dequantize_mla_cache(cache: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         int_decode: bool | None = None) -> torch.Tensor:
    """fp8_ds_mla bytes ``[..., 656]`` -> rows ``[..., 576]`` in ``dtype``. ``int_decode``
    (default: where the device lacks e4m3) decodes the bytes with integer operations."""
    lead = cache.shape[:-1]
    rows = cache.reshape(-1, FP8_BYTES)
    if rows.stride(0) != FP8_BYTES or rows.stride(1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    out = torch.empty(n, D_NOPE + D_ROPE, dtype=dtype, device=cache.device)
    if n:
        c8, sc, pe = byte_views(rows)
        if int_decode is None:
            int_decode = not fp8_native(cache.device)
        if int_decode:
            c8 = rows
        _dequantize_mla_cache_kernel[(triton.cdiv(n, BLOCK_R),)](
            c8, sc, pe, out, n, c8.stride(0), sc.stride(0), pe.stride(0), out.stride(0),
            BLOCK_R=BLOCK_R, INT_DECODE=bool(int_decode), num_warps=4)
    return out.reshape(*lead, D_NOPE + D_ROPE)
