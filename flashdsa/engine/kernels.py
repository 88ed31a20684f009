"""The engine's view of the paged ops: the public ops of flashdsa.api (Triton kernels
on a GPU) with a lean reference for CPU runs.

The reference of the attention gathers only the distinct cache rows the step uses
(the public reference dequantizes the whole cache), so CPU tests stay fast.
"""
from __future__ import annotations

import torch

from .. import api
from .. import reference as ref
from ..backend import resolve_backend
from ..reference import paged_indexer as ref_paged


def use_kernels(x: torch.Tensor, backend: str) -> bool:
    """True when ``backend`` resolves to the Triton kernels for tensors like ``x``."""
    return resolve_backend(backend, x) == "triton"


def quantize_mla_cache(rows: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Latent rows [N, 576] -> fp8_ds_mla bytes [N, 656] uint8 (SPEC 4)."""
    return api.quantize_mla_cache(rows, backend=backend)


def dequantize_mla_cache(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8_ds_mla bytes [N, 656] -> rows [N, 576] in ``dtype`` (exact in bf16)."""
    from ..reference.mla_cache import dequantize_mla_cache as fn
    return fn(rows, dtype)


def indexer_cache_write(cache: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor,
                        backend: str = "auto") -> None:
    """Quantize indexer keys [N, D] (one ue8m0 scale a token, SPEC 1) into ``cache``
    uint8 [num_blocks, 64 * (D + 4)] at physical ``slots [N]``."""
    if use_kernels(keys, backend):
        from ..ops.paged_indexer import indexer_cache_write as kernel
        kernel(cache, keys.contiguous(), slots.contiguous())
    else:
        ref_paged.indexer_cache_write(cache, keys, slots)


def paged_indexer_topk(q8: torch.Tensor, cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                       block_table: torch.Tensor, topk: int, backend: str = "auto") -> torch.Tensor:
    """Decode top-k over the paged key cache: [B * next_n, topk] int32 physical slots."""
    return api.paged_indexer_topk(q8, cache, weights, context_lens, block_table, topk, backend=backend)


def sparse_mla_paged(q: torch.Tensor, caches, layer: int, indices: torch.Tensor, sm_scale: float, d_v: int,
                     backend: str = "auto") -> torch.Tensor:
    """Sparse attention of packed queries over a paged latent cache.

    q [T, H, W]; indices [T, topk] int32 physical slots (-1 = unused). Returns
    out [T, H, d_v] in q.dtype. The kernel path runs ``sparse_mla_decode`` over all T
    queries as one batch entry with s_q = T (it is the prefill kernel on paged rows);
    the reference gathers the distinct rows in use and runs the reference
    ``sparse_mla_fwd`` on them."""
    if use_kernels(q, backend):
        out, _ = api.sparse_mla_decode(q[None], caches.latent_layer(layer), indices[None], sm_scale, d_v,
                                       caches.kv_format, backend=backend)
        return out[0]
    valid = indices >= 0
    used, inverse = torch.unique(indices[valid].long(), return_inverse=True)
    rows = caches.read_latent(used, layer, q.dtype)               # [U, W]
    local = torch.full_like(indices, -1)
    local[valid] = inverse.to(local.dtype)
    out, _, _ = ref.sparse_mla_fwd(q, rows[:, None, :], local[:, None, :], sm_scale, d_v)
    return out
