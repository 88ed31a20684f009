"""A DeepSeek-V3.2-style decoder: embedding, RMSNorm, MLA with DSA, SwiGLU MLP or MoE.

Module tree and names follow the Hugging Face DeepSeek-V3 / V3.2 layout, so an official
state dict maps one to one (SPEC 6)::

    DSAForCausalLM(cfg)
      .model : DSAModel
        .embed_tokens            nn.Embedding(vocab_size, hidden_size)
        .layers[i] : DecoderLayer
          .input_layernorm       RMSNorm(hidden_size)
          .self_attn             flashdsa.layers.MLA (q_a_proj, ..., o_proj, indexer.*)
          .post_attention_layernorm RMSNorm(hidden_size)
          .mlp                   MLP (gate_proj, up_proj, down_proj; layers < first_k_dense_replace
                                 or when n_routed_experts is None) or MoE:
                                   .gate : MoEGate (weight [E, hidden], buffer e_score_correction_bias [E])
                                   .experts[j] : MLP(moe_intermediate_size)
                                   .shared_experts : MLP(moe_intermediate_size * n_shared_experts)
        .norm                    RMSNorm(hidden_size)
      .lm_head                   nn.Linear(hidden_size, vocab_size)

Calling convention (tokens may be batched [B, L] or packed [T] with ``cu_seqlens``)::

    out = model(input_ids [B, L])                          -> CausalLMOutput(logits [B, L, vocab] fp32, None)
    out = model(input_ids [T], cu_seqlens [B + 1] int32)   -> CausalLMOutput(logits [T, vocab] fp32, None)
    out = model.model(input_ids, cu_seqlens, positions, attention=..., backend=...)
                                                           -> DSAOutput(hidden [.., hidden], None)

    keyword arguments:
      positions     [B, L] or [T] int: RoPE position of each token; default 0, 1, ... within each sequence.
      attention     "sparse" (indexer top-k + sparse attention, the inference default) or "dense".
      indexer_loss  False (inference) or True (training, SPEC 5): also return the indexer's KL loss,
                    a scalar fp32 tensor: per layer the mean over tokens of the per-token KL
                    (MLA's convention), summed over layers. With dense attention it is the
                    warm-up loss, with sparse attention the sparse-training loss (indexer
                    input detached). The training stages map onto these two knobs in
                    flashdsa.train.STAGES.
      backend       "auto" | "triton" | "reference" (flashdsa.backend), passed to every op.
      logits_rows   optional int64 tensor of packed rows: compute logits only there (e.g. the last
                    token of each sequence when prefilling); logits [len(logits_rows), vocab].

On CPU tensors the attention runs sequence by sequence (same result): the pure-PyTorch
reference ops would otherwise score every query against the whole packed batch.

Loading and saving: :func:`flashdsa.checkpoint.from_pretrained` / ``save_pretrained``
(config.json + safetensors, FP8 ``weight_scale_inv`` block scales dequantized on load);
``DSAForCausalLM.from_pretrained(dir)`` and ``model.save_pretrained(dir)`` forward there.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DSAConfig
from .layers import MLA, MLAOutput, RMSNorm, merge_rows


class DSAOutput(NamedTuple):
    """What :class:`DecoderLayer` and :class:`DSAModel` return: ``hidden`` states and
    ``indexer_loss`` (scalar fp32, summed over layers) when asked for, else None."""

    hidden: torch.Tensor
    indexer_loss: torch.Tensor | None


class CausalLMOutput(NamedTuple):
    """What :class:`DSAForCausalLM` returns: ``logits`` (fp32) and ``indexer_loss`` (scalar
    fp32, summed over layers) when asked for, else None."""

    logits: torch.Tensor
    indexer_loss: torch.Tensor | None


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """The DeepSeek-V3 router ("noaux_tc"): sigmoid affinities, a per-expert correction
    bias used only for *choosing* experts (it is adjusted by load balancing, not by
    gradient, hence a buffer), grouped top-k: experts are split into ``n_group`` groups,
    a group scores the sum of its two best biased affinities, the best ``topk_group``
    groups stay eligible, and the top ``num_experts_per_tok`` eligible experts are picked.
    Their weights are the unbiased affinities, renormalized to sum 1 when
    ``norm_topk_prob`` (for every top_k, as transformers' router and DeepSeek's inference
    code, which always renormalizes sigmoid affinities), and scaled by
    ``routed_scaling_factor``. Training MoE models from scratch would also need
    V3's bias update (aux-loss-free balancing), which is not implemented: the bias is
    loaded from checkpoints and stays fixed."""

    def __init__(self, cfg: DSAConfig):
        super().__init__()
        if cfg.scoring_func != "sigmoid":
            raise ValueError(f"scoring_func: only the sigmoid router of DeepSeek-V3 is supported, got "
                             f"{cfg.scoring_func!r}")
        e = cfg.n_routed_experts
        if e % cfg.n_group or not 1 <= cfg.topk_group <= cfg.n_group:
            raise ValueError(f"n_group/topk_group: need n_routed_experts ({e}) divisible by n_group "
                             f"({cfg.n_group}) and 1 <= topk_group ({cfg.topk_group}) <= n_group")
        if cfg.num_experts_per_tok > e:
            raise ValueError(f"num_experts_per_tok ({cfg.num_experts_per_tok}) > n_routed_experts ({e})")
        self.n_experts, self.top_k = e, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(e, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [T, hidden] -> (weights [T, top_k] fp32, expert ids [T, top_k] int64)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))        # [T, E]
        biased = scores + self.e_score_correction_bias.float()
        t = x.shape[0]
        if self.n_group > 1:
            per_group = biased.view(t, self.n_group, -1)                        # [T, G, E/G]
            group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            biased = biased.masked_fill(~keep.repeat_interleave(self.n_experts // self.n_group, dim=1),
                                        float("-inf"))
        ids = biased.topk(self.top_k, dim=-1).indices                           # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:  # for every top_k, one expert included (its weight becomes 1)
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scale, ids


# torch's grouped GEMM (public as F.grouped_mm in recent releases, torch._grouped_mm since 2.8)
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_unsupported(dtype: torch.dtype, device: torch.device, widths: tuple = ()) -> str | None:
    """None when torch's grouped GEMM takes operands of ``dtype`` on ``device`` whose rows
    are ``widths`` elements long (its CUDA kernels: bf16 on sm_90 and sm_100, rows of a
    multiple of 16 bytes; on CPU: bf16, fp16 and fp32), else why not."""
    if _GROUPED_MM is None:
        return f"this torch ({torch.__version__}) has no grouped GEMM (torch >= 2.8 has)"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"torch's grouped GEMM on CUDA takes bf16 weights, not {dtype}"
        if any(w % 8 for w in widths):
            return f"torch's grouped GEMM on CUDA needs rows of a multiple of 16 bytes (widths {widths})"
        if torch.cuda.get_device_capability(device)[0] not in (9, 10):
            return "torch's grouped GEMM on CUDA needs sm_90 or sm_100"
        return None
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16, torch.float32):
        return None
    return f"torch's grouped GEMM does not take {dtype} on {device.type}"


class MoE(nn.Module):
    """Routed experts + always-on shared experts (DeepSeek-V3).

    Two forwards with the same result: tokens grouped by expert with one sort, each
    expert one matmul over its tokens (reads the group sizes on the host); or, after
    :meth:`stack_experts` and without autograd, two grouped GEMMs over all experts
    (:meth:`grouped_forward`: fixed shapes, no host synchronization, so a CUDA graph can
    capture it)."""

    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self._stacked = None   # (w13 [E, 2 * I, hidden], w2 [E, hidden, I], why not grouped): see stack_experts

    @torch.no_grad()
    def stack_experts(self) -> None:
        """For inference: store the routed experts' weights in two tensors, gate and up
        projections as w13 [E, 2 * I, hidden] (each expert's gate rows, then its up rows)
        and down projections as w2 [E, hidden, I], each expert's weights becoming views of
        them (same values and names, still trainable; moving the module afterwards undoes
        it). The forward then takes :meth:`grouped_forward` where torch's grouped GEMM
        takes the weights (:func:`grouped_mm_unsupported`)."""
        e = len(self.experts)
        w13 = merge_rows([lin for m in self.experts for lin in (m.gate_proj, m.up_proj)])
        w2 = merge_rows([m.down_proj for m in self.experts])
        self._stacked = (w13.view(e, -1, w13.shape[-1]), w2.view(e, -1, w2.shape[-1]),
                         grouped_mm_unsupported(w13.dtype, w13.device, (w13.shape[-1], w2.shape[-1])))

    def grouped_unsupported(self) -> str | None:
        """None when the forward takes :meth:`grouped_forward` (without autograd), else why not."""
        if self._stacked is not None and self._stacked[0].data_ptr() != self.experts[0].gate_proj.weight.data_ptr():
            self._stacked = None   # the module moved: its experts have storage of their own again
        if self._stacked is None:
            return "the MoE experts are not stacked (MoE.stack_experts)"
        return self._stacked[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)                                  # [T, k]
        if x.shape[0] and not torch.is_grad_enabled() and self.grouped_unsupported() is None:
            out = self.grouped_forward(x, weights, ids)
        else:
            out = self._sorted_forward(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def _sorted_forward(self, x, weights, ids):
        flat = ids.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token_of = order // ids.shape[1]                             # source row of each sorted slot
        w_sorted = weights.flatten()[order]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = token_of[start:start + n]
                y = self.experts[e](x[rows]) * w_sorted[start:start + n, None].to(x.dtype)
                out.index_add_(0, rows, y)
                start += n
        return out

    def grouped_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' output [T, hidden] for x [T, hidden] and the router's weights
        and expert ids [T, k], by two grouped GEMMs over the (token, expert) pairs sorted
        by expert; needs :meth:`stack_experts`. Every shape follows from T, and the group
        ends are computed on the device: no host synchronization."""
        w13, w2, _ = self._stacked
        t, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        experts = torch.arange(w13.shape[0], device=x.device, dtype=flat.dtype)
        ends = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)   # [E] group ends
        h = _GROUPED_MM(x[order // k], w13.transpose(1, 2), offs=ends)                # [T * k, 2 * I]
        gate, up = h.chunk(2, dim=-1)
        y = _GROUPED_MM(F.silu(gate) * up, w2.transpose(1, 2), offs=ends)             # [T * k, hidden]
        pairs = torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1)           # back to token order
        return (pairs * weights[..., None].to(x.dtype)).sum(1)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: DSAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.n_routed_experts is not None and layer_idx >= cfg.first_k_dense_replace \
            and layer_idx % int(cfg.extra.get("moe_layer_freq", 1)) == 0
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, cu_seqlens, attention="sparse", indexer_loss=False, backend="auto",
                per_sequence=False) -> DSAOutput:
        """x [T, hidden] -> DSAOutput(hidden [T, hidden], the layer's indexer loss or None);
        ``attention`` and ``indexer_loss`` as :meth:`MLA.forward`.

        per_sequence: call the attention once per sequence of ``cu_seqlens`` instead of once
        on the packed batch. Same result; the pure-PyTorch reference ops score every query
        against the whole packed axis (masking other sequences), so on CPU this turns
        O((sum L)^2) work into O(sum L^2)."""
        h = self.input_layernorm(x)
        bounds = cu_seqlens.tolist() if per_sequence else []
        if len(bounds) > 2:
            outs, losses = [], []
            for s, e in zip(bounds[:-1], bounds[1:]):
                if e > s:
                    cu = torch.tensor([0, e - s], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
                    o, l_ = self.self_attn(h[s:e], positions[s:e], cu, attention, indexer_loss, backend)
                    outs.append(o)
                    if l_ is not None:   # a per-token mean: weight by the sequence's share of T
                        losses.append(l_ * ((e - s) / bounds[-1]))
            attn = MLAOutput(torch.cat(outs), sum(losses) if indexer_loss else None)
        else:
            attn = self.self_attn(h, positions, cu_seqlens, attention, indexer_loss, backend)
        x = x + attn.hidden
        x = x + self.mlp(self.post_attention_layernorm(x))
        return DSAOutput(x, attn.indexer_loss)


def _pack(input_ids: torch.Tensor, cu_seqlens, positions):
    """Flatten [B, L] ids to the packed layout; derive cu_seqlens and positions when absent."""
    if input_ids.dim() == 2:
        b, l = input_ids.shape
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: only for packed input_ids [T]; got input_ids [B, L] "
                             f"{tuple(input_ids.shape)}")
        cu_seqlens = torch.arange(0, (b + 1) * l, l, dtype=torch.int32, device=input_ids.device)
        if positions is None:
            positions = torch.arange(l, device=input_ids.device).repeat(b)
        return input_ids.reshape(-1), cu_seqlens, positions.reshape(-1)
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids: expected [B, L] or packed [T], got shape {tuple(input_ids.shape)}")
    t = input_ids.shape[0]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, t], dtype=torch.int32, device=input_ids.device)
    if positions is None:
        rows = torch.arange(t, device=input_ids.device)
        seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
        positions = rows - cu_seqlens.long()[seq]
    return input_ids, cu_seqlens, positions


