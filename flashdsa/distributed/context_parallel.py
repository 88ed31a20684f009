"""Context parallelism for DSA's MLA: one long sequence split across the ranks of a group.

The sequence of L tokens is cut into 2W equal chunks, W the size of the context-parallel
group, and rank r holds chunks r and 2W-1-r (the zigzag split, :func:`zigzag_split`): an
early chunk with few causal keys paired with a late one with many, so every rank's queries
score the same number of (query, key) pairs.

One MLA layer (:func:`context_parallel_mla`) projects the local tokens, then all-gathers,
for the whole sequence, only what the queries read from other tokens:
  - the MLA latent rows ``[c | k_pe]`` (576 values a token at DeepSeek-V3.2's widths), from
    which the absorbed sparse attention reads directly and the dense attention expands its
    per-head keys and values locally;
  - the indexer keys: e4m3 bytes plus one fp32 scale a token (132 bytes at d_I 128) for
    inference-style selection, or the unquantized keys when the indexer is trained (its
    loss needs their gradient) or scores with "exact" numerics.
Top-k selection, sparse attention and the indexer loss then run locally, indices pointing
into the gathered rows in sequence order. The gather is differentiable (:func:`gather_rows`):
its backward reduce-scatters the gathered rows' gradients, summing every rank's share into
the rows' owner. Parameters are replicated across the group; each rank's parameter gradient
is its share of the whole sequence's, so averaging them across the group (as data-parallel
training does) gives the gradient of the mean over the sequence's tokens.

The whole causal LM (:func:`context_parallel_forward`) runs the per-token modules (embedding,
norms, MLP / MoE, LM head) on the local tokens and every layer's attention through
:func:`context_parallel_mla`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .. import api
from .._validate import check, check_tensor
from ..layers import ATTENTIONS, MLA, MLAOutput
from ..model import CausalLMOutput, DSAForCausalLM


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def zigzag_positions(seq_len: int, world_size: int, rank: int, device=None) -> torch.Tensor:
    """Sequence positions [seq_len // world_size] int64 that ``rank`` holds: chunk ``rank``
    then chunk ``2 * world_size - 1 - rank`` of the ``2 * world_size`` equal chunks."""
    check(isinstance(world_size, int) and world_size >= 1, ValueError,
          f"world_size: expected a positive int, got {world_size!r}")
    check(isinstance(rank, int) and 0 <= rank < world_size, ValueError,
          f"rank: expected an int in [0, {world_size}), got {rank!r}")
    check(isinstance(seq_len, int) and seq_len > 0 and seq_len % (2 * world_size) == 0, ValueError,
          f"seq_len: expected a positive multiple of 2 * world_size = {2 * world_size}, got {seq_len!r}")
    m = seq_len // (2 * world_size)
    chunks = (rank, 2 * world_size - 1 - rank)
    return torch.cat([torch.arange(c * m, (c + 1) * m, device=device) for c in chunks])


def zigzag_split(x: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The rows of ``x [L, ...]`` (a whole sequence along dim 0) that ``rank`` holds."""
    return x[zigzag_positions(x.shape[0], world_size, rank, x.device)]


def zigzag_unsplit(gathered: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sequence in order from ``gathered [L, ...]``: every rank's :func:`zigzag_split`
    concatenated in rank order (what :func:`gather_rows` returns). Differentiable."""
    seq_len = gathered.shape[0]
    held = torch.cat([zigzag_positions(seq_len, world_size, r, gathered.device) for r in range(world_size)])
    order = torch.empty_like(held)
    order[held] = torch.arange(seq_len, device=gathered.device)
    return gathered.index_select(0, order)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Rank-ordered concatenation along dim 0 of every rank's ``x`` (same shape on every rank);
    float8 tensors travel as their bytes (backends without float8 collectives)."""
    world, _ = _world(group)
    x = x.contiguous()
    wire = x.view(torch.uint8) if x.element_size() == 1 and x.is_floating_point() else x
    out = wire.new_empty((world * wire.shape[0], *wire.shape[1:]))
    dist.all_gather_single(out, wire, group=group)
    return out.view(x.dtype)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 forward; reduce-scatter (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        world, _ = _world(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``x [n, ...]`` concatenated in rank order, ``[W * n, ...]``. Differentiable:
    the gradient of the result is reduce-scattered, so each rank's ``x`` receives the sum over
    the ranks of the gradients of its rows."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, group)
    return _all_gather(x, group)


def gather_sequence(x_local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The whole sequence ``[L, ...]`` in order from every rank's zigzag rows ``x_local``."""
    return zigzag_unsplit(gather_rows(x_local, group), _world(group)[0])


def _gather_fp8_keys(indexer, k: torch.Tensor, group):
    """The whole sequence's indexer keys quantized as the FP8 selection does (e4m3, one
    fp32 scale a row), gathered as one byte row per token: d_I key bytes + 4 scale bytes."""
    k8, k_scale = api.act_quant(k, indexer.head_dim)                  # [n, d], [n, 1] fp32
    rows = torch.cat((k8.view(torch.uint8), k_scale.view(torch.uint8)), dim=1)
    rows = gather_sequence(rows, group)                               # [L, d + 4]
    d = indexer.head_dim
    return rows[:, :d].contiguous().view(torch.float8_e4m3fn), rows[:, d:].contiguous().view(torch.float32)[:, 0]


def _fp8_select(indexer, q, k8, k_scale, weights, ks, ke, backend):
    """:meth:`LightningIndexer.select` with the keys already quantized (gathered as bytes)."""
    q8, q_scale = api.act_quant(q, indexer.head_dim)
    weights = weights * q_scale[..., 0] * indexer.head_dim ** -0.5
    return api.indexer_topk(q8, k8, k_scale, weights, ks, ke, indexer.topk, backend=backend)


def _dense_local(mla: MLA, q_nope, q_pe, kv_all, k_pe_all, layout, chunk):
    """Causal multi-head attention of the local queries over the gathered sequence: the
    per-head keys and values expanded from the gathered latent rows by kv_b_proj. Each of
    the two zigzag chunks is a contiguous block of queries ending at position e; it attends
    to keys [0, e) with a causal mask aligned to the lower right. Returns [n, H, v]."""
    seq_len = kv_all.shape[0]
    k_nope, v = mla.kv_b_proj(kv_all).view(seq_len, mla.n_heads, mla.nope + mla.v_dim).split(
        (mla.nope, mla.v_dim), dim=-1)
    k = torch.cat((k_nope, k_pe_all.expand(-1, mla.n_heads, -1)), dim=-1).transpose(0, 1)
    v = v.transpose(0, 1)
    q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)               # [H, n, d]
    outs = []
    for c0 in range(0, q.shape[1], chunk):
        end = int(layout[c0 + chunk - 1]) + 1
        # 4-D operands, which torch's fused SDPA kernels need
        o = F.scaled_dot_product_attention(q[None, :, c0:c0 + chunk], k[None, :, :end], v[None, :, :end],
                                           attn_mask=causal_lower_right(chunk, end), scale=mla.softmax_scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def context_parallel_mla(mla: MLA, x_local: torch.Tensor, positions_local: torch.Tensor,
                         attention: str = "sparse", indexer_loss: bool = False,
                         group: dist.ProcessGroup | None = None, backend: str = "auto") -> MLAOutput:
    """One MLA layer over one sequence split across ``group`` (default: the world) by
    :func:`zigzag_split`: the same as ``mla(x, positions, [0, L], attention, indexer_loss)`` on
    the whole sequence, for this rank's tokens.

    ``x_local [n, hidden]``: this rank's tokens, ``zigzag_split(x, W, rank)`` (n = L / W, even);
    ``positions_local [n]``: their RoPE positions (``zigzag_split`` of the sequence's positions).
    Causality follows the zigzag layout: the token in the split's slot of sequence index p sees
    indices [0, p]. ``attention`` and ``backend`` as :meth:`MLA.forward`.

    Returns :class:`MLAOutput` ``(hidden [n, hidden], indexer_loss)``; the loss is the mean
    over this rank's tokens, so the whole sequence's mean is the mean over the ranks, and
    with ``loss / W`` backpropagated on each rank the gradients summed over the ranks are the
    whole sequence's. Every rank must make the same call (the gathers are collective).
    """
    check(attention in ATTENTIONS, ValueError, f"attention: expected one of {ATTENTIONS}, got {attention!r}")
    check(isinstance(indexer_loss, bool), TypeError,
          f"indexer_loss: expected a bool, got {type(indexer_loss).__name__}")
    check_tensor("x_local", x_local, ndim=2, shape=(None, mla.cfg.hidden_size), layout="[n, hidden_size]")
    n = x_local.shape[0]
    check(n > 0 and n % 2 == 0, ValueError, f"x_local: expected an even, positive number of rows (two zigzag "
                                            f"chunks), got {n}")
    check_tensor("positions_local", positions_local, shape=(n,), layout="[n]")
    world, rank = _world(group)
    seq_len = n * world
    layout = zigzag_positions(seq_len, world, rank, x_local.device)
    ks = torch.zeros(n, dtype=torch.int32, device=x_local.device)
    ke = (layout + 1).to(torch.int32)

    qr, q_nope, q_pe, kv, k_pe, cos, sin = mla.project(x_local, positions_local)
    q_full, kv_full, w_uv = mla.absorb(q_nope, q_pe, kv, k_pe)
    kv_all = gather_sequence(kv_full, group)                             # [L, 1, c + r]
    indexer = mla.indexer
    # The unquantized indexer keys are gathered where the loss needs their gradient or the
    # "exact" indexer scores them; otherwise the selection gathers them in FP8.
    unquantized_keys = indexer_loss or (attention == "sparse" and indexer.numerics == "exact")
    if unquantized_keys:
        # The indexer learns from its loss only: its inputs are cut from the graph.
        src = (x_local.detach(), qr.detach()) if indexer_loss else (x_local, qr)
        with torch.set_grad_enabled(indexer_loss and torch.is_grad_enabled()):
            iq, ik, iw_proj = indexer.project(*src, cos, sin)
            ik_all = gather_sequence(ik, group)                          # [L, d_I]
    loss = None
    if attention == "dense":
        out = _dense_local(mla, q_nope, q_pe, kv_all[:, 0, :mla.kv_lora_rank], kv_all[:, :, mla.kv_lora_rank:],
                           layout, n // 2)
        if indexer_loss:
            loss = api.warmup_kl_loss(iq, ik_all, iw_proj * indexer.head_dim ** -0.5, q_full.detach(),
                                      kv_all.detach(), None, mla.softmax_scale, ks, ke, reduction="mean",
                                      backend=backend)
    else:
        if unquantized_keys:
            indices = indexer.select(iq.detach(), ik_all.detach(), iw_proj.detach(), ks, ke, backend=backend)
        else:
            with torch.no_grad():
                iq, ik, iw_proj = indexer.project(x_local, qr, cos, sin)
                k8, k_scale = _gather_fp8_keys(indexer, ik, group)
                indices = _fp8_select(indexer, iq, k8, k_scale, iw_proj, ks, ke, backend)
        indices = indices[:, None, :]                                    # [n, 1, topk] into [0, L)
        res = api.sparse_mla_fwd(q_full, kv_all, indices, mla.softmax_scale, d_v=mla.kv_lora_rank,
                                 backend=backend, return_probs=indexer_loss, probs_precision=mla.probs_precision)
        out = torch.einsum("thc,hdc->thd", res[0], w_uv)                  # [n, H, v]
        if indexer_loss:
            loss = api.sparse_kl_loss_from_probs(iq, ik_all, iw_proj * indexer.head_dim ** -0.5, res[3], indices,
                                                 reduction="mean", backend=backend)
    return MLAOutput(mla.o_proj(out.flatten(1)), None if loss is None else loss.float())


def context_parallel_forward(model: DSAForCausalLM, input_ids_local: torch.Tensor, positions_local: torch.Tensor,
                             attention: str = "sparse", indexer_loss: bool = False,
                             group: dist.ProcessGroup | None = None, backend: str = "auto") -> CausalLMOutput:
    """The whole causal LM over one sequence split across ``group`` by :func:`zigzag_split`:
    the same as ``model(input_ids, attention=attention, indexer_loss=indexer_loss)`` on the
    whole sequence, for this rank's tokens.

    ``input_ids_local [n]``: this rank's tokens, ``zigzag_split(input_ids, W, rank)``;
    ``positions_local [n]``: their positions, ``zigzag_split`` of the sequence's positions.
    Every decoder layer's attention runs through :func:`context_parallel_mla`; the embedding,
    norms, MLP / MoE and LM head are per token and run on the local tokens only.

    Returns :class:`~flashdsa.model.CausalLMOutput` ``(logits [n, vocab] fp32, indexer_loss)``,
    the loss summed over layers, each layer's a mean over this rank's tokens (as
    :func:`context_parallel_mla`). Every rank must make the same call.
    """
    check_tensor("input_ids_local", input_ids_local, ndim=1, layout="[n]")
    inner = model.model
    x = inner.embed_tokens(input_ids_local)
    total = x.new_zeros((), dtype=torch.float32) if indexer_loss else None
    for layer in inner.layers:
        attn = context_parallel_mla(layer.self_attn, layer.input_layernorm(x), positions_local, attention,
                                    indexer_loss, group, backend)
        x = x + attn.hidden
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        if indexer_loss:
            total = total + attn.indexer_loss
    return CausalLMOutput(model.lm_head(inner.norm(x)).float(), total)
