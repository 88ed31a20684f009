"""The public ops: validate inputs once, then dispatch to a Triton kernel or the reference.

Every op takes ``backend="auto" | "triton" | "reference"``, sparse_mla_fwd also "gluon"
(see flashdsa.backend).
Shapes follow SPEC.md: batches are flattened into the token axis and described by
per-row candidate ranges [ks, ke) or by ``cu_seqlens``.
"""
from __future__ import annotations

import torch

from . import reference as ref
from ._validate import FLOAT_DTYPES, check, check_cu_seqlens, check_range, check_same_dtype, check_tensor
from .backend import resolve_backend
from .layout import PAGE_SIZE, indexer_block_bytes

FP8_OR_FLOAT = (torch.float8_e4m3fn,) + FLOAT_DTYPES
SCALE_DTYPES = (torch.float32, torch.float64)


def _reference_only(op: str, backend: str, x: torch.Tensor) -> None:
    """For ops that have no Triton kernel: accept "auto"/"reference", refuse "triton"
    (on any device: the answer does not depend on where triton could run)."""
    if backend == "triton":
        raise NotImplementedError(f"{op}: there is no Triton kernel for this op; use backend='reference'")
    resolve_backend(backend, x)  # validates the name


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = "ue8m0", backend: str = "auto"):
    """Block-wise e4m3 quantization of ``x [..., D]`` (SPEC 1): returns
    ``(x_fp8 [..., D], scale [..., D // block_size] fp32)``. See reference.act_quant."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check(x.dim() >= 1 and x.shape[-1] % block_size == 0, ValueError,
          f"x: last dim must be a multiple of block_size={block_size}, got shape {tuple(x.shape)}")
    _reference_only("act_quant", backend, x)
    return ref.act_quant(x, block_size, scale_fmt)


def act_dequant(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int = 128, backend: str = "auto"):
    """fp32 values of an :func:`act_quant` result."""
    check_tensor("x_fp8", x_fp8, dtypes=(torch.float8_e4m3fn,))
    d = x_fp8.shape[-1]
    check(d % block_size == 0, ValueError, f"x_fp8: last dim {d} must be a multiple of block_size={block_size}")
    check_tensor("scale", scale, dtypes=SCALE_DTYPES, shape=(*x_fp8.shape[:-1], d // block_size),
                 device=x_fp8.device)
    _reference_only("act_dequant", backend, x_fp8)
    return ref.act_dequant(x_fp8, scale, block_size)


_HADAMARD: dict = {}


def hadamard_matrix(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """H_n / sqrt(n) [n, n] (Sylvester order), cached per (n, dtype, device) outside
    torch.compile (where it is rebuilt, a constant of the graph)."""
    key = (n, dtype, torch.device(device))
    h = None if torch.compiler.is_compiling() else _HADAMARD.get(key)
    if h is None:
        with torch.inference_mode(False):  # a normal tensor, usable by autograd later
            h = ref.hadamard_transform(torch.eye(n, dtype=torch.float64, device=device)).to(dtype)
        if not torch.compiler.is_compiling():
            _HADAMARD[key] = h
    return h


def hadamard_transform(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (a power of two).

    ``backend="auto"`` on a GPU multiplies by the cached matrix (one GEMM, fp32
    accumulation, rounded once) instead of the reference's log2(n) butterfly stages
    (3 log2(n) small kernels, each rounding to x's dtype): the same transform, fewer
    launches for the decode step."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    n = x.shape[-1] if x.dim() else 0
    check(n >= 1 and n & (n - 1) == 0, ValueError,
          f"x: last dim must be a power of two for the Hadamard transform, got {n}")
    _reference_only("hadamard_transform", backend, x)
    if backend == "auto" and x.is_cuda:
        return x @ hadamard_matrix(n, x.dtype, x.device)
    return ref.hadamard_transform(x)


def _check_indexer_inputs(q8, k8, k_scale, weights, ks, ke):
    check_tensor("q8", q8, ndim=3, dtypes=FP8_OR_FLOAT, layout="[S, H, D]")
    s, h, d = q8.shape
    check_tensor("k8", k8, ndim=2, dtypes=(q8.dtype,), shape=(None, d), device=q8.device,
                 layout="[S_kv, D] (same dtype and D as q8)")
    s_kv = k8.shape[0]
    check_tensor("k_scale", k_scale, dtypes=SCALE_DTYPES, shape=(s_kv,), device=q8.device, layout="[S_kv]")
    check_tensor("weights", weights, dtypes=SCALE_DTYPES, shape=(s, h), device=q8.device, layout="[S, H]")
    for name, t in (("ks", ks), ("ke", ke)):
        check_tensor(name, t, dtypes=(torch.int32,), shape=(s,), device=q8.device, layout="[S] int32")
    check_range("ks/ke", ks, ke, s_kv)


def indexer_logits(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                   ks: torch.Tensor, ke: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Lightning-indexer scores [S, S_kv] fp32, -inf outside each row's [ks, ke) (SPEC 1).
    As DeepGEMM ``fp8_mqa_logits``, except: the keys come as two arguments (not a (k, k_scale)
    tuple), the ranges must lie in [0, S_kv], and there is no compressed ``max_seqlen_k`` form;
    ``flashdsa.compat.deep_gemm.fp8_mqa_logits`` matches it exactly.

    q8 [S, H, D] e4m3 (unscaled), k8 [S_kv, D] e4m3, k_scale [S_kv] fp32, weights [S, H]
    fp32 with the q scales and D^-0.5 folded in, ks/ke [S] int32 with 0 <= ks <= ke <= S_kv.
    """
    _check_indexer_inputs(q8, k8, k_scale, weights, ks, ke)
    if resolve_backend(backend, q8) == "triton":
        from .ops.indexer import indexer_logits as kernel
        return kernel(q8, k8, k_scale, weights, ks, ke)
    return ref.indexer_logits(q8, k8, k_scale, weights, ks, ke)


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int,
                 backend: str = "auto") -> torch.Tensor:
    """[S, topk] int32 indices of the largest ``logits [S, S_kv]`` inside each row's
    [ks, ke), -1 padded (SPEC 2). Arguments in the order of :func:`indexer_topk`."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, layout="[S, S_kv]")
    check(isinstance(topk, int) and topk > 0, ValueError, f"topk: expected a positive int, got {topk!r}")
    s, s_kv = logits.shape
    for name, t in (("ks", ks), ("ke", ke)):
        check_tensor(name, t, dtypes=(torch.int32,), shape=(s,), device=logits.device, layout="[S] int32")
    check_range("ks/ke", ks, ke, s_kv)
    _reference_only("topk_indices", backend, logits)
    return ref.topk_indices(logits, ks, ke, topk)


def indexer_topk(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                 ks: torch.Tensor, ke: torch.Tensor, topk: int, backend: str = "auto",
                 chunk: int = 256) -> torch.Tensor:
    """Top-k of the indexer scores without materializing [S, S_kv] (the Triton path
    writes the scores of short rows a chunk of at most 256 MiB at a time): [S, topk]
    int32, -1 padded. Arguments as :func:`indexer_logits`. The reference path scores ``chunk``
    query rows at a time (memory O(chunk * S_kv))."""
    _check_indexer_inputs(q8, k8, k_scale, weights, ks, ke)
    check(isinstance(topk, int) and topk > 0, ValueError, f"topk: expected a positive int, got {topk!r}")
    if resolve_backend(backend, q8) == "triton":
        from .ops.indexer import indexer_topk as kernel
        return kernel(q8, k8, k_scale, weights, ks, ke, topk)
    out = torch.empty(q8.shape[0], topk, dtype=torch.int32, device=q8.device)
    for t0 in range(0, q8.shape[0], chunk):
        t1 = min(t0 + chunk, q8.shape[0])
        logits = ref.indexer_logits(q8[t0:t1], k8, k_scale, weights[t0:t1], ks[t0:t1], ke[t0:t1])
        out[t0:t1] = ref.topk_indices(logits, ks[t0:t1], ke[t0:t1], topk)
    return out


def _check_sm_scale(sm_scale) -> None:
    """``sm_scale`` has no default: the right one depends on the model (absorbed MLA uses
    (qk_nope + qk_rope)^-0.5 times YaRN's mscale^2, not d_qk^-0.5), as in FlashMLA."""
    check(sm_scale is not None, ValueError,
          "sm_scale: required, got None; pass the softmax scale, e.g. (qk_nope_head_dim + qk_rope_head_dim)"
          " ** -0.5 * mscale ** 2 for absorbed MLA (flashdsa.reference.yarn_softmax_scale); d_qk ** -0.5 is"
          " wrong there")


def _check_mla_inputs(q, kv, d_v):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, layout="[s_q, h_q, d_qk]")
    d_qk = q.shape[2]
    check_tensor("kv", kv, ndim=3, shape=(None, 1, d_qk), dtypes=FLOAT_DTYPES, device=q.device,
                 layout="[s_kv, 1, d_qk] (one latent head, d_qk as q)")
    check_same_dtype(q=q, kv=kv)
    check(isinstance(d_v, int) and 0 < d_v <= d_qk, ValueError,
          f"d_v: expected an int in [1, d_qk={d_qk}], got {d_v!r}")


