"""Context parallelism (flashdsa.distributed.context_parallel) on CPU with gloo: the zigzag
split, the differentiable gather, one MLA layer and the whole causal LM split over 2 and 4
processes against the unsplit sequence (float64, every stage's knobs)."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flashdsa.distributed.context_parallel import (context_parallel_forward, context_parallel_mla, gather_rows,
                                                   gather_sequence, zigzag_positions, zigzag_split, zigzag_unsplit)
from flashdsa.distributed.fsdp import init_from_env, launch, leave_process_group
from flashdsa.layers import MLA
from flashdsa.model import DSAForCausalLM
from flashdsa.recipe import STAGES
from flashdsa.train import lm_loss, load_model, preset_config, set_trainable
from tests.utils import rel_err, tiny_mla_config

SEQ_LEN = 32
TOPK = 8  # < SEQ_LEN: the selection matters
# (attention, indexer_loss, indexer numerics): the sparse stage, the warm-up stage, the dense stage,
# inference-style sparse attention (FP8 keys gathered as bytes) and with the "exact" indexer.
CASES = (("sparse", True, "fp8"), ("dense", True, "fp8"), ("dense", False, "fp8"), ("sparse", False, "fp8"),
         ("sparse", False, "exact"))
MODEL_STAGES = ("sparse", "warmup")
TIMEOUT_S = 120  # seconds for a whole group of processes: a hung collective fails the test


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_split_and_inverse_are_exact(world):
    seq_len = 4 * world
    x = torch.randn(seq_len, 3, dtype=torch.float64)
    parts = [zigzag_split(x, world, r) for r in range(world)]
    m = seq_len // (2 * world)
    for r, part in enumerate(parts):
        pos = zigzag_positions(seq_len, world, r)
        assert pos.tolist() == list(range(r * m, (r + 1) * m)) + list(range((2 * world - 1 - r) * m,
                                                                             (2 * world - r) * m))
        assert torch.equal(part, x[pos])
    assert torch.equal(zigzag_unsplit(torch.cat(parts), world), x)
    # Load balance: every rank's queries score the same number of causal (query, key) pairs.
    pairs = {int((zigzag_positions(seq_len, world, r) + 1).sum()) for r in range(world)}
    assert len(pairs) == 1


def test_zigzag_errors_name_the_argument():
    with pytest.raises(ValueError, match="seq_len"):
        zigzag_positions(10, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        zigzag_positions(8, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        zigzag_positions(8, 0, 0)


def _join():
    """This process's rank, the group size and the group, joining what :func:`launch` describes."""
    mesh, _ = init_from_env("cpu")
    return dist.get_rank(), dist.get_world_size(), mesh.get_group()


def _gather_check(rank, world):
    """gather_rows on rank-seeded rows: the result, the input's gradient, an e4m3 gather."""
    n = 3
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    y = gather_rows(x)
    # The upstream gradient differs by rank: rank r's weighs row i by (r + 1) * (i + 1).
    g = (rank + 1) * torch.arange(1, world * n + 1, dtype=torch.float64)[:, None].expand(-1, 2)
    (y * g).sum().backward()
    with torch.no_grad():
        k8 = (x * 100).to(torch.float8_e4m3fn)
        all8 = gather_rows(k8)
    return {"x": x.detach(), "y": y.detach(), "grad": x.grad, "all8": all8.view(torch.uint8),
            "k8": k8.view(torch.uint8)}


def test_gather_rows_forward_and_gradient(cp_results):
    world, per_rank = cp_results
    res = [r["gather"] for r in per_rank]
    n = 3
    scale = sum(r + 1 for r in range(world))  # the ranks' upstream gradients summed
    for r, rr in enumerate(res):
        assert torch.equal(rr["y"], torch.cat([q["x"] for q in res]))
        rows = torch.arange(r * n + 1, (r + 1) * n + 1, dtype=torch.float64)[:, None].expand(-1, 2)
        assert torch.equal(rr["grad"], scale * rows)
        assert torch.equal(rr["all8"], torch.cat([q["k8"] for q in res]))


def _model_and_data(numerics):
    torch.manual_seed(0)
    mla = MLA(tiny_mla_config(index_topk=TOPK, indexer_numerics=numerics)).double()
    x = torch.randn(SEQ_LEN, mla.cfg.hidden_size, dtype=torch.float64)
    g = torch.randn(SEQ_LEN, mla.cfg.hidden_size, dtype=torch.float64)
    return mla, x, g


def _grads(mla, x):
    return {"x": x.grad, **{n: p.grad for n, p in mla.named_parameters()}}


def _grad_error(got, want):
    """rel_err of a gradient; None where neither run gave one, inf where only one did."""
    if got is None or want is None:
        return None if got is None and want is None else float("inf")
    return rel_err(got, want)


