"""The indexer KL losses of DSA training (SPEC 5), blockwise in Triton.

    kernels.py  the forward and backward kernels (the algorithm is described there)
    launch.py   block sizes (CONFIGS) and the launchers indexer_kl_fwd / indexer_kl_bwd
    op.py       the custom ops flashdsa::indexer_kl_fwd / _bwd, autograd, and the losses

Reference: flashdsa/reference/indexer_loss.py; public ops: flashdsa.warmup_kl_loss,
flashdsa.sparse_kl_loss, flashdsa.sparse_kl_loss_from_probs (flashdsa.api).
"""
from .launch import CONFIGS, config_for, indexer_kl_bwd, indexer_kl_fwd, query_block
from .op import sparse_kl_loss, sparse_kl_loss_from_probs, warmup_kl_loss

__all__ = ["CONFIGS", "config_for", "query_block", "indexer_kl_fwd", "indexer_kl_bwd", "warmup_kl_loss", "sparse_kl_loss",
           "sparse_kl_loss_from_probs"]