PROBS_PRECISIONS = ("e4m3", "fp16")


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                   d_v: int = 512, backend: str = "auto", return_probs: bool = False,
                   probs_precision: str = "e4m3"):
    """Sparse MLA attention, absorbed/MQA form (SPEC 3). As FlashMLA ``flash_mla_sparse_fwd``,
    except: ``max_logits`` and ``lse`` are in natural-log units (FlashMLA returns both in base 2,
    of the logits times log2(e)); ``flashdsa.compat.flash_mla.flash_mla_sparse_fwd`` matches it exactly.

    Args:
        q: [s_q, h_q, d_qk] query heads (bf16 on GPU; any float on the reference).
        kv: [s_kv, 1, d_qk] latent rows; the value is the first ``d_v`` dims.
        indices: [s_q, 1, topk] int32 rows of kv per query; -1 or >= s_kv are skipped.
        sm_scale: softmax scale, required (DeepSeek-V3.2: (128 + 64)^-0.5 times YaRN's
            mscale^2, see flashdsa.reference.yarn_softmax_scale).
        d_v: value width (512 for DeepSeek-V3.2).
        backend: "auto": on an sm_90 GPU the Gluon kernel where it takes the shape (bf16,
            d_qk 576, d_v 512, h_q a multiple of 64, no ``return_probs``), the portable
            Triton kernel on other GPUs and shapes, the reference on CPU; "triton", "gluon"
            (fails clearly where it cannot run) or "reference" force one.
        return_probs: also return ``probs [s_q, topk]`` fp32, the attention probability of
            each slot averaged over the heads (0 at invalid slots, not differentiable): the
            target of the sparse-stage indexer loss (:func:`sparse_kl_loss_from_probs`),
            computed from the forward's own softmax instead of a second q.k pass.
        probs_precision: the Triton forward's scratch for those probabilities: "e4m3"
            (the default, what MLA's sparse training stage uses: 1 byte per (query, head,
            slot); each head's probability rounded to 2^-4 relative, values below 2^-14 of
            their block's max lost) or "fp16" (2 bytes; 2^-11 relative rounding). The
            reference is exact either way.

    Returns:
        (out [s_q, h_q, d_v] in q.dtype, max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32)
        (+ probs); a query with no valid index gets out 0, max_logits -inf and lse +inf.
    """
    _check_mla_inputs(q, kv, d_v)
    check_tensor("indices", indices, ndim=3, dtypes=(torch.int32,), shape=(q.shape[0], 1, None),
                 device=q.device, layout="[s_q, 1, topk] int32")
    check(indices.shape[2] > 0, ValueError, "indices: topk (last dim) must be at least 1")
    _check_sm_scale(sm_scale)
    check(probs_precision in PROBS_PRECISIONS, ValueError,
          f"probs_precision: expected one of {PROBS_PRECISIONS}, got {probs_precision!r}")
    chosen = resolve_backend(backend, q, gluon=True)
    if chosen == "gluon":
        from .ops.sparse_mla.fwd_sm90 import gluon_fwd_supported

        why = gluon_fwd_supported(q, kv, d_v) or (
            "the Gluon kernel does not return probabilities (return_probs=True takes backend='triton')"
            if return_probs else None)
        check(why is None, ValueError, f"backend='gluon': {why}")
    if chosen != "reference":
        # differentiable in q and kv (and lse): custom ops + autograd, torch.compile-traceable
        from .ops.sparse_mla import sparse_mla_fwd as kernel
        return kernel(q, kv, indices, sm_scale, d_v, return_probs=return_probs, probs_precision=probs_precision,
                      impl="auto" if backend == "auto" else chosen)
    return ref.sparse_mla_fwd(q, kv, indices, sm_scale, d_v, return_probs=return_probs)


