"""Helpers shared by the tests (import as ``from tests.utils import ...``)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Kernels run on the GPU when there is one, else under the Triton interpreter on CPU.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 over finite entries; inf/nan must match exactly."""
    x, ref = x.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin].nan_to_num(), ref[~fin].nan_to_num()):
        return float("inf")
    x, ref = x[fin], ref[fin]
    den = ref.norm()
    return float((x - ref).norm() / den) if den > 0 else float((x - ref).norm())
