"""The ``flashdsa`` command. Each subcommand is a function ``cmd_<name>(args)`` registered
in :func:`build_parser`."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

from . import __version__
from .backend import triton_available, triton_interpreted


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the device and which backends are usable here."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device = "cpu (no CUDA device)"
    if not triton_available():
        triton_state = "unavailable (pip install triton)"
    elif torch.cuda.is_available():
        triton_state = "usable (GPU kernels)"
    elif triton_interpreted():
        triton_state = "usable through the Triton interpreter (TRITON_INTERPRET=1; slow, for testing)"
    else:
        triton_state = "installed, but no GPU: set TRITON_INTERPRET=1 to run kernels interpreted"
    rows = [
        ("flashdsa", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _package_version("triton")),
        ("device", device),
        ("backend reference", "usable"),
        ("backend triton", triton_state),
        ("backend auto", "triton" if triton_available() and torch.cuda.is_available() else "reference"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """One training stage (SPEC 5); see flashdsa.train."""
    from .train import cmd_train as run
    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """Loss by position, passkey retrieval and indexer recall of a model; see flashdsa.evaluate."""
    from .train import cmd_eval as run
    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Dense pretrain -> (a) dense continued vs (b) DSA warm-up + sparse, at tiny scale."""
    from .train import cmd_demo as run
    return run(args)


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete prompts with the inference engine; see flashdsa.engine.cli."""
    from .engine.cli import cmd_generate as run
    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP server; see flashdsa.engine.server."""
    from .engine.cli import cmd_serve as run
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashdsa", description="DeepSeek Sparse Attention in PyTorch and Triton")
    parser.add_argument("--version", action="version", version=f"flashdsa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device and usable backends")
    p.set_defaults(func=cmd_info)
    from .engine.cli import add_generate_args, add_serve_args
    from .train import add_demo_args, add_eval_args, add_train_args
    commands = [
        ("train", "train one stage: dense (pretrain/continue), warmup (indexer KL), sparse", add_train_args, cmd_train),
        ("eval", "loss/perplexity by position, passkey retrieval, indexer recall", add_eval_args, cmd_eval),
        ("demo", "the whole DSA recipe at tiny scale on CPU, against dense, as a table", add_demo_args, cmd_demo),
        ("generate", "complete prompts with the inference engine (paged DSA)", add_generate_args, cmd_generate),
        ("serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)", add_serve_args,
         cmd_serve),
    ]
    for name, help_text, add_args, func in commands:
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