def dense_mla_fwd(q: torch.Tensor, kv: torch.Tensor, cu_seqlens: torch.Tensor, sm_scale: float,
                  d_v: int = 512, backend: str = "auto"):
    """Causal dense MLA attention (absorbed form) over sequences packed along the token
    axis: q [T, h_q, d_qk], kv [T, 1, d_qk], cu_seqlens [B + 1] int32 (0, ..., T),
    sm_scale required (as :func:`sparse_mla_fwd`). Returns (out [T, h_q, d_v], lse [T, h_q])."""
    _check_mla_inputs(q, kv, d_v)
    check(kv.shape[0] == q.shape[0], ValueError,
          f"kv: expected as many rows as q ({q.shape[0]}) for causal attention, got {kv.shape[0]}")
    check_cu_seqlens(cu_seqlens, q.shape[0])
    _check_sm_scale(sm_scale)
    _reference_only("dense_mla_fwd", backend, q)
    return ref.dense_mla_fwd(q, kv, cu_seqlens, sm_scale, d_v)



MLA_CACHE_FORMATS = ("bf16", "fp8_ds_mla")


def _check_mla_cache(kv_cache, kv_format, device):
    check(kv_format in MLA_CACHE_FORMATS, ValueError,
          f"kv_format: expected one of {MLA_CACHE_FORMATS}, got {kv_format!r}")
    if kv_format == "bf16":
        check_tensor("kv_cache", kv_cache, dtypes=FLOAT_DTYPES, device=device,
                     layout="[num_blocks, 64, 1, d_qk] for kv_format='bf16'")
    else:
        check_tensor("kv_cache", kv_cache, dtypes=(torch.uint8,), device=device,
                     layout="[num_blocks, 64, 1, 656] uint8 for kv_format='fp8_ds_mla'")
    check(kv_cache.dim() in (3, 4) and kv_cache.shape[1] == 64 and (kv_cache.dim() == 3 or kv_cache.shape[2] == 1),
          ValueError, f"kv_cache: expected shape [num_blocks, 64, 1, D] (or [num_blocks, 64, D]), "
          f"got {tuple(kv_cache.shape)}")
    check(kv_format == "bf16" or kv_cache.shape[-1] == 656, ValueError,
          f"kv_cache: fp8_ds_mla rows are 656 bytes, got last dim {kv_cache.shape[-1]}")


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      sm_scale: float, d_v: int = 512, kv_format: str = "bf16",
                      backend: str = "auto"):
    """Sparse MLA decode over a paged latent cache (SPEC 4). As FlashMLA ``flash_mla_with_kvcache``
    with ``indices``, except: lse is [b, s_q, h_q] (FlashMLA's [b, h_q, s_q]), the fp8 cache is
    uint8 (FlashMLA's is float8_e4m3fn bytes), ``sm_scale`` has no default, and there is no dense
    (block_table) mode; ``flashdsa.compat.flash_mla.flash_mla_with_kvcache`` matches it exactly.

    Args:
        q: [b, s_q, h_q, d_qk] decode queries (s_q 1, or 2 for MTP steps).
        kv_cache: pages of 64 tokens: [num_blocks, 64, 1, d_qk] bf16 for ``kv_format="bf16"``,
            or [num_blocks, 64, 1, 656] uint8 for ``"fp8_ds_mla"`` (d_qk 576, d_v 512; see
            :func:`quantize_mla_cache`).
        indices: [b, s_q, topk] int32 physical slots (``block_table[b, pos // 64] * 64 +
            pos % 64``); -1 or >= num_blocks * 64 are skipped.
        sm_scale: softmax scale, required (as :func:`sparse_mla_fwd`). d_v: value width.

    Returns:
        (out [b, s_q, h_q, d_v] in q.dtype, lse [b, s_q, h_q] fp32, natural log; +inf and
        out 0 for a query with no valid index). The Triton path dequantizes fp8 rows in
        registers and splits the top-k range over programs when b * s_q is small.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, layout="[b, s_q, h_q, d_qk]")
    b, s_q, _, d_qk = q.shape
    _check_mla_cache(kv_cache, kv_format, q.device)
    if kv_format == "bf16":
        check(kv_cache.shape[-1] == d_qk, ValueError,
              f"kv_cache: expected last dim d_qk={d_qk} (as q), got {kv_cache.shape[-1]}")
    else:
        check(d_qk == 576 and d_v == 512, ValueError,
              f"fp8_ds_mla holds 576-wide rows with d_v 512: got d_qk={d_qk}, d_v={d_v}")
    check(isinstance(d_v, int) and 0 < d_v <= d_qk, ValueError,
          f"d_v: expected an int in [1, d_qk={d_qk}], got {d_v!r}")
    check_tensor("indices", indices, ndim=3, dtypes=(torch.int32,), shape=(b, s_q, None), device=q.device,
                 layout="[b, s_q, topk] int32 physical slots")
    check(indices.shape[2] > 0, ValueError, "indices: topk (last dim) must be at least 1")
    _check_sm_scale(sm_scale)
    if resolve_backend(backend, q) == "triton":
        from .ops.sparse_mla import sparse_mla_decode as kernel
        return kernel(q, kv_cache, indices, sm_scale, d_v, kv_format)
    from .reference.sparse_mla import sparse_mla_decode as reference
    return reference(q, kv_cache, indices, sm_scale, d_v, kv_format)


def quantize_mla_cache(kv: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """576-wide latent rows ``kv [..., 576]`` -> fp8_ds_mla bytes ``[..., 656]`` uint8 (SPEC 4):
    512 e4m3 bytes in 4 tiles of 128 with power-of-two fp32 scales, then 64 bf16 rope values."""
    check_tensor("kv", kv, dtypes=FLOAT_DTYPES, layout="[..., 576]")
    check(kv.dim() >= 1 and kv.shape[-1] == 576, ValueError,
          f"kv: expected last dim 576 (512 latent + 64 rope), got shape {tuple(kv.shape)}")
    if resolve_backend(backend, kv) == "triton":
        from .ops.mla_cache import quantize_mla_cache as kernel
        return kernel(kv)
    from .reference.mla_cache import quantize_mla_cache as reference
    return reference(kv)


def dequantize_mla_cache(cache: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         backend: str = "auto") -> torch.Tensor:
    """fp8_ds_mla bytes ``[..., 656]`` uint8 -> rows ``[..., 576]`` in ``dtype``."""
    check_tensor("cache", cache, dtypes=(torch.uint8,), layout="[..., 656] uint8")
    check(cache.dim() >= 1 and cache.shape[-1] == 656, ValueError,
          f"cache: expected last dim 656 (fp8_ds_mla bytes), got shape {tuple(cache.shape)}")
    check(dtype in FLOAT_DTYPES, TypeError, f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    if resolve_backend(backend, cache) == "triton":
        from .ops.mla_cache import dequantize_mla_cache as kernel
        return kernel(cache, dtype)
    from .reference.mla_cache import dequantize_mla_cache as reference
    return reference(cache, dtype)


def _check_paged_indexer_inputs(q8, kv_cache, weights, context_lens, block_table):
    check_tensor("q8", q8, ndim=4, dtypes=(torch.float8_e4m3fn,), layout="[B, next_n, H, D] e4m3")
    bsz, next_n, h, d = q8.shape
    check(next_n in (1, 2), ValueError, f"q8: next_n (dim 1) must be 1 or 2, got {next_n}")
    check_tensor("kv_cache", kv_cache, ndim=2, dtypes=(torch.uint8,), shape=(None, indexer_block_bytes(d)),
                 device=q8.device, layout=f"[num_blocks, 64 * (D + 4)] uint8 (D = {d})")
    check(kv_cache.is_contiguous(), ValueError, "kv_cache: expected a contiguous tensor")
    check_tensor("weights", weights, ndim=2, dtypes=SCALE_DTYPES, shape=(bsz * next_n, h), device=q8.device,
                 layout="[B * next_n, H]")
    check_tensor("context_lens", context_lens, ndim=1, dtypes=(torch.int32,), shape=(bsz,), device=q8.device,
                 layout="[B] int32")
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), shape=(bsz, None), device=q8.device,
                 layout="[B, max_blocks] int32")
    if bsz and not torch.compiler.is_compiling():
        cmax = int(context_lens.max())
        check(int(context_lens.min()) >= 0 and cmax <= block_table.shape[1] * PAGE_SIZE, ValueError,
              f"context_lens: expected values in [0, max_blocks * 64 = {block_table.shape[1] * PAGE_SIZE}], "
              f"got [{int(context_lens.min())}, {cmax}]")


def paged_indexer_logits(q8: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor,
                         max_context_len: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Decode index scores over the paged indexer key cache (SPEC 4). As DeepGEMM
    ``fp8_paged_mqa_logits``, except: the key cache is 2-d [num_blocks, 64 * (D + 4)] (DeepGEMM's
    [num_blocks, block_kv, 1, D + 4] is a view of the same bytes), ``context_lens`` is [B] only with
    next_n 1 or 2, there is no schedule metadata, and -inf is always written outside each query's
    range; ``flashdsa.compat.deep_gemm.fp8_paged_mqa_logits`` matches it exactly.

    Args:
        q8: [B, next_n, H, D] e4m3 queries, next_n 1 or 2 tokens a sequence.
        kv_cache: uint8 [num_blocks, 64 * (D + 4)] (flashdsa.PagedIndexerCache.kv).
        weights: [B * next_n, H] fp32, q scales and D^-0.5 folded in.
        context_lens: [B] int32 tokens of each sequence (the new ones included).
        block_table: [B, max_blocks] int32 physical block of each logical page.
        max_context_len: width of the result (default max_blocks * 64).

    Returns:
        [B * next_n, max_context_len] fp32 over logical positions; query j of sequence b
        sees positions [0, context_lens[b] - next_n + j], -inf elsewhere.
    """
    _check_paged_indexer_inputs(q8, kv_cache, weights, context_lens, block_table)
    width = block_table.shape[1] * PAGE_SIZE if max_context_len is None else max_context_len
    check(isinstance(width, int) and width >= 0, ValueError,
          f"max_context_len: expected a non-negative int, got {max_context_len!r}")
    if resolve_backend(backend, q8) == "triton":
        from .ops.indexer import paged_indexer_logits as kernel
        return kernel(q8, kv_cache, weights, context_lens, block_table, width)
    from .reference.paged_indexer import paged_indexer_logits as reference
    return reference(q8, kv_cache, weights, context_lens, block_table, width)


