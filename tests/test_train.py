"""Training stages, schedule, exact resume, seeding, the stage record, progress output."""
import io
import random
import sys

import numpy
import pytest
import torch

from flashdsa.data import Corpus
from flashdsa.model import DSAForCausalLM
from flashdsa.train import (
    STAGES_KEY,
    TrainConfig,
    indexer_trained,
    lr_factor,
    preset_config,
    seed_everything,
    set_trainable,
    train,
    trained_stages,
)

SEQ = 64


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load(max_bytes=1 << 18)


def _model(seed=0):
    torch.manual_seed(seed)
    return DSAForCausalLM(preset_config("tiny", SEQ))


def _cfg(**kw):
    base = dict(steps=6, batch_size=2, seq_len=SEQ, lr=3e-3, warmup_steps=2, log_every=1, plant_prob=0.5)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[55] == pytest.approx(0.55)


def test_passkey_curriculum_feeds_the_scheduled_batches(corpus, monkeypatch):
    """With plant_curriculum, each step's batch takes the curriculum's distances for its
    data step (flashdsa.data.curriculum_distances), then the plain floor."""
    import flashdsa.train as T

    seen = []
    plain = T.training_batch
    monkeypatch.setattr(T, "training_batch", lambda *a: seen.append((a[1], a[6], a[8])) or plain(*a))
    train(_model(), corpus, _cfg(steps=4, batch_size=1, seq_len=256, plant_prob=1.0, plant_curriculum=3),
          progress=False)
    floor = seen[-1][1]   # the passkey floor train() picks (4 x index_topk + 1, capped to fit the window)
    assert seen == [(s, *T.curriculum_distances(s, floor, 256, 3)) for s in range(3)] + [(3, floor, None)]
    assert seen[0][2] < seen[1][2] < seen[2][2]


def test_repeat_curriculum_then_the_plain_offsets(corpus, monkeypatch):
    """The repeat task takes the curriculum too: offsets from 64 up during it, then its own
    range (plant_distance to plant_max_distance)."""
    import flashdsa.train as T

    seen = []
    plain = T.training_batch
    monkeypatch.setattr(T, "training_batch", lambda *a: seen.append((a[6], a[8])) or plain(*a))
    train(_model(), corpus, _cfg(steps=4, batch_size=1, seq_len=256, plant_prob=1.0, plant="repeat",
                                 plant_distance=100, plant_max_distance=180, plant_curriculum=3), progress=False)
    assert seen == [T.curriculum_distances(s, 100, 256, 3) for s in range(3)] + [(100, 180)]
    assert seen[0] == (64, 64) and seen[2][0] < seen[2][1]


def test_dense_stage_learns(corpus):
    model = _model()
    st = train(model, corpus, _cfg(steps=25, lr=5e-3), progress=False)
    losses = [h[1] for h in st.history]
    assert st.step == 25 and st.data_step == 25 and st.tokens == 25 * 2 * SEQ
    # ln(259) = 5.56 -> well below after 25 steps; the mean of the last 5 batches, since one
    # batch can be hard (seen on the H200's stdlib corpus: the 25th batch alone is 4.8)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert all(p.requires_grad for p in model.parameters())


def test_exact_resume(corpus, tmp_path):
    ref = _model()
    train(ref, corpus, _cfg(), progress=False)
    part = _model()
    train(part, corpus, _cfg(out_dir=str(tmp_path)), progress=False, stop_after=3)
    other = _model(seed=1)                    # different weights: all must come from the file
    torch.manual_seed(123)
    st = train(other, corpus, _cfg(out_dir=str(tmp_path)), progress=False, resume=tmp_path / "train_state.pt")
    assert st.step == 6 and st.data_step == 6
    for (name, a), b in zip(ref.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="stage"):
        train(_model(), corpus, _cfg(stage="sparse"), resume=tmp_path / "train_state.pt", progress=False)


def test_resume_restores_every_generator(corpus, tmp_path):
    train(_model(), corpus, _cfg(out_dir=str(tmp_path)), progress=False, stop_after=2)
    draws = (random.random(), float(numpy.random.rand()), float(torch.rand(())))
    seed_everything(99)
    train(_model(), corpus, _cfg(), progress=False, resume=tmp_path / "train_state.pt", stop_after=0)
    assert (random.random(), float(numpy.random.rand()), float(torch.rand(()))) == draws


