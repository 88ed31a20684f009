"""A shortened `flashdsa demo`: the whole pipeline runs and prints the comparison table."""
import json

import pytest
import torch

from flashdsa.cli import main


def test_demo_short(tmp_path, capsys, monkeypatch):
    import flashdsa.train

    planted, batch = set(), flashdsa.train.training_batch

    def spy(*args):       # records each stage's (plant_prob, distance, task)
        planted.add(args[5:8])
        return batch(*args)

    monkeypatch.setattr(flashdsa.train, "training_batch", spy)
    out = tmp_path / "demo.json"
    rc = main(["demo", "--seq-len", "128", "--repeat-offset", "64", "--batch-size", "2", "--pretrain-steps", "6",
               "--branch-steps", "5", "--warmup-steps", "2", "--eval-windows", "2", "--eval-retrieval", "2",
               "--eval-recall", "1", "--max-bytes", str(1 << 18), "--quiet", "--json", str(out),
               "--out", str(tmp_path / "models")])
    assert rc == 0
    text = capsys.readouterr().out
    for row in ("(a) dense continued", "(a) + DSA, untrained indexer", "(b) DSA warm-up + sparse"):
        assert row in text
    assert "retrieval all/digits/loss" in text and "idx recall" in text
    assert "64 random digits in held-out code, repeated exactly 64 tokens (8 x index_topk) later" in text
    res = json.loads(out.read_text())
    assert planted == {(0.5, 64, "repeat")}        # every stage trains on the task the table scores
    assert res["comparison"]["retrieval"] == "repeat" and res["comparison"]["retrieval_distance"] == 64
    for r in res["rows"]:
        rt = r["retrieval"]
        assert (rt["task"], rt["distance"], rt["n"]) == ("repeat", 64, 2)
        assert 0 <= rt["accuracy"] <= rt["digit_accuracy"] <= 1
    assert [s for s in res["stages"]] == ["pretrain (dense)", "(a) dense continued", "(b) DSA warm-up",
                                          "(b) DSA sparse"]
    st = res["stages"]
    # equal LM steps on the same tokens: (b)'s sparse stage trains on exactly (a)'s data steps,
    # after a warm-up on the first of them
    first = {k: v["first_data_step"] for k, v in st.items()}
    assert first["(a) dense continued"] == first["(b) DSA warm-up"] == first["(b) DSA sparse"] == 6
    assert st["(b) DSA sparse"]["steps"] == st["(a) dense continued"]["steps"] == 5
    assert st["(b) DSA warm-up"]["steps"] == 2
    dsa = res["rows"][-1]
    assert 0 < dsa["indexer_recall"]["mean"] <= 1 and dsa["lm"]["loss"] > 0
    # no selection of k keys captures more than the k heaviest (the oracle)
    rec = dsa["indexer_recall"]
    assert all(0 < r <= o + 1e-6 <= 1 + 1e-6 for r, o in zip(rec["per_layer"], rec["oracle_per_layer"]))
    assert (tmp_path / "models" / "dsa" / "config.json").exists()


def test_demo_refuses_a_repeat_offset_the_window_cannot_hold(capsys):
    assert main(["demo", "--seq-len", "128"]) == 2       # the default offset, 128, needs --seq-len >= 191
    err = capsys.readouterr().err
    assert "--repeat-offset 128 with --seq-len 128: a 64-digit span repeated 128 tokens later needs windows of " \
           "192 tokens (seq_len >= 191)" in err and len(err.strip().splitlines()) == 1
    assert main(["demo", "--repeat-offset", "32"]) == 2
    err = capsys.readouterr().err
    assert "--repeat-offset 32 with --seq-len 256: repeat offset 32: expected at least the span" in err


