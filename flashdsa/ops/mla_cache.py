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
from .common import e4m3_byte, e4m3_to_f32, fp8_native, last_dim_contiguous, round_as

BLOCK_R = 16  # rows per program: [16, 512] fp32 is 64 registers a thread at 4 warps
BLOCK_T = 4   # tokens per program of the latent write: a decode step's few tokens spread over programs


@triton.jit
def _store_fp8_rows(x, pe, r64, r_mask, c8_ptr, sc_ptr, pe_ptr, stride_c8, stride_sc, stride_pe,
                    BLOCK_R: tl.constexpr):
    """Store latent rows x [BLOCK_R, 512] fp32 and rope values pe [BLOCK_R, 64] as
    fp8_ds_mla at rows r64 (int64; r_mask: which are stored): e4m3 bytes (c8_ptr), 4
    scales (sc_ptr), 64 bf16 values (pe_ptr)."""
    offs = tl.arange(0, 512)
    x3 = tl.reshape(x, (BLOCK_R, 4, 128))  # [BLOCK_R, tile, 128]
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
    pe16 = round_as(pe.to(tl.float32), tl.bfloat16).to(tl.bfloat16)
    tl.store(pe_ptr + r64[:, None] * stride_pe + offs_pe[None, :], pe16, mask=r_mask[:, None])


@triton.jit
def _quantize_mla_cache_kernel(kv_ptr, c8_ptr, sc_ptr, pe_ptr, n_rows, stride_kv,
                               stride_c8, stride_sc, stride_pe, BLOCK_R: tl.constexpr):
    """Rows kv [n_rows, 576] -> e4m3 bytes (c8_ptr), 4 scales (sc_ptr), 64 bf16 rope values (pe_ptr)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    r64 = r.to(tl.int64)
    x = tl.load(kv_ptr + r64[:, None] * stride_kv + tl.arange(0, 512)[None, :], mask=r_mask[:, None], other=0.0)
    pe = tl.load(kv_ptr + r64[:, None] * stride_kv + 512 + tl.arange(0, 64)[None, :], mask=r_mask[:, None],
                 other=0.0)
    _store_fp8_rows(x.to(tl.float32), pe, r64, r_mask, c8_ptr, sc_ptr, pe_ptr, stride_c8, stride_sc, stride_pe,
                    BLOCK_R)


@triton.jit
def latent_cache_write_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, slot_ptr, out_ptr, sc_ptr, pe_ptr, n, eps,
                              stride_kv, stride_cs, stride_out, stride_sc, stride_pe, C: tl.constexpr,
                              C_PAD: tl.constexpr, R: tl.constexpr, FP8: tl.constexpr, BLOCK_T: tl.constexpr):
    """BLOCK_T tokens of kv_pe [n, C + R] (MLA's kv_a output) into their cache rows: the
    latent RMS-normalized times w [C], k_pe rotated by cos/sin [n, R / 2] (pairs 2i,
    2i + 1), each in fp32 and rounded to kv_pe's dtype (as RMSNorm and MLA's RoPE
    compute them), stored at row ``slot`` (int64, < 0: skipped) of the cache: [c | k_pe]
    in out's dtype, or as fp8_ds_mla bytes when FP8 (out/sc/pe: its e4m3, fp32 and bf16
    views)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < n, other=-1).to(tl.int64)
    ok = slot >= 0
    t64 = t.to(tl.int64)
    dt = kv_ptr.dtype.element_ty
    d = tl.arange(0, C_PAD)
    m = ok[:, None] & (d < C)[None, :]
    x = tl.load(kv_ptr + t64[:, None] * stride_kv + d[None, :], mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
    y = round_as(x * inv[:, None] * tl.load(w_ptr + d, mask=d < C, other=0.0).to(tl.float32)[None, :], dt)
    j = tl.arange(0, R)
    pe = tl.load(kv_ptr + t64[:, None] * stride_kv + C + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    p1, p2 = tl.split(tl.reshape(pe, [BLOCK_T, R // 2, 2]))
    i = tl.arange(0, R // 2)
    c = tl.load(cos_ptr + t64[:, None] * stride_cs + i[None, :], mask=ok[:, None], other=0.0)
    s = tl.load(sin_ptr + t64[:, None] * stride_cs + i[None, :], mask=ok[:, None], other=0.0)
    pe = tl.reshape(tl.join(round_as(p1 * c - p2 * s, dt), round_as(p1 * s + p2 * c, dt)), [BLOCK_T, R])
    if FP8:
        _store_fp8_rows(y, pe, slot, ok, out_ptr, sc_ptr, pe_ptr, stride_out, stride_sc, stride_pe, BLOCK_T)
    else:
        ot = out_ptr.dtype.element_ty
        tl.store(out_ptr + slot[:, None] * stride_out + d[None, :], round_as(y, ot).to(ot), mask=m)
        tl.store(out_ptr + slot[:, None] * stride_out + C + j[None, :], round_as(pe, ot).to(ot), mask=ok[:, None])


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


def write_latent_rows(cache: torch.Tensor, kv_format: str, kv_pe: torch.Tensor, weight: torch.Tensor, eps: float,
                      cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> None:
    """flashdsa.reference.mla_cache.write_latent_rows in one launch: RMSNorm of the latent,
    RoPE of k_pe and the (quantized) store of both at ``slots`` (inputs assumed validated:
    kv_pe [T, c + r] with a contiguous last dim, cos/sin [T, r // 2] fp32, r a power of
    two, slots [T] integer; fp8_ds_mla needs c = 512, r = 64). CUDA-graph capturable: no
    host sync."""
    n = kv_pe.shape[0]
    if n == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()   # one row stride for both
    c = weight.shape[0]
    r = kv_pe.shape[1] - c
    flat = cache.view(-1, cache.shape[-1])
    fp8 = kv_format == "fp8_ds_mla"
    if fp8:
        _, sc, pe = mla_byte_views(flat)
        sc, pe = sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:]
    else:
        sc = pe = flat
    latent_cache_write_kernel[(triton.cdiv(n, BLOCK_T),)](
        kv_pe, weight, cos, sin, slots, flat, sc, pe, n, eps, kv_pe.stride(0), cos.stride(0), flat.stride(0),
        sc.stride(0), pe.stride(0), C=c, C_PAD=triton.next_power_of_2(c), R=r, FP8=fp8, BLOCK_T=BLOCK_T,
        num_warps=4)
