"""act_quant / Hadamard / RoPE references against independent formulations."""
import math

import pytest
import torch

import flashdsa
from tests.utils import requires_cuda
from flashdsa.reference import (
    apply_rope,
    rope_cos_sin,
    yarn_inv_freq,
    yarn_softmax_scale,
)


@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_act_quant_round_trip_within_fp8_bound(scale_fmt):
    x = torch.randn(7, 3, 256) * torch.logspace(-3, 2, 256)  # wide dynamic range inside each block
    x[0, 0, :128] = 0.0                                      # an all-zero block uses the amax floor
    q, scale = flashdsa.act_quant(x, 128, scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (7, 3, 2)
    amax = x.abs().unflatten(-1, (2, 128)).amax(-1).clamp_min(1e-4)
    assert (scale >= amax / 448 * (1 - 1e-6)).all()          # no clamping needed
    if scale_fmt == "ue8m0":
        log2 = torch.log2(scale)
        assert torch.equal(log2, log2.round()), "ue8m0 scales must be powers of two"
        assert (scale < 2 * amax / 448).all()                 # rounded up by less than 2x
    deq = flashdsa.act_dequant(q, scale, 128)
    # e4m3: 3 mantissa bits -> half-ulp error 2^-4 |v| for normals, 2^-10 absolute for subnormals,
    # in units of the block scale.
    s = scale.repeat_interleave(128, dim=-1)
    bound = s * torch.maximum((x / s).abs() * 2.0 ** -4, torch.full_like(x, 2.0 ** -10))
    assert ((deq - x).abs() <= bound * (1 + 1e-6)).all()
    assert (deq[0, 0, :128] == 0).all()


def _sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_hadamard_orthonormal_self_inverse(n):
    eye = torch.eye(n, dtype=torch.float64)
    h = flashdsa.hadamard_transform(eye)
    torch.testing.assert_close(h, _sylvester(n) / math.sqrt(n), rtol=0, atol=1e-14)
    torch.testing.assert_close(h @ h.T, eye, rtol=0, atol=1e-13)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    torch.testing.assert_close(flashdsa.hadamard_transform(flashdsa.hadamard_transform(x)), x)
    torch.testing.assert_close(flashdsa.hadamard_transform(x).norm(), x.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_hadamard_matrix_path_matches_butterfly(dtype):
    """The GPU path of flashdsa.hadamard_transform (x @ the cached matrix) is the same
    transform as the reference butterfly: exact in float64; in bf16 within the rounding
    of the butterfly's log2(n) stages."""
    from flashdsa import api
    from flashdsa import reference as ref
    x = torch.randn(7, 3, 128, dtype=torch.float64)
    h = api.hadamard_matrix(128, torch.float64, "cpu")
    assert api.hadamard_matrix(128, torch.float64, "cpu") is h  # cached
    with torch.inference_mode():  # first built under inference mode: still usable by autograd
        h2 = api.hadamard_matrix(64, torch.float64, "cpu")
    assert not h2.is_inference()
    torch.testing.assert_close(x @ h, ref.hadamard_transform(x), rtol=0, atol=1e-13)
    want = ref.hadamard_transform(x)
    got = x.to(dtype) @ api.hadamard_matrix(128, dtype, "cpu")
    butterfly = ref.hadamard_transform(x.to(dtype))
    err = float((got.double() - want).norm() / want.norm())
    assert err <= max(float((butterfly.double() - want).norm() / want.norm()), 1e-15), err


@requires_cuda
def test_gpu_hadamard_auto_uses_the_matrix():
    x = torch.randn(33, 128, device="cuda", dtype=torch.bfloat16)
    want = flashdsa.hadamard_transform(x.double().cpu())
    got = flashdsa.hadamard_transform(x).double().cpu()
    assert float((got - want).norm() / want.norm()) < 4e-3


def test_yarn_scale_and_frequencies():
    assert abs(yarn_softmax_scale(192, 40.0, 1.0, 4096, 163840) - 0.13523) < 5e-6
    assert yarn_softmax_scale(192, 40.0, 1.0, 4096, 4096) == 192 ** -0.5  # within the original context
    plain = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    torch.testing.assert_close(yarn_inv_freq(64, dtype=torch.float64), plain)
    yarn = yarn_inv_freq(64, 10000.0, 40.0, 4096, 163840, 32, 1, dtype=torch.float64)
    # High frequencies (fast rotating, first dims) kept, low frequencies divided by the factor.
    torch.testing.assert_close(yarn[:4], plain[:4])
    torch.testing.assert_close(yarn[-4:], plain[-4:] / 40)
    assert ((yarn <= plain * (1 + 1e-12)) & (yarn >= plain / 40 * (1 - 1e-12))).all()


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_matches_complex_rotation(interleaved):
    t, h, d = 9, 3, 16
    x = torch.randn(t, h, d, dtype=torch.float64)
    pos = torch.randint(0, 5000, (t,))
    inv = yarn_inv_freq(d, 10000.0, 40.0, 64, 8192, 32, 1, dtype=torch.float64)
    cos, sin = rope_cos_sin(pos, inv)
    got = apply_rope(x, cos, sin, interleaved)
    rot = torch.polar(torch.ones_like(cos), pos[:, None].double() * inv[None, :])[:, None, :]  # [t, 1, d/2]
    if interleaved:
        z = torch.view_as_complex(x.unflatten(-1, (d // 2, 2)).contiguous())
        want = torch.view_as_real(z * rot).flatten(-2)
    else:
        z = torch.complex(x[..., : d // 2], x[..., d // 2:])
        zr = z * rot
        want = torch.cat((zr.real, zr.imag), -1)
    torch.testing.assert_close(got, want)
