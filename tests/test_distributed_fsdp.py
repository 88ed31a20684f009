"""FSDP2 data parallelism (flashdsa.distributed.fsdp) on CPU with gloo: N ranks, each on
batch_size / N windows, train exactly as one process on the whole batch; DCP checkpoints
written by N ranks load into a plain model in one process; `flashdsa train --nproc 2`."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flashdsa.data import Corpus
from flashdsa.distributed.fsdp import launch, load_sharded, local_rows
from flashdsa.model import DSAForCausalLM
from flashdsa.train import (
    TrainConfig,
    load_model,
    make_optimizer,
    preset_config,
    seed_everything,
    set_trainable,
    train,
)
from tests.utils import rel_err

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120        # seconds for a whole group of processes: a hung collective fails the test
SEQ_LEN, STEPS = 64, 2
# float32 on both sides, summed in other orders: relative errors of a few 1e-7 measured, bounds 10x above.
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-5
# The indexer's scores pass a ReLU: where one (query, key, head) score sits within rounding of 0,
# the two summation orders can put it on either side, and that term's share of the indexer's
# gradients appears on one side only (measured: 3.2e-4 for one layer's wq_b in the warm-up with 4
# ranks on one machine's corpus, everything else below 7e-6). A sharding bug (a missing or doubled
# reduction) is off by O(1).
GRAD_RTOL_INDEXER = 1e-3
# The indexer's KL at these steps is ~1e-4, a difference of terms of order 1 (cross-entropy minus
# entropy): its error is float32's rounding of those terms (3e-9 measured), not a share of it.
LOSS_ATOL = 1e-7
# AdamW's first steps move a weight by about lr whatever its gradient's size, so weights agree to
# a small share of lr (measured: 6e-7 with lr 2e-3 after 3 steps).
PARAM_ATOL = 1e-5
LR = 2e-3


def _corpus() -> Corpus:
    return Corpus.load(None, max_bytes=100_000)


def _fresh_model() -> DSAForCausalLM:
    seed_everything(0)
    return DSAForCausalLM(preset_config("tiny", SEQ_LEN))


def _config(stage: str, batch_size: int) -> TrainConfig:
    return TrainConfig(stage=stage, steps=STEPS, batch_size=batch_size, seq_len=SEQ_LEN, warmup_steps=1, log_every=1,
                       lr=LR)


def _compare_stages(out_dir: str, batch_size: int) -> None:
    """One rank: every stage trained sharded and, in this same process, plain on the whole
    batch; losses, last gradients and weights compared. Then a DCP checkpoint of the
    sparse run and, from rank 0, its full weights for the single-process test to load."""
    import torch.distributed as dist

    from flashdsa.distributed.fsdp import (
        full_state_dict,
        init_from_env,
        leave_process_group,
        save_sharded,
        shard_model,
    )
    mesh, _ = init_from_env("cpu")
    corpus = _corpus()
    for stage in ("dense", "warmup", "sparse"):
        cfg = _config(stage, batch_size)
        plain, sharded = _fresh_model(), shard_model(_fresh_model(), mesh)
        ref = train(plain, corpus, cfg, progress=False)
        got = train(sharded, corpus, cfg, progress=False)
        assert got.tokens == ref.tokens == STEPS * batch_size * SEQ_LEN
        for (step, *losses), (ref_step, *ref_losses) in zip(got.history, ref.history, strict=True):
            assert step == ref_step
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=LOSS_ATOL)
        trained = 0
        for (name, p), (ref_name, q) in zip(sharded.named_parameters(), plain.named_parameters(), strict=True):
            assert name == ref_name
            assert (p.grad is None) == (q.grad is None), f"{stage}: {name}"
            if q.grad is not None:
                trained += 1
                rtol = GRAD_RTOL_INDEXER if ".indexer." in name else GRAD_RTOL
                assert rel_err(p.grad.full_tensor(), q.grad) < rtol, f"{stage}: gradient of {name}"
            if ".indexer." in name:
                # where the kink's term dominates a weight's gradient, AdamW (up to lr a step)
                # moves it otherwise: measured 2 of 8192 weights, by 2e-5
                dw = (p.full_tensor() - q.detach()).abs()
                assert int((dw > PARAM_ATOL).sum()) <= dw.numel() // 1000, f"{stage}: {name}"
                assert float(dw.max()) <= STEPS * LR, f"{stage}: {name}"
            else:
                torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=PARAM_ATOL, msg=f"{stage}: {name}")
        # dense: the indexers take no part; warm-up: only they train; sparse: everything
        indexer = sum(1 for n, _ in plain.named_parameters() if ".indexer." in n)
        total = sum(1 for _ in plain.parameters())
        assert trained == {"dense": total - indexer, "warmup": indexer, "sparse": total}[stage], stage
    save_sharded(Path(out_dir) / "ckpt", sharded)
    full = full_state_dict(sharded)
    if dist.get_rank() == 0:
        torch.save(full, Path(out_dir) / "full.pt")
    leave_process_group()


@pytest.mark.parametrize("nproc", [2, 4])
def test_fsdp_equals_single_process_and_dcp_loads_on_one(nproc, tmp_path):
    launch(_compare_stages, nproc, str(tmp_path), 4, timeout=TIMEOUT)
    model = DSAForCausalLM(preset_config("tiny", SEQ_LEN), init=False)
    load_sharded(tmp_path / "ckpt", model)          # one process, no process group
    full = torch.load(tmp_path / "full.pt")
    assert full.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, full[name]), name


def test_local_rows_split_the_batch_in_order():
    batch = torch.arange(12).reshape(6, 2)
    parts = [local_rows(batch, SimpleNamespace(size=lambda: 3, get_local_rank=lambda r=r: r)) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch) and all(p.shape[0] == 2 for p in parts)
    with pytest.raises(ValueError, match="batch_size"):
        local_rows(batch, SimpleNamespace(size=lambda: 4, get_local_rank=lambda: 0))


def _cli(out: Path, *extra: str) -> dict:
    argv = ["train", "--stage", "dense", "--preset", "tiny", "--batch-size", "4", "--seq-len", str(SEQ_LEN),
            "--max-bytes", "100000", "--log-every", "1", "--out", str(out), "--json", str(out / "summary.json"),
            *(extra if "--steps" in extra else ("--steps", "3", *extra))]
    r = subprocess.run([sys.executable, "-m", "flashdsa", *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "summary.json").read_text())


def test_cli_nproc_2_trains_as_one_process(tmp_path):
    one, two = _cli(tmp_path / "one"), _cli(tmp_path / "two", "--nproc", "2")
    assert two["tokens"] == one["tokens"]
    torch.testing.assert_close(torch.tensor(two["history"]), torch.tensor(one["history"]), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert (tmp_path / "two" / "train_state.dcp").is_dir()
    plain = load_model(tmp_path / "one" / "train_state.pt")
    for sharded in (load_model(tmp_path / "two" / "train_state.pt"), load_model(tmp_path / "two" / "model")):
        for name, value in sharded.state_dict().items():
            torch.testing.assert_close(value, plain.state_dict()[name], rtol=0, atol=PARAM_ATOL, msg=name)
    # The 2-rank checkpoint resumes in one process: model and optimizer come from the DCP files
    # (the dense stage's indexers had no gradient, hence no optimizer state, there).
    model = load_model(tmp_path / "two" / "train_state.pt")
    opt = make_optimizer(set_trainable(model, "dense"), _config("dense", 4))
    load_sharded(tmp_path / "two" / "train_state.dcp", model, opt)
    steps = [float(s["step"]) for s in opt.state_dict()["state"].values()]
    assert steps.count(3) == sum(1 for n, _ in model.named_parameters() if ".indexer." not in n)


def test_cli_resumes_a_one_process_run_on_2_ranks(tmp_path):
    """A dense run's train_state.pt of one process (its indexers had no gradient, hence no
    optimizer state) continued by `--resume --nproc 2` as the uninterrupted run."""
    whole = _cli(tmp_path / "whole")
    _cli(tmp_path / "split", "--steps", "2")
    r = subprocess.run([sys.executable, "-m", "flashdsa", "train", "--resume", str(tmp_path / "split" / "train_state.pt"),
                        "--steps", "3", "--override", "steps", "--nproc", "2", "--json", str(tmp_path / "resumed.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    resumed = json.loads((tmp_path / "resumed.json").read_text())     # steps 1-2 from the file, 3 on 2 ranks
    torch.testing.assert_close(torch.tensor(resumed["history"]), torch.tensor(whole["history"]), rtol=LOSS_RTOL,
                               atol=LOSS_ATOL)


def test_cli_batch_that_does_not_split_is_a_one_line_error(tmp_path, capsys):
    from flashdsa.cli import main
    assert main(["train", "--stage", "dense", "--batch-size", "3", "--nproc", "2", "--out", str(tmp_path)]) == 2
    assert "--batch-size 3 does not split evenly over 2 processes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
