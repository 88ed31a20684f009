"""Training on several processes with PyTorch's own distributed stack: data parallelism
with FSDP2 (:mod:`flashdsa.distributed.fsdp`), context parallelism of one long sequence
(:mod:`flashdsa.distributed.context_parallel`). See docs/distributed.md."""
