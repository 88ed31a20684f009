"""nn.Modules of DeepSeek Sparse Attention: the lightning indexer and MLA attention.

Parameter names follow the Hugging Face DeepSeek-V3.2 checkpoints (SPEC 6), so an
official state dict maps one to one. Tokens of a batch are packed along one axis
(``x [T, hidden]``) with ``cu_seqlens [B + 1]`` marking sequence boundaries.

Data flow of one DSA attention call (prefill):
hidden -> MLA projections -> indexer (q^I, k^I, weights, FP8) -> fused logits + top-k
-> sparse MLA attention over the selected latent rows -> output projection.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import api
from ._validate import check, check_cu_seqlens, check_tensor
from .backend import fused_inference
from .config import DSAConfig
from .reference.norm import rms_norm
from .reference.rope import apply_rope, rope_cos_sin, yarn_inv_freq


class RMSNorm(nn.Module):
    """RMS normalization computed in fp32, returned in the input dtype (on a GPU without
    autograd: one fused kernel, flashdsa.ops.norm_rope)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_inference(x) and x.stride(-1) == 1:
            from .ops.norm_rope import rms_norm as fused_rms_norm
            return fused_rms_norm(x, self.weight, self.eps)     # one launch (inference on a GPU)
        return rms_norm(x, self.weight, self.eps)