def test_data_step_continues_the_stream(corpus, monkeypatch):
    import flashdsa.train as tr
    seen = []
    real = tr.training_batch
    monkeypatch.setattr(tr, "training_batch", lambda c, step, *a: seen.append(step) or real(c, step, *a))
    st = train(_model(), corpus, _cfg(steps=2), data_step=5, progress=False)
    assert seen == [5, 6] and st.data_step == 7


def test_warmup_freezes_all_but_indexer():
    model = _model()
    trainable = set_trainable(model, "warmup")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".indexer." in n for n in names) and len(trainable) == len(names)
    set_trainable(model, "dense")
    assert all(p.requires_grad for p in model.parameters())


def test_progress_lines_off_a_terminal(corpus, capsys):
    """stderr not a terminal (pytest, CI logs): one plain line every log_every steps."""
    st = train(_model(), corpus, _cfg(steps=4, log_every=2), progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 2, err
    assert "2/4" in lines[0] and "4/4" in lines[1] and f"loss={st.history[-1][1]:.4f}" in lines[1]
    assert "tok/s=" in lines[1] and "kl=" not in lines[1]


def test_progress_bar_on_a_terminal(corpus, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    train(_model(), corpus, _cfg(stage="warmup", steps=3), progress=True)
    out = term.getvalue()
    assert "\r" in out and "3/3" in out and "kl=" in out     # redrawn in place by tqdm


def test_seed_everything():
    def draws():
        return random.random(), float(numpy.random.rand()), float(torch.rand(()))

    seed_everything(5)
    a = draws()
    seed_everything(5)
    assert draws() == a
    seed_everything(6)
    assert all(x != y for x, y in zip(draws(), a))


def test_stages_are_recorded_and_kept_in_the_checkpoint(corpus, tmp_path):
    from flashdsa.checkpoint import from_pretrained

    model = _model()
    assert trained_stages(model) is None and indexer_trained(model) is None
    train(model, corpus, _cfg(steps=1), progress=False)
    train(model, corpus, _cfg(steps=1), progress=False)       # dense again: one entry
    assert trained_stages(model) == ["dense"] and indexer_trained(model) is False
    train(model, corpus, _cfg(stage="warmup", steps=0), progress=False)     # no step, no record
    assert trained_stages(model) == ["dense"]
    train(model, corpus, _cfg(stage="warmup", steps=1, out_dir=str(tmp_path)), progress=False)
    assert trained_stages(model) == ["dense", "warmup"] and indexer_trained(model) is True
    model.save_pretrained(tmp_path / "hf")
    assert from_pretrained(tmp_path / "hf").config.extra[STAGES_KEY] == ["dense", "warmup"]
    # a resumed run takes the record from its checkpoint, not from the model it is handed
    other = _model()
    train(other, corpus, _cfg(stage="warmup", steps=1), progress=False, resume=tmp_path / "train_state.pt")
    assert trained_stages(other) == ["dense", "warmup"]


def test_bad_config():
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="pretrain")
    with pytest.raises(ValueError, match="plant: expected one of"):
        TrainConfig(plant="copy")
    with pytest.raises(ValueError, match="plant_distance"):
        TrainConfig(plant="repeat", plant_prob=0.5)
    with pytest.raises(ValueError, match=r"needs windows of 192 tokens \(seq_len >= 191\), got 129"):
        TrainConfig(plant="repeat", plant_distance=128, seq_len=128)
    TrainConfig(plant="repeat", plant_distance=128, seq_len=191)


def test_warmup_trains_only_the_indexers_and_lowers_the_kl(corpus):
    model = _model()
    train(model, corpus, _cfg(steps=10, lr=1e-2), progress=False)       # a little dense pretraining first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = train(model, corpus, _cfg(stage="warmup", steps=12, lr=1e-2), progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed)
    assert any("indexer.wq_b" in k for k in changed) and any("indexer.weights_proj" in k for k in changed)
    kls = [h[3] for h in st.history]
    assert kls[0] > 0 and sum(kls[-3:]) < sum(kls[:3]), kls
    assert all(p.requires_grad for p in model.parameters())     # unfrozen again afterwards


def test_sparse_stage_trains_everything(corpus):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = train(model, corpus, _cfg(stage="sparse", steps=3), progress=False)
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight")
               and "norm" not in k)
    _, loss, lm, kl = st.history[-1]
    assert kl > 0 and loss == pytest.approx(lm + kl, rel=1e-5)
