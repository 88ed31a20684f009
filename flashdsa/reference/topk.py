"""Fine-grained top-k selection over index scores (SPEC 2)."""
from __future__ import annotations

import torch


def topk_indices(logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` largest scores of each row inside its range [ks, ke).

    logits [S, S_kv]; ks, ke [S]. Returns [S, topk] int32: the chosen column indices in
    descending score order, then -1 padding when the row has fewer than ``topk``
    candidates (ke - ks < topk). Ties may break either way.
    """
    s, s_kv = logits.shape
    cols = torch.arange(s_kv, device=logits.device)
    inside = (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
    masked = logits.masked_fill(~inside, float("-inf"))
    k = min(topk, s_kv)
    idx = masked.topk(k, dim=-1).indices
    rank = torch.arange(k, device=logits.device)
    count = (ke - ks).to(idx.dtype)
    idx = torch.where(rank[None, :] < count[:, None], idx, -1)
    out = torch.full((s, topk), -1, dtype=torch.int32, device=logits.device)
    out[:, :k] = idx.to(torch.int32)
    return out
