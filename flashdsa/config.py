"""DSAConfig: the model configuration, with the official DeepSeek-V3.2 config.json key names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .reference.rope import yarn_softmax_scale


@dataclass
class DSAConfig:
    """Hyper-parameters of a DeepSeek-V3.2-style model. Field names are the Hugging Face
    config.json keys, so ``DSAConfig.from_hf_config(json.load(f))`` reads an official
    config; the defaults are the 671B DeepSeek-V3.2 values (SPEC, reference configuration).
    The YaRN entries of ``rope_scaling`` are flattened into ``rope_factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow`` and ``mscale``."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432        # dense MLP width (the first layers)
    moe_intermediate_size: int = 2048     # width of each routed / shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3        # layers [0, k) use a dense MLP, the rest MoE
    num_attention_heads: int = 128
    n_routed_experts: int | None = 256    # None: no MoE, every layer dense
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8                      # router: experts in groups, best topk_group groups kept
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512               # latent width = d_v of the absorbed attention
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    max_position_embeddings: int = 163840
    index_n_heads: int = 64               # lightning indexer heads H_I
    index_head_dim: int = 128             # indexer key/query width d_I
    index_topk: int = 2048                # k of the fine-grained top-k selection
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # other config.json keys, kept

    def __post_init__(self):
        if self.q_lora_rank <= 0:
            raise ValueError("q_lora_rank: DSA needs the low-rank query path (the indexer reads its latent), got "
                             f"{self.q_lora_rank}")
        if self.index_head_dim & (self.index_head_dim - 1) or self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(f"index_head_dim: expected a power of two >= qk_rope_head_dim "
                             f"({self.qk_rope_head_dim}) for the Hadamard rotation, got {self.index_head_dim}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 with the YaRN mscale^2 correction (about 0.13523 for 671B)."""
        return yarn_softmax_scale(self.qk_head_dim, self.rope_factor, self.mscale,
                                  self.original_max_position_embeddings, self.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "DSAConfig":
        """Build from a config.json dict (model_type "deepseek_v32" or "deepseek_v3")."""
        cfg = dict(config)
        rope_scaling = cfg.pop("rope_scaling", None) or {}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        extra = {k: v for k, v in cfg.items() if k not in names}
        if rope_scaling:
            kind = rope_scaling.get("type", rope_scaling.get("rope_type", "yarn"))
            if kind != "yarn":
                raise ValueError(f"rope_scaling: only YaRN is supported, got type {kind!r}")
            kwargs["rope_factor"] = float(rope_scaling.get("factor", 1.0))
            for key in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
                if key in rope_scaling:
                    kwargs[key] = rope_scaling[key]
            kwargs["mscale"] = float(rope_scaling.get("mscale_all_dim", rope_scaling.get("mscale", 1.0)))
        else:
            kwargs["rope_factor"] = 1.0
        return cls(**kwargs, extra=extra)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict (inverse of :meth:`from_hf_config`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra", "rope_factor", "beta_fast", "beta_slow", "mscale",
                                 "original_max_position_embeddings")}
        out["rope_scaling"] = None if self.rope_factor == 1.0 else {
            "type": "yarn", "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
            "mscale": self.mscale, "mscale_all_dim": self.mscale}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        out["model_type"] = self.extra.get("model_type", "deepseek_v32")
        return out
