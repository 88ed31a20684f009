"""flashdsa's sparse attention inside a Hugging Face transformers ``DeepseekV32ForCausalLM``.

``use_flashdsa_attention(model)`` makes every ``DeepseekV32Attention`` of the model run
flashdsa's DSA path instead of transformers' own, on the module's own weights (shared, not
copied):

1. the MLA projections, with the RoPE cos/sin that transformers' rotary embedding hands
   each layer (so every rope setting transformers reads is honoured as transformers reads it);
2. the lightning indexer (``flashdsa.layers.LightningIndexer.project``: RoPE, Hadamard) and
   the top-k over each query's causal range with ``flashdsa.indexer_topk``, the keys and
   queries quantized to FP8 as DeepSeek's inference code does (``indexer="fp8"``) or scored
   in full precision as transformers scores them (``indexer="exact"``);
3. sparse MLA in absorbed form (``flashdsa.sparse_mla_fwd``) over the selected latent rows
   [c | k_pe], then W_UV and o_proj.

Memory is O(L * index_topk): the model is switched to the attention implementation
``"dsa_sparse"``, whose mask is the one transformers makes for flash attention: no [L, L] mask,
the 2-d padding mask [B, past + S] (or None without padding); the indexer's ranges come from it.

The cache is transformers' own (``DynamicCache`` with its indexed layers, what ``generate``
creates): each layer stores the normalized latent ``c`` [B, 1, S, kv_lora_rank] and the rotated
``k_pe`` [B, 1, S, qk_rope_head_dim] in the key and value slots, and flashdsa's indexer keys
(after RoPE and the Hadamard rotation) [B, S, index_head_dim] in the indexer slot, so decode
steps attend over the whole past and ``generate``'s cache operations (reorder, crop) apply.
A cache filled by this path is read only by this path (its k_pe layout and indexer keys differ
from what transformers' attention stores).
"""
from __future__ import annotations

import functools

import torch

from .. import api
from .._validate import check
from ..backend import BACKENDS
from ..config import INDEXER_NUMERICS, DSAConfig
from ..layers import MLA
from ..reference.rope import apply_rope

ATTN_IMPLEMENTATION = "dsa_sparse"   # no "flash" in it: transformers takes such names for flash attention
_ATTENTION_PARTS = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                    "kv_b_proj", "o_proj")
_INDEXER_PARTS = ("wq_b", "wk", "k_norm", "weights_proj")


def use_flashdsa_attention(model, backend: str = "auto", indexer: str = "fp8"):
    """Run flashdsa's sparse attention in every DeepseekV32 attention layer of ``model`` (a
    transformers ``DeepseekV32ForCausalLM`` or ``DeepseekV32Model``), in place; returns ``model``.

    ``backend``: "auto" | "triton" | "reference", as for flashdsa's ops. ``indexer``: "fp8" (the
    official numerics: q and k of the indexer quantized to e4m3 with one scale per row) or
    "exact" (full-precision scores, as transformers' own indexer; it runs on the reference op,
    and ``backend="triton"`` refuses it). The weights stay the module's (shared, not copied);
    ``generate`` and its DynamicCache work as before."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention

    check(indexer in INDEXER_NUMERICS, ValueError,
          f"indexer: expected one of {INDEXER_NUMERICS}, got {indexer!r}")
    check(backend in BACKENDS, ValueError, f"backend: expected one of {BACKENDS}, got {backend!r}")
    layers = [m for m in model.modules() if type(m) is DeepseekV32Attention]
    check(bool(layers), TypeError, f"model: expected a transformers DeepseekV32 model (with DeepseekV32Attention "
          f"modules), got {type(model).__name__} without any")
    AttentionInterface.register(ATTN_IMPLEMENTATION, _not_called)
    # The mask that transformers builds for flash attention: the 2-d padding mask, or None
    # when there is no padding; never a [L, L] one.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for attn in layers:
        attn.forward = functools.partial(_sparse_attention, attn, _mla_view(attn, indexer), backend)
    return model


def _not_called(module, *args, **kwargs):
    """The ``"dsa_sparse"`` entry of transformers' attention registry: the patched layers never
    dispatch through it, so a call means a module that this integration did not patch."""
    raise RuntimeError(f"attn_implementation {ATTN_IMPLEMENTATION!r}: {type(module).__name__} is not a "
                       "DeepseekV32Attention patched by flashdsa.integrations.transformers.use_flashdsa_attention")


def _mla_view(attn, indexer: str) -> MLA:
    """A flashdsa MLA whose submodules are the transformers module's own (no copy): built on
    the meta device from the module's sizes, then each part replaced by the module's; its
    indexer scores with the numerics ``indexer``."""
    cfg = attn.config
    dsa = DSAConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                    q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                    qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                    v_head_dim=cfg.v_head_dim, index_n_heads=cfg.index_n_heads,
                    index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk, rope_factor=1.0,
                    indexer_numerics=indexer)
    with torch.device("meta"):
        mla = MLA(dsa)
    for name in _ATTENTION_PARTS:
        setattr(mla, name, getattr(attn, name))
    for name in _INDEXER_PARTS:
        setattr(mla.indexer, name, getattr(attn.indexer, name))
    mla.softmax_scale = attn.scaling          # qk_head_dim^-0.5 with YaRN's mscale, as transformers reads it
    return mla


def key_ranges(attention_mask: torch.Tensor | None, batch: int, seq: int, past: int, total: int,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate key ranges (ks, ke) int32 [batch * seq] of the queries of one step on the
    packed key axis (``total`` cached rows per batch entry, entry b at rows b * total ...).

    Query s of entry b sits at position past + s and may attend to the positions of its
    entry's 2-d ``attention_mask`` [batch, >= past + seq] (1 = token) that are <= its own; the
    ones of each row must be one contiguous block (left or right padding). A query with no
    such position (a padding query) gets an empty range and attention output 0."""
    pos = past + torch.arange(seq, device=device)                                  # [S]
    if attention_mask is None:
        start = torch.zeros(batch, dtype=torch.long, device=device)
        stop = torch.full((batch,), past + seq, dtype=torch.long, device=device)
    else:
        check(attention_mask.dim() == 2 and attention_mask.shape[0] == batch
              and attention_mask.shape[1] >= past + seq, ValueError,
              f"attention_mask: expected the 2-d padding mask [batch={batch}, >= {past + seq}], got shape "
              f"{tuple(attention_mask.shape)}")
        ones = attention_mask[:, :past + seq].bool()
        count = ones.sum(-1)
        start = ones.int().argmax(-1)
        stop = start + count
        inside = torch.arange(past + seq, device=device)[None, :]
        block = (inside >= start[:, None]) & (inside < stop[:, None])
        check(bool((block == ones).all()), ValueError,
              "attention_mask: flashdsa's sparse attention takes padding as one contiguous block of ones "
              "per row (left or right padding), got a row with holes")
    base = torch.arange(batch, device=device)[:, None] * total                     # [B, 1]
    ks = (base + start[:, None]).expand(batch, seq)
    ke = base + torch.minimum(pos[None, :] + 1, stop[:, None])
    ke = torch.maximum(ke, ks)
    return ks.reshape(-1).to(torch.int32), ke.reshape(-1).to(torch.int32)


