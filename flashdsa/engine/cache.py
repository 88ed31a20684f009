"""Block allocator and the paged caches of the engine (SPEC 4).

Every sequence owns a list of physical blocks (pages of ``PAGE_SIZE`` = 64 tokens).
ONE page table serves both caches and every layer: logical position p of a sequence
lives in physical slot ``blocks[p // 64] * 64 + p % 64`` of

- the MLA latent cache, per layer ``[num_blocks, 64, 1, W]`` with W = kv_lora_rank +
  qk_rope_head_dim (576 for V3.2), stored in the model dtype ("auto"), in bf16
  ("bf16") or as the 656-byte "fp8_ds_mla" rows (uint8 ``[num_blocks, 64, 1, 656]``);
- the lightning-indexer key cache, per layer a :class:`flashdsa.PagedIndexerCache`
  (uint8 ``[num_blocks, 64 * (D + 4)]``: in each block the 64 x D e4m3 key bytes, then
  64 fp32 scales, the DeepGEMM / vLLM layout).

The byte layouts are those of flashdsa.layout.
"""
from __future__ import annotations

import itertools
from collections import Counter, OrderedDict

import torch

from .. import api
from ..cache import PagedIndexerCache
from ..layout import MLA_FP8_BYTES, PAGE_SIZE, indexer_block_bytes
from ..backend import resolve_backend
from ..reference.mla_cache import dequantize_mla_cache, latent_rows

KV_CACHE_DTYPES = ("auto", "bf16", "fp8_ds_mla")


class NoFreeBlocks(RuntimeError):
    """Raised by :meth:`BlockAllocator.allocate` when the pool is exhausted."""


ROOT = 0  # the parent key of a sequence's first block


