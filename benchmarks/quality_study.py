"""Dense vs. DSA quality study: does the two-stage recipe (SPEC 5) keep dense quality?

Pretrain a small DeepSeek-V3.2-style model densely on the Python standard library
(byte tokens), then from the same weights train on the same tokens
  (a) dense, continued;
  (b) DSA: warm-up (indexers only, KL to the dense attention), then sparse training
      (top-k attention, LM loss + KL on the selected set);
and compare held-out loss, perplexity by position, retrieval (a passkey, or with
``--retrieval-task repeat`` 64 random digits copied at a random offset) with the answer more
than 4 x top-k tokens back, indexer recall and tokens/s. Writes
benchmarks/results/quality_study.json (or $OUT/...) and two SVG plots beside it (with matplotlib:
``pip install 'flashdsa[plot]'``; ``--plot-from`` redraws them from the JSON).

    python -m benchmarks.quality_study                  # H200, one call of < 10 minutes:
                                                        # 8 layers, width 512, context 8192, top-k 512
    python -m benchmarks.quality_study --toy            # CPU logic check at toy size (~1 minute)
    python -m benchmarks.quality_study --plot-from benchmarks/results/quality_study.json --out docs
    python -m benchmarks.quality_study --state-dir .study --time-limit-s 540 --budget-s 1500
        # a study longer than one call: each call trains until its time limit, saves
        # model, optimizer, data position and RNG under .study/ (ignored by git, so it stays
        # on a GPU machine between calls) and exits; the same command again continues, and
        # the call that finishes evaluates and writes the result, also into .study/

Step counts follow from a time budget: a short probe times one step of each stage, then
pretraining gets ``--pretrain-share`` of the training time and the two branches split the rest
(equal LM steps on the same tokens: (b)'s sparse steps = (a)'s steps, its warm-up steps come first).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from flashdsa.data import Corpus, check_repeat  # noqa: E402
from flashdsa.model import DSAForCausalLM  # noqa: E402
from flashdsa.recipe import REPEAT_SPAN  # noqa: E402
from flashdsa.train import (  # noqa: E402
    ComparisonConfig,
    TrainConfig,
    format_table,
    preset_config,
    run_comparison,
    train,
)


def probe_step_seconds(mcfg, corpus, cc: ComparisonConfig, device, backend: str, steps: int = 2) -> dict:
    """Seconds per optimizer step of each stage on a throwaway model (first step excluded:
    kernel compilation and autotuning)."""
    model = DSAForCausalLM(mcfg).to(device)
    out = {}
    for stage in ("dense", "warmup", "sparse"):
        tc = TrainConfig(stage=stage, steps=steps + 1, batch_size=cc.batch_size, seq_len=cc.seq_len,
                         backend=backend, warmup_steps=1, plant_prob=cc.plant_prob, plant=cc.retrieval,
                         plant_distance=cc.retrieval_distance, plant_max_distance=cc.retrieval_max_distance)
        train(model, corpus, tc, progress=False, stop_after=1)
        st = train(model, corpus, tc, progress=False)
        out[stage] = st.train_seconds / max(st.step, 1)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def sdpa_preflight(mcfg, seq_len: int) -> str:
    """Which fused SDPA kernel takes the dense path's shapes (q/k 96 wide, v 64 at the
    "small" preset)? Without one, torch falls back to the math kernel, which
    materializes [H, L, L] scores per sequence: slow and large at 8K."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    h, dqk, dv = mcfg.num_attention_heads, mcfg.qk_head_dim, mcfg.v_head_dim
    q = torch.randn(1, h, seq_len, dqk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, h, seq_len, dv, device="cuda", dtype=torch.bfloat16)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, v, is_causal=True)
            return name
        except RuntimeError:
            continue
    return "math (no fused kernel for these head dims: dense steps will be slow and memory-hungry)"


