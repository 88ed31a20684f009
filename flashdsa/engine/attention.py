"""One MLA + DSA attention layer over the paged caches: the engine's attention step.

The queries of one engine step are packed along one axis: prefill chunks and decode
tokens of several sequences together (``x [T, hidden]``). For each layer this

1. runs the MLA projections of the new tokens (the lead's :class:`flashdsa.layers.MLA`
   weights, same math as ``MLA.forward``),
2. writes their latent rows and indexer keys into the paged caches,
3. picks, for each query at position p, the key positions it attends to:
   all of [0, p] when p + 1 <= index_topk (the top-k of that few candidates is all
   of them, so this "dense path" is exact and skips the indexer), else the indexer's
   top-k over the cached keys of its sequence (on the kernels: the paged top-k for the
   sequences with one new token, together; a prefill chunk's keys gathered per
   sequence for the ragged top-k),
4. runs sparse MLA attention (absorbed form) over those physical slots and maps the
   latent output back through W_UV and o_proj.

Kernels (paged indexer top-k, sparse MLA decode, cache writes) are used on a GPU when
they exist, through the public ops of flashdsa.api; otherwise everything falls back to
the references (:func:`sparse_mla_paged` has a lean one of its own).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import api
from .. import reference as ref
from ..backend import resolve_backend
from ..reference.paged_indexer import logical_slots
from .cache import PAGE_SIZE, PagedCaches


@dataclass
class StepMetadata:
    """Where the packed tokens of one step come from and go to.

    positions [T] int64: position of each new token in its sequence.
    slots [T] int64: physical cache slot of each new token.
    token_seq [T] int64: index (0..B-1) of each token's sequence in this step.
    block_table [B, max_blocks] int32: physical blocks of each sequence (0-padded).
    context_lens [B] int32: cached tokens of each sequence after this step.
    query_start: python list [B + 1], offsets of each sequence's tokens in the packed axis.
    context_host: python list [B], context_lens on the host (no device sync to read it);
    the new tokens of sequence b are positions context_host[b] - (query_start[b + 1] -
    query_start[b]) .. context_host[b] - 1.
    """
    positions: torch.Tensor
    slots: torch.Tensor
    token_seq: torch.Tensor
    block_table: torch.Tensor
    context_lens: torch.Tensor
    query_start: list
    context_host: list

    @property
    def num_seqs(self) -> int:
        return len(self.query_start) - 1

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token."""
        return self.positions.shape[0] == self.num_seqs

    def sparse_rows(self, b: int, topk: int) -> range:
        """Packed rows of sequence b whose query needs the indexer (position + 1 > topk)."""
        t0, t1 = self.query_start[b], self.query_start[b + 1]
        first = self.context_host[b] - (t1 - t0)           # position of row t0
        return range(t0 + max(0, min(t1 - t0, topk - first)), t1)

    def slots_of(self, b: int, n: int) -> torch.Tensor:
        """Physical slots [n] of positions 0..n-1 of sequence b."""
        return logical_slots(self.block_table, b, n)


