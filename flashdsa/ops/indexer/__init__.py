"""Triton lightning indexer (SPEC 1, 2 and 4): FP8 scores and their top-k, ragged
(prefill) and paged (decode), and the write path of the paged key cache.

    scores.py     the FP8 scores kernel (logits; the scoring pass of the threshold
                  top-k), block sizes, :class:`Problem`, :func:`indexer_logits`
    selection.py  int32 score keys and the exact in-register top-k both methods use
    direct.py     the top-k of short rows: scores of row chunks, then an in-register
                  exact select a row
    threshold.py  the top-k of long rows: sample thresholds, keep-above-threshold pass,
                  select kernel; :func:`select_topk` (which picks the method),
                  :func:`indexer_topk`
    filter_sm90.py  the threshold top-k's filter pass in Gluon on Hopper (sm_90)
    streaming.py  the streaming top-k kernel: exact on any input, the fallback
    paged.py      the paged problem, :func:`paged_indexer_logits`,
                  :func:`paged_indexer_topk` and :func:`indexer_cache_write`

The reference is flashdsa.reference.indexer (+ topk, paged_indexer); the public,
validated ops are flashdsa.indexer_logits / indexer_topk / paged_indexer_logits /
paged_indexer_topk. Host functions here assume validated inputs.
"""
from .paged import indexer_cache_write, paged_indexer_logits, paged_indexer_topk, paged_problem
from .scores import (
    SCORES_ATOMIC,
    SCORES_SLOTS,
    SCORES_STORE,
    Problem,
    default_config,
    indexer_logits,
    launch_scores,
    ragged_problem,
)
from .direct import DIRECT_MAX_POS, direct_topk, prefers_direct
from .streaming import streaming_topk
from .threshold import METHODS, indexer_select_kernel, indexer_topk, sample_thresholds, select_topk, threshold_topk

__all__ = [
    "indexer_logits", "indexer_topk", "paged_indexer_logits", "paged_indexer_topk", "indexer_cache_write",
    "Problem", "ragged_problem", "paged_problem", "default_config", "launch_scores", "select_topk",
    "threshold_topk", "sample_thresholds", "streaming_topk", "indexer_select_kernel", "direct_topk",
    "DIRECT_MAX_POS", "METHODS", "prefers_direct",
    "SCORES_STORE", "SCORES_SLOTS", "SCORES_ATOMIC",
]