def plan_steps(sec: dict, train_budget: float, pretrain_share: float, warmup_share: float) -> tuple[int, int, int]:
    """(pretrain, branch, warm-up) steps filling ``train_budget`` seconds: a branch step is
    one step of (a) and one sparse step of (b), and (b) warms up for ``warmup_share`` x
    the branch steps before."""
    per_branch_step = sec["dense"] + sec["sparse"] + warmup_share * sec["warmup"]
    branch_time = train_budget * (1 - pretrain_share)
    branch = max(int(branch_time / per_branch_step), 10)
    pretrain = max(int(train_budget * pretrain_share / sec["dense"]), 10)
    warm = max(int(branch * warmup_share), 2)
    return pretrain, branch, warm


BRANCHES = {"(a) dense": ["(a) dense continued"], "(b) DSA": ["(b) DSA warm-up", "(b) DSA sparse"]}


def loss_by_time(res: dict) -> dict[str, list[tuple[float, float]]]:
    """Each branch's training LM loss against its own training seconds (the stages of a
    branch one after the other; a stage's logged steps placed at their share of its
    seconds, its steps taken as equally long). Branch (b)'s warm-up trains the indexers
    only: its LM loss stays the pretrained model's, and its seconds count."""
    curves = {}
    for branch, names in BRANCHES.items():
        t0, pts = 0.0, []
        for name in names:
            st = res["stages"].get(name)
            if not st or not st["steps"]:
                continue
            per_step = st["seconds"] / st["steps"]
            pts += [(t0 + step * per_step, lm) for step, _, lm, _ in st["history"]]
            t0 += st["seconds"]
        curves[branch] = pts
    return curves


def equal_time(res: dict) -> dict | None:
    """The branches at equal training time: when (b) finishes first (sparse steps are
    faster at long context), (a)'s training LM loss at (b)'s total seconds (interpolated
    along its logged steps) against (b)'s last; and the other way round. None without
    both curves."""
    curves = loss_by_time(res)
    a, b = curves.get("(a) dense"), curves.get("(b) DSA")
    if not a or not b:
        return None
    first, other = ("(b) DSA", a) if b[-1][0] <= a[-1][0] else ("(a) dense", b)
    t_end, loss_end = curves[first][-1]
    before = [p for p in other if p[0] <= t_end]
    after = [p for p in other if p[0] > t_end]
    if not before:
        at = other[0][1]
    elif not after:
        at = before[-1][1]
    else:
        (t0, l0), (t1, l1) = before[-1], after[0]
        at = l0 + (l1 - l0) * (t_end - t0) / (t1 - t0)
    return {"seconds": t_end, "finished_first": first, "its_train_lm_loss": loss_end,
            "other_train_lm_loss_at_that_time": at,
            "seconds_a": a[-1][0], "seconds_b": b[-1][0]}


