"""DSAConfig: the model configuration, with the official DeepSeek-V3.2 config.json key names.

:meth:`DSAConfig.from_hf_config` reads both dialects of config.json: the official release's
(top-level ``rope_theta``, a ``rope_scaling`` block with ``type`` "yarn", ``torch_dtype``) and
transformers 5's (a ``rope_parameters`` block holding ``rope_theta`` and ``rope_type``,
``dtype``). A key it does not know is kept in ``extra`` with a warning naming it; a value it
cannot honor (a rope type other than YaRN, another quantization, a different activation, ...)
raises a ValueError naming the key. :meth:`DSAConfig.to_hf_config` writes a config that
flashdsa and transformers' ``DeepseekV32Config`` both read.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from .reference.rope import yarn_mscale, yarn_softmax_scale

INDEXER_NUMERICS = ("fp8", "exact")
# config.json key of the one flashdsa-specific setting (transformers keeps unknown keys as attributes).
INDEXER_NUMERICS_KEY = "flashdsa_indexer_numerics"

# Keys of a rope block (``rope_scaling`` or ``rope_parameters``) that flashdsa honors.
_ROPE_KEYS = {"type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor"}
# config.json keys with no field whose value the model fixes: another value is a different model.
_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "topk_method": "noaux_tc",
          "moe_layer_freq": 1, "rope_interleave": True}
# config.json keys with no bearing on the function the model computes (bookkeeping, training,
# parallelism, derived sizes, the weights' dtype, flashdsa.train's record of the training stages),
# kept in ``extra`` without a warning.
_HARMLESS = {"flashdsa_stages", "architectures", "model_type", "transformers_version", "auto_map", "use_cache",
             "initializer_range", "attention_dropout", "pad_token_id", "output_router_logits", "num_nextn_predict_layers",
             "aux_loss_alpha", "seq_aux", "ep_size", "head_dim", "qk_head_dim", "dtype", "torch_dtype",
             "num_key_value_heads", "mlp_layer_types", "layer_types", "quantization_config"}


@dataclass
class DSAConfig:
    """Hyper-parameters of a DeepSeek-V3.2-style model. Field names are the Hugging Face
    config.json keys, so ``DSAConfig.from_hf_config(json.load(f))`` reads an official (or a
    transformers 5) config; the defaults are the 671B DeepSeek-V3.2 values (SPEC, reference
    configuration). The rope block is flattened: ``rope_theta``, ``rope_factor`` (YaRN's
    ``factor``; 1 = plain RoPE), ``original_max_position_embeddings``, ``beta_fast``,
    ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``rope_attention_factor`` (YaRN's
    ``attention_factor``). YaRN acts when ``rope_factor > 1`` and ``max_position_embeddings >
    original_max_position_embeddings`` (DeepSeek's condition).

    ``indexer_numerics``: how the lightning indexer scores keys. "fp8" (default): q and k
    quantized to e4m3 with one scale per row, as DeepSeek's inference code and kernels do.
    "exact": unquantized scores in fp32 (or float64 inputs), as transformers' indexer computes
    them; the reference path only, for comparisons (it materializes every [T, T] score).
    Stored in config.json under ``flashdsa_indexer_numerics``, "fp8" when absent."""

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
    mscale: float = 1.0                   # YaRN: with mscale_all_dim, the rotary dims' scale (see rope_scale)
    mscale_all_dim: float = 1.0           # YaRN: the softmax scale's mscale^2 (0: none)
    rope_attention_factor: float | None = None  # YaRN attention_factor: the rotary dims' scale, if given
    max_position_embeddings: int = 163840
    index_n_heads: int = 64               # lightning indexer heads H_I
    index_head_dim: int = 128             # indexer key/query width d_I
    index_topk: int = 2048                # k of the fine-grained top-k selection
    indexer_numerics: str = "fp8"         # "fp8" (DeepSeek's inference) or "exact" (transformers')
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
        if self.indexer_numerics not in INDEXER_NUMERICS:
            raise ValueError(f"indexer_numerics: expected one of {INDEXER_NUMERICS}, got {self.indexer_numerics!r}")
        if self.rope_attention_factor is not None and not self.yarn:
            raise ValueError(f"rope_attention_factor: YaRN's attention_factor ({self.rope_attention_factor}) needs "
                             f"YaRN on (rope_factor > 1 and max_position_embeddings > "
                             f"original_max_position_embeddings)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        """Whether YaRN acts: a factor above 1 and a context beyond the original one."""
        return self.rope_factor > 1 and self.max_position_embeddings > self.original_max_position_embeddings

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 times YaRN's mscale(factor, mscale_all_dim)^2 (about 0.13523 for 671B)."""
        return yarn_softmax_scale(self.qk_head_dim, self.rope_factor, self.mscale_all_dim,
                                  self.original_max_position_embeddings, self.max_position_embeddings)

    @property
    def rope_scale(self) -> float:
        """The factor on RoPE's cos and sin (MLA's and the indexer's rotary dims), as in
        transformers' YaRN and DeepSeek's Hugging Face code: ``rope_attention_factor`` if given,
        else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are nonzero,
        else mscale(factor); 1 without YaRN and for the released configs (mscale ==
        mscale_all_dim)."""
        if not self.yarn:
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.mscale) / yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return yarn_mscale(self.rope_factor)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "DSAConfig":
        """Build from a config.json dict (model_type "deepseek_v32" or "deepseek_v3"), in the
        official release's dialect or transformers 5's. Raises ValueError naming the key for
        a value flashdsa cannot honor; warns naming the keys it does not know (kept in
        ``extra`` and written back by :meth:`to_hf_config`)."""
        cfg = dict(config)
        rope = _read_rope(cfg)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "indexer_numerics"} - set(rope)
        kwargs = {k: v for k, v in cfg.items() if k in names}
        extra = {k: v for k, v in cfg.items() if k not in names}
        if INDEXER_NUMERICS_KEY in extra:
            kwargs["indexer_numerics"] = extra.pop(INDEXER_NUMERICS_KEY)
        kwargs.update(rope)
        _check_fixed(cfg, kwargs)
        unknown = sorted(set(extra) - _HARMLESS - set(_FIXED))
        if unknown:
            warnings.warn(f"config.json: flashdsa does not use the keys {unknown}; they are kept and written back "
                          f"but do not change the model", stacklevel=2)
        return cls(**kwargs, extra=extra)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict (inverse of :meth:`from_hf_config`), in transformers 5's dialect
        (``rope_parameters``), which the official loaders of transformers 5 read as well."""
        rope_fields = ("rope_theta", "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "rope_attention_factor")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra", "indexer_numerics") + rope_fields}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_factor != 1.0:
            rope.update(rope_type="yarn", factor=self.rope_factor,
                        original_max_position_embeddings=self.original_max_position_embeddings,
                        beta_fast=self.beta_fast, beta_slow=self.beta_slow, mscale=self.mscale,
                        mscale_all_dim=self.mscale_all_dim)
            if self.rope_attention_factor is not None:
                rope["attention_factor"] = self.rope_attention_factor
        out["rope_parameters"] = rope
        out[INDEXER_NUMERICS_KEY] = self.indexer_numerics
        # The other dialect's rope keys would contradict the block written above.
        stale = {"rope_scaling", "rope_theta", "rope_parameters"}
        out.update({k: v for k, v in self.extra.items() if k not in out and k not in stale})
        out["model_type"] = self.extra.get("model_type", "deepseek_v32")
        return out


def _read_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """Pop the rope keys of either dialect from ``cfg``; return the DSAConfig fields they set."""
    scaling, params = cfg.pop("rope_scaling", None), cfg.pop("rope_parameters", None)
    if scaling and params and {**scaling, "rope_theta": None} != {**params, "rope_theta": None}:
        raise ValueError(f"rope_scaling and rope_parameters: both given and different ({scaling} vs {params})")
    block = dict(scaling or params or {})
    unknown = sorted(set(block) - _ROPE_KEYS)
    if unknown:
        raise ValueError(f"rope_parameters: keys {unknown} are not supported (flashdsa honors {sorted(_ROPE_KEYS)})")
    theta_top, theta_block = cfg.pop("rope_theta", None), block.get("rope_theta")
    if theta_top is not None and theta_block is not None and float(theta_top) != float(theta_block):
        raise ValueError(f"rope_theta: {theta_top} at the top level but {theta_block} in the rope block")
    out = {}
    theta = theta_block if theta_block is not None else theta_top
    if theta is not None:
        out["rope_theta"] = float(theta)
    kind = block.get("rope_type", block.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope_parameters.rope_type: only 'yarn' and 'default' RoPE are supported, got {kind!r}")
    if block.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters.partial_rotary_factor: MLA rotates all qk_rope_head_dim dims, got "
                         f"{block['partial_rotary_factor']}")
    if kind == "default":
        out["rope_factor"] = 1.0
        return out
    if block.get("truncate", True) is not True:
        raise ValueError("rope_parameters.truncate: flashdsa's YaRN rounds the correction range to whole dims "
                         f"(DeepSeek's code, truncate=True), got {block['truncate']!r}")
    orig = block.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    factor = block.get("factor")
    # transformers' YaRN: without a factor, the ratio of the two context lengths.
    factor = float(factor) if factor is not None else cfg["max_position_embeddings"] / orig
    max_pos = cfg.get("max_position_embeddings", DSAConfig.max_position_embeddings)
    if factor > 1 and max_pos <= orig:
        raise ValueError(f"rope_parameters.factor: YaRN with factor {factor} but max_position_embeddings "
                         f"({max_pos}) <= original_max_position_embeddings ({orig}): DeepSeek's code would not "
                         f"apply it and transformers' would")
    out.update(rope_factor=factor, original_max_position_embeddings=int(orig),
               beta_fast=float(block.get("beta_fast") or 32.0), beta_slow=float(block.get("beta_slow") or 1.0),
               mscale=float(block.get("mscale") or 0.0), mscale_all_dim=float(block.get("mscale_all_dim") or 0.0))
    if block.get("attention_factor") is not None:
        out["rope_attention_factor"] = float(block["attention_factor"])
    return out


def _check_fixed(cfg: dict[str, Any], fields: dict[str, Any]) -> None:
    """ValueError naming the key for each config.json value that would describe a model other
    than the one flashdsa builds."""
    for key, want in _FIXED.items():
        if key in cfg and cfg[key] != want:
            raise ValueError(f"{key}: flashdsa implements {want!r}, got {cfg[key]!r}")
    heads = fields.get("num_attention_heads", DSAConfig.num_attention_heads)
    if cfg.get("num_key_value_heads", heads) != heads:
        raise ValueError(f"num_key_value_heads: MLA expands keys and values per head, expected "
                         f"num_attention_heads ({heads}), got {cfg['num_key_value_heads']}")
    layers = fields.get("num_hidden_layers", DSAConfig.num_hidden_layers)
    if cfg.get("mlp_layer_types") is not None:
        k = fields.get("first_k_dense_replace", DSAConfig.first_k_dense_replace)
        moe = fields.get("n_routed_experts", DSAConfig.n_routed_experts) is not None
        want = ["dense"] * min(k, layers) + ["sparse" if moe else "dense"] * max(layers - k, 0)
        if list(cfg["mlp_layer_types"]) != want:
            raise ValueError(f"mlp_layer_types: flashdsa places dense MLPs in the first first_k_dense_replace "
                             f"layers, expected {want}, got {cfg['mlp_layer_types']}")
    if cfg.get("layer_types") is not None and set(cfg["layer_types"]) != {"indexed_attention"}:
        raise ValueError(f"layer_types: every flashdsa layer is DSA ('indexed_attention'), got {cfg['layer_types']}")
    quant = cfg.get("quantization_config")
    if quant is not None:
        fp8 = (quant.get("quant_method") == "fp8" and quant.get("fmt", "e4m3") == "e4m3"
               and list(quant.get("weight_block_size", [128, 128])) == [128, 128])
        if not fp8:
            raise ValueError(f"quantization_config: flashdsa dequantizes FP8 e4m3 weights with 128 x 128 block "
                             f"scales (quant_method 'fp8'), got {quant}")
