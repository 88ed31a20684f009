"""End-to-end engine throughput: ``LLM.generate`` on a small V3.2-style model.

    python -m benchmarks.bench_engine                         # H200: 32K prompts, batch 1 and 32 (a few min)
    python -m benchmarks.bench_engine --toy                   # CPU: tiny shapes, checks the logic only

The model: V3.2's attention shapes per head (MLA with kv_lora 512 + rope 64, 128-dim
nope / v heads, the 64 x 128 FP8 lightning indexer, top-k 2048) at a small width
(``--hidden``, ``--heads``, ``--layers``, dense SwiGLU MLP, byte vocabulary), random
bf16 weights. Prompts are random tokens of ``--prompt-len`` each, greedy, EOS ignored.
``--experts N``: V3's MoE instead of the dense MLP after the first layer (N routed
experts in 8 groups, 4 groups and 8 experts a token, one shared expert, each of width
``--hidden`` / 4). ``--vocab V``: a vocabulary of V tokens (DeepSeek's: 129280; the
prompts stay bytes), and ``--temperature``, ``--top-p``: sampled instead of greedy (the
sampler's cost grows with the vocabulary).

For each batch size and each engine setting (``default``: ``LLM(model)`` as a user makes
it, CUDA graphs on where they work; ``eager``: ``cuda_graphs=False``, the engine's
default before graphs were; ``per_expert``: eager, with the MoE layers' per-expert
forward, which reads the expert counts on the host, as before the engine stacked the
experts; ``no_prefix_cache``: ``enable_prefix_caching=False``), the requests go through
the engine's step loop (what ``LLM.generate`` runs) twice, the first pass a warm-up
(Triton compiles each shape once) on other random prompts, so that the timed pass finds
nothing in the prefix cache:

- prefill: from adding the requests until every one has its first token (chunks of
  ``max_num_batched_tokens``; sequences done early decode beside later chunks);
- decode: then ``--decode-steps`` steps in which every sequence decodes one token, all of
  them still running: decode tokens/s = batch * steps / time;
- follow-up: once those requests are done, a request for each of ``--follow-up`` more
  tokens after its prompt (the next turn of a chat over the same document) until its
  first token: with prefix caching only the new tokens and the prompt's last block are
  computed.

``--shared N``: every prompt of a pass starts with the same N tokens (a system prompt,
one document asked several questions), then its own: with prefix caching the batch
computes them once (the later requests wait for the pages, then take them).

Results go to benchmarks/results/bench_engine.json ($OUT when set), with the ceilings of
the same run.
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
    moe = dict(n_routed_experts=args.experts, num_experts_per_tok=8, n_group=8, topk_group=4,
               n_shared_experts=1, moe_intermediate_size=args.hidden // 4, first_k_dense_replace=1)
    moe = moe if args.experts else dict(n_routed_experts=None)
    if args.toy:
        return DSAConfig(vocab_size=args.vocab, bos_token_id=BOS, eos_token_id=EOS, **moe,
                         hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                         v_head_dim=16, index_n_heads=4, index_head_dim=32, index_topk=32, rope_factor=1.0,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    return DSAConfig(vocab_size=args.vocab, bos_token_id=BOS, eos_token_id=EOS, **moe,
                     hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads, q_lora_rank=args.hidden // 2,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     index_n_heads=64, index_head_dim=128, index_topk=2048, rope_factor=1.0,
                     max_position_embeddings=args.max_model_len, tie_word_embeddings=False)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def max_tokens(decode_steps: int, prompt_tokens: int, chunk: int) -> int:
    """Tokens a request may generate so that none finishes before the timed decode steps
    end: at most one a prefill step (chunks of ``chunk`` tokens) before them, plus them."""
    return decode_steps + prompt_tokens // chunk + 2


def measure(engine, prompts, decode_steps: int, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """Seconds of the prefill phase and of ``decode_steps`` decode-only steps (see the
    module docstring); the requests are aborted afterwards."""
    from flashdsa.engine import SamplingParams
    room = max_tokens(decode_steps, sum(len(p) for p in prompts), engine.config.max_num_batched_tokens)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=0, max_tokens=room, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    seqs = [engine.sequences[i] for i in ids]
    sync()
    t0 = time.perf_counter()
    while not all(s.output_ids for s in seqs):
        engine.step()
    sync()
    t1 = time.perf_counter()
    for _ in range(decode_steps):
        outs = engine.step()
        assert len(outs) == len(prompts) and not any(o.finished for o in outs), "not a full decode step"
    sync()
    t2 = time.perf_counter()
    for i in ids:
        engine.abort_request(i)
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1}


def follow_up(engine, prompts, n_new: int, g: torch.Generator) -> float:
    """Seconds until a request of each prompt + ``n_new`` random tokens has its first token."""
    from flashdsa.engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    sync()
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p + torch.randint(0, 256, (n_new,), generator=g).tolist(), params)
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 32768; toy 96)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 64; toy 4)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=65536, help="the model's max_position_embeddings")
    ap.add_argument("--vocab", type=int, default=VOCAB_SIZE, help="vocabulary size (default: the byte tokens')")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--experts", type=int, default=None,
                    help="routed experts of MoE layers after the first (default: dense MLPs only)")
    ap.add_argument("--follow-up", type=int, default=64, help="new tokens of the follow-up requests")
    ap.add_argument("--shared", type=int, default=0, help="leading tokens every prompt of a pass shares")
    ap.add_argument("--settings", nargs="+", default=["default", "eager"],
                    choices=("default", "eager", "per_expert", "no_prefix_cache"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from flashdsa.engine import LLM, EngineConfig
    from flashdsa.model import DSAForCausalLM, MoE

    prompt_len = args.prompt_len or (96 if args.toy else 32768)
    steps = args.decode_steps or (4 if args.toy else 64)
    cuda = torch.cuda.is_available() and not args.toy
    device = "cuda" if cuda else "cpu"
    cfg = small_v32(args)
    torch.manual_seed(0)
    model = DSAForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    result = {"config": dataclasses.asdict(cfg), "prompt_len": prompt_len, "shared": args.shared, "decode_steps": steps,
              "temperature": args.temperature, "top_p": args.top_p,
              "params": sum(p.numel() for p in model.parameters()), "rows": []}
    if cuda:
        result["ceilings"] = measure_ceilings()
    name = "bench_engine_toy" if args.toy else "bench_engine"
    g = torch.Generator().manual_seed(1)
    for setting in args.settings:
        engine_args = {"default": {}, "no_prefix_cache": {"enable_prefix_caching": False}}.get(
            setting, {"cuda_graphs": False})
        room = max(max_tokens(steps, max(args.batches) * prompt_len, EngineConfig.max_num_batched_tokens),
                   args.follow_up + 1)
        n_blocks = max(args.batches) * (-(-(prompt_len + room) // 64) + 1) + 8
        t0 = time.perf_counter()
        llm = LLM(model, num_blocks=n_blocks, max_num_seqs=max(args.batches), **engine_args)
        build_s = time.perf_counter() - t0
        if setting == "per_expert":   # the engine stacked the experts: undo it
            for m in model.modules():
                if isinstance(m, MoE):
                    m._stacked = None
        graphs = getattr(llm.engine.runner, "graphs", None)
        for b in args.batches:
            for _ in range(2):   # a warm-up (compiles), then the timed pass on other prompts
                shared = torch.randint(0, 256, (min(args.shared, prompt_len),), generator=g).tolist()
                prompts = [shared + torch.randint(0, 256, (prompt_len - len(shared),), generator=g).tolist()
                           for _ in range(b)]
                m = measure(llm.engine, prompts, steps, args.temperature, args.top_p)
                m["follow_up_s"] = follow_up(llm.engine, prompts, args.follow_up, g)
            row = {"setting": setting, "batch": b, "cuda_graphs": bool(graphs and graphs.graphs),
                   "engine_build_s": round(build_s, 2), "prefill_s": round(m["prefill_s"], 3),
                   "prefill_tokens_per_s": round(b * prompt_len / m["prefill_s"], 1),
                   "decode_tokens_per_s": round(b * steps / m["decode_s"], 1),
                   "decode_ms_per_step": round(m["decode_s"] * 1e3 / steps, 3),
                   "follow_up_ttft_s": round(m["follow_up_s"], 4)}
            result["rows"].append(row)
            print(row, flush=True)
            write_result(name, result, args.out or os.environ.get("OUT"))   # after each row: a cut run keeps it
        del llm
        if cuda:
            torch.cuda.empty_cache()
    print("wrote", write_result(name, result, args.out or os.environ.get("OUT")))


if __name__ == "__main__":
    main()
