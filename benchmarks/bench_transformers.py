"""A transformers DeepseekV32ForCausalLM before and after ``use_flashdsa_attention``: prefill
and decode time at long context.

    python -m benchmarks.bench_transformers                  # GPU: small V3.2-shaped model, 8K and 32K
    python -m benchmarks.bench_transformers --toy            # CPU: tiny shapes, checks the logic only

The model: transformers' own DeepseekV32ForCausalLM, random weights, bf16, ``--layers``
layers with DeepSeek-V3.2's attention shapes (q_lora 1536, kv_lora 512, rope 64, nope 128,
v 128, indexer 64 heads x 128, top-k 2048) but 64 heads, hidden 2048 and a dense MLP.
Two attention paths on the same weights: "transformers" (its own attention, the default
implementation: an [L, L] mask and the indexer's full score matrix) and "flashdsa" (after
``use_flashdsa_attention(model)``: FP8 indexer top-k kernel, sparse MLA kernels).

- prefill: one forward over L tokens of one sequence (no cache, logits of the last token
  only), median of ``--reps`` after a warm-up call; "oom" where it does not fit.
- decode: transformers' DynamicCache filled with L - 1 tokens by chunks of ``--chunk``,
  then ``--decode-steps`` one-token forwards (as ``generate`` runs them), the mean per step
  after one warm-up step.

Peak memory (torch.cuda.max_memory_allocated) is reported for each. Results go to
benchmarks/results/bench_transformers.json ($OUT when set) with the ceilings measured in the
same run (benchmarks/common.py).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import measure_ceilings, print_table, write_result

SMALL = dict(vocab_size=4096, hidden_size=2048, intermediate_size=4096, num_attention_heads=64,
             num_key_value_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
             qk_nope_head_dim=128, v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048)
TOY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
           q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
           index_n_heads=4, index_head_dim=32, index_topk=16)
PATHS = ("transformers", "flashdsa")


def build_model(shapes: dict, layers: int, max_len: int, device, dtype):
    """transformers' DeepseekV32ForCausalLM with ``shapes``, dense MLPs only, random weights."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = DeepseekV32Config(**shapes, num_hidden_layers=layers, first_k_dense_replace=layers,
                            max_position_embeddings=max(max_len, 4096), bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return DeepseekV32ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def time_prefill(model, ids: torch.Tensor, reps: int) -> float:
    """Median ms of one no-cache forward over ``ids`` [1, L], after a warm-up call."""
    times = []
    for _ in range(reps + 1):
        _sync(ids.device)
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(ids.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times[1:])[len(times[1:]) // 2]


def time_decode(model, ids: torch.Tensor, chunk: int, steps: int) -> float:
    """Mean ms of a one-token forward with transformers' DynamicCache holding ids [1, L - 1]
    (filled by chunks of ``chunk``), over ``steps`` steps after a warm-up step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for start in range(0, ids.shape[1] - 1, chunk):
        model(ids[:, start:min(start + chunk, ids.shape[1] - 1)], cache=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    for step in range(steps + 1):
        if step == 1:
            _sync(ids.device)
            t0 = time.perf_counter()
        tok = model(tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    _sync(ids.device)
    return (time.perf_counter() - t0) * 1e3 / steps


def _measure(fn, device, *args) -> tuple[float | None, float | None]:
    """(ms, peak GiB) of ``fn(*args)``, (None, peak) when the device runs out of memory."""
    _reset_peak(device)
    try:
        ms = fn(*args)
    except torch.cuda.OutOfMemoryError:
        ms = None
    peak = _peak_gib(device)
    _reset_peak(device)
    return ms, peak


@torch.no_grad()
def run(args) -> dict:
    from flashdsa.integrations.transformers import use_flashdsa_attention

    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TOY if args.toy else SMALL
    model = build_model(shapes, args.layers, max(args.contexts), device, dtype)
    result = {"config": {**shapes, "num_hidden_layers": args.layers}, "dtype": str(dtype), "backend": args.backend,
              "chunk": args.chunk, "decode_steps": args.decode_steps, "rows": []}
    if device.type == "cuda":
        result["ceilings"] = measure_ceilings()
    for path in PATHS:
        if path == "flashdsa":
            use_flashdsa_attention(model, backend=args.backend)
        for length in args.contexts:
            ids = torch.randint(0, shapes["vocab_size"], (1, length), device=device)
            prefill, prefill_peak = _measure(time_prefill, device, model, ids, args.reps)
            decode, decode_peak = _measure(time_decode, device, model, ids, args.chunk, args.decode_steps)
            row = {"path": path, "context": length, "prefill_ms": prefill, "prefill_peak_gib": prefill_peak,
                   "decode_ms_per_token": decode, "decode_peak_gib": decode_peak}
            result["rows"].append(row)
            print(row, flush=True)
    for length in args.contexts:
        own, ours = (next(r for r in result["rows"] if r["path"] == p and r["context"] == length) for p in PATHS)
        for key in ("prefill_ms", "decode_ms_per_token"):
            if own[key] is not None and ours[key] is not None:
                ours[key.split("_")[0] + "_speedup"] = own[key] / ours[key]
    return result


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 8192 32768; toy 48 96")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk that fills the decode cache "
                    "(default 2048; toy 32)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 32; toy 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed prefill calls (default 5; toy 1)")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                    help="of the flashdsa path")
    ap.add_argument("--toy", action="store_true", help="tiny shapes on CPU: checks the logic, times nothing useful")
    ap.add_argument("--out", default=None, help="output folder (default $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    args.contexts = args.contexts or ([48, 96] if args.toy else [8192, 32768])
    args.chunk = args.chunk or (32 if args.toy else 2048)
    args.decode_steps = args.decode_steps or (2 if args.toy else 32)
    args.reps = args.reps or (1 if args.toy else 5)
    result = run(args)
    print_table(result["rows"], ["path", "context", "prefill_ms", "prefill_speedup", "prefill_peak_gib",
                                 "decode_ms_per_token", "decode_speedup", "decode_peak_gib"])
    path = write_result("bench_transformers_toy" if args.toy else "bench_transformers", result, args.out)
    print("wrote", path)
    return path


if __name__ == "__main__":
    main()
