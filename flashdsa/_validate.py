"""Input checks for the public API.

Kernels assume validated inputs; every public op checks its arguments here once,
and each error names the argument, what it got and what was expected. The checks
are skipped while torch.compile traces (they only read metadata, but keeping the
graph free of Python branching on shapes is cheaper).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    x,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    layout: str = "",
) -> None:
    """Raise TypeError/ValueError unless ``x`` is a tensor of the given rank, dtype,
    shape (``None`` entries match anything) and device. ``layout`` is a
    human-readable description like "[s_q, h_q, d_qk]" used in messages."""
    if _compiling():
        return
    where = f" {layout}" if layout else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor{where}, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor{where}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {x.dtype}")
    if shape is not None:
        if len(shape) != x.dim() or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}{where}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the other inputs), got {x.device}")


def check(cond: bool, exc: type[Exception], message: str) -> None:
    """Raise ``exc(message)`` unless ``cond`` (skipped while compiling)."""
    if not _compiling() and not cond:
        raise exc(message)


def check_same_dtype(**tensors: torch.Tensor) -> None:
    if _compiling():
        return
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"expected one dtype for {', '.join(dtypes)}, got {desc}")


def check_range(name: str, ks: torch.Tensor, ke: torch.Tensor, upper: int) -> None:
    """Candidate ranges [ks, ke): need 0 <= ks <= ke <= upper, elementwise."""
    if _compiling():
        return
    if bool((ks > ke).any()):
        i = int((ks > ke).nonzero()[0, 0])
        raise ValueError(f"{name}: ks must be <= ke for every row, row {i} has ks={int(ks[i])} > ke={int(ke[i])}")
    if bool((ks < 0).any()) or bool((ke > upper).any()):
        raise ValueError(f"{name}: ks and ke must lie in [0, {upper}] (the key count), got "
                         f"ks in [{int(ks.min())}, {int(ks.max())}], ke in [{int(ke.min())}, {int(ke.max())}]")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """cu_seqlens: int32 [B + 1], starting at 0, non-decreasing, ending at ``total``."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), layout="[B + 1]")
    if _compiling():
        return
    c = cu_seqlens.tolist()
    check(len(c) >= 2 and c[0] == 0 and c[-1] == total and all(a <= b for a, b in zip(c, c[1:])), ValueError,
          f"cu_seqlens: expected non-decreasing offsets from 0 to {total} (the token count), got {c[:8]}"
          f"{'...' if len(c) > 8 else ''}")