class BlockAllocator:
    """Physical block ids ``0 .. num_blocks - 1``, reference counted, with an optional
    prefix cache.

    Blocks are handed out lowest id first (a deterministic layout makes failures
    reproducible). A block may be held by several sequences at once (a shared prompt
    prefix); :meth:`free` drops one reference of each block it is given.

    Prefix cache (``prefix_caching=True``): once a block's 64 positions are written, its
    sequence registers it (:meth:`register`) under the key (key of the block before it,
    its 64 token ids), so the key of a block stands for every token up to its end. A
    later sequence that starts with the same tokens takes those blocks (:meth:`match`,
    then :meth:`acquire`) instead of computing them. Keys compare the token ids
    themselves (no hash can collide), and the cached rows are what computing the same
    tokens at the same positions writes. A registered block that no sequence holds stays
    cached and counts as free: when a block is needed and no uncached one is free, the
    least recently released cached block is evicted (its key dropped), the end of a
    sequence before its start."""

    def __init__(self, num_blocks: int, prefix_caching: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: expected a positive int, got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # uncached, unheld: a stack, pop() gives the lowest id
        self._refs: dict[int, int] = {}                    # held blocks -> number of holders
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unheld: least recently released first
        self._block_of: dict[tuple, int] = {}               # key -> its cached block
        self._key_of: dict[int, tuple] = {}                 # cached block -> (key, its node id)
        self._nodes = itertools.count(ROOT + 1)

    @property
    def num_free(self) -> int:
        """Blocks :meth:`allocate` can hand out (cached ones no sequence holds included)."""
        return len(self._free) + len(self._idle)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """``n`` block ids, or :class:`NoFreeBlocks` (nothing is taken then)."""
        if n > self.num_free:
            raise NoFreeBlocks(f"asked for {n} blocks, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._idle.popitem(last=False)
                del self._block_of[self._key_of.pop(b)[0]]
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference of each of ``blocks`` (a sequence's list, in order). A block
        no sequence holds then returns to the pool: cached ones as evictable, the last
        of the list first in line."""
        for b, n in Counter(blocks).items():
            if self._refs.get(b, 0) < n:
                raise ValueError(f"block {b} is not allocated (double free?)")
        released = False
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            del self._refs[b]
            if b in self._key_of:
                self._idle[b] = None
            else:
                self._free.append(b)
                released = True
        if released:  # keep the stack ordered so the lowest free id comes out next
            self._free.sort(reverse=True)

    def match(self, tokens: list[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """(blocks, their node ids): the cached blocks that hold the first full blocks of
        ``tokens``, at most ``max_blocks``, up to the first one not cached. Takes nothing
        (see :meth:`acquire`)."""
        blocks, nodes = [], []
        node = ROOT
        for i in range(max_blocks if self.prefix_caching else 0):
            b = self._block_of.get((node, tuple(tokens[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])))
            if b is None:
                break
            node = self._key_of[b][1]
            blocks.append(b)
            nodes.append(node)
        return blocks, nodes

    def num_idle(self, blocks: list[int]) -> int:
        """How many of ``blocks`` are cached blocks no sequence holds (taking them lowers
        :attr:`num_free`)."""
        return sum(b in self._idle for b in blocks)

    def acquire(self, blocks: list[int]) -> None:
        """Take one more reference of each of ``blocks`` (cached blocks from :meth:`match`)."""
        for b in blocks:
            if b in self._idle:
                del self._idle[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1

    def register(self, block: int, parent: int, tokens: list[int]) -> int:
        """Cache held ``block``, whose 64 positions hold ``tokens`` after the block of node
        ``parent`` (ROOT for a sequence's first block); returns its node id, the parent
        of the next block. A block with those contents cached already stays the cached
        one (its node is returned; ``block`` stays uncached); without prefix caching
        nothing is cached and ROOT is returned."""
        if not self.prefix_caching:
            return ROOT
        key = (parent, tuple(tokens))
        held = self._block_of.get(key)
        if held is not None:
            return self._key_of[held][1]
        if self._refs.get(block, 0) < 1:
            raise ValueError(f"block {block} is not allocated: only a held block can be cached")
        if block in self._key_of:
            raise ValueError(f"block {block} is cached already under another key")
        node = next(self._nodes)
        self._block_of[key] = block
        self._key_of[block] = (key, node)
        return node


def blocks_needed(num_tokens: int) -> int:
    return -(-num_tokens // PAGE_SIZE)


class HostBlockTable:
    """A block table ``table [rows, width]`` int32 on the host that is kept across steps:
    row i holds the first n blocks of one sequence's block list (the rest ``fill``), and
    :meth:`set_row` writes only what changed since the last step. A sequence's block list
    grows in place and is replaced by a new list when the sequence is preempted or
    freed, so the list itself (held here) tells whether a row still belongs to it."""

    def __init__(self, table: torch.Tensor, fill: int):
        self.table = table
        self.fill = fill
        self._rows: list[tuple[list | None, int]] = [(None, 0)] * table.shape[0]

    def reset(self) -> None:
        """Every row ``fill`` only."""
        self.table.fill_(self.fill)
        self._rows = [(None, 0)] * self.table.shape[0]

    def set_row(self, i: int, blocks: list | None) -> None:
        """Row i := ``blocks`` (a sequence's block list; None: ``fill`` only)."""
        held, n = self._rows[i]
        if blocks is None:
            if held is not None:
                self.table[i].fill_(self.fill)
                self._rows[i] = (None, 0)
            return
        if held is not blocks:
            self.table[i].fill_(self.fill)
            n = 0
        if len(blocks) > n:
            self.table[i, n:len(blocks)] = torch.tensor(blocks[n:], dtype=torch.int32)
        self._rows[i] = (blocks, len(blocks))


class PagedCaches:
    """The latent cache and the indexer key cache of every layer, one page table.

    Args:
        num_layers, num_blocks: sizes.
        latent_dim: width W of a latent row (kv_lora_rank + qk_rope_head_dim).
        index_dim: indexer key width D (index_head_dim).
        kv_cache_dtype: "auto" (the model dtype, unquantized), "bf16" or "fp8_ds_mla"
            (needs the V3.2 widths 512 + 64).
        model_dtype, device: of the model.
        backend: of the cache writes ("auto": kernels on a GPU).
    """

    def __init__(self, num_layers: int, num_blocks: int, latent_dim: int, index_dim: int,
                 kv_cache_dtype: str = "auto", model_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", kv_lora_rank: int | None = None,
                 backend: str = "auto"):
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: expected one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
        if kv_cache_dtype == "fp8_ds_mla" and (latent_dim != 576 or kv_lora_rank not in (None, 512)):
            raise ValueError("kv_cache_dtype='fp8_ds_mla' stores 512 latent + 64 rope dims a token; this "
                             f"model's latent row is {latent_dim} wide (kv_lora_rank {kv_lora_rank}): "
                             "use 'auto' or 'bf16'")
        self.num_layers, self.num_blocks = num_layers, num_blocks
        self.latent_dim, self.index_dim = latent_dim, index_dim
        self.kv_cache_dtype = kv_cache_dtype
        self.backend = backend
        self.device = torch.device(device)
        if kv_cache_dtype == "fp8_ds_mla":
            self.kv_format = "fp8_ds_mla"
            self.latent = torch.zeros(num_layers, num_blocks, PAGE_SIZE, 1, MLA_FP8_BYTES, dtype=torch.uint8,
                                      device=self.device)
        else:
            # "bf16" is the kernels' name of any unquantized layout; "auto" keeps the model dtype
            self.kv_format = "bf16"
            dt = torch.bfloat16 if kv_cache_dtype == "bf16" else model_dtype
            self.latent = torch.zeros(num_layers, num_blocks, PAGE_SIZE, 1, latent_dim, dtype=dt,
                                      device=self.device)
        self.index = [PagedIndexerCache(num_blocks, index_dim, self.device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, latent_dim: int, index_dim: int, kv_cache_dtype: str,
                        model_dtype: torch.dtype) -> int:
        """Memory of one block over all layers (to size the pool from free memory)."""
        if kv_cache_dtype == "fp8_ds_mla":
            lat = MLA_FP8_BYTES
        else:
            dt = torch.bfloat16 if kv_cache_dtype == "bf16" else model_dtype
            lat = latent_dim * torch.empty((), dtype=dt).element_size()
        return num_layers * (PAGE_SIZE * lat + indexer_block_bytes(index_dim))

    def latent_layer(self, layer: int) -> torch.Tensor:
        return self.latent[layer]

    def index_layer(self, layer: int) -> torch.Tensor:
        """The indexer key cache bytes of ``layer`` (uint8 [num_blocks, 64 * (D + 4)])."""
        return self.index[layer].kv

    def write_latent(self, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store latent rows ``rows [N, W]`` at physical ``slots [N]`` (int64)."""
        flat = self.latent[layer].view(-1, self.latent.shape[-1])
        if self.kv_format == "fp8_ds_mla":
            flat[slots] = api.quantize_mla_cache(rows.contiguous(), backend=self.backend)
        else:
            flat[slots] = rows.to(flat.dtype)

    def write_latent_rows(self, layer: int, slots: torch.Tensor, kv_pe: torch.Tensor, norm, cos: torch.Tensor,
                          sin: torch.Tensor) -> None:
        """Store the latent rows of MLA's kv_a output ``kv_pe [N, c + r]`` at physical
        ``slots [N]``: the latent through ``norm`` (the layer's kv_a_layernorm), k_pe
        rotated by ``cos``/``sin`` [N, r // 2] (flashdsa.reference.mla_cache.latent_rows).
        On the kernels one launch (flashdsa.ops.mla_cache.write_latent_rows), where the
        norm, the RoPE, a cat, the fp8 quantization and an indexed store take one each."""
        r = kv_pe.shape[1] - norm.weight.shape[0]
        if resolve_backend(self.backend, kv_pe) == "triton" and r & (r - 1) == 0 and kv_pe.stride(-1) == 1:
            from ..ops.mla_cache import write_latent_rows
            write_latent_rows(self.latent[layer], self.kv_format, kv_pe, norm.weight, norm.eps, cos, sin, slots)
        else:
            self.write_latent(layer, slots, latent_rows(kv_pe, norm.weight, norm.eps, cos, sin))

    def write_index(self, layer: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Quantize indexer keys ``keys [N, D]`` (one ue8m0 scale a token) and store them at
        physical ``slots [N]`` (unchecked: the engine computed them)."""
        self.index[layer].store(keys, slots, self.backend)

    def read_index(self, layer: int, slots: torch.Tensor):
        """(k8 [N, D] e4m3, k_scale [N] fp32) at physical ``slots [N]`` (all valid)."""
        return self.index[layer].gather(slots)

    def read_latent(self, slots: torch.Tensor, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """Latent rows [N, W] at ``slots`` in ``dtype`` (dequantized for fp8_ds_mla)."""
        flat = self.latent[layer].view(-1, self.latent.shape[-1])
        rows = flat[slots.long()]
        if self.kv_format == "fp8_ds_mla":
            return dequantize_mla_cache(rows, dtype)
        return rows.to(dtype)
