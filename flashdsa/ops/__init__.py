"""Triton kernels and their host wrappers, one module per op. The host functions here
assume validated inputs: call the public ops in ``flashdsa`` (flashdsa.api) instead."""
