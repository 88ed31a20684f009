"""The engine (add requests, step) and the offline ``LLM.generate`` front end."""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..layers import LightningIndexer
from ..model import MoE
from .cache import PAGE_SIZE, BlockAllocator, PagedCaches, blocks_needed
from .runner import ModelRunner
from .sampler import SamplingParams, TokenLogprob, apply_penalties, choices_of, sample, token_logprobs, token_mask
from .scheduler import Scheduler, Sequence, Status
from .tokenizer import ByteTokenizer, default_tokenizer, load_tokenizer


@dataclass
class EngineConfig:
    """Sizes and limits of an engine.

    kv_cache_dtype: "auto" (model dtype), "bf16" or "fp8_ds_mla" (see engine.cache).
    num_blocks: pages of 64 tokens in the pool; None sizes it from free GPU memory
        (``gpu_memory_utilization``) or, on CPU, from max_num_seqs * max_model_len.
    max_model_len: longest prompt + output (default: the model's
        max_position_embeddings, capped by the pool).
    max_num_seqs: sequences in one step; max_num_batched_tokens: tokens in one step
        (the prefill chunk size).
    backend: "auto" | "triton" | "reference" for every op.
    cuda_graphs: capture decode steps in CUDA graphs (see engine/cuda_graph.py). None
        (default): on where they work (a CUDA device, the Triton kernels, MoE layers
        that run as grouped GEMMs), eager elsewhere without a warning; True: on, with a
        warning where they cannot be; False: off (every step eager).
    enable_prefix_caching: reuse the cache blocks of earlier requests that hold the
        same leading tokens (a shared system prompt, the earlier turns of a chat):
        those tokens are not computed again (see engine.cache.BlockAllocator).
    """
    kv_cache_dtype: str = "auto"
    num_blocks: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    gpu_memory_utilization: float = 0.9
    backend: str = "auto"
    cuda_graphs: bool | None = None
    enable_prefix_caching: bool = True


