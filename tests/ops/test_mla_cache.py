"""fp8_ds_mla cache format (SPEC 4): Triton quantize/dequantize vs the reference, bit for bit."""
import pytest
import torch
import triton
import triton.language as tl

import flashdsa.api as api
from flashdsa.ops.common import e4m3_byte
from flashdsa.reference import act_quant
from flashdsa.reference import mla_cache as R
from tests.utils import KERNEL_DEVICE, rel_err


@triton.jit
def _encode_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o, mask=o < n, other=0.0)
    tl.store(o_ptr + o, e4m3_byte(x).to(tl.uint8), mask=o < n)


def wide_rows(n, device=KERNEL_DEVICE):
    """bf16 rows whose 128-wide tiles span magnitudes 1e-6..1e3 (so e4m3 subnormals, the
    1e-4 amax floor and the top of the range all occur), plus an all-zero tile."""
    mag = 10.0 ** torch.empty(n, 1, 4, 1).uniform_(-6, 3)
    c = (torch.randn(n, 1, 4, 128) * mag).flatten(-2)
    pe = torch.randn(n, 1, 64) * 3
    kv = torch.cat([c, pe], -1).to(torch.bfloat16)
    kv[0, 0, :128] = 0
    return kv.to(device)


def tie_rows(device=KERNEL_DEVICE):
    """Values exactly halfway between two e4m3 neighbours (after the scale), where the
    rounding mode decides: ties must go to even, like the GPU's conversion does."""
    # scale will be 1 (amax 448 -> 448/448 = 1); 100 lies between 96 and 104, 136 between
    # 128 and 144, 31.75 between 30 and 32 ... are not all ties; take exact midpoints
    grid = torch.tensor([0.001953125 * k for k in range(8)] + [1.0, 1.125, 1.25, 96.0, 104.0, 128.0, 144.0,
                                                              240.0, 256.0, 416.0, 448.0])
    mids = (grid[1:] + grid[:-1]) / 2
    c = torch.cat([mids, -mids, grid, -grid])
    row = torch.zeros(576)
    row[: c.numel()] = c
    row[127] = 448.0
    for t in range(1, 4):
        row[t * 128: t * 128 + c.numel()] = c * 2.0 ** (t - 3)
        row[t * 128 + 127] = 448.0 * 2.0 ** (t - 3)
    return row.to(torch.bfloat16).reshape(1, 1, 576).to(device)


@pytest.mark.parametrize("make", [lambda: wide_rows(37), tie_rows])
def test_quantize_kernel_bitwise_equals_reference(make):
    kv = make()
    got = api.quantize_mla_cache(kv, backend="triton")
    want = R.quantize_mla_cache(kv.cpu())
    assert got.shape == (*kv.shape[:-1], 656) and got.dtype == torch.uint8
    assert torch.equal(got.cpu(), want), f"{int((got.cpu() != want).sum())} bytes differ"


def test_reference_format_layout():
    """Independent check of the byte layout: e4m3 part and scales equal the indexer's
    act_quant (block 128, ue8m0) and the rope bytes are the bf16 values."""
    kv = wide_rows(21, "cpu")
    cache = R.quantize_mla_cache(kv)
    x8, scale = act_quant(kv[..., :512], 128, "ue8m0")
    assert torch.equal(cache[..., :512], x8.view(torch.uint8))
    assert torch.equal(cache[..., 512:528].view(torch.float32), scale)
    assert torch.equal(cache[..., 528:].view(torch.bfloat16), kv[..., 512:])
    # scales are powers of two and the dequantized rows are within e4m3 rounding
    assert torch.equal(torch.frexp(scale)[0].abs(), torch.full_like(scale, 0.5))
    deq = R.dequantize_mla_cache(cache, torch.float32)
    x, s = kv.float(), scale.repeat_interleave(128, -1)
    bound = torch.maximum(x[..., :512].abs() * 2.0 ** -4, s * 2.0 ** -10)
    assert ((deq[..., :512] - x[..., :512]).abs() <= bound).all()


@pytest.mark.parametrize("dtype,int_decode", [(torch.bfloat16, None), (torch.float32, None), (torch.float32, True)])
def test_dequantize_kernel_bitwise_equals_reference(dtype, int_decode):
    """int_decode: e4m3 decoded with integer ops, as on GPUs before sm_89."""
    from flashdsa.ops.mla_cache import dequantize_mla_cache

    kv = wide_rows(23)
    cache = R.quantize_mla_cache(kv.cpu()).reshape(23, 1, 656).to(KERNEL_DEVICE)
    if int_decode is None:
        got = api.dequantize_mla_cache(cache, dtype, backend="triton")
    else:
        got = dequantize_mla_cache(cache, dtype, int_decode=int_decode)
    want = R.dequantize_mla_cache(cache.cpu(), dtype)
    assert got.shape == (23, 1, 576) and got.dtype == dtype
    assert torch.equal(got.cpu(), want)
    assert rel_err(got.cpu(), kv.cpu().float()) < 0.05


def test_paged_shape_and_errors():
    kv = wide_rows(64 * 2).reshape(2, 64, 1, 576)
    cache = api.quantize_mla_cache(kv, backend="triton")
    assert cache.shape == (2, 64, 1, 656)
    with pytest.raises(ValueError, match="576"):
        api.quantize_mla_cache(kv[..., :512])
    with pytest.raises(TypeError, match="uint8"):
        api.dequantize_mla_cache(kv)


def test_e4m3_byte_encoder_matches_torch_cast():
    """The kernel's integer e4m3 encoder against torch's cast on every e4m3 value, every
    midpoint between neighbours (ties: to even), one ulp either side of each, +-0 and
    random values: bit for bit."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, torch.nextafter(mids, torch.full_like(mids, 1e9)),
                   torch.nextafter(mids, torch.full_like(mids, -1e9)), torch.tensor([0.0, -0.0]),
                   (torch.rand(20000) * 2 - 1) * 448, torch.randn(20000) * 0.01]).clamp(-448, 448)
    x = x.to(KERNEL_DEVICE)
    out = torch.empty(x.numel(), dtype=torch.uint8, device=KERNEL_DEVICE)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    want = x.cpu().to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(out.cpu(), want), f"{int((out.cpu() != want).sum())} of {x.numel()} bytes differ"