def dense_indices(meta: StepMetadata, topk: int) -> torch.Tensor:
    """[T, topk] int32: physical slots of positions 0..p of each query (p < topk), -1 after."""
    dev = meta.positions.device
    j = torch.arange(topk, device=dev)                                         # logical key positions
    width = meta.block_table.shape[1]
    blk = meta.block_table[meta.token_seq][:, (j // PAGE_SIZE).clamp(max=width - 1)]   # [T, topk]
    phys = blk.long() * PAGE_SIZE + j % PAGE_SIZE
    return torch.where(j[None, :] <= meta.positions[:, None], phys, -1).to(torch.int32)


def paged_select(q8: torch.Tensor, weights: torch.Tensor, icache: torch.Tensor, context_lens: torch.Tensor,
                 block_table: torch.Tensor, topk: int, max_context_len: int) -> torch.Tensor:
    """Selection of one-token queries (q8 [R, H_I, D], weights [R, H_I]) by the paged
    indexer kernel over their sequences' cached keys (context_lens [R], block_table
    [R, blocks]), at most ``max_context_len`` positions, with no host synchronization (a
    CUDA graph can capture it). A row with position + 1 <= topk gets every slot of its
    context (the top-k of at most topk keys), the set :func:`dense_indices` gives."""
    from ..ops.indexer import paged_indexer_topk
    return paged_indexer_topk(q8[:, None].contiguous(), icache, weights.contiguous(), context_lens, block_table,
                              topk, max_context_len=max_context_len)


def index_operands(indexer, x, qr, cos, sin, raw, meta: StepMetadata, caches: PagedCaches, layer: int,
                   kernels: bool):
    """Write the new tokens' indexer keys into the key cache; return (the queries q8
    [T, H_I, D] e4m3, weights [T, H_I] fp32 with the q scales and D^-0.5 folded in), as
    the scores take them. ``raw``: the indexer's projections (q, k, weights) of
    LightningIndexer.project_raw. ``kernels``: the fused kernels of
    flashdsa.ops.indexer.prep (one launch), else the indexer's torch path."""
    d = indexer.head_dim
    if kernels and d >= 16:   # (the kernel's Hadamard product is a tl.dot: 16 wide at least)
        from ..ops.indexer.prep import indexer_operands
        q, k, w = raw
        return indexer_operands(q, w, k, indexer.k_norm, cos, sin, indexer.rope_dim,
                                api.hadamard_matrix(d, q.dtype, q.device), caches.index_layer(layer), meta.slots)
    q, k, weights = indexer.project(x, qr, cos, sin, raw)   # [T, H_I, D], [T, D], [T, H_I] fp32
    caches.write_index(layer, meta.slots, k)
    q8, q_scale = api.act_quant(q, d)                    # [T, H, D] e4m3, [T, H, 1]
    return q8, weights * q_scale[..., 0] * d ** -0.5


def select_indices(attn, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   meta: StepMetadata, caches: PagedCaches, layer: int, backend: str,
                   static: bool = False, raw=None) -> torch.Tensor:
    """Write the indexer keys of the new tokens, then return the attended physical slots
    [T, topk] int32 (-1 padded) of every query (see the module docstring, step 3).
    ``static``: a decode step captured in a CUDA graph (:func:`paged_select` for every
    row, over block_table.shape[1] * 64 positions; an eager decode step on the kernels
    selects the same way)."""
    indexer = attn.indexer
    topk = indexer.topk
    kernels = resolve_backend(backend, x) == "triton"
    if raw is None:
        raw = indexer.project_raw(x, qr)
    q8, weights = index_operands(indexer, x, qr, cos, sin, raw, meta, caches, layer, kernels)
    if static or (meta.is_decode and kernels):
        # one query per sequence: the paged kernel scores the cache in place, for every
        # row (a row within top-k selects its whole context), with no host sync
        return paged_select(q8, weights, caches.index_layer(layer), meta.context_lens, meta.block_table, topk,
                            meta.block_table.shape[1] * PAGE_SIZE)
    indices = dense_indices(meta, topk)
    rows_of = [meta.sparse_rows(b, topk) for b in range(meta.num_seqs)]
    if not any(len(r) for r in rows_of):
        return indices
    # sequences with one new token (decodes beside a prefill chunk): on the kernels, one
    # paged top-k over all their cached keys, as a decode step runs it
    single = [b for b, r in enumerate(rows_of) if kernels and len(r) == 1 and
              meta.query_start[b + 1] - meta.query_start[b] == 1]
    if single:
        rows = torch.tensor([meta.query_start[b] for b in single], device=x.device)
        seqs = torch.tensor(single, device=x.device)
        indices[rows] = paged_select(q8[rows], weights[rows], caches.index_layer(layer), meta.context_lens[seqs],
                                     meta.block_table[seqs], topk, max(meta.context_host[b] for b in single))
    done = set(single)
    for b, r in enumerate(rows_of):
        if not len(r) or b in done:
            continue
        n = meta.context_host[b]
        slots = meta.slots_of(b, n)                              # [n] logical -> physical
        k8, k_scale = caches.read_index(layer, slots)           # [n, D], [n]
        rows = slice(r.start, r.stop)
        ke = (meta.positions[rows] + 1).to(torch.int32)
        ks = torch.zeros_like(ke)
        logical = api.indexer_topk(q8[rows], k8, k_scale, weights[rows], ks, ke, topk, backend=backend)
        indices[rows] = torch.where(logical >= 0, slots[logical.long().clamp(min=0)], -1).to(torch.int32)
    return indices


def sparse_mla_paged(q: torch.Tensor, caches: PagedCaches, layer: int, indices: torch.Tensor, sm_scale: float,
                     d_v: int, backend: str = "auto") -> torch.Tensor:
    """Sparse attention of packed queries over a paged latent cache.

    q [T, H, W]; indices [T, topk] int32 physical slots (-1 = unused). Returns
    out [T, H, d_v] in q.dtype. The kernel path runs ``sparse_mla_decode`` over all T
    queries as one batch entry with s_q = T (it is the prefill kernel on paged rows);
    the reference gathers the distinct rows in use and runs the reference
    ``sparse_mla_fwd`` on them (the public reference dequantizes the whole cache)."""
    if resolve_backend(backend, q) == "triton":
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


def paged_mla_attention(attn, x: torch.Tensor, meta: StepMetadata, caches: PagedCaches, layer: int,
                        backend: str = "auto", static: bool = False,
                        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The attention sub-layer of ``layer`` for packed new tokens ``x [T, hidden]``
    (already normed). ``attn`` is a :class:`flashdsa.layers.MLA`. Returns [T, hidden].
    ``static``: a decode step with no host synchronization, for CUDA graph capture
    (kernels only; see engine/cuda_graph.py). ``cos_sin``: the RoPE cos/sin of
    ``meta.positions`` (:meth:`MLA.rope_cos_sin`), computed once for every layer of a
    step (:func:`run_layers`); None: computed here."""
    cos, sin = cos_sin if cos_sin is not None else attn.rope_cos_sin(meta.positions)
    qr, q, kv_pe, raw = attn.project_inputs(x, indexer_raw=True)
    caches.write_latent_rows(layer, meta.slots, kv_pe, attn.kv_a_layernorm, cos, sin)
    q_full, w_uv = attn.absorbed_query(q, cos, sin)                          # [T, H, c + r]

    indices = select_indices(attn, x, qr, cos, sin, meta, caches, layer, backend, static, raw)

    o_lat = sparse_mla_paged(q_full, caches, layer, indices, attn.softmax_scale,
                             attn.kv_lora_rank, backend)                     # [T, H, c]
    out = torch.einsum("thc,hdc->thd", o_lat, w_uv)                          # [T, H, v]
    return attn.o_proj(out.flatten(1))


def run_layers(model, ids: torch.Tensor, meta: StepMetadata, caches: PagedCaches, backend: str = "auto",
               static: bool = False) -> torch.Tensor:
    """The decoder layers of a :class:`flashdsa.model.DSAForCausalLM` over the packed new
    tokens ``ids [T]`` with the engine's paged attention: the hidden states [T, hidden]
    before the final norm. The RoPE cos/sin of the step are computed once (every layer of
    the model has the same rotary configuration)."""
    inner = model.model
    x = inner.embed_tokens(ids)
    cos_sin = inner.layers[0].self_attn.rope_cos_sin(meta.positions)
    for i, layer in enumerate(inner.layers):
        h = layer.input_layernorm(x)
        x = x + paged_mla_attention(layer.self_attn, h, meta, caches, i, backend, static, cos_sin)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x
