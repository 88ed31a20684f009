"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


MAX_LOGPROBS = 20   # most likely tokens a request may ask for with each generated one


@dataclass
class SamplingParams:
    """How to pick the tokens of one request.

    temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
    top_k: keep only the k most likely tokens (0 = all).
    seed: seeds this request's own generator, so its samples do not depend on the
        other requests of the batch (None: drawn from torch's global generator).
    max_tokens: most new tokens; the request ends with finish_reason "length" (0: none,
        the prompt is only scored, with ``prompt_logprobs``).
    stop_token_ids: tokens that end the request (finish_reason "stop"); the stop token
        is kept in ``token_ids`` but not in the text. The tokenizer's eos is added
        unless ``ignore_eos``.
    stop: strings that end the request; the text is cut before the stop string.
    logprobs: None, or return with every generated token its log-probability under the
        model (the log-softmax of its logits, before temperature and filtering) and the
        ``logprobs`` most likely tokens of that step (0 to MAX_LOGPROBS; 0: the
        generated token's only).
    prompt_logprobs: None, or the same for every prompt token after the first (given
        the tokens before it); the prompt is then computed whole (no prefix caching).
    presence_penalty, frequency_penalty: subtracted from the logit of every token the
        request has generated, once and once per occurrence (the OpenAI API's, in [-2, 2]).
    repetition_penalty: the logits of every token of the prompt and the output are
        divided by it where positive and multiplied where not (Hugging Face's, > 0; 1: none).
    Penalties act before temperature, top-k and top-p (and on greedy picks too);
    ``logprobs`` are of the model's logits, without them.
    n: choices of the same prompt (``LLM.generate`` and the server; :func:`choices_of`):
        choice i is what a request with seed ``seed + i`` gives alone.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature: expected a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k: expected an int >= 0, got {self.top_k!r}")
        if isinstance(self.n, bool) or not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"n: expected an int >= 1, got {self.n!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 0):
            raise ValueError(f"max_tokens: expected an int >= 0, got {self.max_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and -2 <= v <= 2):
                raise ValueError(f"{name}: expected a number in [-2, 2], got {v!r}")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not (isinstance(rp, (int, float)) and 0 < rp <= 10):
            raise ValueError(f"repetition_penalty: expected a number in (0, 10], got {rp!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name}: expected None or an int in [0, {MAX_LOGPROBS}], got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


def choices_of(params: SamplingParams) -> list[SamplingParams]:
    """The parameters of each of ``params.n`` choices, one engine request each: n 1, and
    choice i seeded ``seed + i`` (unseeded choices draw from torch's generator)."""
    return [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)]


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (natural log of the softmax of
    its logits, before temperature and filtering), and the ``SamplingParams.logprobs``
    most likely tokens of that step as (token id, log-probability), most likely first."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], n_top: list[int]) -> list[TokenLogprob]:
    """The :class:`TokenLogprob` of each row of ``logits [N, V]``: of its token ``tokens[i]``
    and its ``n_top[i]`` most likely tokens (one log-softmax and one copy to the host)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    k = max(n_top)
    top_lp, top_id = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_lp, top_id = top_lp.tolist(), top_id.tolist()
    return [TokenLogprob(t, c, list(zip(top_id[i][:n], top_lp[i][:n])))
            for i, (t, c, n) in enumerate(zip(tokens, chosen, n_top))]


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]],
                    prompt_seen: list[torch.Tensor | None]) -> torch.Tensor:
    """``logits [N, V]`` with the penalties of ``params[i]`` applied to row i (see
    :class:`SamplingParams`): ``outputs[i]`` are the row's generated tokens and
    ``prompt_seen[i]`` a bool [V] mask of its prompt's tokens (:func:`token_mask`; needed
    where it has a repetition penalty). A new tensor when some row has penalties, else
    ``logits`` itself."""
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return logits
    dev, v = logits.device, logits.shape[1]
    out = logits.float().clone()
    ps = [params[i] for i in rows]
    generated = torch.zeros(len(rows), v, device=dev)
    row = torch.tensor([r for r, i in enumerate(rows) for _ in outputs[i]], dtype=torch.long)
    tok = torch.tensor([t for i in rows for t in outputs[i]], dtype=torch.long)
    generated.index_put_((row.to(dev), tok.to(dev)), torch.ones(len(tok), device=dev), accumulate=True)
    freq = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
    sub = out[rows] - freq * generated - pres * (generated > 0)
    if any(p.repetition_penalty != 1 for p in ps):
        none = torch.zeros(v, dtype=torch.bool, device=dev)
        seen = torch.stack([prompt_seen[i] if p.repetition_penalty != 1 else none
                            for i, p in zip(rows, ps)]) | (generated > 0)
        rp = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    out[rows] = sub
    return out


def token_mask(tokens: list[int], vocab: int, device) -> torch.Tensor:
    """bool [vocab]: which tokens occur in ``tokens``."""
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[torch.tensor(tokens, dtype=torch.long, device=device)] = True
    return mask


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(params.seed)
    return g


def filter_sorted(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Temperature, top-k and top-p (nucleus) filtering of ``logits [N, V]``, row i with
    ``temperature[i]`` (> 0), ``top_k[i]`` (0: all) and ``top_p[i]`` (1: all), all rows in
    one sort on the logits' device. Returns (probabilities [N, V] fp32 in descending
    order of the logits, each row summing to 1; that order [N, V]). Top-k keeps every
    token whose logit reaches the k-th largest (ties included); top-p keeps a token when
    the mass of the tokens before it is below top_p, so the most likely token stays."""
    n, v = logits.shape
    scaled, order = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=v), v)
    scaled = scaled.masked_fill(scaled < scaled.gather(1, (k - 1)[:, None]), float("-inf"))
    p = torch.softmax(scaled, dim=-1)
    before = p.cumsum(-1) - p
    p = p.masked_fill((before >= top_p[:, None]) & (top_p < 1.0)[:, None], 0.0)
    return p / p.sum(-1, keepdim=True), order


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities [V] fp32 of one row of logits after :func:`filter_sorted`'s filtering."""
    dev = logits.device
    p, order = filter_sorted(logits[None], torch.tensor([temperature], dtype=torch.float32, device=dev),
                             torch.tensor([top_k], device=dev), torch.tensor([top_p], dtype=torch.float32, device=dev))
    return torch.zeros_like(p[0]).scatter_(0, order[0], p[0])


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of ``logits [N, V]``; row i follows ``params[i]`` and draws from
    ``generators[i]`` (a seeded CPU generator, or None for torch's global one).

    The sampled rows are filtered together on the logits' device (:func:`filter_sorted`);
    each draws one uniform number from its generator on the host and takes the token
    where that falls in its cumulative distribution. A row's token depends on its logits,
    its parameters and its generator only (not on the batch), and a seed gives the same
    tokens on every device up to the float rounding of the distribution."""
    out = [0] * logits.shape[0]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        ids = logits[greedy].argmax(-1).tolist()
        for i, t in zip(greedy, ids):
            out[i] = t
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        dev = logits.device
        ps = [params[i] for i in drawn]
        temperature = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev)
        if any(p.top_k or p.top_p < 1.0 for p in ps):
            probs, order = filter_sorted(logits[drawn], temperature, torch.tensor([p.top_k for p in ps], device=dev),
                                         torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev))
        else:   # temperature only: no sort
            probs, order = torch.softmax(logits[drawn].float() / temperature[:, None], dim=-1), None
        u = torch.tensor([float(torch.rand((), generator=generators[i])) for i in drawn], device=dev)
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=probs.shape[-1] - 1)
        tokens = pick if order is None else order.gather(1, pick)
        for i, t in zip(drawn, tokens[:, 0].tolist()):
            out[i] = t
    return out