@dataclass
class RequestOutput:
    """State of one request after a step (or at the end of ``generate``)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None          # "stop" | "length" | "abort"
    # "preemptions": times the request was preempted; "cached_tokens": prompt tokens
    # taken from the prefix cache
    metrics: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None   # one a token of token_ids, when SamplingParams.logprobs asks
    # one a prompt token (None for the first), when SamplingParams.prompt_logprobs asks
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # LLM.generate with SamplingParams.n > 1: every choice's output (this one is choice 0)
    choices: list[RequestOutput] | None = None


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take (free device memory plus torch's
    cached free blocks); None off CUDA (no limit checked)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def stack_experts(model, free_bytes: int | None) -> None:
    """Stack the routed experts of every MoE layer of ``model``
    (:meth:`flashdsa.model.MoE.stack_experts`: grouped GEMMs, no host sync, so MoE
    decode steps can be captured in CUDA graphs). Stacking a layer briefly holds its
    experts twice: where ``free_bytes`` cannot take the largest layer's experts, nothing
    is stacked and the engine warns (MoE layers then run expert by expert, eagerly)."""
    moe = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    need = max((sum(p.numel() * p.element_size() for p in m.experts.parameters()) for m in moe), default=0)
    if free_bytes is not None and need > free_bytes:
        warnings.warn(f"flashdsa engine: stacking an MoE layer's experts needs {need / 2 ** 30:.2f} GiB free, "
                      f"{free_bytes / 2 ** 30:.2f} GiB are: MoE layers run expert by expert (no CUDA graphs)")
        return
    for m in moe:
        m.stack_experts()
    if moe and torch.cuda.is_available():
        torch.cuda.empty_cache()   # the experts' old storage back to the device, for the caches' sizing


class LLMEngine:
    """Continuous-batching inference over paged caches for a DSAForCausalLM.

    ``add_request`` queues a request; each ``step`` runs one forward pass over the
    tokens the scheduler picked and returns a :class:`RequestOutput` for every request
    that got a new token or finished. Not thread safe: one thread drives it
    (see engine.server for the serving loop). At start every layer's projections are
    merged (:meth:`flashdsa.layers.MLA.merge_projections`) and the routed experts of
    every MoE layer stacked (:meth:`flashdsa.model.MoE.stack_experts`): the model's
    weights become views of the merged tensors, same values and names."""

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.model = model.eval()
        self.config = config or EngineConfig()
        cfg = model.config
        if any(isinstance(m, LightningIndexer) and m.numerics != "fp8" for m in model.modules()):
            raise ValueError('indexer_numerics: the engine scores keys from its FP8 paged key cache and needs "fp8" '
                             'indexers, got "exact" (set each indexer\'s numerics to "fp8")')
        self.model_config = cfg
        for layer in model.model.layers:   # one GEMM per input for MLA's and the indexer's projections
            layer.self_attn.merge_projections()
        stack_experts(model, free_device_bytes(next(model.parameters()).device))
        self.tokenizer = tokenizer or default_tokenizer(cfg.vocab_size)
        if getattr(self.tokenizer, "vocab_size", 0) > cfg.vocab_size:
            raise ValueError(f"tokenizer: {self.tokenizer.vocab_size} tokens, more than the model's vocabulary of "
                             f"{cfg.vocab_size}")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        latent_dim = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        c = self.config
        max_len = c.max_model_len or cfg.max_position_embeddings
        num_blocks = c.num_blocks or self._auto_num_blocks(cfg, latent_dim, max_len)
        self.max_model_len = min(max_len, num_blocks * PAGE_SIZE)
        if c.cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs: expected None (auto), True or False, got {c.cuda_graphs!r}")
        use_graphs = False
        if c.cuda_graphs is not False:
            from .cuda_graph import graphs_supported
            graphs_off = graphs_supported(model, self.device, c.backend)
            if graphs_off and c.cuda_graphs:
                warnings.warn(f"flashdsa engine: cuda_graphs requested but off: {graphs_off}")
            use_graphs = not graphs_off
        # with CUDA graphs one extra block, owned by no sequence, takes the padding rows
        self.caches = PagedCaches(cfg.num_hidden_layers, num_blocks + use_graphs, latent_dim, cfg.index_head_dim,
                                  c.kv_cache_dtype, self.dtype, self.device, cfg.kv_lora_rank, c.backend)
        self.allocator = BlockAllocator(num_blocks, prefix_caching=c.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, c.max_num_seqs, c.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.caches, c.backend)
        if use_graphs:
            from .cuda_graph import DecodeGraphs
            self.runner.graphs = DecodeGraphs(self.runner, c.max_num_seqs, blocks_needed(self.max_model_len),
                                              scratch_block=num_blocks)
            self.runner.graphs.capture()
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.num_steps = 0

    def _auto_num_blocks(self, cfg, latent_dim: int, max_len: int) -> int:
        per_block = PagedCaches.bytes_per_block(cfg.num_hidden_layers, latent_dim, cfg.index_head_dim,
                                                self.config.kv_cache_dtype, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * self.config.gpu_memory_utilization) // per_block)
        # CPU: room for every sequence at full length, but at most 1 GiB
        want = self.config.max_num_seqs * blocks_needed(min(max_len, 32768))
        return max(1, min(want, (1 << 30) // per_block))

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prompt: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError when it cannot fit."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"n: an engine request is one choice, got n={params.n} (LLM.generate and the server "
                             "make n requests: engine.sampler.choices_of)")
        if not prompt_ids:
            raise ValueError("prompt: expected at least one token")
        vocab = self.model_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.sequences:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_ids, params, prompt)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.finished:
            self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if not params.ignore_eos and eos is not None:
            ids.add(eos)
        return ids

    def _detokenize(self, seq: Sequence, end: int, flush: bool = False) -> int:
        """Append the text of output_ids[read_offset:end] to seq.text; returns how many
        characters it grew. Incremental: the new text is what decoding from prefix_offset
        adds to decoding up to read_offset (a few tokens of context, for tokenizers whose
        decoding of a token depends on its neighbours), so a step costs a few tokens, not
        the whole output. Text that ends in a partial UTF-8 character (U+FFFD) waits for
        the next token, unless ``flush`` (the request ends)."""
        prefix = self.tokenizer.decode(seq.output_ids[seq.prefix_offset:seq.read_offset])
        new = self.tokenizer.decode(seq.output_ids[seq.prefix_offset:end])
        if len(new) <= len(prefix) or (new.endswith("\ufffd") and not flush):
            return 0
        seq.text += new[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, end
        return len(new) - len(prefix)

    def _append(self, seq: Sequence, token: int) -> None:
        """Add a sampled token; update the text and decide whether the request is done."""
        seq.output_ids.append(token)
        p = seq.params
        n = len(seq.output_ids)
        if token in self._stop_ids(p):
            seq.finish_reason = "stop"
            self._detokenize(seq, n - 1, flush=True)        # the stop token's text is not kept
        else:
            done = len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
            grew = self._detokenize(seq, n, flush=done)
            for s in p.stop if grew else ():
                # only the tail can hold a new match: the text grew by ``grew`` characters
                cut = seq.text.find(s, max(0, len(seq.text) - len(s) - grew + 1))
                if s and cut >= 0:
                    seq.text, seq.finish_reason = seq.text[:cut], "stop"
                    break
            if seq.finish_reason is None and done:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._finish(seq, seq.finish_reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End a request: its reason, its blocks back to the pool (its output is still sent)."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.scheduler.free(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_ids, list(seq.output_ids), seq.text,
                             seq.finished, seq.finish_reason,
                             {"preemptions": seq.num_preemptions, "cached_tokens": seq.num_cached_tokens},
                             None if seq.logprobs is None else list(seq.logprobs),
                             None if seq.prompt_logprobs is None else list(seq.prompt_logprobs))

    def step(self) -> list[RequestOutput]:
        """One forward pass; outputs of the requests that got a token this step."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits, which = self.runner.forward(scheduled)
        for seq, n in scheduled:
            seq.num_computed += n
            self.scheduler.cache_blocks(seq)
        outs = []
        keep = [i for i, b in enumerate(which) if scheduled[b][0].params.max_tokens]
        if len(keep) < len(which):   # max_tokens 0: the prompt is computed (and scored), nothing sampled
            for seq in [scheduled[b][0] for b in which if not scheduled[b][0].params.max_tokens]:
                self._finish(seq, "length")
                outs.append(self._output(seq))
                self.sequences.pop(seq.request_id, None)
            logits, which = logits[keep], [which[i] for i in keep]
        if which:
            seqs = [scheduled[b][0] for b in which]
            params = [s.params for s in seqs]
            for s in seqs:   # a prompt's token mask, made once (a repetition penalty reads it every step)
                if s.params.repetition_penalty != 1 and s.prompt_seen is None:
                    s.prompt_seen = token_mask(s.prompt_ids, logits.shape[1], logits.device)
            penalized = apply_penalties(logits, params, [s.output_ids for s in seqs], [s.prompt_seen for s in seqs])
            tokens = sample(penalized, params, [s.generator for s in seqs])
            want = [i for i, s in enumerate(seqs) if s.logprobs is not None]
            if want:
                lps = token_logprobs(logits[want], [tokens[i] for i in want], [seqs[i].params.logprobs for i in want])
                for i, lp in zip(want, lps):
                    seqs[i].logprobs.append(lp)
            for seq, tok in zip(seqs, tokens):
                self._append(seq, tok)
                outs.append(self._output(seq))
                if seq.finished:
                    self.sequences.pop(seq.request_id, None)
        self.num_steps += 1
        return outs


