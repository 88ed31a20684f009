"""Experiment (issue 18): does a distance curriculum make the dense model learn the long
copy sooner?

    python -m benchmarks.probe_curriculum [--steps 1200 --every 200]     # CPU, one process a variant

The GPU study's dense pretraining learned the repeat task (64 random digits copied 4 x
index_topk to a whole window later) in one run out of three of similar length: the copy
appears at an unpredictable step, or not at all. `--curriculum-steps` (TrainConfig.
plant_curriculum) plants the copies close by first (offsets from 64 tokens, growing to
the window over the curriculum). This probe trains the tiny preset at a longer context
than the demo's, dense, with and without the curriculum, each variant in its own
process (one thread each), and scores the copy on held-out windows at the study's
offsets every ``--every`` steps. Results: ``probe_curriculum.json`` under $OUT or
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import write_result


def run_variant(curriculum: int, args) -> list[dict]:
    """Dense pretraining of the tiny preset with ``curriculum`` steps of curriculum; the
    copy's held-out accuracy every ``args.every`` steps."""
    import torch

    from flashdsa.data import Corpus
    from flashdsa.evaluate import retrieval_accuracy
    from flashdsa.model import DSAForCausalLM
    from flashdsa.recipe import REPEAT_SPAN
    from flashdsa.train import TrainConfig, preset_config, seed_everything, train

    torch.set_num_threads(1)
    seed_everything(0)
    n = args.seq_len
    lo, hi = 4 * (n // 16), n + 1 - REPEAT_SPAN
    corpus = Corpus.load(max_bytes=args.max_bytes)
    model = DSAForCausalLM(preset_config("tiny", n))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=n, lr=args.lr, plant="repeat",
                      plant_prob=0.5, plant_distance=lo, plant_max_distance=hi, plant_curriculum=curriculum,
                      backend="reference", log_every=args.every)
    history = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = tmp
        resume = None
        while True:
            state = train(model, corpus, cfg, resume=resume, progress=False, stop_after=args.every)
            acc = retrieval_accuracy(model, corpus, n, n=args.eval, distance=lo, task="repeat",
                                     attention="dense", backend="reference", max_distance=hi)
            history.append({"step": state.step, "accuracy": acc["accuracy"],
                            "digit_accuracy": acc["digit_accuracy"], "answer_loss": acc["answer_loss"]})
            print(f"curriculum {curriculum}: {history[-1]}", file=sys.stderr, flush=True)
            if state.step >= args.steps:
                return history
            resume = Path(tmp) / "train_state.pt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval", type=int, default=32, help="held-out windows scored at each point")
    ap.add_argument("--max-bytes", type=int, default=1 << 22)
    ap.add_argument("--curricula", type=int, nargs="+", default=[0, 400])
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_variant(args.child, args)))
        return
    base = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("curricula", "child")]
    procs = {c: subprocess.Popen([sys.executable, "-m", "benchmarks.probe_curriculum", *base, "--child", str(c)],
                                 stdout=subprocess.PIPE, text=True) for c in args.curricula}
    result = {"seq_len": args.seq_len, "offsets": [4 * (args.seq_len // 16), args.seq_len - 63],
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "variants": {}}
    for c, p in procs.items():
        out, _ = p.communicate()
        sys.stdout.write(out)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            raise SystemExit(f"curriculum {c}: the child failed (exit {p.returncode})")
        result["variants"][str(c)] = json.loads(lines[-1][len("RESULT "):])
    print("written", write_result("probe_curriculum", result))


if __name__ == "__main__":
    main()
