"""Bridges from other libraries' models to flashdsa's kernels (``flashdsa.integrations.transformers``:
Hugging Face transformers' DeepseekV32). Each bridge imports its library only when used."""