def load_model(path, device=None, dtype=None):
    """A DSAForCausalLM from a Hugging Face directory or a ``train_state.pt``; on a GPU
    by default, in bf16 there unless ``dtype`` says otherwise."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None and torch.device(device).type == "cuda":
        dtype = torch.bfloat16
    if str(path).endswith(".pt"):
        from ..train import load_model as load_train_state
        model = load_train_state(path, device=device)
        return model.to(dtype) if dtype is not None else model
    from ..checkpoint import from_pretrained
    return from_pretrained(path, device=device, dtype=dtype)


class LLM:
    """Offline generation: ``LLM(path_or_model).generate(prompts, SamplingParams(...))``.

    Args:
        model: a checkpoint directory (config.json + safetensors, see
            flashdsa.checkpoint.from_pretrained), a ``train_state.pt`` of ``flashdsa train``
            or a DSAForCausalLM.
        tokenizer: object with encode/decode/eos_token_id (see engine.tokenizer; default:
            the checkpoint directory's Hugging Face tokenizer where it has one, else the
            byte-level tokenizer).
        device, dtype: where and how to load a checkpoint (default cuda + bf16 when a GPU
            is present, else cpu + the checkpoint's dtype).
        **engine_args: fields of :class:`EngineConfig`.
    """

    def __init__(self, model, tokenizer=None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **engine_args):
        if isinstance(model, (str, os.PathLike)):
            path = model
            if tokenizer is None:
                tokenizer = load_tokenizer(path)
            model = load_model(path, device, dtype)
            if tokenizer is None and model.config.vocab_size != ByteTokenizer.vocab_size:
                warnings.warn(f"flashdsa engine: {path} has no tokenizer files; the byte-level tokenizer's ids mean "
                              f"nothing to a vocabulary of {model.config.vocab_size} tokens: pass tokenizer=")
        elif device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (a string, a list of token ids, or a list of either);
        returns one :class:`RequestOutput` per prompt, in order (with ``n`` > 1: choice 0,
        all n in its ``choices``; the prompt's full pages are computed once). ``use_tqdm``:
        a progress bar of the finished requests and generated tokens on stderr, where that
        is a terminal."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        ids = []   # the engine requests of each prompt, one a choice
        for prompt, p in zip(prompts, params):
            text = prompt if isinstance(prompt, str) else None
            prompt_ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
            ids.append([self.engine.add_request(prompt_ids, c, prompt=text) for c in choices_of(p or SamplingParams())])
        done: dict[str, RequestOutput] = {}
        tokens = 0
        with tqdm(total=sum(map(len, ids)), desc="generate", unit="req", file=sys.stderr,
                  disable=None if use_tqdm else True, leave=False) as bar:
            while self.engine.has_unfinished_requests():
                outs = self.engine.step()
                tokens += len(outs)
                for out in outs:
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                bar.set_postfix_str(f"{tokens} tokens", refresh=False)
        outs = []
        for rids in ids:
            out = done[rids[0]]
            if len(rids) > 1:
                out = dataclasses.replace(out, choices=[done[r] for r in rids])
            outs.append(out)
        return outs

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One chat completion: the messages through the tokenizer's chat template."""
        return self.generate(self.tokenizer.apply_chat_template(messages), sampling_params)[0]
