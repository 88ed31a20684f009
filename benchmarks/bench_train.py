"""Training throughput by context: dense vs. DSA stages of the quality study's model.

    python -m benchmarks.bench_train                   # H200: contexts 8K, 16K, 32K
    python -m benchmarks.bench_train --toy             # CPU logic check at tiny sizes

For each context, the "small" preset of the quality study (8 layers, width 512, index_topk
= context / 16) trains a few steps of each stage (flashdsa.recipe: dense, warm-up,
sparse) on the standard-library corpus, about ``--tokens`` tokens a step (batch =
tokens / context, at least 1), and reports seconds a step (the first steps excluded:
compilation and autotuning), tokens/s, model TFLOP/s
(``DSAForCausalLM.train_flops_per_token``) and, on a GPU, MFU against the bf16 matmul
ceiling measured in the same run, and the peak memory. Writes ``bench_train.json`` and
``bench_train.svg`` (tokens/s against context, one line a stage; needs matplotlib).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from flashdsa.data import Corpus  # noqa: E402
from flashdsa.model import DSAForCausalLM  # noqa: E402
from flashdsa.recipe import STAGES  # noqa: E402
from flashdsa.train import TrainConfig, preset_config, train  # noqa: E402


def stage_rate(model, corpus, stage: str, seq_len: int, batch: int, steps: int, backend: str) -> dict:
    """Seconds a step of ``stage`` over ``steps`` steps after one untimed step, and the peak
    memory of the timed steps."""
    tc = TrainConfig(stage=stage, steps=steps + 1, batch_size=batch, seq_len=seq_len, backend=backend,
                     warmup_steps=1)
    train(model, corpus, tc, progress=False, stop_after=1)
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.reset_peak_memory_stats()
    st = train(model, corpus, tc, progress=False)
    out = dict(seconds_per_step=st.train_seconds / max(st.step, 1))
    if next(model.parameters()).is_cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--tokens", type=int, default=32768, help="tokens a step (batch = tokens / context)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps a stage")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    ap.add_argument("--toy", action="store_true", help="tiny model and contexts on CPU: checks the logic")
    ap.add_argument("--out", default=None, help="output directory (default $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    if args.toy:
        args.contexts, args.tokens, args.steps = [c for c in args.contexts if c <= 256] or [128, 256], 512, 1
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    corpus = Corpus.load(max_bytes=(1 << 20) if args.toy else None)
    res = {"contexts": args.contexts, "tokens_per_step": args.tokens, "rows": []}
    if device.type == "cuda":
        from benchmarks.common import measure_ceilings
        res["ceilings"] = measure_ceilings()
    for seq_len in args.contexts:
        mcfg = preset_config("tiny" if args.toy else "small", seq_len)
        batch = max(1, args.tokens // seq_len)
        model = DSAForCausalLM(mcfg).to(device)
        for stage in STAGES:
            row = dict(context=seq_len, stage=stage, batch=batch, index_topk=mcfg.index_topk,
                       **stage_rate(model, corpus, stage, seq_len, batch, args.steps, args.backend))
            row["tokens_per_s"] = batch * seq_len / row["seconds_per_step"]
            row["model_tflops"] = row["tokens_per_s"] * model.train_flops_per_token(seq_len, stage) * 1e-12
            if "ceilings" in res:
                row["mfu_bf16"] = row["model_tflops"] / res["ceilings"]["bf16_matmul_tflops"]
            res["rows"].append(row)
            print(f"{seq_len:6d} {stage:7s} batch {batch:3d}: {row['seconds_per_step'] * 1e3:9.1f} ms/step "
                  f"{row['tokens_per_s']:12,.0f} tokens/s {row['model_tflops']:8.2f} model TFLOP/s"
                  + (f"  MFU {100 * row['mfu_bf16']:.1f}%" if "mfu_bf16" in row else ""), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out_dir = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    name = "bench_train_toy" if args.toy else "bench_train"
    print("wrote", write_result(name, res, out_dir))
    try:
        from benchmarks.plot import line_chart
        series = {stage: [(r["context"], r["tokens_per_s"]) for r in res["rows"] if r["stage"] == stage]
                  for stage in STAGES}
        print("wrote", line_chart(series, os.path.join(out_dir, f"{name}.svg"), "training throughput by context",
                                  "context (tokens)", "tokens/s", logx=True))
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
