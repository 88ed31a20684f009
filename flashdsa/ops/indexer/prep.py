"""The indexer's FP8 operands from its raw projections, in one launch (SPEC 1):

- queries: q = wq_b(qr) [T, H, D] -> RoPE on the first R dims (half-split) -> Hadamard ->
  e4m3 with one ue8m0 scale a (token, head), and the scores' head weights folded with
  that scale: w' = weights_proj(x) * H^-0.5 * scale * D^-0.5 (what the scores kernels take);
- keys: k = wk(x) [T, D] -> LayerNorm -> RoPE -> Hadamard -> e4m3 + ue8m0 scale, stored
  into the paged key cache at each token's slot.

The reference is the indexer's own torch path (``LightningIndexer.project``, then
``act_quant`` and ``PagedIndexerCache.store``), which runs each step as its own kernels
(about 25 launches for the queries and 17 for the keys): at decode sizes each launch
costs more than its work, so one kernel does both, its first programs the query rows
and the rest the key rows. Intermediate roundings follow
the reference: RoPE and the LayerNorm in fp32 rounded to the input dtype, the Hadamard
as a product with the same cached matrix (``flashdsa.api.hadamard_matrix``), fp32
accumulation, rounded to the input dtype, then the quantization of
``flashdsa.reference.act_quant``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout import PAGE_SIZE
from ..common import interpreted, pdl_launch, pdl_prologue, quantize_rows_ue8m0, round_as
from .paged import store_key_rows


@triton.jit
def _prep_rows(pid, x_ptr, cos_ptr, sin_ptr, had_ptr, ln_w_ptr, ln_b_ptr, w_ptr, q8_ptr, wout_ptr,
               slot_ptr, cache_ptr, cscale_ptr, n_rows, heads, stride_xt, stride_wt, stride_cs, eps,
               w_mul, d_mul, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, KEYS: tl.constexpr,
               PAGE: tl.constexpr, UPCAST: tl.constexpr):
    """Rows pid * BLOCK.. of x (row r is head r % heads of token r // heads, at x_ptr +
    token * stride_xt + head * D; keys: heads = 1). KEYS=False: q8 [n_rows, D] e4m3 bytes
    and wout [n_rows] = w [n_rows] * w_mul * scale * d_mul. KEYS=True: LayerNorm (ln_w,
    ln_b, eps) first, then the bytes and scale of each row go to the paged cache at
    slot_ptr[token] (negative: skipped)."""
    r = pid * BLOCK + tl.arange(0, BLOCK)
    ok = r < n_rows
    rr = r.to(tl.int64)
    t = rr // heads
    xrow = t * stride_xt + (rr % heads) * D
    d = tl.arange(0, D)
    half: tl.constexpr = R // 2
    # the RoPE partner of dim d < R: d + R/2 in the first half, d - R/2 in the second
    dp = tl.where(d < half, d + half, tl.where(d < R, d - half, d))
    m2 = ok[:, None] & (d[None, :] < D)
    x = tl.load(x_ptr + xrow[:, None] + d[None, :], mask=m2, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    xp = tl.load(x_ptr + xrow[:, None] + dp[None, :], mask=m2, other=0.0).to(tl.float32)
    if KEYS:
        mean = tl.sum(xf, axis=1) / D
        xc = xf - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        xf = (xc * rstd[:, None] * tl.load(ln_w_ptr + d)[None, :].to(tl.float32)
              + tl.load(ln_b_ptr + d)[None, :].to(tl.float32))
        xp = ((xp - mean[:, None]) * rstd[:, None] * tl.load(ln_w_ptr + dp)[None, :].to(tl.float32)
              + tl.load(ln_b_ptr + dp)[None, :].to(tl.float32))
        xf, xp = round_as(xf, dt), round_as(xp, dt)
    j = tl.where(d < half, d, d - half)
    rope = d < R
    cs = tl.load(cos_ptr + t[:, None] * stride_cs + j[None, :], mask=ok[:, None] & rope[None, :], other=1.0)
    sn = tl.load(sin_ptr + t[:, None] * stride_cs + j[None, :], mask=ok[:, None] & rope[None, :], other=0.0)
    # first half: x1 cos - x2 sin; second half: x1 sin + x2 cos (x1 = dim d - R/2)
    lo = (d < half)[None, :]
    y = round_as(tl.where(rope[None, :], tl.where(lo, xf * cs - xp * sn, xp * sn + xf * cs), xf), dt)
    h = tl.load(had_ptr + d[:, None] * D + d[None, :])
    if UPCAST:  # fp32 inputs, or the interpreter (whose bf16 dot is wrong): exact products either way
        y = tl.dot(y, h.to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(y.to(dt), h.to(dt))
    y = round_as(y, dt)
    y8, scale = quantize_rows_ue8m0(y)
    if KEYS:
        slot = tl.load(slot_ptr + t, mask=ok, other=-1).to(tl.int64)
        store_key_rows(cache_ptr, cscale_ptr, slot, ok & (slot >= 0), y8, scale, d, D, PAGE)
    else:
        tl.store(q8_ptr + rr[:, None] * D + d[None, :], y8.to(tl.uint8), mask=m2)
        w = tl.load(w_ptr + t * stride_wt + rr % heads, mask=ok, other=0.0).to(tl.float32)
        tl.store(wout_ptr + rr, w * w_mul * scale * d_mul, mask=ok)


@triton.jit
def indexer_prep_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, had_ptr, ln_w_ptr, ln_b_ptr, w_ptr, q8_ptr, wout_ptr,
                        slot_ptr, cache_ptr, cscale_ptr, n_q, n_k, heads, stride_qt, stride_kt, stride_wt,
                        stride_cs, eps, w_mul, d_mul, D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                        PAGE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr = False):
    """Programs below cdiv(n_q, BLOCK): BLOCK of the n_q = T * heads query rows; the
    rest: BLOCK of the n_k = T key rows (see :func:`_prep_rows`). PDL: see
    flashdsa.ops.common.pdl_prologue (the scores kernels of the top-k come next)."""
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    n_qp = tl.cdiv(n_q, BLOCK)
    if pid < n_qp:
        _prep_rows(pid, q_ptr, cos_ptr, sin_ptr, had_ptr, ln_w_ptr, ln_b_ptr, w_ptr, q8_ptr, wout_ptr, slot_ptr,
                   cache_ptr, cscale_ptr, n_q, heads, stride_qt, stride_wt, stride_cs, eps, w_mul, d_mul,
                   D, R, BLOCK, False, PAGE, UPCAST)
    else:
        _prep_rows(pid - n_qp, k_ptr, cos_ptr, sin_ptr, had_ptr, ln_w_ptr, ln_b_ptr, w_ptr, q8_ptr, wout_ptr,
                   slot_ptr, cache_ptr, cscale_ptr, n_k, 1, stride_kt, stride_wt, stride_cs, eps, w_mul, d_mul,
                   D, R, BLOCK, True, PAGE, UPCAST)


def indexer_operands(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, norm: torch.nn.LayerNorm,
                     cos: torch.Tensor, sin: torch.Tensor, rope_dim: int, hadamard: torch.Tensor,
                     kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexer's scoring operands from its raw projections, in one launch (inputs
    assumed valid: D a power of two >= 16, q and k of one dtype):

    - returns (q8 [T, H, D] e4m3, weights [T, H] fp32) from the queries q = wq_b(qr)
      [T, H, D] (heads and dims contiguous, any token stride) and head weights
      weights = weights_proj(x) [T, H] (last dim contiguous): RoPE over the first
      ``rope_dim`` dims (half-split; cos/sin [T, rope_dim / 2] fp32), the Hadamard
      rotation (``hadamard`` [D, D]: H_D / sqrt(D) in q's dtype), one ue8m0 e4m3 scale
      a (token, head), and weights * H^-0.5 * scale * D^-0.5;
    - stores the keys k = wk(x) [T, D] (last dim contiguous) into the paged key cache
      kv_cache uint8 [num_blocks, 64 * (D + 4)] at ``slots [T]`` (< 0: skipped):
      LayerNorm ``norm`` (fp32), RoPE, Hadamard, e4m3 with one ue8m0 scale a token."""
    t, h, d = q.shape
    q8 = torch.empty(t, h, d, dtype=torch.float8_e4m3fn, device=q.device)
    w_out = torch.empty(t, h, dtype=torch.float32, device=q.device)
    if t == 0:
        return q8, w_out
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    n_q, n_k = t * h, k.shape[0]
    block = 16 if interpreted() else (32 if n_q <= 4096 else 64)
    indexer_prep_kernel[(triton.cdiv(n_q, block) + triton.cdiv(n_k, block),)](
        q, k, cos, sin, hadamard, norm.weight, norm.bias, weights, q8.view(torch.uint8), w_out,
        slots.contiguous(), kv_cache, kv_cache.view(torch.float32), n_q, n_k, h, q.stride(0), k.stride(0),
        weights.stride(0), cos.stride(0), norm.eps, h ** -0.5, d ** -0.5, D=d, R=rope_dim, BLOCK=block,
        PAGE=PAGE_SIZE, UPCAST=q.dtype == torch.float32 or interpreted(), num_warps=4, **pdl_launch(q.device))
    return q8, w_out
