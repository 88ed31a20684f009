"""Retrieval scoring: the rows scored, exact match and answer loss, against stub models
whose predictions are known."""
from types import SimpleNamespace

import pytest
import torch

from flashdsa.data import REPEAT_SPAN, VOCAB_SIZE, Corpus
from flashdsa.evaluate import retrieval_accuracy, score_answers


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