def write_plots(res: dict, out_dir: str, prefix: str) -> list[str]:
    """``<prefix>_loss.svg`` (training LM loss against the data step: pretraining and both
    branches on one axis), ``<prefix>_loss_by_position.svg`` (held-out loss of each
    evaluated model by position bucket), ``<prefix>_loss_by_time.svg`` (each branch's
    training LM loss against its training seconds: :func:`loss_by_time`) and, where the rows have them,
    ``<prefix>_retrieval_by_distance.svg`` (retrieval accuracy by distance bucket: a
    passkey's share of samples right, a repeat's share of copied digits right) and
    ``<prefix>_recall_by_layer.svg`` (indexer recall of each layer) in ``out_dir``, with
    matplotlib."""
    from benchmarks.plot import line_chart
    curves = {name: [(st["first_data_step"] + s, lm) for s, _, lm, _ in st["history"]]
              for name, st in res["stages"].items()}
    by_position = {r["name"]: [((b["start"] + b["end"]) / 2, b["loss"]) for b in r["lm"]["buckets"]]
                   for r in res["rows"]}
    paths = [line_chart(curves, os.path.join(out_dir, f"{prefix}_loss.svg"),
                        "training LM loss (same data steps for both branches)", "data step", "loss (nats/byte)"),
             line_chart(by_position, os.path.join(out_dir, f"{prefix}_loss_by_position.svg"),
                        "held-out loss by position", "position (bucket centre)", "loss (nats/byte)", logx=True)]
    paths.append(line_chart(loss_by_time(res), os.path.join(out_dir, f"{prefix}_loss_by_time.svg"),
                            "training LM loss of each branch against its training time", "seconds",
                            "loss (nats/byte)"))
    repeat = res["rows"][0]["retrieval"]["task"] == "repeat"
    key = "digit_accuracy" if repeat else "accuracy"
    by_distance = {r["name"]: [(b["distance"], 100 * b[key]) for b in r["retrieval_by_distance"]]
                   for r in res["rows"] if r.get("retrieval_by_distance")}
    if by_distance:
        paths.append(line_chart(by_distance, os.path.join(out_dir, f"{prefix}_retrieval_by_distance.svg"),
                                "retrieval accuracy by distance (bucket start; buckets double)", "distance (tokens)",
                                "copied digits right (%)" if repeat else "samples all digits right (%)", logx=True))
    by_layer = {}
    for r in res["rows"]:
        rec = r.get("indexer_recall")
        if rec:
            by_layer[r["name"]] = [(i, 100 * x) for i, x in enumerate(rec["per_layer"])]
            if "oracle_per_layer" in rec:  # the most any k keys capture
                by_layer[f"{r['name']}: best k keys"] = [(i, 100 * x) for i, x in enumerate(rec["oracle_per_layer"])]
    if by_layer:
        paths.append(line_chart(by_layer, os.path.join(out_dir, f"{prefix}_recall_by_layer.svg"),
                                "indexer recall by layer (dense attention mass on the top-k selection)", "layer",
                                "recall (%)"))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="CPU logic check: tiny model, context 256, few steps")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=480, help="training + evaluation wall-clock budget")
    ap.add_argument("--eval-reserve-s", type=float, default=100, help="part of the budget kept for evaluation")
    ap.add_argument("--pretrain-share", type=float, default=0.55)
    ap.add_argument("--warmup-share", type=float, default=0.15, help="(b)'s warm-up steps as a share of the branch steps (LM steps)")
    ap.add_argument("--pretrain-steps", type=int, help="override the planned step counts")
    ap.add_argument("--branch-steps", type=int)
    ap.add_argument("--warmup-steps", type=int)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--branch-lr", type=float, default=4e-4)
    ap.add_argument("--warmup-lr", type=float, default=1e-3)
    ap.add_argument("--plant-prob", type=float, default=0.3)
    ap.add_argument("--retrieval-task", default="passkey", choices=("passkey", "repeat"),
                    help="the retrieval task planted and scored: a passkey, or 64 random digits repeated "
                         "--repeat-offset to --repeat-max-offset tokens later (found by content)")
    ap.add_argument("--repeat-offset", type=int, default=None, help="repeat: the shortest offset "
                    "(default 4 x index_topk)")
    ap.add_argument("--repeat-max-offset", type=int, default=None, help="repeat: the longest offset "
                    "(default: the window less the 64 digits)")
    ap.add_argument("--curriculum-steps", type=int, default=0,
                    help="retrieval distance curriculum over the first data steps (pretraining): the largest "
                         "passkey distance or repeat offset grows geometrically from 64 tokens to the window "
                         "(flashdsa.data.curriculum_distances)")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-retrieval", type=int, default=32)
    ap.add_argument("--eval-recall", type=int, default=2)
    ap.add_argument("--max-bytes", type=int, default=None)
    ap.add_argument("--pretrain-gate", type=float, default=0.0, metavar="SHARE",
                    help="stop after pretraining (exit 1, before the branches) unless the dense model gets at "
                         "least this share of the retrieval's digits right, e.g. 0.9 (default 0: no gate)")
    ap.add_argument("--state-dir", default=None,
                    help="resumable run: stage checkpoints and the step plan live here; rerun to continue")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="with --state-dir: this call stops training after this many seconds (minus "
                         "--eval-reserve-s) and saves its state")
    ap.add_argument("--out", default=None, help="output directory (default $OUT or benchmarks/results)")
    ap.add_argument("--plot-from", default=None, metavar="JSON",
                    help="only redraw the two plots of a result JSON (into --out, default next to the JSON; "
                         "needs matplotlib: pip install 'flashdsa[plot]')")
    args = ap.parse_args(argv)
    if args.time_limit_s is not None and not args.state_dir:
        ap.error("--time-limit-s needs --state-dir (where the paused run's state is kept)")
    if args.plot_from:
        res = json.loads(Path(args.plot_from).read_text())
        try:
            plots = write_plots(res, args.out or os.path.dirname(args.plot_from), Path(args.plot_from).stem)
        except ModuleNotFoundError as e:
            raise SystemExit(str(e)) from None
        print("wrote", *plots)
        return 0

    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    if args.toy:
        args.seq_len, args.batch_size = min(args.seq_len, 256), min(args.batch_size, 4)
        args.eval_windows, args.eval_retrieval, args.eval_recall = 4, 8, 1
        args.max_bytes = args.max_bytes or (1 << 20)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)   # toy ops are tiny: one thread, no spinning on a busy machine
    out_dir = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    corpus = Corpus.load(max_bytes=args.max_bytes)
    mcfg = preset_config("tiny" if args.toy else "small", args.seq_len)
    distance = max_distance = None
    if args.retrieval_task == "repeat":
        distance = args.repeat_offset or 4 * mcfg.index_topk
        max_distance = args.repeat_max_offset or args.seq_len + 1 - REPEAT_SPAN
        try:
            check_repeat(args.seq_len + 1, distance)
            check_repeat(args.seq_len + 1, max_distance)
        except ValueError as e:
            ap.error(f"--repeat-offset / --repeat-max-offset: {e}")
        if max_distance < distance:
            ap.error(f"--repeat-max-offset {max_distance}: expected >= --repeat-offset {distance}")
    elif args.repeat_offset is not None or args.repeat_max_offset is not None:
        ap.error("--repeat-offset / --repeat-max-offset: apply to --retrieval-task repeat only")
    cc = ComparisonConfig(preset="tiny" if args.toy else "small", seq_len=args.seq_len, batch_size=args.batch_size,
                          lr=args.lr, branch_lr=args.branch_lr, warmup_lr=args.warmup_lr, retrieval=args.retrieval_task,
                          retrieval_distance=distance, retrieval_max_distance=max_distance,
                          plant_prob=args.plant_prob, plant_curriculum=args.curriculum_steps,
                          backend=args.backend,
                          eval_windows=args.eval_windows, eval_retrieval=args.eval_retrieval,
                          eval_recall=args.eval_recall, eval_by_distance=True, log_every=10,
                          pretrain_gate=args.pretrain_gate)

    plan_path = Path(args.state_dir) / "plan.json" if args.state_dir else None
    if plan_path is not None and plan_path.exists():   # a later call of a resumable run: the same plan
        plan = json.loads(plan_path.read_text())
        cc = ComparisonConfig(**plan["comparison"])
        sec, notes = plan["probe_seconds_per_step"], plan["notes"]
        print(f"continuing the run in {args.state_dir}", flush=True)
    else:
        notes = []
        if device.type == "cuda":
            notes.append(f"dense SDPA kernel: {sdpa_preflight(mcfg, args.seq_len)}")
            print(notes[-1], flush=True)
        backend = args.backend
        try:
            sec = probe_step_seconds(mcfg, corpus, cc, device, backend)
        except Exception as e:  # a kernel that does not support this shape: say so, fall back, keep going
            if backend == "reference":
                raise
            notes.append(f"backend {backend!r} failed in the probe ({type(e).__name__}: {e}); used 'reference'")
            traceback.print_exc()
            backend = cc.backend = "reference"
            sec = probe_step_seconds(mcfg, corpus, cc, device, backend)
        elapsed = time.perf_counter() - t_start
        train_budget = max(args.budget_s - args.eval_reserve_s - elapsed, 10)
        pre, branch, warm = plan_steps(sec, train_budget, args.pretrain_share, args.warmup_share)
        cc.pretrain_steps = args.pretrain_steps or pre
        cc.branch_steps = args.branch_steps or branch
        cc.warmup_steps = args.warmup_steps or warm
        if plan_path is not None:
            plan_path.parent.mkdir(parents=True, exist_ok=True)
            plan_path.write_text(json.dumps({"comparison": dataclasses.asdict(cc), "probe_seconds_per_step": sec,
                                             "notes": notes}, indent=1) + "\n")
    print(f"probe s/step {sec}; plan: pretrain {cc.pretrain_steps}, branches {cc.branch_steps} "
          f"(warm-up {cc.warmup_steps}) steps of {cc.batch_size} x {cc.seq_len} tokens", flush=True)

    deadline = None
    if args.time_limit_s is not None:
        deadline = t_start + max(args.time_limit_s - args.eval_reserve_s, 1.0)
    res = run_comparison(cc, corpus, device, model_config=copy.deepcopy(mcfg), progress=True,
                         state_dir=args.state_dir, deadline=deadline)
    if "paused" in res:
        print(f"paused in stage {res['paused']!r} after {time.perf_counter() - t_start:.0f} s; "
              f"the same command again continues", flush=True)
        return 0
    if "gated" in res:
        g = res["gated"]
        print(f"stopped after pretraining: the dense model gets {100 * g['digit_accuracy']:.1f}% of the "
              f"{cc.retrieval} digits right, under --pretrain-gate {100 * g['gate']:.1f}%; the branches would "
              f"compare no retrieval. Pretrain longer (--pretrain-steps) or plant the task more "
              f"(--plant-prob)", flush=True)
        return 1
    res["probe_seconds_per_step"] = sec
    res["notes"] = notes
    if device.type == "cuda":   # MFU: each stage's model FLOPs (DSAForCausalLM.train_flops_per_token) a second
        from benchmarks.common import measure_ceilings
        res["ceilings"] = measure_ceilings()
        for st in res["stages"].values():
            if "model_tflops" in st:   # (absent from stages finished by an older version of a resumed study)
                st["mfu_bf16"] = st["model_tflops"] / res["ceilings"]["bf16_matmul_tflops"]
    for name, st in res["stages"].items():
        if "model_tflops" in st:
            print(f"{name}: {st['tokens_per_s']:,.0f} tokens/s, {st['model_tflops']:.3f} model TFLOP/s"
                  + (f", MFU {100 * st['mfu_bf16']:.1f}% of the bf16 matmul" if "mfu_bf16" in st else ""), flush=True)
    res["wall_seconds"] = time.perf_counter() - t_start
    table = format_table(res)
    print(table)
    res["table"] = table
    dense, dsa = res["rows"][0], res["rows"][-1]
    res["equal_time"] = equal_time(res)
    rec = dsa["indexer_recall"]
    res["summary"] = {
        "loss_gap_pct": 100 * (dsa["lm"]["loss"] / dense["lm"]["loss"] - 1),
        "retrieval_gap_points": 100 * (dsa["retrieval"]["accuracy"] - dense["retrieval"]["accuracy"]),
        "answer_loss_dense_vs_dsa": [dense["retrieval"]["answer_loss"], dsa["retrieval"]["answer_loss"]],
        "indexer_recall_pct": 100 * rec["mean"] if rec else None,
        "indexer_recall_oracle_pct": 100 * rec["oracle_mean"] if rec else None,
        # recall as a share of the oracle (the most any k keys capture), mean and weakest layer
        "recall_of_oracle_pct": 100 * rec["mean"] / rec["oracle_mean"] if rec else None,
        "recall_of_oracle_min_layer_pct": min(100 * r / o for r, o in zip(rec["per_layer"], rec["oracle_per_layer"]))
        if rec else None,
        "targets": "loss within 1%, retrieval within 2 points, recall >= 90% (proposed: >= 90% of the oracle, "
                   "mean and every layer)",
    }
    print(res["summary"])
    name = "quality_study_toy" if args.toy else "quality_study"
    path = write_result(name, res, out_dir)
    print("wrote", path)
    if args.state_dir:  # a second copy beside the run's state, which outlives the output folder's
        print("wrote", write_result(name, res, args.state_dir))
    try:
        print("wrote", *write_plots(res, out_dir, name))
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print(f"no plots: {e}; then: python -m benchmarks.quality_study --plot-from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