def test_cli_train_then_eval(tmp_path, capsys):
    common = ["--seq-len", "64", "--batch-size", "2", "--max-bytes", str(1 << 18)]
    assert main(["train", "--stage", "dense", "--preset", "tiny", "--steps", "3", "--out", str(tmp_path / "a"),
                 *common]) == 0
    # the warm-up continues the token stream where the dense run stopped (data step 3)
    assert main(["train", "--stage", "warmup", "--init", str(tmp_path / "a" / "train_state.pt"), "--steps", "2",
                 "--out", str(tmp_path / "b"), "--json", str(tmp_path / "b.json"), *common]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["data_step"] == 5
    assert (tmp_path / "b" / "model" / "model.safetensors").exists()
    # resuming a finished stage is a no-op that still writes its outputs
    assert main(["train", "--stage", "warmup", "--resume", str(tmp_path / "b" / "train_state.pt"), "--steps", "2",
                 "--out", str(tmp_path / "b"), *common]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "b" / "model"), "--attention", "sparse", "--windows", "2", "--retrieval", "2",
                 "--recall-windows", "1", "--seq-len", "128", "--max-bytes", str(1 << 18)]) == 0
    text = capsys.readouterr().out
    assert "held-out loss" in text and "passkey retrieval" in text and "indexer recall" in text
    assert "sparse attention (DSA" in text and "indexer trained (stages: dense -> warmup)" in text


def test_cli_train_and_eval_on_the_repeat_task(tmp_path, capsys, monkeypatch):
    """--retrieval-task repeat --repeat-offset: train plants the repeat (a resumed run too: the
    checkpoint holds the task and its offset) and eval scores it."""
    import flashdsa.train

    planted, batch = [], flashdsa.train.training_batch

    def spy(*args):       # records each step's (plant_prob, distance, task)
        planted.append(args[5:8])
        return batch(*args)

    monkeypatch.setattr(flashdsa.train, "training_batch", spy)
    common = ["--seq-len", "128", "--max-bytes", str(1 << 18)]
    out = tmp_path / "run"
    assert main(["train", "--stage", "dense", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                 "--plant-prob", "0.5", "--retrieval-task", "repeat", "--repeat-offset", "64", "--out", str(out),
                 *common]) == 0
    state = str(out / "train_state.pt")
    assert main(["train", "--resume", state, "--steps", "3", "--override", "steps"]) == 0
    assert planted == [(0.5, 64, "repeat")] * 3
    capsys.readouterr()
    assert main(["train", "--resume", state, "--repeat-offset", "96"]) == 2
    assert "--repeat-offset 96 contradicts the checkpoint's repeat-offset 64" in capsys.readouterr().err
    assert main(["eval", str(out / "model"), "--attention", "dense", "--windows", "1", "--retrieval", "2",
                 "--recall-windows", "0", "--retrieval-task", "repeat", "--repeat-offset", "64",
                 "--json", str(tmp_path / "eval.json"), *common]) == 0
    assert "repeat retrieval (64 digits repeated exactly 64 tokens later)" in capsys.readouterr().out
    rt = json.loads((tmp_path / "eval.json").read_text())["retrieval"]
    assert (rt["task"], rt["distance"], rt["n"]) == ("repeat", 64, 2)


def test_eval_refuses_sparse_attention_with_an_untrained_indexer(tmp_path, capsys):
    common = ["--seq-len", "64", "--max-bytes", str(1 << 18)]
    assert main(["train", "--stage", "dense", "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                 "--out", str(tmp_path), *common]) == 0
    small = ["--windows", "1", "--retrieval", "1", "--recall-windows", "0", *common]
    capsys.readouterr()
    for model in (tmp_path / "model", tmp_path / "train_state.pt"):      # HF directory and train_state.pt
        assert main(["eval", str(model), *small]) == 2
        err = capsys.readouterr().err
        assert "--attention sparse: the indexer of" in err and "was never trained (stages: dense" in err
        assert "--allow-untrained-indexer" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(tmp_path / "model"), "--attention", "dense", "--json", str(tmp_path / "d.json"),
                 *small]) == 0
    out = capsys.readouterr()
    assert "dense attention (all keys)" in out.out and "indexer never trained" in out.out and not out.err
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["attention"] == "dense" and res["indexer_trained"] is False and res["trained_stages"] == ["dense"]
    assert main(["eval", str(tmp_path / "model"), "--allow-untrained-indexer", *small]) == 0
    out = capsys.readouterr()
    assert "sparse attention (DSA" in out.out and "warning: sparse attention with an untrained indexer" in out.err


