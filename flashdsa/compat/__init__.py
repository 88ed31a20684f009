"""Drop-in entry points with the FlashMLA and DeepGEMM conventions, on flashdsa's ops.

flashdsa's own ops keep flashdsa's conventions (natural-log lse, ``[b, s_q, h_q]`` decode
lse, a 2-d paged indexer key cache, checked arguments with a ``backend=``). Code written
against FlashMLA's or DeepGEMM's Python API runs on flashdsa by changing its import::

    from flash_mla import flash_mla_sparse_fwd          ->  from flashdsa.compat.flash_mla import ...
    import deep_gemm                                    ->  from flashdsa.compat import deep_gemm

The functions here have the official names, argument orders, layouts and return
conventions, and are implemented by flashdsa's public ops plus views, transposes and
rescales (no kernels of their own). The ones that compute take one extra keyword-only
argument, ``backend="auto" | "triton" | "reference"``. Where the official functions schedule work
ahead (``get_mla_metadata``, ``get_paged_mqa_logits_metadata``) the versions here return
placeholders of the documented shapes: flashdsa's kernels schedule themselves.

- :mod:`flashdsa.compat.flash_mla`: ``flash_mla_sparse_fwd``, ``flash_mla_with_kvcache``,
  ``get_mla_metadata``, in the interface of FlashMLA's release with DeepSeek-V3.2 (its
  first sparse kernels).
- :mod:`flashdsa.compat.deep_gemm`: ``fp8_mqa_logits``, ``fp8_paged_mqa_logits``,
  ``get_paged_mqa_logits_metadata``, ``get_num_sms``.
"""
from . import deep_gemm, flash_mla
from .deep_gemm import fp8_mqa_logits, fp8_paged_mqa_logits, get_num_sms, get_paged_mqa_logits_metadata
from .flash_mla import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata

__all__ = [
    "deep_gemm", "flash_mla", "flash_mla_sparse_fwd", "flash_mla_with_kvcache", "get_mla_metadata",
    "fp8_mqa_logits", "fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata", "get_num_sms",
]
