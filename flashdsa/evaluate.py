"""Evaluations of a DSA model against its dense counterpart.

- :func:`loss_by_position`: held-out loss and perplexity, overall and per position bucket
  ([0, 64), [64, 128), [128, 256), ... doubling): sparse attention can only hurt where a
  query has more than ``index_topk`` candidates, so the late buckets are where to look.
- :func:`retrieval_accuracy`: a retrieval task planted in real held-out code
  (flashdsa.data.plant_retrieval): a passkey more than 4 x index_topk tokens before the
  question, or a span of digits repeated at a fixed offset; a sample counts when every
  answer digit is the model's top prediction (teacher forcing); ``digit_accuracy`` is the
  share of answer digits right, and ``answer_loss`` (nats per digit, ln 10 = 2.30 for a
  guess) shows partial use of the context before exact recall emerges.
- :func:`indexer_recall`: for every layer, the share of the dense attention mass (summed
  over heads, normalized per query) that falls on the indexer's top-k selection, averaged
  over queries with more than top-k candidates (the others keep everything).
- :func:`throughput`: forward tokens/s with sparse or dense attention.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .data import Corpus, passkey_max_distance, retrieval_windows
from .recipe import REPEAT_SPAN
from .layers import MLA, causal_ranges


def position_buckets(seq_len: int, first: int = 64) -> list[tuple[int, int]]:
    """[0, first), [first, 2 first), [2 first, 4 first), ... up to seq_len."""
    edges = [0, min(first, seq_len)]
    while edges[-1] < seq_len:
        edges.append(min(edges[-1] * 2, seq_len))
    return list(zip(edges[:-1], edges[1:]))


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def loss_by_position(model, windows: torch.Tensor, attention: str = "sparse", backend: str = "auto",
                     batch_size: int = 4) -> dict:
    """Mean next-token loss over ``windows [n, L + 1]`` and per position bucket.

    Returns {"loss", "ppl", "buckets": [{"start", "end", "loss", "ppl"}], "tokens"}."""
    device = next(model.parameters()).device
    model.eval()
    seq_len = windows.shape[1] - 1
    sums = torch.zeros(seq_len, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        b = windows[i:i + batch_size].to(device)
        with _autocast(device):
            logits = model(b[:, :-1], attention=attention, backend=backend).logits
        nll = F.cross_entropy(logits.float().transpose(1, 2), b[:, 1:], reduction="none")   # [B, L]
        sums += nll.double().sum(0).cpu()
    per_pos = sums / len(windows)
    buckets = []
    for s, e in position_buckets(seq_len):
        loss = float(per_pos[s:e].mean())
        buckets.append({"start": s, "end": e, "loss": loss, "ppl": math.exp(loss)})
    loss = float(per_pos.mean())
    return {"loss": loss, "ppl": math.exp(loss), "buckets": buckets, "tokens": windows[:, 1:].numel()}


def score_answers(logits: torch.Tensor, windows: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced answers: ``logits`` [B, L, V] of ``windows`` [B, L + 1] (the model
    ran on ``windows[:, :-1]``), answer ``rows`` [B, R] (the answer of row p is
    ``windows[:, p + 1]``). Returns (right [B, R] bool: the top prediction is the answer,
    nll [B, R] fp32: the answer's negative log-likelihood)."""
    at = logits.float().gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))   # [B, R, V]
    want = windows.gather(1, rows + 1)
    return at.argmax(-1) == want, -at.log_softmax(-1).gather(-1, want[..., None])[..., 0]


