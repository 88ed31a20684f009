"""End-to-end engine throughput: ``LLM.generate`` on a small V3.2-style model.

    python -m benchmarks.bench_engine                         # H200: 32K prompts, batch 1 and 32 (a few min)
    python -m benchmarks.bench_engine --toy                   # CPU: tiny shapes, checks the logic only

The model: V3.2's attention shapes per head (MLA with kv_lora 512 + rope 64, 128-dim
nope / v heads, the 64 x 128 FP8 lightning indexer, top-k 2048) at a small width
(``--hidden``, ``--heads``, ``--layers``, dense SwiGLU MLP, byte vocabulary), random
bf16 weights. Prompts are random tokens of ``--prompt-len`` each, greedy, EOS ignored.

For each batch size and each engine setting (``default``: ``LLM(model)`` as a user makes
it, CUDA graphs on where they work; ``eager``: ``cuda_graphs=False``, the engine's
default before graphs were), two generate calls run: ``max_tokens=1`` (prefill and the
first token) and ``max_tokens=--new-tokens``. Decode tokens/s = batch * (new - 1) /
(difference of the two times): the prefill cancels. Results go to
benchmarks/results/bench_engine.json ($OUT when set), with the ceilings of the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from benchmarks.common import measure_ceilings, write_result
from flashdsa.config import DSAConfig
from flashdsa.data import BOS, EOS, VOCAB_SIZE


def small_v32(args) -> DSAConfig:
    if args.toy:
        return DSAConfig(vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, n_routed_experts=None,
                         hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                         v_head_dim=16, index_n_heads=4, index_head_dim=32, index_topk=32, rope_factor=1.0,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    return DSAConfig(vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, n_routed_experts=None,
                     hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads, q_lora_rank=args.hidden // 2,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     index_n_heads=64, index_head_dim=128, index_topk=2048, rope_factor=1.0,
                     max_position_embeddings=args.max_model_len, tie_word_embeddings=False)


def timed_generate(llm, prompts, params) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert all(len(o.token_ids) == params.max_tokens for o in outs), "a request stopped early"
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 32768; toy 96)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 65; toy 5)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=65536, help="the model's max_position_embeddings")
    ap.add_argument("--settings", nargs="+", default=["default", "eager"], choices=("default", "eager"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from flashdsa.engine import LLM, SamplingParams
    from flashdsa.model import DSAForCausalLM

    prompt_len = args.prompt_len or (96 if args.toy else 32768)
    new = args.new_tokens or (5 if args.toy else 65)
    cuda = torch.cuda.is_available() and not args.toy
    device = "cuda" if cuda else "cpu"
    cfg = small_v32(args)
    torch.manual_seed(0)
    model = DSAForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    result = {"config": dataclasses.asdict(cfg), "prompt_len": prompt_len,
              "new_tokens": new, "params": sum(p.numel() for p in model.parameters()), "rows": []}
    if cuda:
        result["ceilings"] = measure_ceilings()
    g = torch.Generator().manual_seed(1)
    for setting in args.settings:
        engine_args = {} if setting == "default" else {"cuda_graphs": False}
        n_blocks = max(args.batches) * (-(-(prompt_len + new) // 64) + 1) + 8
        t0 = time.perf_counter()
        llm = LLM(model, num_blocks=n_blocks, max_num_seqs=max(args.batches), **engine_args)
        build_s = time.perf_counter() - t0
        graphs = getattr(llm.engine.runner, "graphs", None)
        for b in args.batches:
            prompts = [torch.randint(0, 256, (prompt_len,), generator=g).tolist() for _ in range(b)]
            one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
            full = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
            timed_generate(llm, [p[:256] for p in prompts], SamplingParams(temperature=0, max_tokens=3,
                                                                           ignore_eos=True))   # warm-up
            t1 = timed_generate(llm, prompts, one)
            tn = timed_generate(llm, prompts, full)
            row = {"setting": setting, "batch": b, "cuda_graphs": bool(graphs and graphs.graphs),
                   "engine_build_s": round(build_s, 2), "prefill_s": round(t1, 3),
                   "prefill_tokens_per_s": round(b * prompt_len / t1, 1), "generate_s": round(tn, 3),
                   "decode_tokens_per_s": round(b * (new - 1) / max(tn - t1, 1e-9), 1),
                   "decode_ms_per_step": round((tn - t1) * 1e3 / (new - 1), 3)}
            result["rows"].append(row)
            print(row, flush=True)
        del llm
        if cuda:
            torch.cuda.empty_cache()
    path = write_result("bench_engine_toy" if args.toy else "bench_engine", result,
                        args.out or os.environ.get("OUT"))
    print("wrote", path)


if __name__ == "__main__":
    main()