class DSAModel(nn.Module):
    """Embedding, decoder layers, final norm (no LM head)."""

    def __init__(self, cfg: DSAConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, cu_seqlens=None, positions=None, attention="sparse", indexer_loss=False,
                backend="auto") -> DSAOutput:
        """DSAOutput(final hidden states [B, L, hidden] or [T, hidden] like ``input_ids``,
        the indexer loss summed over layers or None); arguments as the module docstring."""
        shape = input_ids.shape
        ids, cu_seqlens, positions = _pack(input_ids, cu_seqlens, positions)
        x = self.embed_tokens(ids)
        total = x.new_zeros((), dtype=torch.float32) if indexer_loss else None
        # CPU (reference ops): attend sequence by sequence, see DecoderLayer.forward
        per_sequence = not x.is_cuda
        for layer in self.layers:
            x, loss = layer(x, positions, cu_seqlens, attention, indexer_loss, backend, per_sequence=per_sequence)
            if loss is not None:
                total = total + loss.float()
        return DSAOutput(self.norm(x).view(*shape, -1), total)


@contextlib.contextmanager
def _no_default_init():
    """Skip torch's default parameter init while building (weights stay uninitialized).
    Building the 671B tree spends most of its time in 45K kaiming inits otherwise, even
    on the meta device."""
    saved = [(cls, cls.reset_parameters) for cls in (nn.Linear, nn.Embedding, nn.LayerNorm)]
    try:
        for cls, _ in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved:
            cls.reset_parameters = fn


