"""Test setup shared by all tests.

Without a GPU the Triton kernels run under the Triton interpreter, which must be
switched on before triton is first imported, hence here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are 0)."""
    x, ref = x.double(), ref.double()
    den = ref.norm()
    return float((x - ref).norm() / den) if den > 0 else float((x - ref).norm())