def test_eval_without_a_training_record(tmp_path, capsys):
    """A model from elsewhere (no record of its stages): sparse runs, the indexer is "unknown"."""
    from flashdsa.model import DSAForCausalLM
    from flashdsa.train import preset_config

    DSAForCausalLM(preset_config("tiny", 64)).save_pretrained(tmp_path)
    assert main(["eval", str(tmp_path), "--windows", "1", "--retrieval", "1", "--recall-windows", "0",
                 "--seq-len", "64", "--max-bytes", str(1 << 18)]) == 0
    text = capsys.readouterr().out
    assert "sparse attention (DSA" in text and "indexer unknown (no training record)" in text


def test_bench_train_toy(tmp_path):
    """The training-throughput sweep at toy size on CPU: every stage at every context, with
    rates and model FLOPs that follow from the step times."""
    from benchmarks.bench_train import main as bench
    from flashdsa.recipe import STAGES

    n = torch.get_num_threads()
    try:
        assert bench(["--toy", "--contexts", "64", "128", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "bench_train_toy.json").read_text())
    assert [(r["context"], r["stage"]) for r in res["rows"]] == [(c, s) for c in (64, 128) for s in STAGES]
    for r in res["rows"]:
        assert r["seconds_per_step"] > 0 and r["batch"] == 512 // r["context"]
        assert abs(r["tokens_per_s"] * r["seconds_per_step"] - 512) < 1e-6 * 512 and r["model_tflops"] > 0


def test_equal_time_comparison():
    """Each branch's logged steps placed at their share of its stages' seconds; the branch
    that finishes first against the other's loss interpolated at that time."""
    from benchmarks.quality_study import equal_time, loss_by_time

    stages = {"(a) dense continued": {"steps": 4, "seconds": 8.0, "history": [(2, 0, 3.0, 0), (4, 0, 2.0, 0)]},
              "(b) DSA warm-up": {"steps": 1, "seconds": 1.0, "history": [(1, 0, 3.5, 0)]},
              "(b) DSA sparse": {"steps": 3, "seconds": 3.0, "history": [(2, 0, 3.0, 0), (3, 0, 2.5, 0)]}}
    assert loss_by_time({"stages": stages}) == {"(a) dense": [(4.0, 3.0), (8.0, 2.0)],
                                                "(b) DSA": [(1.0, 3.5), (3.0, 3.0), (4.0, 2.5)]}
    assert equal_time({"stages": stages}) == {"seconds": 4.0, "finished_first": "(b) DSA", "its_train_lm_loss": 2.5,
                                              "other_train_lm_loss_at_that_time": 3.0, "seconds_a": 8.0,
                                              "seconds_b": 4.0}
    stages["(a) dense continued"]["history"] = [(1, 0, 3.2, 0), (3, 0, 2.4, 0), (4, 0, 2.0, 0)]
    assert equal_time({"stages": stages})["other_train_lm_loss_at_that_time"] == 3.2 + (2.4 - 3.2) * (4 - 2) / (6 - 2)


