"""Retrieval scoring: the rows scored, exact match and answer loss, against stub models
whose predictions are known."""
from types import SimpleNamespace

import pytest
import torch

from flashdsa.data import PASSKEY_PREFIX, REPEAT_SPAN, VOCAB_SIZE, Corpus, passkey_max_distance
from flashdsa.evaluate import distance_buckets, retrieval_accuracy, retrieval_by_distance, score_answers


class LookBack(torch.nn.Module):
    """Predicts, at every position p, the token ``back`` positions before p + 1 (certain:
    logit 30 on it, 0 elsewhere)."""

    def __init__(self, back: int):
        super().__init__()
        self.back = back
        self.config = SimpleNamespace(index_topk=16)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids, attention="sparse", backend="auto"):
        src = torch.arange(ids.shape[1]) + 1 - self.back
        guess = ids[:, src.clamp_min(0)]
        return SimpleNamespace(logits=30.0 * torch.nn.functional.one_hot(guess, VOCAB_SIZE).float())


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load(max_bytes=1 << 18)


def test_score_answers_reads_the_next_token_of_each_row():
    windows = torch.tensor([[5, 6, 7, 8]])
    logits = torch.full((1, 3, 10), -5.0)
    logits[0, 0, 6], logits[0, 1, 3], logits[0, 2, 8] = 5.0, 5.0, 5.0     # right, wrong, right
    right, nll = score_answers(logits, windows, torch.tensor([[0, 1, 2]]))
    assert right.tolist() == [[True, False, True]]
    assert nll[0, 1] > 9 > 0.01 > nll[0, 0]


def test_repeat_retrieval_is_exact_for_a_model_that_looks_back_the_offset(corpus):
    perfect = retrieval_accuracy(LookBack(128), corpus, 256, n=6, distance=128, task="repeat", batch_size=4)
    assert perfect["accuracy"] == perfect["digit_accuracy"] == 1.0 and perfect["answer_loss"] < 1e-6
    assert perfect["task"] == "repeat" and perfect["distance"] == 128 and perfect["n"] == 6
    # one token off: the copy's digits are random, so about a tenth of them are right by chance
    off = retrieval_accuracy(LookBack(127), corpus, 256, n=6, distance=128, task="repeat")
    assert off["accuracy"] == 0 and off["digit_accuracy"] < 0.3 and off["answer_loss"] > 10
    with pytest.raises(ValueError, match="give its distance"):
        retrieval_accuracy(LookBack(128), corpus, 256, n=2, task="repeat")
    with pytest.raises(ValueError, match=f"needs windows of {128 + REPEAT_SPAN} tokens"):
        retrieval_accuracy(LookBack(128), corpus, 128, n=2, distance=128, task="repeat")


def test_passkey_retrieval_default_distance(corpus):
    res = retrieval_accuracy(LookBack(1), corpus, 256, n=2)
    assert res["task"] == "passkey" and res["distance"] == 4 * 16 + 1


def test_passkey_accuracy_by_distance(corpus):
    """Buckets from 4 x top-k doubling up to what the window holds; in a bucket of one
    distance D, a model that looks back exactly D + the line's length (where the first
    copy's digit sits) is always right, and wrong one distance further."""
    assert distance_buckets(8192, 512) == [(2048, 4095), (4096, passkey_max_distance(8193))]
    assert distance_buckets(256, 16)[0] == (64, 127)
    line = len(PASSKEY_PREFIX) + 6
    res = retrieval_by_distance(LookBack(90 + line), corpus, 256, [(90, 90), (91, 91)], n=4)
    assert [r["accuracy"] for r in res] == [1.0, 0.0]
    assert [(r["distance"], r["max_distance"]) for r in res] == [(90, 90), (91, 91)]