def paged_indexer_topk(q8: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                       context_lens: torch.Tensor, block_table: torch.Tensor, topk: int,
                       backend: str = "auto") -> torch.Tensor:
    """[B * next_n, topk] int32 PHYSICAL slots (block * 64 + row, what sparse_mla_decode
    takes) of each decode query's top-k keys, -1 padded; arguments as
    :func:`paged_indexer_logits`. The Triton path materializes the scores of short rows
    only, a chunk at a time (memory O(B * next_n * topk) beyond a fixed bound)."""
    _check_paged_indexer_inputs(q8, kv_cache, weights, context_lens, block_table)
    check(isinstance(topk, int) and topk > 0, ValueError, f"topk: expected a positive int, got {topk!r}")
    if resolve_backend(backend, q8) == "triton":
        from .ops.indexer import paged_indexer_topk as kernel
        return kernel(q8, kv_cache, weights, context_lens, block_table, topk)
    from .reference.paged_indexer import paged_indexer_topk as reference
    return reference(q8, kv_cache, weights, context_lens, block_table, topk)


# The indexer's KL losses (SPEC 5): its training objective against the main attention.

LOSS_REDUCTIONS = ("sum", "mean", "none")


def _check_loss_inputs(iq, ik, weights, reduction, attention=None, indices=None, ks=None, ke=None,
                       attn_probs=None) -> None:
    """The loss arguments' shapes, dtypes and devices: an error naming the argument instead
    of a wrong answer or, in a kernel, a read out of bounds. ``attention``: (q, kv, lse,
    sm_scale) of the losses that recompute the target. Out-of-range ks/ke and indices are
    normal inputs (only the key rows in [0, S) count), so their values are not checked."""
    from ._validate import INDEX_DTYPES

    check_tensor("iq", iq, ndim=3, dtypes=FLOAT_DTYPES, layout="[T, H_I, d_I]")
    t, h_i, d_i = iq.shape
    dev = iq.device
    check_tensor("ik", ik, ndim=2, shape=(None, d_i), dtypes=FLOAT_DTYPES, device=dev, layout="[S, d_I] (d_I as iq)")
    check_same_dtype(iq=iq, ik=ik)
    check_tensor("weights", weights, ndim=2, shape=(t, h_i), dtypes=FLOAT_DTYPES, device=dev, layout="[T, H_I]")
    s = ik.shape[0]
    if attention is not None:
        q, kv, lse, sm_scale = attention
        check_tensor("q", q, ndim=3, shape=(t, None, None), dtypes=FLOAT_DTYPES, device=dev, layout="[T, H, d_qk]")
        check_tensor("kv", kv, ndim=3, shape=(s, 1, q.shape[2]), dtypes=FLOAT_DTYPES, device=dev,
                     layout="[S, 1, d_qk] (S as ik, d_qk as q)")
        check_same_dtype(q=q, kv=kv)
        if lse is not None:
            check_tensor("lse", lse, ndim=2, shape=(t, q.shape[1]), dtypes=FLOAT_DTYPES, device=dev, layout="[T, H]")
        check(isinstance(sm_scale, (int, float)) and not isinstance(sm_scale, bool), TypeError,
              f"sm_scale: expected a float (the attention's softmax scale), got {type(sm_scale).__name__}")
    if indices is not None:
        check_tensor("indices", indices, dtypes=INDEX_DTYPES, device=dev, layout="[T, 1, topk] or [T, topk]",
                     shape=(t, 1, None) if indices.dim() == 3 else (t, None))
    if attn_probs is not None:
        check_tensor("attn_probs", attn_probs, ndim=2, shape=(t, indices.shape[-1]), dtypes=FLOAT_DTYPES,
                     device=dev, layout="[T, topk] (topk as indices)")
    for name, x in (("ks", ks), ("ke", ke)):
        if x is not None:
            check_tensor(name, x, ndim=1, shape=(t,), dtypes=INDEX_DTYPES, device=dev, layout="[T]")
    check(reduction in LOSS_REDUCTIONS, ValueError,
          f"reduction: expected one of {LOSS_REDUCTIONS}, got {reduction!r}")