def test_quality_study_toy(tmp_path):
    """The GPU study script's logic, at toy size on CPU: probe, plan, run, JSON, plots."""
    import xml.etree.ElementTree as ET

    from benchmarks.quality_study import main as study
    from benchmarks.quality_study import plan_steps

    pre, branch, warm = plan_steps({"dense": 1.0, "warmup": 0.5, "sparse": 2.0}, 1000, 0.5, 0.2)
    assert pre == 500 and warm == int(branch * 0.2)
    assert abs(branch * (1.0 + 2.0 + 0.2 * 0.5) - 500) < 3   # the branches fill their half: (a), (b) sparse, warm-up
    n = torch.get_num_threads()
    try:
        assert study(["--toy", "--seq-len", "128", "--pretrain-steps", "4", "--branch-steps", "4",
                      "--warmup-steps", "2", "--max-bytes", str(1 << 18), "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "quality_study_toy.json").read_text())
    assert res["comparison"]["pretrain_steps"] == 4 and set(res["probe_seconds_per_step"]) == {
        "dense", "warmup", "sparse"}
    assert {"loss_gap_pct", "retrieval_gap_points", "indexer_recall_pct"} <= set(res["summary"])
    rec, summ = res["rows"][-1]["indexer_recall"], res["summary"]   # recall against the oracle's mass
    shares = [r / o for r, o in zip(rec["per_layer"], rec["oracle_per_layer"])]
    assert all(0 < x <= 1 + 1e-6 for x in shares)
    assert summ["recall_of_oracle_pct"] == pytest.approx(100 * rec["mean"] / rec["oracle_mean"])
    assert summ["recall_of_oracle_min_layer_pct"] == pytest.approx(100 * min(shares))
    assert "torch" in res and "command" in res
    legends = {"quality_study_toy_loss.svg": set(res["stages"]),
               "quality_study_toy_loss_by_position.svg": {r["name"] for r in res["rows"]},
               "quality_study_toy_loss_by_time.svg": {"(a) dense", "(b) DSA"},
               "quality_study_toy_recall_by_layer.svg": {r["name"] for r in res["rows"] if r["indexer_recall"]}}
    for plot, names in legends.items():     # each plot's legend names its series
        root = ET.parse(tmp_path / plot).getroot()
        texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
        assert root.tag.endswith("svg") and len(names) >= 2 and names <= texts
    eq = res["equal_time"]    # the branch that finished first, the other's loss at that time
    a, b = res["stages"]["(a) dense continued"], (res["stages"]["(b) DSA warm-up"], res["stages"]["(b) DSA sparse"])
    assert abs(eq["seconds_a"] - a["seconds"]) < 1e-9 and abs(eq["seconds_b"] - b[0]["seconds"] - b[1]["seconds"]) < 1e-9
    assert eq["seconds"] == min(eq["seconds_a"], eq["seconds_b"]) and eq["finished_first"] in ("(a) dense", "(b) DSA")


def test_quality_study_pretrain_gate(tmp_path, capsys):
    """--pretrain-gate: a dense model under the gate stops the study after pretraining (exit
    1, saying why), its retrieval kept in the state dir; no branch is trained."""
    from benchmarks.quality_study import main as study

    n = torch.get_num_threads()
    state = tmp_path / "state"
    try:
        assert study(["--toy", "--seq-len", "128", "--pretrain-steps", "2", "--branch-steps", "2",
                      "--warmup-steps", "1", "--max-bytes", str(1 << 18), "--out", str(tmp_path),
                      "--state-dir", str(state), "--pretrain-gate", "1.01"]) == 1
    finally:
        torch.set_num_threads(n)
    assert "stopped after pretraining" in capsys.readouterr().out
    got = json.loads((state / "pretrain_retrieval_rows.json").read_text())
    assert 0 <= got["digit_accuracy"] <= 1 and got["task"] == "passkey"   # the study's default task
    assert (state / "pretrain" / "done.json").exists() and not (state / "dense").exists()
    assert not (tmp_path / "quality_study_toy.json").exists()


def test_quality_study_repeat_by_distance(tmp_path, capsys):
    """--retrieval-task repeat: digits copied at offsets from 4 x index_topk to the window's
    end, scored overall and by distance bucket; offsets the window cannot hold are refused."""
    from benchmarks.quality_study import main as study

    n = torch.get_num_threads()
    try:
        assert study(["--toy", "--seq-len", "256", "--retrieval-task", "repeat", "--pretrain-steps", "2",
                      "--branch-steps", "3", "--warmup-steps", "1", "--max-bytes", str(1 << 18),
                      "--out", str(tmp_path)]) == 0
        for bad in (["--repeat-offset", "300"], ["--repeat-offset", "100", "--repeat-max-offset", "80"]):
            with pytest.raises(SystemExit):
                study(["--toy", "--seq-len", "256", "--retrieval-task", "repeat", *bad, "--out", str(tmp_path)])
        with pytest.raises(SystemExit):
            study(["--toy", "--repeat-offset", "100", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    assert "--repeat-offset" in capsys.readouterr().err
    res = json.loads((tmp_path / "quality_study_toy.json").read_text())
    topk = res["rows"][0]["index_topk"]
    assert res["comparison"]["retrieval"] == "repeat"
    assert (res["comparison"]["retrieval_distance"], res["comparison"]["retrieval_max_distance"]) == (4 * topk, 193)
    for r in res["rows"]:
        assert (r["retrieval"]["task"], r["retrieval"]["distance"], r["retrieval"]["max_distance"]) == (
            "repeat", 64, 193)
        assert [(b["distance"], b["max_distance"]) for b in r["retrieval_by_distance"]] == [(64, 127), (128, 193)]
    assert "repeated 64 to 193 tokens" in res["table"]


def test_comparison_resumes_across_calls_exactly(tmp_path):
    """A comparison run with a state dir and a deadline that has already passed trains one
    step a call (each call a fresh model, as a new process would), pausing in every stage
    in turn; called until it finishes, it gives the uninterrupted run's losses, retrieval
    and recall exactly, and the same stage records."""
    from flashdsa.data import Corpus
    from flashdsa.train import ComparisonConfig, run_comparison

    torch.set_num_threads(1)
    corpus = Corpus.load(max_bytes=1 << 18)
    cc = ComparisonConfig(seq_len=128, retrieval_distance=64, batch_size=2, pretrain_steps=4, branch_steps=4,
                          warmup_steps=2, eval_windows=2, eval_retrieval=2, eval_recall=1, log_every=1)
    quiet = dict(progress=False, log=lambda *a: None)
    whole = run_comparison(cc, corpus, **quiet)
    paused, calls = [], 0
    while True:
        calls += 1
        res = run_comparison(cc, corpus, state_dir=tmp_path / "state", deadline=0.0, **quiet)
        if "paused" not in res:
            break
        paused.append(res["paused"])
        assert calls < 30
    assert sorted(set(paused)) == ["dense", "pretrain", "sparse", "warmup"], paused
    assert [r["name"] for r in res["rows"]] == [r["name"] for r in whole["rows"]]
    for a, b in zip(res["rows"], whole["rows"]):
        assert a["lm"] == b["lm"] and a["retrieval"] == b["retrieval"]
        assert a["indexer_recall"] == b["indexer_recall"]
    for name, st in whole["stages"].items():
        got = res["stages"][name]
        assert (got["steps"], got["first_data_step"]) == (st["steps"], st["first_data_step"])
        assert [list(h) for h in got["history"]] == [list(h) for h in st["history"]], name
    # finished: one more call only reads what is done
    again = run_comparison(cc, corpus, state_dir=tmp_path / "state", deadline=0.0, **quiet)
    assert again["rows"] == res["rows"]


def test_quality_study_resumes_in_time_limited_calls(tmp_path):
    """`--state-dir` with `--time-limit-s`: the first call plans and saves the plan, later
    calls continue it; the call that finishes writes the result. A time limit without a
    state dir is refused (the paused state would be lost)."""
    import pytest

    from benchmarks.quality_study import main as study

    args = ["--toy", "--seq-len", "128", "--pretrain-steps", "4", "--branch-steps", "4", "--warmup-steps", "2",
            "--max-bytes", str(1 << 18), "--out", str(tmp_path), "--state-dir", str(tmp_path / "state"),
            "--time-limit-s", "0", "--eval-reserve-s", "0"]
    n = torch.get_num_threads()
    try:
        for calls in range(1, 20):
            assert study(args) == 0
            if (tmp_path / "quality_study_toy.json").exists():
                break
    finally:
        torch.set_num_threads(n)
    assert calls > 1 and (tmp_path / "state" / "plan.json").exists()
    res = json.loads((tmp_path / "quality_study_toy.json").read_text())
    assert res["comparison"]["pretrain_steps"] == 4 and len(res["rows"]) == 3
    assert json.loads((tmp_path / "state" / "quality_study_toy.json").read_text())["summary"] == res["summary"]
    with pytest.raises(SystemExit):
        study(["--toy", "--time-limit-s", "10"])
