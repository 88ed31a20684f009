"""Inference engine: paged latent + indexer caches, continuous batching with chunked
prefill and preemption, sparse (DSA) prefill and decode, sampling, ``LLM.generate``
and an OpenAI-compatible HTTP server (``flashdsa.engine.server``).

The names below are imported on first use, so that ``flashdsa.engine.cli`` (the
``generate`` and ``serve`` arguments) imports without torch."""
from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {"PAGE_SIZE": "cache", "BlockAllocator": "cache", "PagedCaches": "cache", "LLM": "llm",
            "EngineConfig": "llm", "LLMEngine": "llm", "RequestOutput": "llm", "SamplingParams": "sampler",
            "TokenLogprob": "sampler", "ByteTokenizer": "tokenizer"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:   # the same names for type checkers and IDEs
    from .cache import PAGE_SIZE, BlockAllocator, PagedCaches
    from .llm import LLM, EngineConfig, LLMEngine, RequestOutput
    from .sampler import SamplingParams, TokenLogprob
    from .tokenizer import ByteTokenizer

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams", "TokenLogprob", "ByteTokenizer",
           "BlockAllocator", "PagedCaches", "PAGE_SIZE"]
