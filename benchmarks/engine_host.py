"""Host time of the engine's decode step, without a GPU: what ``LLMEngine.step`` spends in
Python and torch's CPU ops around a decode step that replays a CUDA graph (scheduling,
the graph's static inputs, sampling, detokenization, the outputs), with the replay
itself stubbed out (its logits: fixed random numbers).

    python -m benchmarks.engine_host                        # batch 1 and 32, 32K contexts
    python -m benchmarks.engine_host --batches 1 --contexts 8192 131072 --output-len 2048

Each of ``--batches`` sequences holds a context of ``--contexts`` tokens, the last
``--output-len`` of them generated (the text the engine detokenizes), and decodes
``--steps`` tokens, greedily unless ``--temperature`` (and ``--top-p``) say otherwise;
the model is a tiny random one with ``--vocab`` tokens whose captured decode is
replaced by a graph whose replay does nothing and whose logits are fixed random numbers. Prints and
writes (benchmarks/results/engine_host.json, or $OUT) the median host milliseconds of a
step over ``--repeat`` timings. ``--mixed``: instead, the host milliseconds of the eager
step's metadata (``ModelRunner.build_metadata``) for a mixed step: batch - 1 decoding
sequences beside the first prefill chunk of one more (a step of 2048 tokens). On a GPU the step also copies its static inputs to the
device; that and the replay are not in these numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import cpu_name, write_result
from flashdsa.config import DSAConfig
from flashdsa.data import BOS, EOS, VOCAB_SIZE
from flashdsa.engine import EngineConfig, LLMEngine, SamplingParams
from flashdsa.engine.cache import blocks_needed
from flashdsa.engine.cuda_graph import DecodeGraphs
from flashdsa.engine.scheduler import Status
from flashdsa.model import DSAForCausalLM


class _NoReplay:
    def replay(self) -> None:
        pass


def engine_with_stub_graphs(batch: int, context: int, steps: int, vocab: int = VOCAB_SIZE) -> LLMEngine:
    cfg = DSAConfig(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, n_routed_experts=None,
                    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    index_n_heads=2, index_head_dim=16, index_topk=8, rope_factor=1.0,
                    max_position_embeddings=context + steps + 64)  # room for the warm-up step and the timed ones
    model = DSAForCausalLM(cfg).eval()
    per_seq = blocks_needed(context + steps + 1)
    engine = LLMEngine(model, config=EngineConfig(num_blocks=batch * per_seq + 1, max_num_seqs=batch))
    graphs = DecodeGraphs(engine.runner, batch, per_seq, scratch_block=batch * per_seq)
    for size in graphs.sizes:
        logits = torch.randn(size, cfg.vocab_size, generator=torch.Generator().manual_seed(size))
        graphs.graphs[size] = (_NoReplay(), logits)
    engine.runner.graphs = graphs
    return engine


def add_decoding(engine: LLMEngine, batch: int, context: int, output_len: int, steps: int,
                 temperature: float = 0.0, top_p: float = 1.0) -> None:
    """``batch`` requests whose ``context`` tokens are cached but the last sampled one."""
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        tokens = torch.randint(32, 127, (context,), generator=g).tolist()   # printable ASCII
        prompt, output = tokens[:context - output_len], tokens[context - output_len:]
        rid = engine.add_request(prompt, SamplingParams(temperature=temperature, top_p=top_p, seed=0,
                                                        max_tokens=output_len + steps + 2, ignore_eos=True))
        seq = engine.sequences[rid]
        engine.scheduler.waiting.remove(seq)
        seq.output_ids = list(output)
        seq.text = engine.tokenizer.decode(output)
        seq.prefix_offset = seq.read_offset = len(output)
        seq.num_computed = context - 1
        seq.blocks = engine.allocator.allocate(blocks_needed(context))
        seq.status = Status.RUNNING
        engine.scheduler.running.append(seq)
        engine.scheduler.cache_blocks(seq)   # as its prefill and decode steps did


def host_ms(batch: int, context: int, output_len: int, steps: int, repeat: int, vocab: int = VOCAB_SIZE,
            temperature: float = 0.0, top_p: float = 1.0) -> float:
    times = []
    for _ in range(repeat):
        engine = engine_with_stub_graphs(batch, context, steps, vocab)
        add_decoding(engine, batch, context, output_len, steps, temperature, top_p)
        engine.step()   # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            outs = engine.step()
            assert len(outs) == batch and not any(o.finished for o in outs)
        times.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(times)


def mixed_metadata_ms(batch: int, context: int, output_len: int, repeat: int) -> float:
    engine = engine_with_stub_graphs(batch, context, 1)
    add_decoding(engine, batch - 1, context, output_len, 1)
    engine.add_request(torch.randint(0, 256, (context,), generator=torch.Generator().manual_seed(1)).tolist(),
                       SamplingParams(temperature=0, max_tokens=1))
    scheduled = engine.scheduler.schedule()
    assert len(scheduled) == batch and scheduled[-1][1] > 1, [n for _, n in scheduled]
    times = []
    for _ in range(repeat):
        engine.runner.build_metadata(scheduled)   # warm-up
        t0 = time.perf_counter()
        for _ in range(20):
            engine.runner.build_metadata(scheduled)
        times.append((time.perf_counter() - t0) * 1e3 / 20)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768])
    ap.add_argument("--output-len", type=int, default=512, help="generated tokens already in each context")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=VOCAB_SIZE, help="vocabulary size (DeepSeek's: 129280)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--mixed", action="store_true", help="time the eager mixed step's metadata instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for context in args.contexts:
        for b in args.batches:
            if args.mixed:
                if b < 2:
                    continue
                rows.append({"batch": b, "context": context, "mixed_metadata_ms": round(
                    mixed_metadata_ms(b, context, args.output_len, args.repeat), 4)})
            else:
                ms = host_ms(b, context, args.output_len, args.steps, args.repeat, args.vocab, args.temperature,
                             args.top_p)
                rows.append({"batch": b, "context": context, "output_len": args.output_len, "vocab": args.vocab,
                             "temperature": args.temperature, "top_p": args.top_p, "host_ms_per_step": round(ms, 4)})
            print(rows[-1], flush=True)
    result = {"command": "python -m benchmarks.engine_host " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host_cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(), "rows": rows}
    print("wrote", write_result("engine_host_mixed" if args.mixed else "engine_host", result,
                                os.environ.get("OUT") or None))


if __name__ == "__main__":
    main()
