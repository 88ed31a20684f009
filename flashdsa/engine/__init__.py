"""Inference engine: paged latent + indexer caches, continuous batching with chunked
prefill and preemption, sparse (DSA) prefill and decode, sampling, ``LLM.generate``
and an OpenAI-compatible HTTP server (``flashdsa.engine.server``)."""
from .cache import PAGE_SIZE, BlockAllocator, PagedCaches
from .llm import LLM, EngineConfig, LLMEngine, RequestOutput
from .sampler import SamplingParams
from .tokenizer import ByteTokenizer

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams", "ByteTokenizer",
           "BlockAllocator", "PagedCaches", "PAGE_SIZE"]
