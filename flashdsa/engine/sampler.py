"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick the tokens of one request.

    temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
    top_k: keep only the k most likely tokens (0 = all).
    seed: seeds this request's own generator, so its samples do not depend on the
        other requests of the batch (None: drawn from torch's global generator).
    max_tokens: most new tokens; the request ends with finish_reason "length".
    stop_token_ids: tokens that end the request (finish_reason "stop"); the stop token
        is kept in ``token_ids`` but not in the text. The tokenizer's eos is added
        unless ``ignore_eos``.
    stop: strings that end the request; the text is cut before the stop string.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k: expected an int >= 0, got {self.top_k!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens: expected an int >= 1, got {self.max_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(params.seed)
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities [V] fp32 after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep token i when the mass of the tokens before it is below top_p: the most
        # likely token always stays
        before = sorted_p.cumsum(0) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of ``logits [N, V]``; row i follows ``params[i]`` and draws from
    ``generators[i]`` (a seeded CPU generator, or None for the global one)."""
    out = [0] * logits.shape[0]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        ids = logits[greedy].argmax(-1).tolist()
        for i, t in zip(greedy, ids):
            out[i] = t
    for i, p in enumerate(params):
        if p.greedy:
            continue
        # sampled on the CPU so that a seed gives the same tokens on every device
        probs = filter_logits(logits[i].cpu(), p.temperature, p.top_k, p.top_p)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out
