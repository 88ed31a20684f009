"""The indexer's KL losses of DSA training (SPEC 5), naive and materialized.

Ground truth for the Triton kernels of flashdsa.ops.indexer_loss: these build [T, H, S]
attention probabilities and [T, S] index scores outright, so they are for small shapes
only. Float64 inputs give float64 results (use them for gradcheck). Inputs are assumed
valid: the public ops (``flashdsa.warmup_kl_loss`` and the others, flashdsa.api) check
them before calling these.

Notation (T query rows, S key rows, H attention heads, H_I indexer heads):
    attention logits  a[t,h,s] = sm_scale * q[t,h] . kv[s]            (q [T,H,d_qk], kv [S,1,d_qk])
    target            p[t,s]   = (1/H) sum_h exp(a[t,h,s] - lse[t,h])  over the candidate set of t,
                      then L1-normalized over that set (the attention side is detached)
    index scores      I[t,s]   = sum_j w[t,j] * ReLU(iq[t,j] . ik[s])  (iq [T,H_I,d_I], ik [S,d_I],
                                                                        w [T,H_I], scales folded in)
    loss              L = sum_t KL(p[t,:] || softmax(I[t,:]))          over the candidate set

The warm-up stage's candidate set of row t is the causal range [ks[t], ke[t]) (dense
attention); the sparse stage's is the selected slots indices[t, :] (valid ones only;
a row listed twice counts twice, as in the attention). Rows with an empty set add 0.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean", "none")


def indexer_scores(iq: torch.Tensor, ik: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """I[t, s] = sum_j weights[t, j] * ReLU(iq[t, j] . ik[s]): [T, S] in the promoted dtype
    (at least fp32). Differentiable; no masking."""
    ct = torch.promote_types(torch.promote_types(iq.dtype, ik.dtype), torch.float32)
    dots = torch.einsum("tjd,sd->tjs", iq.to(ct), ik.to(ct)).relu()
    return torch.einsum("tj,tjs->ts", weights.to(ct), dots)


def attention_probs_headsum(q: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor | None, sm_scale: float,
                            rows: torch.Tensor | None = None, member: torch.Tensor | None = None) -> torch.Tensor:
    """p[t, j] = (1/H) sum_h exp(sm_scale q[t,h].kv[r_j] - lse[t,h]), detached, over the key rows
    r_j = rows[t, j] ([T, N], default every row: N = S). ``lse=None``: the logsumexp is taken
    here over the entries where ``member`` [T, N] is True (as the attention over that set
    would). Rows whose lse is +inf (no valid key) give 0."""
    q, kv = q.detach(), kv.detach()
    ct = torch.promote_types(q.dtype, torch.float32)
    logits = torch.einsum("thd,sd->ths", q.to(ct), kv[:, 0].to(ct)) * sm_scale  # [T, H, S]
    if rows is not None:
        logits = logits.gather(2, rows[:, None, :].expand(-1, logits.shape[1], -1))  # [T, H, N]
    if lse is None:
        masked = logits.masked_fill(~member[:, None, :], float("-inf"))
        lse = torch.logsumexp(masked, dim=-1)
        lse = torch.where(member.any(-1)[:, None], lse, torch.full_like(lse, float("inf")))
    probs = torch.exp(logits - lse.detach().to(ct)[..., None])
    return probs.nan_to_num(0.0, posinf=0.0).mean(dim=1)


def _kl_rows(p: torch.Tensor, scores: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_n || softmax(scores)) over the entries where ``member`` is True.
    p, scores, member: [T, N]. Empty rows give 0."""
    p = p.masked_fill(~member, 0.0)
    z = p.sum(-1, keepdim=True)
    p_n = torch.where(z > 0, p / z.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    s = scores.masked_fill(~member, float("-inf"))
    any_member = member.any(-1, keepdim=True)
    logq = torch.log_softmax(s.masked_fill(~any_member, 0.0), dim=-1)
    # p_n (log p_n - log q): xlogy gives 0 where p_n = 0; masked entries have p_n = 0 and
    # log q = -inf, so zero them before multiplying to keep NaN out of values and grads.
    cross = p_n * logq.masked_fill(~member, 0.0)
    return (torch.xlogy(p_n, p_n) - cross).sum(-1)


def reduce_loss(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-row losses ``kl [T]`` reduced: "sum" (SPEC 5), "mean" (over the T rows) or
    "none" (``kl`` itself)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return kl.sum() if reduction == "sum" else kl.mean() if reduction == "mean" else kl


def warmup_kl_loss(iq: torch.Tensor, ik: torch.Tensor, weights: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                   lse: torch.Tensor, sm_scale: float, ks: torch.Tensor, ke: torch.Tensor,
                   reduction: str = "sum") -> torch.Tensor:
    """Dense warm-up loss: sum_t KL(p[t] || softmax(I[t])) over each row's [ks[t], ke[t]).

    iq [T, H_I, d_I], ik [S, d_I], weights [T, H_I]: the indexer (gradients flow to these);
    q [T, H, d_qk], kv [S, 1, d_qk], lse [T, H]: the dense attention's inputs and its
    natural-log lse over the same ranges (detached; None: computed here from q and kv).
    ks, ke [T] int. reduction: "sum" (SPEC 5), "mean" (over the T rows) or "none" ([T]).
    """
    cols = torch.arange(ik.shape[0], device=iq.device)
    member = (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())
    p = attention_probs_headsum(q, kv, lse, sm_scale, member=member)
    scores = indexer_scores(iq, ik, weights)
    return reduce_loss(_kl_rows(p.to(scores.dtype), scores, member), reduction)


def _slots(indices: torch.Tensor, s: int):
    """Selected rows [T, topk] (clamped into range) and which slots are valid."""
    idx = indices.reshape(indices.shape[0], -1).long()
    member = (idx >= 0) & (idx < s)
    return idx.clamp(0, max(s - 1, 0)), member


def sparse_kl_loss(iq: torch.Tensor, ik: torch.Tensor, weights: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                   lse: torch.Tensor, sm_scale: float, indices: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Sparse-stage loss: the KL restricted to each row's selected slots (both distributions
    renormalized over them). ``indices`` [T, 1, topk] or [T, topk], -1 or >= S invalid;
    other arguments as :func:`warmup_kl_loss` (lse from the sparse attention)."""
    rows, member = _slots(indices, ik.shape[0])
    p = attention_probs_headsum(q, kv, lse, sm_scale, rows=rows, member=member)
    return sparse_kl_loss_from_probs(iq, ik, weights, p, indices, reduction)


def sparse_kl_loss_from_probs(iq: torch.Tensor, ik: torch.Tensor, weights: torch.Tensor, attn_probs: torch.Tensor,
                              indices: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """:func:`sparse_kl_loss` with the target given: ``attn_probs`` [T, topk], the head-mean
    attention probability of each slot (as ``sparse_mla_fwd(..., return_probs=True)`` gives;
    any nonnegative weights work, they are L1-normalized over the valid slots here)."""
    rows, member = _slots(indices, ik.shape[0])
    scores = indexer_scores(iq, ik, weights).gather(1, rows)
    return reduce_loss(_kl_rows(attn_probs.detach().to(scores.dtype), scores, member), reduction)
