"""The ``flashdsa generate`` and ``flashdsa serve`` subcommands (registered in flashdsa/cli.py).

MODEL is a Hugging Face directory (config.json + safetensors), a ``train_state.pt`` of
``flashdsa train``, or ``random:tiny`` / ``random:small`` for a randomly initialized
preset (smoke tests and demos: the text is noise).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..cli import device_arg

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")   # names of torch dtypes, and auto


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model directory, train_state.pt, or random:tiny / random:small")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="parameter dtype (auto: bf16 on GPU, the checkpoint's on CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="kernels: triton, the PyTorch reference, or auto (triton on GPU)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "bf16", "fp8_ds_mla"),
                   help="latent cache rows: bf16, the 656-byte FP8 rows of FlashMLA, or auto (the model's dtype)")
    p.add_argument("--num-blocks", type=int, default=None, help="cache pages of 64 tokens (default: from memory)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step (prefill chunk)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture decode steps in CUDA graphs (default: on where they work: GPU, Triton "
                        "kernels, MoE layers as grouped GEMMs; --no-cuda-graphs decodes eagerly)")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cache blocks of earlier requests that start with the same tokens "
                        "(default: on; --no-prefix-caching computes every prompt in full)")
    p.add_argument("--seed", type=int, default=0, help="seed of random:* models")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a Hugging Face tokenizer's directory (default: MODEL's tokenizer files if it has "
                        "them, else the byte-level tokenizer)")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    _add_engine_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several, generated as one batch); default: lines of stdin")
    p.add_argument("--chat", action="store_true", help="treat each prompt as one user message")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    p.add_argument("--sample-seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen by this where positive (1: none)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted from generated tokens' logits")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted from generated tokens' logits once per occurrence")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each generated token's log-probability and the N likeliest tokens' (0-20)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--served-model-name", default=None, help="the 'model' of responses (default: MODEL)")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt a request may send")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight; more get 429")
    p.add_argument("--max-n", type=int, default=16, help="most choices (n) a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger get 413")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request body; slower get 408")


def build_llm(args):
    import torch

    from .llm import LLM
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model.startswith("random:"):
        from ..model import DSAForCausalLM
        from ..train import preset_config
        torch.manual_seed(args.seed)
        model = DSAForCausalLM(preset_config(args.model.split(":", 1)[1]))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None and torch.device(device).type == "cuda":
            dtype = torch.bfloat16
        model = model.to(device=device, dtype=dtype)
        dtype = device = None
    else:
        model, device = args.model, args.device
    tokenizer = None
    if args.tokenizer is not None:
        from ..errors import UsageError
        from .tokenizer import TOKENIZER_FILES, load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise UsageError(f"--tokenizer: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {args.tokenizer}")
    return LLM(model, tokenizer, device=device, dtype=dtype, kv_cache_dtype=args.kv_cache_dtype,
               num_blocks=args.num_blocks, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, backend=args.backend,
               cuda_graphs=args.cuda_graphs, enable_prefix_caching=args.prefix_caching)


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete prompts and print the texts (or JSON lines)."""
    from ..errors import UsageError
    from .sampler import SamplingParams
    if not args.prompt and sys.stdin.isatty():
        print("flashdsa generate: reading prompts from stdin, one per line; end with Ctrl-D "
              "(or pass --prompt)", file=sys.stderr)
    prompts = args.prompt if args.prompt else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UsageError("no prompt: pass --prompt or pipe lines on stdin")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.sample_seed, max_tokens=args.max_tokens, stop=args.stop,
                            ignore_eos=args.ignore_eos, logprobs=args.logprobs,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty)
    llm = build_llm(args)
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    outs = llm.generate(prompts, params)
    for out in outs:
        if args.json:
            line = {"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason, "cached_tokens": out.metrics["cached_tokens"]}
            if out.logprobs is not None:
                line["logprobs"] = [{"logprob": lp.logprob, "top": lp.top} for lp in out.logprobs]
            print(json.dumps(line))
        else:
            print(out.text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible API until interrupted (needs the ``serve`` extra)."""
    from ..errors import UsageError
    try:
        from .server import ServerLimits, serve
    except ModuleNotFoundError as e:      # FastAPI or uvicorn: the message says how to install them
        raise UsageError(str(e)) from e
    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                          max_concurrent=args.max_concurrent, max_body_bytes=args.max_body_bytes,
                          request_timeout=args.request_timeout, max_n=args.max_n)
    llm = build_llm(args)
    serve(llm.engine, args.host, args.port, args.served_model_name or args.model, limits)
    return 0