class DSAForCausalLM(nn.Module):
    """DeepSeek-V3.2-style causal language model (see the module docstring for the API).

    ``init=False`` leaves the parameters uninitialized (fast; for loading a checkpoint or
    building on the meta device); ``init=True`` applies :meth:`init_weights`."""

    def __init__(self, cfg: DSAConfig, init: bool = True):
        super().__init__()
        self.config = cfg
        with _no_default_init():       # init_weights below (or a checkpoint) sets every weight
            self.model = DSAModel(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        if init:
            self.init_weights()

    def tie_weights(self):
        """Share the embedding with the LM head when ``tie_word_embeddings`` (again after
        ``to_empty``, which gives each module its own tensor)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """Normal(0, initializer_range) for linear and embedding weights (0.02 unless the
        config says otherwise), output projections scaled by 1/sqrt(2 * layers) as in GPT-2
        so the residual stream does not grow with depth; norms at 1, router bias at 0."""
        cfg = self.config
        std = float(cfg.extra.get("initializer_range", 0.02)) if std is None else std
        out_std = std / math.sqrt(2 * max(cfg.num_hidden_layers, 1))
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, out_std if name.endswith(("o_proj", "down_proj")) else std)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, MoEGate):
                m.weight.normal_(0.0, std)
                m.e_score_correction_bias.zero_()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self):
        """Recompute non-persistent buffers (RoPE frequencies), e.g. after ``to_empty``."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.reset_inv_freq()

    def forward(self, input_ids, cu_seqlens=None, positions=None, attention="sparse", indexer_loss=False,
                backend="auto", logits_rows=None) -> CausalLMOutput:
        """CausalLMOutput(logits fp32, indexer loss or None); see the module docstring."""
        h, loss = self.model(input_ids, cu_seqlens=cu_seqlens, positions=positions, attention=attention,
                             indexer_loss=indexer_loss, backend=backend)
        if logits_rows is not None:
            h = h.reshape(-1, h.shape[-1])[logits_rows]
        return CausalLMOutput(self.lm_head(h).float(), loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def train_flops_per_token(self, seq_len: int, stage: str) -> float:
        """Matmul FLOPs one trained token costs in windows of ``seq_len`` tokens, forward
        and backward, in training stage ``stage`` (flashdsa.recipe.STAGES): the model FLOPs
        of an MFU figure (2 per multiply-add; the backward of a matmul twice its forward).

        - weights: 2 FLOPs per weight the token passes (linear layers and the MoE router;
          routed experts: the num_experts_per_tok it is sent to), the indexer's apart;
        - attention: dense (MHA over the causal context, mean (seq_len + 1) / 2 keys) in the
          dense and warm-up stages, sparse (absorbed MQA over min(index_topk, t + 1) latent
          rows) in the sparse stage;
        - the indexer where a stage runs it (warm-up, sparse): its projections and its scores
          over the causal context forward; backward the projections and, in the warm-up, the
          scores over the context, in the sparse stage those of the selected keys.
        Backward counted where a stage trains: everything in dense and sparse, the indexer
        alone in the warm-up. Not counted: norms, softmax, RoPE, quantization, the top-k,
        the KL's own recomputation of attention scores."""
        from .recipe import STAGES
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}")
        cfg = self.config
        w_main = w_idx = 0.0
        for name, m in self.named_modules():
            if not isinstance(m, (nn.Linear, MoEGate)):
                continue
            n = m.weight.numel()
            if ".indexer." in name:
                w_idx += n
            elif ".experts." in name:
                w_main += n * cfg.num_experts_per_tok / cfg.n_routed_experts
            else:
                w_main += n
        layers, h = cfg.num_hidden_layers, cfg.num_attention_heads
        ctx = (seq_len + 1) / 2
        sel = sum(min(cfg.index_topk, t + 1) for t in range(seq_len)) / seq_len
        d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        dense_attn = 2 * h * (d_qk + cfg.v_head_dim) * ctx * layers
        sparse_attn = 2 * h * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * sel * layers
        scores = 2 * cfg.index_n_heads * cfg.index_head_dim * layers
        if stage == "dense":
            return 3 * (2 * w_main + dense_attn)
        if stage == "warmup":
            return 2 * w_main + dense_attn + 3 * (2 * w_idx + scores * ctx)
        return 3 * (2 * w_main + sparse_attn) + 3 * 2 * w_idx + scores * ctx + 2 * scores * sel

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "DSAForCausalLM":
        """See :func:`flashdsa.checkpoint.from_pretrained`."""
        from .checkpoint import from_pretrained
        return from_pretrained(path, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        """See :func:`flashdsa.checkpoint.save_pretrained`."""
        from .checkpoint import save_pretrained
        save_pretrained(self, path, **kwargs)
