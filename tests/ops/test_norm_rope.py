"""RMSNorm, MLA's interleaved RoPE and the RoPE cos/sin as inference kernels
(flashdsa.ops.norm_rope) against the torch module and functions they replace on a GPU. Both compute in fp32 and
round once to the input dtype, so the kernel's error against float64 may be at most
that of the torch version in the same dtype (twice, for the sum of squares taken in
another order), plus a few fp32 roundings of the inputs' size."""
import pytest
import torch

from flashdsa.layers import RMSNorm
from flashdsa.backend import fused_inference
from flashdsa.ops import norm_rope
from flashdsa.ops.norm_rope import rms_norm, rope_interleaved
from flashdsa.reference.rope import apply_rope, rope_cos_sin, yarn_inv_freq
from tests.utils import KERNEL_DEVICE

DEV = KERNEL_DEVICE


def assert_within_torch_error(got, torch_out, want, scale):
    """max |got - want| <= 2 max |torch_out - want| + 8 fp32 roundings of ``scale``."""
    err = float((got.double() - want).abs().max())
    budget = 2 * float((torch_out.double() - want).abs().max()) + 8 * 2.0 ** -24 * float(scale)
    assert err <= budget, (err, budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7168), (5, 3, 512), (37, 1536), (2, 100)])
def test_rms_norm_matches_module(dtype, shape):
    d = shape[-1]
    norm = RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 4).to(dtype)
    got = rms_norm(x.to(DEV), norm.weight.to(DEV), norm.eps).cpu()
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
    with torch.no_grad():
        assert_within_torch_error(got, norm.to(dtype)(x), want, want.abs().max())
    assert got.dtype == dtype and got.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,r", [(1, 128, 64), (13, 5, 64), (4, 1, 16)])
def test_rope_interleaved_matches_apply_rope(dtype, t, h, r):
    cos, sin = rope_cos_sin(torch.randint(0, 200000, (t,)), yarn_inv_freq(r, 10000.0, 40.0, 4096, 163840))
    full = torch.randn(t, h, 128 + r).to(dtype)
    x = full[..., 128:]                                   # a strided view, like q_pe of q_b_proj's output
    got = rope_interleaved(x.to(DEV), cos.to(DEV), sin.to(DEV)).cpu()
    want = apply_rope(x.double(), cos.double(), sin.double(), interleaved=True)
    assert_within_torch_error(got, apply_rope(x, cos, sin, interleaved=True), want, x.abs().max())
    assert got.is_contiguous() and got.shape == x.shape
    # into the tail of wider rows (the absorbed query's q_pe part), the rest untouched
    wide = torch.full((t, h, 512 + r), float("nan"), dtype=dtype, device=DEV)
    y = rope_interleaved(x.to(DEV), cos.to(DEV), sin.to(DEV), out=wide[..., 512:])
    assert y.data_ptr() == wide[..., 512:].data_ptr() and torch.equal(wide[..., 512:].cpu(), got)
    assert wide[..., :512].isnan().all()


@pytest.mark.parametrize("half,scale", [(32, 1.0), (32, 0.8), (8, 1.0), (5, 1.0)])
def test_rope_cos_sin_matches_reference(half, scale):
    """Angles of up to 10^5 radians (positions to 160K): the kernel's cos/sin agree with
    torch's fp32 ones to a few ulps of 1 (both reduce the full range; the products
    position * frequency are the same fp32 roundings)."""
    t = 41
    inv = yarn_inv_freq(2 * half, 10000.0, 40.0, 4096, 163840) if half % 2 == 0 else torch.rand(half)
    pos = torch.cat((torch.tensor([0, 1, 255, 256, 257, 131071]), torch.randint(0, 163840, (t - 6,))))
    cos, sin = norm_rope.rope_cos_sin(pos.to(DEV), inv.to(DEV), scale)
    want_c, want_s = rope_cos_sin(pos, inv)
    assert cos.shape == sin.shape == (t, half) and cos.dtype == torch.float32
    assert torch.allclose(cos.cpu(), want_c * scale, rtol=0, atol=4 * 2.0 ** -24)
    assert torch.allclose(sin.cpu(), want_s * scale, rtol=0, atol=4 * 2.0 ** -24)


def test_dispatch_only_for_gpu_inference():
    x = torch.randn(3, 8)
    assert not fused_inference(x)                         # CPU: the torch ops
    if torch.cuda.is_available():
        xc = x.cuda()
        with torch.no_grad():
            assert fused_inference(xc)
        assert not fused_inference(xc)                    # autograd on: the torch ops (they have backwards)
