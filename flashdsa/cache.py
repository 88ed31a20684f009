"""The lightning indexer's paged key cache (SPEC 4), one implementation for the public
API and the engine.

``PagedIndexerCache`` holds the key cache in the DeepGEMM / vLLM layout (flashdsa.layout):
uint8 [num_blocks, 64 * (D + 4)], each block = 64 x D e4m3 key bytes followed by 64 fp32
scales (64 * 132 bytes for D = 128). Keys enter through :meth:`write`, which quantizes
them (one ue8m0-scaled e4m3 block of D a token, SPEC 1) straight into that layout; the
paged indexer ops read it by block table.
"""
from __future__ import annotations

import torch
from torch import nn

from ._validate import FLOAT_DTYPES, check, check_tensor
from .backend import resolve_backend
from .layout import PAGE_SIZE, indexer_block_bytes
from .reference import paged_indexer as ref


class PagedIndexerCache(nn.Module):
    """Indexer key cache of ``num_blocks`` pages of 64 tokens.

    Args:
        num_blocks: physical blocks (pages) in the pool.
        head_dim: indexer key width d_I (128 for DeepSeek-V3.2).
        device: where the buffer lives.

    The buffer ``kv`` (uint8 [num_blocks, 64 * (head_dim + 4)]) is a registered
    buffer, so ``.to(device)`` moves it and ``state_dict`` carries it.
    A token at logical position p of a sequence whose block table row is ``bt``
    lives at physical slot ``bt[p // 64] * 64 + p % 64``.

    :meth:`write`, :meth:`write_fp8` and :meth:`read` check their arguments;
    :meth:`store` and :meth:`gather` are the same paths without the checks (no host
    sync: what the engine's CUDA-graph decode step calls, with slots it computed).
    """

    def __init__(self, num_blocks: int, head_dim: int = 128, device: torch.device | str | None = None):
        super().__init__()
        check(num_blocks > 0 and head_dim > 0 and head_dim % 4 == 0, ValueError,
              f"PagedIndexerCache: expected num_blocks > 0 and head_dim a positive multiple of 4, "
              f"got num_blocks={num_blocks}, head_dim={head_dim}")
        self.num_blocks = num_blocks
        self.head_dim = head_dim
        self.register_buffer("kv", torch.zeros(num_blocks, indexer_block_bytes(head_dim), dtype=torch.uint8,
                                               device=device))

    def _check_slots(self, slots: torch.Tensor, n: int) -> None:
        check_tensor("slots", slots, ndim=1, dtypes=(torch.int32, torch.int64), shape=(n,), device=self.kv.device,
                     layout="[N] physical slots (-1 = skip)")
        if n and not torch.compiler.is_compiling():
            check(int(slots.max()) < self.num_blocks * PAGE_SIZE, ValueError,
                  f"slots: expected values < num_blocks * 64 = {self.num_blocks * PAGE_SIZE}, got {int(slots.max())}")

    def write(self, k: torch.Tensor, slots: torch.Tensor, backend: str = "auto") -> None:
        """Quantize keys k [N, head_dim] (after RoPE and Hadamard) to e4m3 with one
        power-of-two scale a token and store them at physical ``slots [N]``; slots < 0
        are skipped (padding tokens)."""
        check_tensor("k", k, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, self.head_dim), device=self.kv.device,
                     layout="[N, head_dim]")
        self._check_slots(slots, k.shape[0])
        self.store(k, slots, backend)

    def store(self, k: torch.Tensor, slots: torch.Tensor, backend: str = "auto") -> None:
        """:meth:`write` without the argument checks (valid k and slots assumed)."""
        if resolve_backend(backend, k) == "triton":
            from .ops.indexer import indexer_cache_write
            indexer_cache_write(self.kv, k.contiguous(), slots.contiguous())
        else:
            ref.indexer_cache_write(self.kv, k, slots)

    def write_fp8(self, k8: torch.Tensor, k_scale: torch.Tensor, slots: torch.Tensor) -> None:
        """Store already quantized keys k8 [N, head_dim] e4m3 with scales k_scale [N] fp32."""
        check_tensor("k8", k8, ndim=2, dtypes=(torch.float8_e4m3fn,), shape=(None, self.head_dim),
                     device=self.kv.device, layout="[N, head_dim]")
        check_tensor("k_scale", k_scale, ndim=1, dtypes=(torch.float32,), shape=(k8.shape[0],),
                     device=self.kv.device, layout="[N]")
        self._check_slots(slots, k8.shape[0])
        ref.indexer_cache_write_fp8(self.kv, k8, k_scale, slots)

    def read(self, slots: torch.Tensor):
        """(k8 [N, head_dim] e4m3, k_scale [N] fp32) stored at valid physical ``slots``."""
        self._check_slots(slots, slots.shape[0])
        return self.gather(slots)

    def gather(self, slots: torch.Tensor):
        """:meth:`read` without the argument checks (valid slots assumed)."""
        return ref.indexer_cache_read(self.kv, slots, self.head_dim)