def causal_ranges(cu_seqlens: torch.Tensor, total: int):
    """Candidate key ranges of packed causal attention: row t of sequence b may attend
    to rows [cu_seqlens[b], t] of the packed axis. Returns (ks, ke) int32 [total]."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    ks = cu_seqlens.long()[seq]
    return ks.to(torch.int32), (rows + 1).to(torch.int32)


class LightningIndexer(nn.Module):
    """The DSA lightning indexer (SPEC 1): H_I small ReLU heads score every past token
    against ONE shared 128-wide key; the top ``index_topk`` tokens are kept.

    Parameters: ``wq_b`` (q_lora_rank -> H_I * d_I), ``wk`` (hidden -> d_I), ``k_norm``
    (LayerNorm with bias, eps 1e-6), ``weights_proj`` (hidden -> H_I).

    ``numerics`` (attribute, from ``DSAConfig.indexer_numerics``): "fp8" quantizes q and k to
    e4m3 with one scale per row before scoring, as DeepSeek's inference code and the Triton
    kernels do; "exact" scores the unquantized q and k (fp32, or float64 inputs) as
    transformers' indexer does, through the reference op (every [T, T] score materialized by
    chunks; ``backend="triton"`` is refused)."""

    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.numerics = cfg.indexer_numerics
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)

    def project(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, raw=None):
        """Unquantized indexer queries, keys and head weights.

        x [T, hidden], qr [T, q_lora_rank] (MLA's normalized query latent), cos/sin
        [T, rope_dim // 2]. Returns q [T, H_I, d_I] and k [T, d_I] (RoPE on the first
        rope_dim dims, half-split, then the Hadamard rotation) and weights [T, H_I] fp32
        (weights_proj(x) * H_I^-0.5). ``raw``: the output of :meth:`project_raw` when
        already computed."""
        q, k, weights = self.project_raw(x, qr) if raw is None else raw
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(),
                         self.k_norm.bias.float(), self.k_norm.eps).to(q.dtype)  # q.dtype: autocast-aware
        r = self.rope_dim
        q = torch.cat((apply_rope(q[..., :r], cos, sin, interleaved=False), q[..., r:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :r], cos, sin, interleaved=False), k[..., r:]), dim=-1)
        q, k = api.hadamard_transform(q), api.hadamard_transform(k)
        return q, k, weights.float() * self.n_heads ** -0.5

    def project_raw(self, x: torch.Tensor, qr: torch.Tensor):
        """The three projections alone: q = wq_b(qr) [T, H_I, d_I], k = wk(x) [T, d_I]
        (before k_norm) and weights_proj(x) [T, H_I] (before the H_I^-0.5), what
        :meth:`project` and the engine's fused FP8 kernels (flashdsa.ops.indexer.prep)
        start from."""
        q = self.wq_b(qr).view(x.shape[0], self.n_heads, self.head_dim)
        weights = self.weights_proj(x.float() if self.weights_proj.weight.dtype == torch.float32 else x)
        return q, self.wk(x), weights

    @torch.no_grad()
    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ks: torch.Tensor, ke: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Selected key rows [T, index_topk] int32 (-1 padded) for each query row, chosen
        inside its range [ks, ke) of the packed axis. Runs in FP8 like the official
        inference code (or exact, see ``numerics``); no gradient flows through the selection."""
        return self.select(*self.project(x, qr, cos, sin), ks, ke, backend=backend)

    @torch.no_grad()
    def select(self, q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
               ke: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Top-k rows [T, index_topk] int32 (-1 padded) from already projected q [T, H_I, d_I],
        k [T, d_I], weights [T, H_I] (the outputs of :meth:`project`), quantized to FP8 as at
        inference when ``numerics`` is "fp8", unquantized when it is "exact"."""
        if self.numerics == "exact":
            check(backend != "triton", ValueError,
                  'backend: the indexer\'s "exact" numerics run on the reference op only, got "triton"')
            ones = torch.ones(k.shape[0], dtype=weights.dtype, device=k.device)
            return api.indexer_topk(q, k.to(q.dtype), ones, weights * self.head_dim ** -0.5, ks, ke, self.topk,
                                    backend="reference")
        q8, q_scale = api.act_quant(q, self.head_dim)         # [T, H, d], [T, H, 1]
        k8, k_scale = api.act_quant(k, self.head_dim)         # [T, d], [T, 1]
        weights = weights * q_scale[..., 0] * self.head_dim ** -0.5
        return api.indexer_topk(q8, k8, k_scale[:, 0], weights, ks, ke, self.topk, backend=backend)


def _cudnn_attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's cuDNN attention takes these [H, L, d] operands (causal, no mask)."""
    try:
        params = torch.backends.cuda.SDPAParams(q[None], k[None], v[None], None, 0.0, True, False)
        return bool(torch.backends.cuda.can_use_cudnn_attention(params))
    except (AttributeError, TypeError, RuntimeError):  # a torch without these entry points
        return False


def _causal_attention(q, k, v, scale, need_lse):
    """Causal attention of one sequence, [H, L, d] operands: (out [H, L, d_v], lse [L, H] fp32
    natural log, or None). SDPA returns no lse; with ``need_lse`` it comes from torch's cuDNN
    attention where that runs (a fused kernel like SDPA's), else None."""
    if need_lse and q.is_cuda and _cudnn_attention_usable(q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q[None], k[None], v[None], None, True, 0.0,
                                                                       True, False, scale=scale)[:2]
        return out[0], lse.reshape(q.shape[0], q.shape[1]).transpose(0, 1)
    # 4-D operands: torch's fused SDPA kernels refuse 3-D ones and fall back to the math
    # kernel, which materializes the [H, L, L] scores
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale)[0], None


ATTENTIONS = ("sparse", "dense")


class MLAOutput(NamedTuple):
    """What :meth:`MLA.forward` returns: ``hidden [T, hidden_size]``, and ``indexer_loss``
    (a scalar fp32 tensor) when the call asked for it, else None."""

    hidden: torch.Tensor
    indexer_loss: torch.Tensor | None


def merge_rows(linears: list) -> torch.Tensor:
    """One weight tensor holding the given bias-free linears' weights as row blocks, each
    linear's weight turned into a view of its block."""
    w = torch.cat([m.weight.detach() for m in linears])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = w[row:row + n]
        row += n
    return w


class MLA(nn.Module):
    """Multi-head latent attention with DeepSeek Sparse Attention.

    ``attention="sparse"``: the indexer selects ``index_topk`` rows per query and attention
    runs in absorbed (MQA) form over only those latent rows: q_nope is absorbed through
    W_UK (from kv_b_proj) into the 512-wide latent space and the output is mapped back
    through W_UV. ``attention="dense"``: causal attention over every past token in the
    usual multi-head form (keys and values expanded from the latent by kv_b_proj), through
    torch's scaled_dot_product_attention. Both give the same function when
    index_topk >= sequence length, so without the indexer loss a call of at most
    index_topk tokens runs the dense path (no indexer, no top-k; the engine does the same
    per query).

    ``indexer_loss=True`` also returns the indexer's KL loss (SPEC 5), the target taken
    from the attention that runs: with dense attention that is the warm-up stage, with
    sparse attention the sparse training stage.

    ``probs_precision`` (attribute, "e4m3" by default): the scratch through which the
    sparse attention's Triton kernel hands the indexer loss its target (see
    ``flashdsa.sparse_mla_fwd``); "fp16" for a target exact to 2^-11."""

    probs_precision = "e4m3"

    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        self.rope_scale = cfg.rope_scale
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)
        self.indexer = LightningIndexer(cfg)
        self._merged = None        # (w_x, w_qr, n): see merge_projections
        self._rope_args = (self.rope, cfg.rope_theta, cfg.rope_factor, cfg.original_max_position_embeddings,
                           cfg.max_position_embeddings, cfg.beta_fast, cfg.beta_slow)
        self.register_buffer("inv_freq", yarn_inv_freq(*self._rope_args), persistent=False)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (``.to``, ``.cuda``, ``.bfloat16()``...) keeping the RoPE
        frequencies in fp32: in bf16 the angles position * frequency would be rounded to
        8 significant bits (positions past 256 merged, a whole turn off at 128K)."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset_inv_freq()
        return self

    @torch.no_grad()
    def reset_inv_freq(self) -> None:
        """Recompute the RoPE frequencies (fp32, on the buffer's device) from the config."""
        self.inv_freq = yarn_inv_freq(*self._rope_args).to(self.inv_freq.device)

    def _kv_b(self) -> torch.Tensor:
        """kv_b_proj weight as [H, nope + v, kv_lora_rank]: W_UK rows first, then W_UV."""
        return self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                attention: str = "sparse", indexer_loss: bool = False, backend: str = "auto") -> MLAOutput:
        """x [T, hidden] packed tokens; positions [T] (position of each token in its
        sequence, for RoPE); cu_seqlens [B + 1] int32. Returns :class:`MLAOutput`
        ``(hidden [T, hidden], indexer_loss)``.

        ``attention``: "sparse" (indexer top-k, then sparse attention) or "dense".
        ``indexer_loss`` (training, SPEC 5): also compute the indexer's loss, a scalar fp32
        tensor to add to the LM loss (it only reaches the indexer's parameters):
          dense attention   KL(head-summed dense attention probabilities || softmax of
                            the index scores) over every causal position: the warm-up
                            stage (freeze the rest with :meth:`freeze_all_but_indexer`).
          sparse attention  the same KL restricted to the selected rows: sparse training.
        The indexer sees detached inputs, so the LM loss sends no gradient into it and its
        loss none into the rest. The loss is the mean over query tokens of the per-token KL
        (SPEC 5's sum over t, divided by T): ``flashdsa.warmup_kl_loss`` /
        ``flashdsa.sparse_kl_loss_from_probs`` with ``reduction="mean"``.
        """
        check(attention in ATTENTIONS, ValueError,
              f"attention: expected one of {ATTENTIONS}, got {attention!r}")
        check(isinstance(indexer_loss, bool), TypeError,
              f"indexer_loss: expected a bool, got {type(indexer_loss).__name__}")
        self._check(x, positions, cu_seqlens)
        qr, q_nope, q_pe, kv, k_pe, cos, sin = self.project(x, positions)
        if attention == "sparse" and not indexer_loss and x.shape[0] <= self.indexer.topk:
            # No sequence is longer than index_topk: the top-k of every query is its whole
            # causal range, so sparse attention is dense attention; skip the indexer.
            attention = "dense"
        if attention == "dense" and not indexer_loss:
            out = self._dense(q_nope, q_pe, kv, k_pe, cu_seqlens)[0]
            return MLAOutput(self.o_proj(out.flatten(1)), None)
        ks, ke = causal_ranges(cu_seqlens, x.shape[0])
        if indexer_loss:
            # The indexer learns from its loss only: its inputs are cut from the graph.
            iq, ik, iw_proj = self.indexer.project(x.detach(), qr.detach(), cos, sin)
            # Score weights as the FP8 path folds them, minus the q scales: w * H_I^-0.5 * d_I^-0.5.
            iw = iw_proj * self.indexer.head_dim ** -0.5
        q_full, kv_full, w_uv = self.absorb(q_nope, q_pe, kv, k_pe)
        loss = None
        if attention == "dense":
            out, lse = self._dense(q_nope, q_pe, kv, k_pe, cu_seqlens, need_lse=True)
            # The loss's target from the absorbed q and latent rows, whose logits equal the
            # multi-head ones, normalized by the attention's lse; where the attention gave
            # none (no cuDNN attention) the loss computes it, one more pass over the logits.
            loss = api.warmup_kl_loss(iq, ik, iw, q_full.detach(), kv_full.detach(),
                                      None if lse is None else lse.detach(), self.softmax_scale, ks, ke,
                                      reduction="mean", backend=backend)
        elif indexer_loss:
            indices = self.indexer.select(iq.detach(), ik.detach(), iw_proj.detach(), ks, ke,
                                          backend=backend)[:, None, :]        # [T, 1, topk]
            # The attention hands over its head-mean probabilities of the selected slots
            # (the loss's target), so the loss computes only the index scores. The e4m3
            # scratch rounds each head's probability to 2^-4 relative; docs/training.md has
            # what that does to the loss and to the forward's cost.
            o_lat, _, _, probs = api.sparse_mla_fwd(q_full, kv_full, indices, self.softmax_scale,
                                                    d_v=self.kv_lora_rank, backend=backend, return_probs=True,
                                                    probs_precision=self.probs_precision)
            out = torch.einsum("thc,hdc->thd", o_lat, w_uv)                   # [T, H, v]
            loss = api.sparse_kl_loss_from_probs(iq, ik, iw, probs, indices, reduction="mean", backend=backend)
        else:
            indices = self.indexer(x, qr, cos, sin, ks, ke, backend=backend)  # [T, topk]
            o_lat, _, _ = api.sparse_mla_fwd(q_full, kv_full, indices[:, None, :], self.softmax_scale,
                                             d_v=self.kv_lora_rank, backend=backend)
            out = torch.einsum("thc,hdc->thd", o_lat, w_uv)                   # [T, H, v]
        return MLAOutput(self.o_proj(out.flatten(1)), None if loss is None else loss.float())

    def _check(self, x, positions, cu_seqlens):
        t = x.shape[0]
        check_tensor("x", x, ndim=2, shape=(None, self.cfg.hidden_size), layout="[T, hidden_size]")
        check_tensor("positions", positions, shape=(t,), layout="[T]")
        check_cu_seqlens(cu_seqlens, t)

    def project_inputs(self, x: torch.Tensor, indexer_raw: bool = False):
        """The GEMMs of :meth:`project`: (qr [T, q_lora_rank] normalized, q [T, H, nope + r]
        before RoPE, kv_pe [T, c + r] = the latent and k_pe before their RMSNorm and RoPE,
        the indexer's projections or None). ``indexer_raw``: also the indexer's projections
        (:meth:`LightningIndexer.project_raw`), in the same GEMMs as MLA's after
        :meth:`merge_projections`."""
        t = x.shape[0]
        ix = self.indexer
        merged = self._merged if indexer_raw else None
        if merged is not None and merged[0].data_ptr() == self.q_a_proj.weight.data_ptr():
            w_x, w_qr, n_x = merged
            outs = F.linear(x, w_x).split([self.q_a_proj.out_features, self.kv_a_proj_with_mqa.out_features,
                                           ix.head_dim, ix.n_heads][:n_x], dim=-1)
            qa, kv_pe, ik = outs[:3]
            iw = outs[3] if n_x == 4 else ix.weights_proj(x.float())
            qr = self.q_a_layernorm(qa)
            q, iq = F.linear(qr, w_qr).split((self.q_b_proj.out_features, ix.wq_b.out_features), dim=-1)
            raw = (iq.view(t, ix.n_heads, ix.head_dim), ik, iw)
        else:
            qr = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(qr)
            kv_pe = self.kv_a_proj_with_mqa(x)
            raw = ix.project_raw(x, qr) if indexer_raw else None
        return qr, q.view(t, self.n_heads, self.nope + self.rope), kv_pe, raw

    def project(self, x: torch.Tensor, positions: torch.Tensor, indexer_raw: bool = False):
        """The projections every attention path starts from (also used by the engine and
        the evaluations): the query latent qr [T, q_lora_rank], q_nope [T, H, nope], q_pe
        [T, H, r] (rotated), the normalized latent kv [T, c], k_pe [T, 1, r] (rotated), and
        the RoPE cos/sin [T, r // 2] shared with the indexer (see :meth:`rope_cos_sin`).
        ``indexer_raw``: an eighth output, the indexer's projections (see
        :meth:`project_inputs`)."""
        cos, sin = self.rope_cos_sin(positions)
        qr, q, kv_pe, raw = self.project_inputs(x, indexer_raw)
        q_nope, q_pe = q.split((self.nope, self.rope), dim=-1)
        kv, k_pe = kv_pe.split((self.kv_lora_rank, self.rope), dim=-1)
        kv = self.kv_a_layernorm(kv)                                          # [T, c]
        rope = self.rope_fn(x)
        out = (qr, q_nope, rope(q_pe, cos, sin), kv, rope(k_pe[:, None, :], cos, sin), cos, sin)
        return out + (raw,) if indexer_raw else out

    @torch.no_grad()
    def merge_projections(self) -> None:
        """For inference: store the weights of the projections that read the same input
        as row blocks of one tensor, so that ``project(..., indexer_raw=True)`` runs one
        GEMM for each input instead of four and two: q_a_proj, kv_a_proj_with_mqa and the
        indexer's wk (and weights_proj, when of the same dtype) read x; q_b_proj and the
        indexer's wq_b read qr. The parameters become views of the merged tensors (same
        values, still trainable); moving the module afterwards (``.to``) undoes the merge,
        and ``project`` then runs the separate GEMMs."""
        ix = self.indexer
        dt = self.q_a_proj.weight.dtype
        down = [self.q_a_proj, self.kv_a_proj_with_mqa, ix.wk]
        if ix.weights_proj.weight.dtype == dt:
            down.append(ix.weights_proj)
        self._merged = (merge_rows(down), merge_rows([self.q_b_proj, ix.wq_b]), len(down))

    def rope_fn(self, x: torch.Tensor):
        """MLA's interleaved RoPE: on a GPU without autograd one kernel (instead of the
        torch ops' nine), else :func:`apply_rope`."""
        if fused_inference(x) and self.rope & (self.rope - 1) == 0:
            from .ops.norm_rope import rope_interleaved
            return rope_interleaved
        return lambda z, c, s: apply_rope(z, c, s, interleaved=True)

    def rope_cos_sin(self, positions: torch.Tensor):
        """RoPE cos and sin [T, r // 2] of positions [T], times YaRN's ``rope_scale`` (1 for the
        released configs), for MLA's and the indexer's rotary dims alike (on a GPU without
        autograd one kernel, :func:`flashdsa.ops.norm_rope.rope_cos_sin`)."""
        if fused_inference(positions):
            from .ops.norm_rope import rope_cos_sin as fused_cos_sin
            return fused_cos_sin(positions, self.inv_freq, self.rope_scale)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        return cos, sin

    def absorb(self, q_nope, q_pe, kv, k_pe):
        """Absorbed (MQA) operands: q_full [T, H, c + r] (q_nope through W_UK), the latent
        rows kv_full [T, 1, c + r], and W_UV [H, v, c] to map the output back."""
        w_uk, w_uv = self._kv_b().split((self.nope, self.v_dim), dim=1)
        q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk)                    # [T, H, c]
        q_full = torch.cat((q_lat, q_pe), dim=-1)                             # [T, H, c + r]
        kv_full = torch.cat((kv[:, None, :], k_pe), dim=-1)                   # [T, 1, c + r]
        return q_full, kv_full, w_uv

    def absorbed_query(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The q_full and W_UV of :meth:`absorb` from q [T, H, nope + r] before RoPE (the q
        of :meth:`project_inputs`), for inference: W_UK's product and the rotated q_pe are
        written into one contiguous q_full [T, H, c + r] (no cat)."""
        w_uk, w_uv = self._kv_b().split((self.nope, self.v_dim), dim=1)
        q_nope, q_pe = q.split((self.nope, self.rope), dim=-1)
        c = self.kv_lora_rank
        q_full = q.new_empty(q.shape[0], self.n_heads, c + self.rope)
        torch.bmm(q_nope.transpose(0, 1), w_uk, out=q_full.transpose(0, 1)[..., :c])   # [H, T, c] view
        if fused_inference(q) and self.rope & (self.rope - 1) == 0:
            from .ops.norm_rope import rope_interleaved
            rope_interleaved(q_pe, cos, sin, out=q_full[..., c:])
        else:
            q_full[..., c:] = apply_rope(q_pe, cos, sin, interleaved=True)
        return q_full, w_uv

    @staticmethod
    def freeze_all_but_indexer(module: nn.Module, freeze: bool = True) -> list[nn.Parameter]:
        """Warm-up stage helper: ``requires_grad=False`` on every parameter of ``module``
        (an MLA or a whole model) except the lightning indexers' (``freeze=True``), or
        ``True`` on all of them (``freeze=False``). Returns the trainable parameters."""
        trainable = []
        for name, p in module.named_parameters():
            keep = not freeze or name.startswith("indexer.") or ".indexer." in name
            p.requires_grad_(keep)
            if keep:
                trainable.append(p)
        return trainable

    def _dense(self, q_nope, q_pe, kv, k_pe, cu_seqlens, need_lse=False):
        """Causal multi-head attention per sequence: (out [T, H, v], lse [T, H] fp32 or None).
        ``need_lse``: also the lse (natural log) where torch's cuDNN attention can run."""
        t = kv.shape[0]
        k_nope, v = self.kv_b_proj(kv).view(t, self.n_heads, self.nope + self.v_dim).split(
            (self.nope, self.v_dim), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1)), dim=-1)
        bounds = cu_seqlens.tolist()
        outs, lses = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # [H, L, d] per sequence; the packed axis has no padding to mask.
            qs, ks_, vs = (z[start:end].transpose(0, 1) for z in (q, k, v))
            o, lse = _causal_attention(qs, ks_, vs, self.softmax_scale, need_lse)
            outs.append(o.transpose(0, 1))
            lses.append(lse)
        lse = None if any(x is None for x in lses) else torch.cat(lses)
        return torch.cat(outs), lse
