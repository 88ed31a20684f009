"""Helpers shared by the tests (import as ``from tests.utils import ...``)."""
import pytest
import torch

from flashdsa.config import DSAConfig

HAS_CUDA = torch.cuda.is_available()
# Kernels run on the GPU when there is one, else under the Triton interpreter on CPU.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 over finite entries; inf/nan must match exactly."""
    x, ref = x.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin].nan_to_num(), ref[~fin].nan_to_num()):
        return float("inf")
    x, ref = x[fin], ref[fin]
    den = ref.norm()
    return float((x - ref).norm() / den) if den > 0 else float((x - ref).norm())


# config.json of deepseek-ai/DeepSeek-V3.2 (671B), as published.
OFFICIAL_671B = {
    "architectures": ["DeepseekV32ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v32", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.44.2", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


def tiny_mla_config(**kw) -> DSAConfig:
    """A DSAConfig small enough for float64 CPU tests of one MLA layer (YaRN on: the
    context 8192 exceeds the original 64)."""
    base = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, index_n_heads=4, index_head_dim=16, index_topk=64,
                max_position_embeddings=8192, original_max_position_embeddings=64, rope_factor=4.0)
    base.update(kw)
    return DSAConfig(**base)