@torch.no_grad()
def retrieval_accuracy(model, corpus: Corpus, seq_len: int, n: int = 32, distance: int | None = None,
                       task: str = "passkey", attention: str = "sparse", backend: str = "auto",
                       batch_size: int = 4, seed: int = 1234, max_distance: int | None = None) -> dict:
    """``task`` retrieval (flashdsa.recipe.RETRIEVAL_TASKS) over ``n`` held-out windows, the
    answer ``distance`` tokens back: a passkey at least that (default 4 * index_topk + 1)
    and at most ``max_distance`` (default: anywhere earlier in the window), a repeat
    exactly that (required), or from that to ``max_distance`` when given. Returns {"task",
    "accuracy", "digit_accuracy", "answer_loss", "distance", "max_distance", "n"}."""
    device = next(model.parameters()).device
    model.eval()
    if distance is None:
        if task != "passkey":
            raise ValueError(f"retrieval task {task!r}: give its distance (the offset it was trained with)")
        distance = 4 * model.config.index_topk + 1
    windows, rows = retrieval_windows(corpus, n, seq_len, distance, seed, task, max_distance)
    hits, digit_hits, nll = 0, 0, 0.0
    for i in range(0, n, batch_size):
        b, r = windows[i:i + batch_size].to(device), rows[i:i + batch_size].to(device)
        with _autocast(device):
            logits = model(b[:, :-1], attention=attention, backend=backend).logits   # [B, L, V]
        ok, answer_nll = score_answers(logits, b, r)
        hits += int(ok.all(-1).sum())
        digit_hits += int(ok.sum())
        nll += float(answer_nll.sum())
    # answer_loss: mean nats per answer digit; ln 10 = 2.303 is guessing, 0 is perfect recall
    return {"task": task, "accuracy": hits / n, "digit_accuracy": digit_hits / (n * rows.shape[1]),
            "answer_loss": nll / (n * rows.shape[1]), "distance": distance, "max_distance": max_distance, "n": n}


def distance_buckets(seq_len: int, index_topk: int, task: str = "passkey") -> list[tuple[int, int]]:
    """Distance buckets [d, 2d) of ``task`` from 4 * index_topk (where the selection must
    reach back past most of the context) doubling while a window of seq_len (+ 1) tokens
    holds them: [(d, 2d - 1), ...], the last one cut at the longest distance the task can
    plant (:func:`~flashdsa.data.passkey_max_distance`; a repeat: the window less its span)."""
    longest = passkey_max_distance(seq_len + 1) if task == "passkey" else seq_len + 1 - REPEAT_SPAN
    out, d = [], 4 * index_topk
    while d <= longest:
        out.append((d, min(2 * d - 1, longest)))
        d *= 2
    return out


def retrieval_by_distance(model, corpus: Corpus, seq_len: int, buckets: list[tuple[int, int]], n: int = 32,
                          attention: str = "sparse", backend: str = "auto", batch_size: int = 4,
                          task: str = "passkey") -> list[dict]:
    """``task`` retrieval (:func:`retrieval_accuracy`) in each distance bucket (lo, hi): the
    first copy lo to hi tokens before the second, ``n`` held-out windows a bucket."""
    return [retrieval_accuracy(model, corpus, seq_len, n, lo, task, attention, backend, batch_size,
                               max_distance=hi) for lo, hi in buckets]


def _dense_probs(mla: MLA, x: torch.Tensor, positions: torch.Tensor, rows: slice) -> torch.Tensor:
    """Head-summed, L1-normalized dense attention of one sequence: [len(rows), L] fp32.

    Recomputes MLA's queries and keys the way MLA's dense attention does (SPEC 3,
    non-absorbed form)."""
    t = x.shape[0]
    _, q_nope, q_pe, kv, k_pe, _, _ = mla.project(x, positions)
    k_nope = mla.kv_b_proj(kv).view(t, mla.n_heads, mla.nope + mla.v_dim)[..., :mla.nope]
    qf = torch.cat((q_nope, q_pe), -1)[rows].float()                               # [R, H, d]
    kf = torch.cat((k_nope, k_pe.expand(-1, mla.n_heads, -1)), -1).float()          # [L, H, d]
    logits = torch.einsum("rhd,lhd->hrl", qf, kf) * mla.softmax_scale
    r_idx = torch.arange(t, device=x.device)[rows]
    causal = torch.arange(t, device=x.device)[None, :] <= r_idx[:, None]
    probs = logits.masked_fill(~causal[None], float("-inf")).softmax(-1)          # [H, R, L]
    return probs.sum(0) / mla.n_heads


