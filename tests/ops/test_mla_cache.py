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


@pytest.mark.parametrize("kv_format,model_dtype,cache_dtype,c,r", [
    ("bf16", torch.bfloat16, torch.bfloat16, 512, 64),
    ("bf16", torch.float32, torch.float32, 24, 8),       # "auto" cache of an fp32 model; c not a power of two
    ("bf16", torch.float32, torch.bfloat16, 512, 64),    # rounded to the model dtype, then to the cache's
    ("fp8_ds_mla", torch.bfloat16, torch.uint8, 512, 64),
])
@pytest.mark.parametrize("t", [1, 7, 37])
def test_latent_write_kernel_matches_reference(kv_format, model_dtype, cache_dtype, c, r, t):
    """The fused latent write (RMSNorm + RoPE + store, one launch) against the reference
    (flashdsa.reference.mla_cache.write_latent_rows, the engine's unfused path): rows
    written at their slots only (padding slots -1 and every other row untouched), within
    the reference's own error against float64 (twice it, for another summation order,
    plus a few fp32 roundings); fp8_ds_mla rows dequantized first."""
    from flashdsa.ops.mla_cache import write_latent_rows
    g = torch.Generator().manual_seed(t * 7 + c)
    width = 656 if kv_format == "fp8_ds_mla" else c + r
    gemm_out = torch.randn(t, 100 + c + r, generator=g) * torch.rand(t, 1, generator=g) * 5
    kv_pe = gemm_out.to(model_dtype)[:, 100:]                           # a strided slice, as of the merged GEMM
    weight = torch.rand(c, generator=g) + 0.5
    pos = torch.randint(0, 150000, (t,), generator=g)
    inv = torch.rand(r // 2, generator=g)
    cos, sin = torch.cos(pos[:, None] * inv), torch.sin(pos[:, None] * inv)
    slots = torch.randperm(3 * 64, generator=g)[:t]
    slots[1::3] = -1
    sentinel = torch.full((3, 64, 1, width), 0xAB if kv_format == "fp8_ds_mla" else float("nan")).to(cache_dtype)
    got = sentinel.clone().to(KERNEL_DEVICE)
    write_latent_rows(got, kv_format, kv_pe.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), 1e-6,
                      cos.to(KERNEL_DEVICE), sin.to(KERNEL_DEVICE), slots.to(KERNEL_DEVICE))
    want = sentinel.clone()
    R.write_latent_rows(want, kv_format, kv_pe, weight, 1e-6, cos, sin, slots)
    got, ok = got.cpu().view(3 * 64, width), slots >= 0
    want, written = want.view(3 * 64, width), slots[ok]
    untouched = torch.ones(3 * 64, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(got[untouched].view(torch.uint8), want[untouched].view(torch.uint8))
    exact = R.latent_rows(kv_pe[ok].double(), weight.double(), 1e-6, cos[ok].double(), sin[ok].double())
    if kv_format == "fp8_ds_mla":
        got_rows, want_rows = R.dequantize_mla_cache(got[written], torch.float64), \
            R.dequantize_mla_cache(want[written], torch.float64)
    else:
        got_rows, want_rows = got[written].double(), want[written].double()
    for part in (slice(0, c), slice(c, c + r)):
        err = float((got_rows[:, part] - exact[:, part]).abs().max())
        budget = 2 * float((want_rows[:, part] - exact[:, part]).abs().max()) + \
            8 * 2.0 ** -24 * float(exact[:, part].abs().max())
        assert err <= budget, (part, err, budget)
