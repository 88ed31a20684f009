"""The byte layouts of DSA's paged caches (SPEC 4), shared by the references, the
kernels' launchers, the caches and the engine. Plain PyTorch: no Triton needed.

Pages hold ``PAGE_SIZE`` = 64 tokens. Logical position p of a sequence whose block table
row is ``bt`` lives at physical slot ``bt[p // 64] * 64 + p % 64``; -1 marks an unused slot.

fp8_ds_mla, one MLA latent row ``[c (512) | k_pe (64)]`` in ``MLA_FP8_BYTES`` = 656 bytes:

    bytes   0..511  c as e4m3, 4 tiles of 128 dims
    bytes 512..527  the 4 tiles' fp32 scales, each a power of two
    bytes 528..655  k_pe, 64 bf16 values, not quantized

The indexer key cache (DeepGEMM / vLLM layout), uint8 ``[num_blocks, 64 * (D + 4)]``
(64 * 132 bytes for D = 128): in each block the 64 x D e4m3 key bytes, token after
token, then 64 fp32 scales, one a token.
"""
from __future__ import annotations

import torch

PAGE_SIZE = 64

MLA_D_NOPE, MLA_D_ROPE, MLA_TILE = 512, 64, 128
MLA_N_TILES = MLA_D_NOPE // MLA_TILE
MLA_FP8_BYTES = MLA_D_NOPE + 4 * MLA_N_TILES + 2 * MLA_D_ROPE  # 656
MLA_SCALE_OFF = MLA_D_NOPE // 4  # first scale, in fp32 elements of a row
MLA_ROPE_OFF = (MLA_D_NOPE + 4 * MLA_N_TILES) // 2  # first rope value, in bf16 elements of a row


def mla_byte_views(rows: torch.Tensor):
    """The three typed views of fp8_ds_mla rows ``[N, 656]`` uint8 sharing one storage:
    (e4m3 [N, 656], fp32 [N, 164], bf16 [N, 328]); the scales are fp32 columns
    ``MLA_SCALE_OFF..+4``, the rope values bf16 columns ``MLA_ROPE_OFF..+64``."""
    return rows.view(torch.float8_e4m3fn), rows.view(torch.float32), rows.view(torch.bfloat16)


def indexer_block_bytes(head_dim: int, page_size: int = PAGE_SIZE) -> int:
    """Bytes of one indexer cache block: ``page_size`` keys of ``head_dim`` e4m3 bytes
    plus an fp32 scale each."""
    return page_size * (head_dim + 4)


def indexer_cache_views(cache: torch.Tensor, head_dim: int, page_size: int = PAGE_SIZE):
    """Views of an indexer cache ``[num_blocks, page_size * (head_dim + 4)]`` uint8 as its
    key bytes ``[num_blocks, page_size, head_dim]`` and scale bytes ``[num_blocks, page_size, 4]``."""
    nb = cache.shape[0]
    keys = cache[:, : page_size * head_dim].view(nb, page_size, head_dim)
    scales = cache[:, page_size * head_dim:].view(nb, page_size, 4)
    return keys, scales