def _sparse_attention(attn, mla: MLA, backend: str, hidden_states: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
    """The patched ``DeepseekV32Attention.forward``: hidden_states [B, S, hidden], the
    transformers (cos, sin) [B or 1, S, qk_rope_head_dim], the 2-d padding mask or None, the
    transformers cache or None. Returns (out [B, S, hidden], None) like the module's own."""
    b, s, _ = hidden_states.shape
    t = b * s
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and position_ids is not None and s > 1:
        check(bool((position_ids.diff(dim=-1) == 1).all()), ValueError,
              "position_ids: expected consecutive positions in each row (one sequence per row); sequences "
              "packed in a row, their positions restarting, are not separated by flashdsa's sparse attention")
    r, c = mla.rope, mla.kv_lora_rank
    x = hidden_states.reshape(t, -1)
    cos, sin = (z.expand(b, s, -1)[..., : r // 2].reshape(t, r // 2) for z in position_embeddings)
    qr = mla.q_a_layernorm(mla.q_a_proj(x))
    q_nope, q_pe = mla.q_b_proj(qr).view(t, mla.n_heads, mla.nope + r).split((mla.nope, r), dim=-1)
    q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
    kv, k_pe = mla.kv_a_proj_with_mqa(x).split((c, r), dim=-1)
    kv = mla.kv_a_layernorm(kv)                                                   # [T, c]
    k_pe = apply_rope(k_pe[:, None, :], cos, sin, interleaved=True)              # [T, 1, r]
    iq, ik, iw = mla.indexer.project(x, qr, cos, sin)                            # [T, H_I, d_I], [T, d_I], [T, H_I]
    q_full, kv_full, w_uv = mla.absorb(q_nope, q_pe, kv, k_pe)                   # [T, H, c + r], [T, 1, c + r]
    past = 0
    if cache is not None:
        past = cache.get_seq_length(attn.layer_idx)
        kv_all, pe_all = cache.update(kv.view(b, 1, s, c), k_pe.view(b, 1, s, r), attn.layer_idx)
        ik = cache.update_indexer(ik.view(b, s, -1), attn.layer_idx).reshape(-1, ik.shape[-1])
        kv_full = torch.cat((kv_all, pe_all), dim=-1).reshape(-1, 1, c + r)      # [B * total, 1, c + r]
    total = kv_full.shape[0] // b
    ks, ke = key_ranges(attention_mask, b, s, past, total, x.device)
    indices = mla.indexer.select(iq, ik, iw, ks, ke, backend=backend)          # [T, topk] int32
    o_lat, _, _ = api.sparse_mla_fwd(q_full.contiguous(), kv_full, indices[:, None, :], mla.softmax_scale,
                                     d_v=c, backend=backend)                     # [T, H, c]
    out = torch.einsum("thc,hdc->thd", o_lat, w_uv)                              # [T, H, v]
    return mla.o_proj(out.flatten(1)).view(b, s, -1), None
