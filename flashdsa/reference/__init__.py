"""Exact pure-PyTorch references of every DSA piece: readable, CPU-friendly, float64-capable.

These are the ground truth the Triton kernels are tested against; they materialize
intermediates freely and are meant for small shapes.
"""
from .hadamard import hadamard_transform
from .indexer import indexer_logits
from .quant import act_dequant, act_quant
from .rope import apply_rope, rope_cos_sin, yarn_inv_freq, yarn_mscale, yarn_softmax_scale
from .sparse_mla import dense_mla_fwd, sparse_mla_fwd
from .topk import topk_indices

__all__ = [
    "act_quant", "act_dequant", "hadamard_transform", "yarn_inv_freq", "yarn_mscale",
    "yarn_softmax_scale", "rope_cos_sin", "apply_rope", "indexer_logits", "topk_indices",
    "sparse_mla_fwd", "dense_mla_fwd",
]
