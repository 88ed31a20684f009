"""Where a training step's GPU time goes: torch.profiler over one step of each stage.

    python -m benchmarks.profile_train_step [--stages sparse warmup dense] [--seq-len 8192]

The quality study's "small" model (flashdsa.train.preset_config) on the standard-library
corpus, batch = 32768 tokens / seq_len: two untimed steps of a stage (compilation,
autotuning), then one step under torch.profiler. Prints each stage's operators and kernels
by CUDA time and writes ``profile_train_step.json`` (per stage: total self CUDA ms and the
top rows: name, self CUDA ms, calls) under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import write_result
from flashdsa.data import Corpus
from flashdsa.model import DSAForCausalLM
from flashdsa.recipe import STAGES
from flashdsa.train import TrainConfig, preset_config, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="+", default=["sparse", "warmup", "dense"], choices=list(STAGES))
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--top", type=int, default=22, help="rows kept per stage")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_train_step: needs a CUDA GPU")
    corpus = Corpus.load()
    model = DSAForCausalLM(preset_config("small", args.seq_len)).cuda()
    batch = max(1, 32768 // args.seq_len)
    results = {"seq_len": args.seq_len, "batch": batch, "stages": {}}
    for stage in args.stages:
        tc = TrainConfig(stage=stage, steps=4, batch_size=batch, seq_len=args.seq_len, warmup_steps=1)
        train(model, corpus, tc, progress=False, stop_after=2)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train(model, corpus, tc, progress=False, stop_after=1)
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        print("=====", stage)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))
        results["stages"][stage] = {
            "self_cuda_ms": sum(e.self_device_time_total for e in rows) / 1e3,
            "top": [{"name": e.key, "self_cuda_ms": e.self_device_time_total / 1e3,
                     "cuda_total_ms": e.device_time_total / 1e3, "calls": e.count} for e in rows[:args.top]]}
    print("written", write_result("profile_train_step", results))


if __name__ == "__main__":
    main()
