"""The indexer's fused FP8 operand kernel (flashdsa.ops.indexer.prep) against the
indexer's torch path: RoPE, LayerNorm, Hadamard product and act_quant as separate ops,
with the Hadamard product in float64 (the kernel accumulates in fp32 and rounds once,
like the GPU's matrix product; the CPU reference's butterfly rounds at every stage).

A value one rounding away from a bf16 or e4m3 boundary may land on the other side
under another summation order: the tests allow that for a small share of the
elements (each off by one e4m3 step at most), and nothing else."""
import pytest
import torch
import torch.nn.functional as F

from flashdsa import api
from flashdsa.cache import PagedIndexerCache
from flashdsa.ops.indexer.prep import indexer_operands
from flashdsa.reference import act_quant
from flashdsa.reference import paged_indexer as pref
from flashdsa.reference.rope import apply_rope, rope_cos_sin, yarn_inv_freq
from tests.utils import KERNEL_DEVICE

DEV = KERNEL_DEVICE
FLIP_SHARE = 0.01   # elements allowed one e4m3 step apart (a bf16/e4m3 rounding tie broken the other way)


def rotate(x: torch.Tensor, cos, sin, rope_dim: int) -> torch.Tensor:
    """The indexer's RoPE (half-split on the first rope_dim dims) then the Hadamard
    product in float64, rounded to x's dtype once."""
    x = torch.cat((apply_rope(x[..., :rope_dim], cos, sin, interleaved=False), x[..., rope_dim:]), dim=-1)
    h = api.hadamard_matrix(x.shape[-1], x.dtype, x.device)
    return (x.double() @ h.double()).to(x.dtype)


def assert_close_fp8(q8, scale, q8_ref, scale_ref):
    """Same scales but where a row's max moved, and dequantized values equal but for at
    most FLIP_SHARE of the elements, each within one e4m3 step (2^-3 relative, or the
    subnormal step 2^-9 of the scale)."""
    same_scale = scale == scale_ref
    assert same_scale.float().mean() >= 1 - FLIP_SHARE, f"scales differ in {int((~same_scale).sum())} rows"
    v = q8.float() * scale[..., None]
    r = q8_ref.float() * scale_ref[..., None]
    diff = (v - r).abs()
    step = torch.maximum(r.abs() * 2.0 ** -3, scale_ref[..., None] * 2.0 ** -9) * 1.001
    assert bool((diff <= step).all()), f"max error {float((diff - step).max())} past one e4m3 step"
    assert float((diff > 0).float().mean()) <= FLIP_SHARE, f"{float((diff > 0).float().mean()):.4f} of values differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,h,d,rope", [(1, 64, 128, 64), (37, 5, 64, 32), (19, 3, 128, 64)])
def test_q_fp8_matches_torch_path(dtype, t, h, d, rope):
    inv = yarn_inv_freq(rope, 10000.0)
    cos, sin = rope_cos_sin(torch.randint(0, 100000, (t,)), inv)
    # token-strided views, like the column blocks of a merged projection's output
    q = (torch.randn(t, h * d + 16) * 3)[:, 16:].view(t, h, d).mul_(torch.rand(t, h, 1)).to(dtype)
    q = torch.cat((torch.zeros(t, 8, dtype=dtype), q.flatten(1)), dim=1)[:, 8:].view(t, h, d)
    w = torch.cat((torch.randn(t, h).to(dtype), torch.zeros(t, 3, dtype=dtype)), dim=1)[:, :h]
    spare = PagedIndexerCache(t // 64 + 1, d, device=DEV)   # the keys' half of the launch (test_k_to_cache)
    q8, w_out = indexer_operands(q.to(DEV), w.to(DEV), torch.randn(t, d, dtype=dtype, device=DEV),
                                 torch.nn.LayerNorm(d).to(DEV), cos.to(DEV), sin.to(DEV), rope,
                                 api.hadamard_matrix(d, dtype, DEV), spare.kv, torch.arange(t, device=DEV))
    q8_ref, scale_ref = act_quant(rotate(q, cos, sin, rope), d)
    scale_ref = scale_ref[..., 0]
    # the folded weights carry the kernel's scale: recover it from them, then compare both
    scale = (w_out.cpu() / ((w.float() * h ** -0.5) * d ** -0.5))
    ok = w.float() != 0
    assert torch.equal(scale[ok], scale_ref[ok]) or (scale[ok] != scale_ref[ok]).float().mean() <= FLIP_SHARE
    assert_close_fp8(q8.cpu(), torch.where(ok, scale, scale_ref), q8_ref, scale_ref)
    w_ref = w.float() * h ** -0.5 * scale_ref * d ** -0.5
    same = scale == scale_ref
    assert torch.equal(w_out.cpu()[same], w_ref[same])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,d,rope", [(1, 128, 64), (45, 128, 64), (23, 64, 32)])
def test_k_to_cache_matches_torch_path(dtype, t, d, rope):
    norm = torch.nn.LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.3)
    inv = yarn_inv_freq(rope, 10000.0)
    cos, sin = rope_cos_sin(torch.randint(0, 100000, (t,)), inv)
    k = torch.cat((torch.zeros(t, 5), torch.randn(t, d) * 3 + torch.randn(t, 1)), dim=1).to(dtype)[:, 5:]
    blocks = t // 64 + 3
    slots = torch.randperm(blocks * 64)[:t]
    slots[1::7] = -1                                  # padding tokens: nothing written
    kn = F.layer_norm(k.float(), (d,), norm.weight.float(), norm.bias.float(), norm.eps).to(dtype)
    cache = PagedIndexerCache(blocks, d, device=DEV)
    cache.kv.fill_(0x5A)                             # poison: the written bytes must all be new
    h = 3   # the queries' half of the launch (test_q_fp8)
    q8, _ = indexer_operands(torch.randn(t, h, d, dtype=dtype, device=DEV), torch.randn(t, h, device=DEV),
                             k.to(DEV), norm.to(DEV), cos.to(DEV), sin.to(DEV), rope,
                             api.hadamard_matrix(d, dtype, DEV), cache.kv, slots.to(DEV))
    assert q8.shape == (t, h, d)
    ref_cache = PagedIndexerCache(blocks, d)
    ref_cache.kv.fill_(0x5A)
    pref.indexer_cache_write(ref_cache.kv, rotate(kn, cos, sin, rope).float(), slots)
    got, ref = cache.kv.cpu(), ref_cache.kv
    written = slots[slots >= 0]
    k8, sc = pref.indexer_cache_read(got, written, d)
    k8_ref, sc_ref = pref.indexer_cache_read(ref, written, d)
    assert_close_fp8(k8, sc, k8_ref, sc_ref)
    # every other byte (padding tokens' slots, unused rows) untouched
    mask = torch.ones(blocks * 64, dtype=torch.bool)
    mask[written] = False
    untouched = mask.nonzero()[:, 0]
    k8_u, _ = pref.indexer_cache_read(got, untouched, d)
    assert bool((k8_u.view(torch.uint8) == 0x5A).all())