@torch.no_grad()
def indexer_recall(model, windows: torch.Tensor, backend: str = "auto", row_chunk: int = 1024) -> dict:
    """Share of dense attention mass captured by the indexer's top-k, per layer.

    Runs the model densely on each window [L + 1] (its last token dropped), captures each
    layer's attention input, and compares the dense head-summed attention of every query
    with more than ``index_topk`` candidates against the indexer's selection. The oracle is
    the mass of each query's own k heaviest keys under that attention: the most any
    selection of k keys can capture.
    Returns {"mean", "per_layer": [...], "oracle_mean", "oracle_per_layer": [...], "queries": n}."""
    device = next(model.parameters()).device
    model.eval()
    layers = [layer.self_attn for layer in model.model.layers]
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, i=i: captured.__setitem__(i, args[0]),
                                         with_kwargs=True) for i, m in enumerate(layers)]
    topk = model.config.index_topk
    mass = torch.zeros(len(layers), dtype=torch.float64)
    oracle = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    try:
        for w in windows:
            ids = w[:-1].to(device)
            t = ids.shape[0]
            if t <= topk:
                continue
            with _autocast(device):
                model(ids[None], attention="dense", backend=backend)
            positions = torch.arange(t, device=device)
            cu = torch.tensor([0, t], dtype=torch.int32, device=device)
            ks, ke = causal_ranges(cu, t)
            for li, mla in enumerate(layers):
                x = captured[li].reshape(t, -1)
                with _autocast(device):
                    cos, sin = mla.rope_cos_sin(positions)
                    qr = mla.q_a_layernorm(mla.q_a_proj(x))
                    idx = mla.indexer(x, qr, cos, sin, ks, ke, backend=backend).long()   # [T, k]
                for r0 in range(topk, t, row_chunk):
                    rows = slice(r0, min(r0 + row_chunk, t))
                    with _autocast(device):
                        p = _dense_probs(mla, x, positions, rows)                        # [R, T]
                    sel = idx[rows]
                    got = p.gather(1, sel.clamp_min(0)) * (sel >= 0)
                    mass[li] += float(got.sum(1).double().sum())
                    oracle[li] += float(p.topk(topk, dim=1).values.sum(1).double().sum())
            count += t - topk
    finally:
        for h in hooks:
            h.remove()
    per_layer = (mass / max(count, 1)).tolist()
    best = (oracle / max(count, 1)).tolist()
    return {"mean": sum(per_layer) / len(per_layer), "per_layer": per_layer,
            "oracle_mean": sum(best) / len(best), "oracle_per_layer": best, "queries": count}


@torch.no_grad()
def throughput(model, batch_size: int, seq_len: int, attention: str, backend: str = "auto",
               iters: int = 3) -> float:
    """Forward tokens/s on random tokens (after one warm-up call), ``attention`` "sparse"
    or "dense"."""
    device = next(model.parameters()).device
    model.eval()
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), device=device)
    with _autocast(device):
        model(x, attention=attention, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x, attention=attention, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return iters * x.numel() / (time.perf_counter() - t0)


def evaluate(model, corpus: Corpus, seq_len: int, attention: str = "sparse", backend: str = "auto",
             n_windows: int = 16, n_retrieval: int = 32, n_recall: int = 4, batch_size: int = 4,
             retrieval: str = "passkey", retrieval_distance: int | None = None,
             retrieval_buckets: list[tuple[int, int]] | None = None,
             retrieval_max_distance: int | None = None) -> dict:
    """All of the above for one model, ``attention`` "sparse" or "dense"; ``retrieval``,
    ``retrieval_distance`` and ``retrieval_max_distance``: the task and distances of
    :func:`retrieval_accuracy`; ``retrieval_buckets``: also its accuracy by distance
    (:func:`retrieval_by_distance`)."""
    windows = corpus.eval_windows(n_windows, seq_len)
    out = {"attention": attention, "seq_len": seq_len, "index_topk": model.config.index_topk}
    out["lm"] = loss_by_position(model, windows, attention, backend, batch_size)
    out["retrieval"] = retrieval_accuracy(model, corpus, seq_len, n_retrieval, retrieval_distance, retrieval,
                                          attention=attention, backend=backend, batch_size=batch_size,
                                          max_distance=retrieval_max_distance)
    if retrieval_buckets:
        out["retrieval_by_distance"] = retrieval_by_distance(model, corpus, seq_len, retrieval_buckets,
                                                             n_retrieval, attention, backend, batch_size, retrieval)
    out["indexer_recall"] = indexer_recall(model, windows[:n_recall], backend) if n_recall else None
    return out
