"""Lightning indexer scores (SPEC 1), DeepGEMM ``fp8_mqa_logits`` semantics."""
from __future__ import annotations

import torch


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def indexer_logits(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                   ks: torch.Tensor, ke: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Index scores of every query row against every key row.

        logits[t, s] = k_scale[s] * sum_h weights[t, h] * ReLU(q8[t, h] . k8[s])   for ks[t] <= s < ke[t]
        logits[t, s] = -inf                                                        otherwise

    q8 [S, H, D] and k8 [S_kv, D] are e4m3 (or any float dtype), k_scale [S_kv] and
    weights [S, H] fp32, with the q scale and D^-0.5 already folded into ``weights``.
    Returns [S, S_kv] fp32 (float64 when any input is float64). Computed ``chunk`` query
    rows at a time so the [chunk, H, S_kv] intermediate stays bounded.
    """
    ct = _compute_dtype(q8, k8, k_scale, weights)
    k = k8.to(ct)
    cols = torch.arange(k8.shape[0], device=k8.device)
    out = torch.empty(q8.shape[0], k8.shape[0], dtype=ct, device=q8.device)
    for t0 in range(0, q8.shape[0], chunk):
        t1 = min(t0 + chunk, q8.shape[0])
        dots = torch.einsum("thd,sd->ths", q8[t0:t1].to(ct), k).relu()
        scores = torch.einsum("th,ths->ts", weights[t0:t1].to(ct), dots) * k_scale.to(ct)[None, :]
        inside = (cols[None, :] >= ks[t0:t1, None]) & (cols[None, :] < ke[t0:t1, None])
        out[t0:t1] = scores.masked_fill(~inside, float("-inf"))
    return out