def warmup_kl_loss(iq: torch.Tensor, ik: torch.Tensor, weights: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                   lse: torch.Tensor | None, sm_scale: float, ks: torch.Tensor, ke: torch.Tensor,
                   reduction: str = "sum", backend: str = "auto") -> torch.Tensor:
    """The dense warm-up stage's indexer loss (SPEC 5): ``sum_t KL(p[t] || softmax(I[t]))``
    over each query row's causal range of key rows ``[ks[t], ke[t])``.

    The target ``p[t, s] = (1/H) sum_h exp(sm_scale q[t,h].kv[s] - lse[t,h])`` is the
    head-mean attention probability, L1-normalized over the range; the index scores are
    ``I[t, s] = sum_j weights[t, j] ReLU(iq[t, j].ik[s])``. The Triton path walks the ranges
    in blocks and never materializes ``[T, S]`` (nor ``[H, T, S]``); the reference does.

    Args:
        iq: [T, H_I, d_I] the indexer's queries (bf16 on a GPU; any float on the reference).
        ik: [S, d_I] the indexer's keys, dtype of ``iq``.
        weights: [T, H_I] the indexer's head weights (fp32), scales folded in.
        q: [T, H, d_qk] the attention's (absorbed) queries. kv: [S, 1, d_qk] its latent rows,
            dtype of ``q``.
        lse: [T, H] the attention's natural-log logsumexp over the same ranges, or None to
            compute it here (one more pass over the logits; for an attention that returns
            none, like SDPA).
        sm_scale: the attention's softmax scale.
        ks, ke: [T] int32/int64, the range of row t; key rows outside [0, S) do not count,
            and a row whose range holds none adds 0.
        reduction: "sum" (SPEC 5's form), "mean" (over the T rows) or "none" (the [T] per-row KL).
        backend: "auto" (Triton on CUDA tensors, the reference otherwise), "triton" or "reference".

    Returns:
        The loss, fp32 (float64 for float64 inputs on the reference): a scalar, or [T] for
        ``reduction="none"``. Gradients flow to ``iq``, ``ik`` and ``weights`` only: q, kv
        and lse are a detached target.
    """
    _check_loss_inputs(iq, ik, weights, reduction, attention=(q, kv, lse, sm_scale), ks=ks, ke=ke)
    if resolve_backend(backend, iq) == "triton":
        from .ops.indexer_loss import warmup_kl_loss as kernel
        return kernel(iq, ik, weights, q, kv, lse, sm_scale, ks, ke, reduction)
    from .reference.indexer_loss import warmup_kl_loss as reference
    return reference(iq, ik, weights, q, kv, lse, sm_scale, ks, ke, reduction)


