"""Sequences and the scheduler: continuous batching with chunked prefill and
preemption by recomputation.

Each engine step the scheduler packs up to ``max_num_batched_tokens`` new tokens:
first the running sequences in arrival order (a decode needs 1 token, an unfinished
prefill its next chunk), then waiting sequences while tokens, blocks and
``max_num_seqs`` allow. Requests therefore join and leave the batch between any two
steps. When a running sequence needs a block and none is free, the most recently
arrived running sequence is preempted: its blocks are freed, it returns to the front
of the queue and later recomputes its prompt and the tokens it had generated (no swap).

With prefix caching (the allocator's, see :class:`BlockAllocator`) a sequence that is
admitted takes the cached blocks that hold the start of its tokens and computes only
the rest; its own blocks are cached as they fill (:meth:`Scheduler.cache_blocks`). At
least its last token is always computed, for the logits it samples from, and all of a
prompt whose tokens are scored (``prompt_logprobs``). A sequence whose next page a
running sequence is computing waits for it to be cached (requests that arrive together
with a shared start compute it once).
"""
from __future__ import annotations

import enum
import itertools
from collections import deque

from .cache import PAGE_SIZE, ROOT, BlockAllocator, blocks_needed
from .sampler import SamplingParams, make_generator


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()


class Sequence:
    """One request: its tokens, its blocks and how much of it is cached."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.arrival = next(_arrival)
        self.status = Status.WAITING
        self.blocks: list[int] = []
        self.num_computed = 0          # tokens whose cache rows are written
        self.block_nodes: list[int] = []  # prefix-cache node ids of blocks[:len(block_nodes)]
        self.num_cached_tokens = 0     # prompt tokens taken from the prefix cache when first scheduled
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.text = ""                 # detokenized output (the engine keeps it up to date)
        self.prefix_offset = 0         # output_ids[prefix_offset:read_offset]: the tokens the last
        self.read_offset = 0           # new text was decoded after (see LLMEngine._detokenize)
        self.generator = make_generator(params)
        self.logprobs: list | None = [] if params.logprobs is not None else None   # TokenLogprob a token
        # TokenLogprob a prompt token (None for the first), filled as the prompt is computed
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_seen = None        # bool [vocab] of the prompt's tokens (for a repetition penalty)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def slot(self, pos: int) -> int:
        """The physical cache slot of position ``pos`` (its block must be allocated)."""
        return self.blocks[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole token list (decode steps read one)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class Scheduler:
    """Decides which tokens of which sequences run in the next step (module docstring)."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1, got "
                             f"{max_num_seqs} and {max_num_batched_tokens}")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []    # in arrival order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.block_nodes = []
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # back to the front, behind nothing that arrived earlier than it
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].arrival < seq.arrival:
            pos += 1
        self.waiting.insert(pos, seq)

    def free(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
            seq.block_nodes = []

    def cache_blocks(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that its computed tokens filled since the last
        call in the prefix cache (a no-op without prefix caching)."""
        if not self.allocator.prefix_caching:
            return
        nodes = seq.block_nodes
        for i in range(len(nodes), seq.num_computed // PAGE_SIZE):
            parent = nodes[-1] if nodes else ROOT
            nodes.append(self.allocator.register(seq.blocks[i], parent,
                                                 seq.token_slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)))

    def _shares(self, seq: Sequence) -> bool:
        """Whether ``seq`` may take pages from the prefix cache: with prefix caching, unless
        its prompt is scored (cached pages have no logits)."""
        return self.allocator.prefix_caching and seq.prompt_logprobs is None

    def _computing(self, seq: Sequence, cached: int) -> bool:
        """Whether a running sequence is computing the page of ``seq`` after its ``cached``
        tokens (the same tokens up to that page's end, not computed yet): ``seq`` then
        waits for the page to be cached instead of computing it too (requests that share
        a prompt's start and arrive together, e.g. one system prompt)."""
        end = cached + PAGE_SIZE
        if not self._shares(seq) or end > seq.num_tokens - 1:
            return False
        head = None
        for r in self.running:
            if r.num_computed < end <= r.num_tokens:
                head = seq.token_slice(0, end) if head is None else head
                if r.token_slice(0, end) == head:
                    return True
        return False

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of new tokens)] for the next step, blocks allocated."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = blocks_needed(seq.num_computed + n) - len(seq.blocks)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break                        # seq itself was preempted: it was the last one
            seq.blocks += self.allocator.allocate(need)
            scheduled.append((seq, n))
            budget -= n
            i += 1
        # admit new (or preempted) sequences; not in a step that had to preempt, which
        # would only make them thrash
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            # the cached blocks that start its tokens (never all of them: the last is computed)
            hit, nodes = (self.allocator.match(seq.tokens, (seq.num_tokens - 1) // PAGE_SIZE)
                          if self._shares(seq) else ([], []))
            cached = len(hit) * PAGE_SIZE
            if self._computing(seq, cached):
                break                        # its next page is being computed: it will be cached
            n = min(seq.num_tokens - cached, budget)
            need = blocks_needed(cached + n) - len(hit)
            if need > self.allocator.num_free - self.allocator.num_idle(hit):
                break
            self.waiting.popleft()
            self.allocator.acquire(hit)
            seq.blocks += hit + self.allocator.allocate(need)
            seq.block_nodes = nodes
            seq.num_computed = cached
            if not seq.num_preemptions:
                seq.num_cached_tokens = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.running.sort(key=lambda s: s.arrival)
            scheduled.append((seq, n))
            budget -= n
        if not scheduled and self.has_unfinished():
            raise RuntimeError("scheduler: no sequence fits in the cache "
                               f"({self.allocator.num_free} free blocks of {self.allocator.num_blocks})")
        return scheduled
