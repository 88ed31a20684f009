"""What the Triton ops share: where kernels run, numeric constants, input views, e4m3
byte conversions and the fixed-order (deterministic) scatter-sum.

Host functions here assume validated inputs, as every launcher in flashdsa.ops does.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted as interpreted

__all__ = [
    "LOG2E", "LN2", "LOG2E_C", "LN2_C", "interpreted", "nvidia_compiled", "capability", "has_tma", "fp8_native",
    "pdl_launch",
    "pdl_prologue",
    "num_sms", "last_dim_contiguous", "e4m3_byte", "e4m3_to_f32", "round_as", "quantize_rows_ue8m0",
    "reduce_slots_fixed_order",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Globals read inside @triton.jit code must be tl.constexpr (compiled Triton rejects plain
# floats; the interpreter does not notice).
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


def nvidia_compiled() -> bool:
    """Whether kernels are compiled for an NVIDIA GPU (PTX available), not interpreted."""
    return not interpreted() and torch.version.hip is None


@functools.lru_cache(maxsize=None)
def _device_query(query, device: torch.device):
    return query(device)


def capability(device: torch.device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, asked once per device (the launchers
    ask on every call, and an eager decode step makes dozens). The cache is keyed by the
    query function too, so a patched one (the dispatch tests) is asked again; a device
    without an index (the current one, which may change) is not cached."""
    if device.index is None:
        return torch.cuda.get_device_capability(device)
    return _device_query(torch.cuda.get_device_capability, device)


def has_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can store through TMA descriptors (NVIDIA sm_90 and
    later, compiled, not interpreted)."""
    return device.type == "cuda" and nvidia_compiled() and capability(device)[0] >= 9


def pdl_launch(device: torch.device) -> dict:
    """Launch options of a kernel that starts with :func:`pdl_prologue`: programmatic
    dependent launch (``PDL`` and Triton's ``launch_pdl``) on NVIDIA sm_90 and later,
    compiled (the condition :func:`has_tma` tests); elsewhere ``PDL=False`` (the prologue
    compiles to nothing)."""
    if has_tma(device):
        return dict(PDL=True, launch_pdl=True)
    return dict(PDL=False)


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """The first statement of a kernel of a chain of dependent launches (a decode step):
    with PDL, wait until the kernels before it in the stream have finished and their
    writes are visible (nothing before this touches memory), then let the next kernel be
    scheduled while this one runs, so that each launch's latency overlaps the kernel
    before it. Every kernel of the chain waits in its prologue, so one that starts early
    still reads and writes only after its predecessors are done."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def fp8_native(device: torch.device) -> bool:
    """Whether Triton has the e4m3 type on this device (sm_89 and later; the interpreter too)."""
    if device.type != "cuda" or interpreted():
        return True
    return capability(device) >= (8, 9)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: grids stay small)."""
    if device.type == "cuda" and not interpreted():
        if device.index is None:
            return torch.cuda.get_device_properties(device).multi_processor_count
        return _device_query(torch.cuda.get_device_properties, device).multi_processor_count
    return 1


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim has stride 1 (what the kernels index), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def round_as(x, dt: tl.constexpr):
    """fp32 x rounded to dtype dt (to nearest, ties to even), kept in fp32. bf16 on the
    bits (the interpreter's fp32 -> bf16 cast truncates); NaN and inf are not expected."""
    if dt == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def e4m3_byte(y):
    """The e4m3 (fn) byte of fp32 ``y`` (|y| <= 448), rounded to nearest, ties to even,
    built with integer arithmetic: int32 in [0, 255].

    Not a float-to-fp8 cast: the bytes then do not depend on how a backend rounds the
    conversion or treats -0 (the CPU interpreter rounds ties away from zero and can lose
    the carry into the exponent), and they equal torch's cast."""
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
def quantize_rows_ue8m0(y):
    """(e4m3 bytes int32 [BLOCK, D], scale fp32 [BLOCK]) of fp32 rows y, one block a row
    (SPEC 1): scale = max(|y|, 1e-4) / 448 rounded up to a power of two on its bits
    (exact, no log2 rounding), bytes of y / scale clamped to +-448."""
    amax = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-4)
    bits = (amax / 448.0).to(tl.int32, bitcast=True)
    expo = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    scale = (expo << 23).to(tl.float32, bitcast=True)
    inv = ((254 - expo) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact
    y = tl.minimum(tl.maximum(y * inv[:, None], -448.0), 448.0)
    return e4m3_byte(y), scale


@triton.jit
def e4m3_to_f32(b):
    """fp32 value of e4m3 (fn) bytes ``b`` (int32 in [0, 255]) with integer operations.

    The decode for GPUs whose Triton has no e4m3 type (before sm_89, e.g. the A100):
    normal bytes become an fp32 bit pattern (exponent rebiased 7 -> 127, the 3 mantissa
    bits on top), subnormals are m * 2^-9. The quantizers never write the NaN bytes."""
    sign = (b & 0x80) << 24
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(e == 0, sub, normal)


@triton.jit
def _reduce_slots_kernel(
    buf_ptr, order_ptr, rowptr_ptr, dst_ptr,
    n_parts, topk, width,
    stride_bp, stride_bt, stride_bk, stride_dst,
    BLOCK_D: tl.constexpr,
):
    """dst[r, dblock] += sum over the sorted slots of row r (fixed order) of buf[part, slot]."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < width
    start = tl.load(rowptr_ptr + r)
    end = tl.load(rowptr_ptr + r + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e in range(start, end):
        slot = tl.load(order_ptr + e).to(tl.int64)  # flat t * topk + j
        t = slot // topk
        j = slot - t * topk
        for part in range(0, n_parts):
            acc += tl.load(buf_ptr + part * stride_bp + t * stride_bt + j * stride_bk + offs_d, mask=mask_d,
                           other=0.0)
    if end > start:
        ptr = dst_ptr + r * stride_dst + offs_d
        tl.store(ptr, tl.load(ptr, mask=mask_d, other=0.0) + acc, mask=mask_d)


def reduce_slots_fixed_order(buf: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[idx[t, j]] += sum_p buf[p, t, j]`` for the valid slots, in a fixed order:
    the scatter-sum of per-slot gradient rows without atomics, bitwise reproducible.

    buf [n_parts, T, topk, >= width] fp32 (last dim contiguous), idx [T, topk] key rows
    (-1 or >= dst.shape[0] skipped), dst [n_rows, width] fp32, updated in place. Slots
    are sorted by key row with a stable sort, so each row sums its slots in ascending
    (query, slot) order and then over the parts: the order depends only on ``idx``."""
    n_rows, width = dst.shape
    topk = idx.shape[1]
    flat = idx.reshape(-1).long()
    keys = torch.where((flat >= 0) & (flat < n_rows), flat, torch.full_like(flat, n_rows))
    _, order = torch.sort(keys, stable=True)
    counts = torch.bincount(keys, minlength=n_rows + 1)[:n_rows]
    rowptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=dst.device)
    rowptr[1:] = torch.cumsum(counts, 0)
    block_d = 64 if width >= 64 else max(16, triton.next_power_of_2(width))
    grid = (n_rows, triton.cdiv(width, block_d))
    _reduce_slots_kernel[grid](
        buf, order, rowptr, dst, buf.shape[0], topk, width,
        buf.stride(0), buf.stride(1), buf.stride(2), dst.stride(0),
        BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2,
    )
