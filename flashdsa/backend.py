"""Backend selection: every public op takes ``backend="auto" | "triton" | "reference"``,
and the ops with a Hopper kernel written in Gluon (``flashdsa.sparse_mla_fwd``) also
``"gluon"``.

"auto" picks the GPU kernels for CUDA tensors when Triton imports (for an op with a Gluon
kernel: that one on sm_90 where it supports the shape, the portable Triton kernel
elsewhere), and the pure-PyTorch reference otherwise. "triton" forces the portable Triton
kernel; on CPU tensors it runs under the Triton interpreter, which needs
``TRITON_INTERPRET=1`` set before Triton is imported (that is how the CPU tests exercise
the kernels). "gluon" forces the Gluon kernel and fails where it cannot run.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "gluon", "reference")


# Looked up once at import: a plain constant keeps torch.compile from tracing a lookup.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_inference(x: torch.Tensor) -> bool:
    """Whether the modules take the inference kernels (flashdsa.ops.norm_rope) for ``x``:
    a CUDA tensor, no autograd recording, not inside torch.compile (which fuses the torch
    ops itself), Triton present and not interpreted."""
    return (x.is_cuda and _TRITON_AVAILABLE and not torch.is_grad_enabled() and not triton_interpreted()
            and not torch.compiler.is_compiling())


def resolve_backend(backend: str, x: torch.Tensor, gluon: bool = False) -> str:
    """Return "triton" or "reference" for an op whose main input is ``x``; with ``gluon``
    (the op has a Gluon kernel) also "gluon", for ``backend="gluon"`` on a CUDA tensor."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "gluon":
        if not gluon:
            raise ValueError("backend='gluon': this op has no Gluon kernel; use 'auto', 'triton' or 'reference'")
        if not (_TRITON_AVAILABLE and x.is_cuda):
            raise RuntimeError("backend='gluon' needs CUDA tensors and the triton package (the Gluon kernels "
                               "do not run in the Triton interpreter)")
        return backend
    usable = triton_available() and (x.is_cuda or triton_interpreted())
    if backend == "auto":
        return "triton" if usable and x.is_cuda else "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if not usable:
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "importing triton to run the kernels on CPU tensors")
    return backend