class _Traffic:
    """Records the bytes a token of every all_gather_single / reduce_scatter_single sends
    while active (wrapping torch.distributed's functions in this process)."""

    def __init__(self):
        self.calls, self.active = [], False
        for name in ("all_gather_single", "reduce_scatter_single"):
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def recorded(out, inp, *args, **kwargs):
            if self.active:
                self.calls.append((name, inp.numel() * inp.element_size() // inp.shape[0]))
            return fn(out, inp, *args, **kwargs)
        return recorded


def _cp_worker(out_dir):
    rank, world, group = _join()
    results = {"gather": _gather_check(rank, world)}
    traffic = _Traffic()
    for attention, loss_on, numerics in CASES:
        mla, x, g = _model_and_data(numerics)
        # The unsplit sequence: F = sum(hidden * g) + indexer loss.
        xf = x.clone().requires_grad_()
        ref = mla(xf, torch.arange(SEQ_LEN), torch.tensor([0, SEQ_LEN], dtype=torch.int32), attention=attention,
                  indexer_loss=loss_on, backend="reference")
        ((ref.hidden * g).sum() + (ref.indexer_loss if loss_on else 0)).backward()
        want = _grads(mla, xf)
        mla.zero_grad(set_to_none=True)
        # Split: rank r's share f_r = sum(hidden_r * g_r) + loss_r / W sums to F over the ranks.
        xl = zigzag_split(x, world, rank).clone().requires_grad_()
        traffic.calls, traffic.active = [], True
        out = context_parallel_mla(mla, xl, zigzag_split(torch.arange(SEQ_LEN), world, rank),
                                   attention=attention, indexer_loss=loss_on, group=group, backend="reference")
        ((out.hidden * zigzag_split(g, world, rank)).sum() + (out.indexer_loss / world if loss_on else 0)).backward()
        traffic.active = False
        got = _grads(mla, xl)
        for name, grad in got.items():
            if name != "x" and grad is not None:
                dist.all_reduce(grad)
        loss = None
        if loss_on:
            loss = out.indexer_loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        results[(attention, loss_on, numerics)] = {
            "hidden": rel_err(gather_sequence(out.hidden.detach()), ref.hidden),
            "loss": None if not loss_on else rel_err(loss, ref.indexer_loss),
            "x": rel_err(got["x"], zigzag_split(want["x"], world, rank)),
            "params": {n: _grad_error(got[n], want[n]) for n in want if n != "x"},
            "traffic": sorted(traffic.calls),
        }
    for stage in MODEL_STAGES:
        results["model", stage] = _model_check(rank, world, group, stage)
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    leave_process_group()


def _model_check(rank, world, group, stage):
    """The tiny causal LM at ``stage`` on one sequence, unsplit and split: the LM loss, the
    indexer loss and every trainable parameter's gradient, backpropagating what training does
    (the warm-up stage: the indexer loss only)."""
    torch.manual_seed(0)
    model = DSAForCausalLM(preset_config("tiny", seq_len=SEQ_LEN)).double()
    set_trainable(model, stage)
    attention, loss_on = STAGES[stage]
    ids = torch.randint(0, model.config.vocab_size, (SEQ_LEN + 1,), generator=torch.Generator().manual_seed(1))
    x, y = ids[:-1], ids[1:]

    def backward(logits, targets, idx):
        lm = lm_loss(logits, targets)
        (idx if stage == "warmup" else lm + idx).backward()
        return lm.detach()

    ref = model(x, attention=attention, indexer_loss=loss_on, backend="reference")
    want_lm, want_idx = backward(ref.logits, y, ref.indexer_loss), ref.indexer_loss.detach()
    want = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    # Each rank backpropagates the means over its own tokens; the mean over the ranks of the
    # losses and of the gradients is the whole sequence's.
    out = context_parallel_forward(model, zigzag_split(x, world, rank), zigzag_split(torch.arange(SEQ_LEN), world, rank),
                                   attention=attention, indexer_loss=loss_on, group=group, backend="reference")
    lm = backward(out.logits, zigzag_split(y, world, rank), out.indexer_loss)
    losses = torch.stack((lm, out.indexer_loss.detach()))
    dist.all_reduce(losses, group=group)
    losses /= world
    got = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            got[n] = p.grad / world
    return {"logits": rel_err(gather_sequence(out.logits.detach(), group), ref.logits.detach()),
            "lm": rel_err(losses[0], want_lm), "indexer": rel_err(losses[1], want_idx),
            "params": {n: _grad_error(got.get(n), want[n]) for n in want},
            "trained": sorted(n for n in got)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def cp_results(request):
    world = request.param
    with tempfile.TemporaryDirectory() as d:
        launch(_cp_worker, world, d, timeout=TIMEOUT_S)
        return world, [torch.load(os.path.join(d, f"{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-loss{int(c[1])}-{c[2]}")
def test_context_parallel_mla_matches_unsplit(cp_results, case):
    _, per_rank = cp_results
    for rank, res in enumerate(per_rank):
        r = res[case]
        assert r["hidden"] < 1e-12, (rank, r["hidden"])
        assert r["x"] < 1e-12, (rank, r["x"])
        if case[1]:
            assert r["loss"] < 1e-6, (rank, r["loss"])  # the loss is returned in fp32, as MLA's
        # The norms compute in fp32 (RMSNorm, the indexer's k_norm): their weights' gradients are
        # fp32 sums over the tokens, summed in another order here.
        bad = {n: e for n, e in r["params"].items() if e is not None and not e < (1e-6 if "norm" in n else 1e-11)}
        assert not bad, (rank, bad)
        # The indexer's parameters get gradients from its loss only.
        assert any(e is not None for n, e in r["params"].items() if n.startswith("indexer.")) == case[1]


def test_context_parallel_traffic_per_token(cp_results):
    """What travels, in bytes a token (float64 here): the latent rows [c | k_pe] forward and
    their gradients backward; the indexer keys as e4m3 + an fp32 scale for the selection,
    unquantized (and their gradients back) when the indexer trains or scores exactly."""
    cfg = tiny_mla_config()
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 8
    keys, keys_fp8 = cfg.index_head_dim * 8, cfg.index_head_dim + 4
    gather, scatter = "all_gather_single", "reduce_scatter_single"
    want = {("sparse", True, "fp8"): [(gather, keys), (gather, latent), (scatter, keys), (scatter, latent)],
            ("dense", True, "fp8"): [(gather, keys), (gather, latent), (scatter, keys), (scatter, latent)],
            ("dense", False, "fp8"): [(gather, latent), (scatter, latent)],
            ("sparse", False, "fp8"): [(gather, keys_fp8), (gather, latent), (scatter, latent)],
            ("sparse", False, "exact"): [(gather, keys), (gather, latent), (scatter, latent)]}
    _, per_rank = cp_results
    for res in per_rank:
        for case, calls in want.items():
            assert res[case]["traffic"] == sorted(calls), case


@pytest.mark.parametrize("stage", MODEL_STAGES)
def test_context_parallel_forward_matches_unsplit_model(cp_results, stage):
    _, per_rank = cp_results
    names = [n for n, _ in DSAForCausalLM(preset_config("tiny", seq_len=SEQ_LEN), init=False).named_parameters()]
    trained = names if stage == "sparse" else [n for n in names if ".indexer." in n]
    for rank, res in enumerate(per_rank):
        r = res["model", stage]
        # Logits and losses are fp32 (the model's output dtype and MLA's loss); the loss means
        # sum their fp32 terms in another order when split.
        assert r["logits"] < 1e-6 and r["lm"] < 1e-6 and r["indexer"] < 1e-6, (rank, r)
        assert r["trained"] == sorted(trained), rank
        # The norms compute in fp32 (see test_context_parallel_mla_matches_unsplit).
        bad = {n: e for n, e in r["params"].items() if e is not None and not e < (1e-6 if "norm" in n else 1e-12)}
        assert not bad, (rank, bad)


def _cli_train(out: Path, *extra: str) -> dict:
    argv = ["train", "--stage", "sparse", "--preset", "tiny", "--batch-size", "2", "--seq-len", "64", "--steps", "3",
            "--max-bytes", "100000", "--log-every", "1", "--out", str(out), "--json", str(out / "summary.json"), *extra]
    r = subprocess.run([sys.executable, "-m", "flashdsa", *argv], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "summary.json").read_text())


def test_cli_context_parallel_trains_as_one_process(tmp_path):
    """`flashdsa train --nproc 2 --context-parallel 2` (every window split over the two ranks)
    logs the one-process run's losses and writes its weights (float32: the losses' means and
    the gradients' sums add in another order)."""
    one = _cli_train(tmp_path / "one")
    two = _cli_train(tmp_path / "two", "--nproc", "2", "--context-parallel", "2")
    assert two["tokens"] == one["tokens"] and len(two["history"]) == 3
    torch.testing.assert_close(torch.tensor(two["history"]), torch.tensor(one["history"]), rtol=1e-5, atol=1e-7)
    plain = load_model(tmp_path / "one" / "model").state_dict()
    for name, value in load_model(tmp_path / "two" / "model").state_dict().items():
        torch.testing.assert_close(value, plain[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("extra, match", [(("--nproc", "2", "--context-parallel", "4"), "--context-parallel 4"),
                                          (("--nproc", "2", "--context-parallel", "2", "--seq-len", "66"),
                                           "--seq-len 66"),
                                          (("--context-parallel", "0"), "--context-parallel: expected >= 1")])
def test_cli_context_parallel_errors_name_the_flag(tmp_path, capsys, extra, match):
    from flashdsa.cli import main
    assert main(["train", "--stage", "sparse", "--out", str(tmp_path), *extra]) == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
