"""The training recipe's names and the demo's settings, without importing torch: the CLI
builds its flags from them (``flashdsa --help`` stays fast) and flashdsa.train runs them."""
from __future__ import annotations

from dataclasses import dataclass

# The recipe's stages as the two knobs of the model's forward: (attention, indexer_loss).
STAGES = {
    "dense": ("dense", False),     # pretraining or continued dense training
    "warmup": ("dense", True),     # dense attention, the indexer fits its distribution
    "sparse": ("sparse", True),    # top-k sparse attention, the KL on the selected rows
}


# Retrieval tasks planted into training windows and evaluated (flashdsa.data.plant_retrieval):
# "passkey" (a copy found by content), "repeat" (REPEAT_SPAN random digits, copied at a fixed offset).
RETRIEVAL_TASKS = ("passkey", "repeat")
REPEAT_SPAN = 64


@dataclass
class ComparisonConfig:
    """The dense-vs-DSA comparison: dense pretraining, then from the same weights
    (a) dense training continued and (b) DSA warm-up + sparse training, at equal LM steps
    on the same tokens: (b)'s warm-up trains the indexers alone on the branch's first
    ``warmup_steps`` batches, then its sparse stage trains on exactly (a)'s batches, in
    the same order, with the same schedule."""

    preset: str = "tiny"
    seq_len: int = 256               # index_topk = seq_len / 16 = 16: 94% of late queries' keys dropped
    batch_size: int = 8
    pretrain_steps: int = 600
    branch_steps: int = 300          # LM steps of each branch: (a) dense steps = (b) sparse steps
    warmup_steps: int = 80           # DSA warm-up stage (indexer only), before (b)'s sparse steps
    lr: float = 2e-3
    branch_lr: float = 6e-4
    warmup_lr: float = 1e-3          # the paper's warm-up learning rate
    retrieval: str = "repeat"        # the task planted in training windows and evaluated (RETRIEVAL_TASKS)
    retrieval_distance: int | None = 128   # repeat: its fixed offset (8 x index_topk at seq_len 256); passkey:
                                           # the distance floor (None: 4 x index_topk + 1)
    retrieval_max_distance: int | None = None  # the largest distance planted and evaluated (repeat: offsets
                                               # drawn from [retrieval_distance, this]; None: fixed offset)
    plant_prob: float = 0.5          # share of training windows with the task planted
    plant_curriculum: int = 0        # data steps of the distance curriculum (TrainConfig.plant_curriculum)
    seed: int = 0
    backend: str = "auto"
    eval_windows: int = 16
    eval_retrieval: int = 32
    eval_recall: int = 4
    eval_by_distance: bool = False   # also accuracy by distance bucket (flashdsa.evaluate.distance_buckets);
                                     # passkey, or a repeat with retrieval_max_distance
    untrained_indexer_row: bool = True   # also evaluate (a) with DSA and its never-trained indexer
    pretrain_gate: float = 0.0       # stop before the branches unless the pretrained dense model gets at least
                                     # this share of the retrieval's digits right (0: no gate)
    log_every: int = 25
