"""Orthonormal Walsh-Hadamard transform (Sylvester order), applied before FP8 quantization."""
import torch


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dim (n a power of two), with the Sylvester
    Hadamard matrix H_n. Orthonormal and symmetric, hence its own inverse.

    Computed by log2(n) butterfly stages: at stage h, element pairs (i, i + h) inside
    each block of 2h become (a + b, a - b)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"x: last dim must be a power of two for the Hadamard transform, got {n}")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(x.shape) * n ** -0.5
