"""flashdsa: DeepSeek Sparse Attention (DSA) in PyTorch and Triton.

Exact references (``flashdsa.reference``), Triton kernels (``flashdsa.ops``),
trainable modules (``flashdsa.layers``) and the public ops re-exported here, each
taking ``backend="auto" | "triton" | "reference"``.

The re-exported names are imported on first use (``import flashdsa`` alone imports neither
torch nor triton), so that the ``flashdsa`` command starts fast.
"""
from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(["act_dequant", "act_quant", "dense_mla_fwd", "dequantize_mla_cache", "hadamard_transform",
                     "indexer_logits", "indexer_topk", "paged_indexer_logits", "paged_indexer_topk",
                     "quantize_mla_cache", "sparse_kl_loss", "sparse_kl_loss_from_probs", "sparse_mla_decode",
                     "sparse_mla_fwd", "topk_indices", "warmup_kl_loss"], "api"),
    "PagedIndexerCache": "cache",
    "DSAConfig": "config",
    "MLA": "layers",
    "LightningIndexer": "layers",
    "DSAForCausalLM": "model",
    "from_pretrained": "checkpoint",
    "save_pretrained": "checkpoint",
    "LLM": "engine",
    "SamplingParams": "engine",
    "UsageError": "errors",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:   # the same names for type checkers and IDEs
    from .api import (
        act_dequant,
        act_quant,
        dense_mla_fwd,
        dequantize_mla_cache,
        hadamard_transform,
        indexer_logits,
        indexer_topk,
        paged_indexer_logits,
        paged_indexer_topk,
        quantize_mla_cache,
        sparse_kl_loss,
        sparse_kl_loss_from_probs,
        sparse_mla_decode,
        sparse_mla_fwd,
        topk_indices,
        warmup_kl_loss,
    )
    from .cache import PagedIndexerCache
    from .checkpoint import from_pretrained, save_pretrained
    from .config import DSAConfig
    from .engine import LLM, SamplingParams
    from .errors import UsageError
    from .layers import MLA, LightningIndexer
    from .model import DSAForCausalLM

__all__ = [
    "act_quant", "act_dequant", "hadamard_transform", "indexer_logits", "indexer_topk", "topk_indices",
    "paged_indexer_logits", "paged_indexer_topk", "sparse_mla_fwd", "dense_mla_fwd", "sparse_mla_decode",
    "quantize_mla_cache", "dequantize_mla_cache", "warmup_kl_loss", "sparse_kl_loss",
    "sparse_kl_loss_from_probs", "PagedIndexerCache", "DSAConfig", "LightningIndexer", "MLA",
    "DSAForCausalLM", "from_pretrained", "save_pretrained", "LLM", "SamplingParams", "UsageError",
]
