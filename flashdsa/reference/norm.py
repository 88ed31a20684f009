"""RMSNorm in plain PyTorch (the inference kernel: flashdsa.ops.norm_rope.rms_norm)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] divided by the root mean square of its last dim (plus ``eps``), times
    ``weight [D]``: computed in fp32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)
