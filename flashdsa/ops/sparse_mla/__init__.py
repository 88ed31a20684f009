"""Sparse MLA attention (SPEC 3 and 4) on Triton: prefill forward, paged decode, backward.

Reference: flashdsa.reference.sparse_mla; tests: tests/ops/test_sparse_mla*.py; benchmarks:
benchmarks/bench_sparse_mla*.py; results: docs/benchmarks_sparse_mla.md. Modules:
  fwd.py      the bf16/fp32 forward kernel, the probabilities reduction kernel, the split-k
              combine kernel and their launcher (run_over_rows, run_sparse_mla_fwd)
  fwd_fp8.py  the forward kernel over fp8_ds_mla rows (656-byte cache format)
  decode.py   paged decode over a bf16 or fp8_ds_mla latent cache (sparse_mla_decode)
  bwd.py      the backward kernels and their launcher (run_sparse_mla_bwd)
  op.py       the torch.library custom ops flashdsa::sparse_mla_fwd / flashdsa::sparse_mla_bwd,
              their fake impls and autograd (sparse_mla_fwd, sparse_mla_bwd)
Host functions assume validated inputs: call the public ops in ``flashdsa`` instead.
"""
from .bwd import run_sparse_mla_bwd
from .decode import choose_n_split, sparse_mla_decode
from .fwd import CONFIGS, default_config, run_sparse_mla_fwd
from .op import sparse_mla_bwd, sparse_mla_fwd

__all__ = [
    "sparse_mla_fwd", "sparse_mla_bwd", "sparse_mla_decode", "run_sparse_mla_fwd", "run_sparse_mla_bwd",
    "choose_n_split", "CONFIGS", "default_config",
]