def sparse_kl_loss(iq: torch.Tensor, ik: torch.Tensor, weights: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                   lse: torch.Tensor | None, sm_scale: float, indices: torch.Tensor, reduction: str = "sum",
                   backend: str = "auto") -> torch.Tensor:
    """The sparse stage's indexer loss (SPEC 5), its target recomputed from the attention's
    inputs: the KL restricted to each row's selected slots ``indices[t]`` (both
    distributions renormalized over them).

    Arguments and result as :func:`warmup_kl_loss`, with ``indices`` [T, 1, topk] or
    [T, topk] int32/int64 (the sparse attention's; -1 or >= S skipped, a row listed twice
    counts twice, as in the attention) in place of ks/ke, and ``lse`` the sparse attention's
    (None: computed here over the valid slots). When the attention is flashdsa's
    :func:`sparse_mla_fwd`, :func:`sparse_kl_loss_from_probs` with its ``return_probs``
    output gives the same loss without a second pass over q.kv.
    """
    _check_loss_inputs(iq, ik, weights, reduction, attention=(q, kv, lse, sm_scale), indices=indices)
    if resolve_backend(backend, iq) == "triton":
        from .ops.indexer_loss import sparse_kl_loss as kernel
        return kernel(iq, ik, weights, q, kv, lse, sm_scale, indices, reduction)
    from .reference.indexer_loss import sparse_kl_loss as reference
    return reference(iq, ik, weights, q, kv, lse, sm_scale, indices, reduction)


def sparse_kl_loss_from_probs(iq: torch.Tensor, ik: torch.Tensor, weights: torch.Tensor, attn_probs: torch.Tensor,
                              indices: torch.Tensor, reduction: str = "sum", backend: str = "auto") -> torch.Tensor:
    """The sparse stage's indexer loss with the target given: only the index scores are
    computed.

    ``attn_probs`` [T, topk] (any float dtype, detached) is the head-mean attention
    probability of each slot of ``indices`` [T, 1, topk] or [T, topk], as
    ``sparse_mla_fwd(..., return_probs=True)`` returns it; any nonnegative weights work,
    they are L1-normalized over each row's valid slots. Other arguments and the result as
    :func:`sparse_kl_loss`; gradients flow to ``iq``, ``ik`` and ``weights`` only.
    """
    _check_loss_inputs(iq, ik, weights, reduction, indices=indices, attn_probs=attn_probs)
    if resolve_backend(backend, iq) == "triton":
        from .ops.indexer_loss import sparse_kl_loss_from_probs as kernel
        return kernel(iq, ik, weights, attn_probs, indices, reduction)
    from .reference.indexer_loss import sparse_kl_loss_from_probs as reference
    return reference(iq, ik, weights, attn_probs, indices, reduction)
