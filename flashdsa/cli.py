"""The ``flashdsa`` command. Each subcommand is a function ``cmd_<name>(args)`` registered
in :func:`build_parser`.

The arguments of every subcommand are defined without torch (here and in
``flashdsa.engine.cli``), and each ``cmd_<name>`` imports what it runs, so that
``flashdsa --help`` and ``flashdsa <command> --help`` start fast. Ordinary mistakes (a bad
flag value, a missing file, a :class:`flashdsa.UsageError` or ``ValueError`` raised by the
command) print one line ``flashdsa <command>: error: <message>`` and exit with status 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .recipe import REPEAT_SPAN, RETRIEVAL_TASKS, STAGES, ComparisonConfig


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default (except None, False and []: their help says what
    happens then) and the examples epilog laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, ``<prog>: error: <message>`` (status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def device_arg(name: str) -> str:
    """argparse type of ``--device``: a torch device string this machine has."""
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{name!r} asked, but no CUDA device is available here "
                                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{name!r} asked, but this machine has {count} CUDA device(s)")
    return name


def _launch_mode(torch) -> str:
    """How the decode step's Triton kernels are launched on this machine (flashdsa info)."""
    from .backend import triton_available

    if not (torch.cuda.is_available() and triton_available()):
        return "no GPU kernels here"
    from .ops.common import pdl_launch

    if pdl_launch(torch.device("cuda", 0))["PDL"]:
        return "programmatic dependent launch (each kernel's launch overlaps the one before)"
    return "plain (programmatic dependent launch needs NVIDIA sm_90 or later)"


def _engine_decode(torch) -> str:
    """How the engine's decode steps run on this machine (flashdsa info)."""
    from .backend import triton_available

    if not torch.cuda.is_available():
        return "eager (CUDA graphs need a CUDA device)"
    if not triton_available():
        return "eager (CUDA graphs need the Triton kernels)"
    from .model import grouped_mm_unsupported

    why = grouped_mm_unsupported(torch.bfloat16, torch.device("cuda", 0))
    if why is None:
        return "CUDA graphs (bf16 MoE layers as grouped GEMMs)"
    return f"CUDA graphs; models with MoE layers eagerly ({why})"


def _sparse_mla_paths(torch) -> list[tuple[str, str]]:
    """flashdsa info's rows on the sparse MLA kernels and the indexer filter that
    backend="auto" runs here."""
    if not torch.cuda.is_available():
        return [("sparse MLA forward, decode", "reference (no CUDA device)")]
    from .backend import triton_available

    if not triton_available():
        return [("sparse MLA forward, decode", "reference (no triton)")]
    from .ops.sparse_mla.fwd_sm90 import gluon_device

    why = gluon_device(torch.device("cuda", 0))
    if why is not None:
        return [("sparse MLA forward, decode", f"triton ({why})")]
    return [("sparse MLA forward", "gluon (the Hopper kernel: bf16, d_qk 576, d_v 512, h_q a multiple of 64, no "
                                   "probabilities); triton otherwise"),
            ("sparse MLA decode", "gluon (bf16 and fp8_ds_mla caches) with enough queries to need no split-k; "
                                  "triton with split-k"),
            ("indexer top-k filter", "gluon (prefill rows: 64 heads of 128 e4m3 values, the key axis in at most "
                                     "4 splits); triton for decode rows and finer splits")]


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the device and which backends are usable here."""
    import importlib.metadata
    import platform

    import torch

    from .backend import triton_available, triton_interpreted

    def package_version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

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
        ("triton", package_version("triton")),
        ("device", device),
        ("backend reference", "usable"),
        ("backend triton", triton_state),
        ("backend auto", "triton" if triton_available() and torch.cuda.is_available() else "reference"),
        *_sparse_mla_paths(torch),
        ("decode launches", _launch_mode(torch)),
        ("engine decode", _engine_decode(torch)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# ---- train / eval / demo: the arguments here, the commands in flashdsa.train ----

# `train --override` choices: flashdsa.train.RUN_SETTINGS but the stage, as flag names
OVERRIDABLE = ("steps", "batch-size", "seq-len", "lr", "warmup-steps", "min-lr-ratio", "weight-decay", "grad-clip",
               "seed", "plant-prob", "retrieval-task", "repeat-offset", "data-step", "no-amp", "data", "max-bytes")


class GivenAction(argparse.Action):
    """Store the flag's value (a switch's ``const``) and add its name to ``args.given``, so
    that ``train --resume`` tells the flags typed on the command line from the defaults."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = namespace.given | {self.dest}


def _add_common(p, seq_len: int, action: type[argparse.Action] | None = None):
    kw = {"action": action} if action else {}
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files or directories (default: the Python standard library sources)", **kw)
    p.add_argument("--max-bytes", type=int, default=None, help="cap the training stream (held-out: a tenth)", **kw)
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens (bytes) per window", **kw)
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="kernels: triton, the PyTorch reference, or auto (triton on GPU)", **kw)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def _add_retrieval(p, action: type[argparse.Action] | None = None):
    """train's and eval's choice of the retrieval task (flashdsa.train.retrieval_setting reads it)."""
    kw = {"action": action} if action else {}
    p.add_argument("--retrieval-task", default="passkey", choices=RETRIEVAL_TASKS, **kw,
                   help="the retrieval task planted in training windows and scored by eval: passkey (a 5-digit "
                        "key found by content, more than 4 x index_topk tokens back) or repeat (flashdsa demo's: "
                        f"a span of {REPEAT_SPAN} random digits repeated exactly --repeat-offset tokens later)")
    p.add_argument("--repeat-offset", type=int, default=None, **kw,
                   help="with --retrieval-task repeat: tokens from the span to its copy (default "
                        f"{ComparisonConfig.retrieval_distance}, flashdsa demo's; needs --seq-len >= offset + "
                        f"{REPEAT_SPAN - 1})")


def add_train_args(p):
    p.set_defaults(given=frozenset())
    given = {"action": GivenAction}
    p.add_argument("--stage", default=None, choices=tuple(STAGES), **given,
                   help="dense: all parameters, dense attention; warmup: only the indexer, by KL to dense "
                        "attention; sparse: all parameters, top-k attention (required unless --resume)")
    p.add_argument("--out", default=None,
                   help="output directory: train_state.pt and model/ (HF format); required unless --resume, "
                        "whose default is the checkpoint's directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=("tiny", "small"), help="fresh model of this size (default tiny)")
    g.add_argument("--init", help="start from a train_state.pt or a Hugging Face model directory")
    g.add_argument("--resume", metavar="TRAIN_STATE",
                   help="continue a killed or finished run exactly from its train_state.pt: the model, optimizer, "
                        "RNG states, data position and every setting below come from the file; a flag that "
                        "contradicts the file is an error (see --override); --save-every, --log-every, --backend, "
                        "--device, --out and --json may change")
    p.add_argument("--override", action="append", choices=OVERRIDABLE, metavar="SETTING",
                   help="with --resume: let this flag's value replace the checkpoint's (repeatable; one of "
                        f"{', '.join(OVERRIDABLE)}), e.g. '--steps 400 --override steps' to train longer; the "
                        "run then departs from the saved one at the resumed step")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of this stage", **given)
    p.add_argument("--batch-size", type=int, default=8, help="windows per step", **given)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 dense, 1e-3 warmup, "
                                                          "6e-4 sparse)", **given)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear LR warm-up (default steps / 20)", **given)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine schedule ends at lr * this", **given)
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay", **given)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip", **given)
    p.add_argument("--seed", type=int, default=0, **given,
                   help="seeds everything: a --preset model's initial weights, the data order and planted digits, "
                        "Python's, NumPy's and torch's generators; one command twice gives the same losses")
    p.add_argument("--plant-prob", type=float, default=0.3, help="share of windows with the retrieval task planted",
                   **given)
    _add_retrieval(p, GivenAction)
    p.add_argument("--data-step", type=int, default=None, **given,
                   help="first data step (default: where --init's train_state stopped, else 0)")
    p.add_argument("--save-every", type=int, default=0, help="write train_state.pt every N steps (0: only at the end)",
                   **given)
    p.add_argument("--log-every", type=int, default=10, help="steps between logged losses and progress lines",
                   **given)
    p.add_argument("--no-amp", nargs=0, const=True, default=False, help="no bf16 autocast on GPU", **given)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data parallel over N processes of this host (FSDP2; one GPU each, or CPU with gloo); "
                        "--batch-size is the whole step's and splits evenly over them (under torchrun: its ranks)")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="instead of data parallel: every window split over the N processes (--nproc N), the "
                        "model replicated; --seq-len a multiple of 2N")
    _add_common(p, 512, GivenAction)


def add_eval_args(p):
    p.add_argument("model", help="a train_state.pt or a Hugging Face model directory")
    p.add_argument("--attention", default="sparse", choices=("sparse", "dense"),
                   help="sparse: DSA, each query attends to the indexer's top-k keys; dense: all keys")
    p.add_argument("--allow-untrained-indexer", action="store_true",
                   help="run --attention sparse even when the model's recorded training has no warmup or sparse "
                        "stage (its indexer was never trained: the top-k is arbitrary; refused without this flag)")
    p.add_argument("--windows", type=int, default=16, help="held-out windows for the loss")
    p.add_argument("--retrieval", type=int, default=32,
                   help="held-out windows for retrieval (the task planted in each)")
    _add_retrieval(p)
    p.add_argument("--recall-windows", type=int, default=4, help="windows for indexer recall (0: skip)")
    _add_common(p, 512)


def add_demo_args(p):
    d = vars(ComparisonConfig())
    p.add_argument("--pretrain-steps", type=int, default=d["pretrain_steps"], help="dense pretraining steps")
    p.add_argument("--branch-steps", type=int, default=d["branch_steps"],
                   help="LM steps of each branch on the same tokens: (a) dense, (b) sparse (after its warm-up)")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="branch (b)'s indexer warm-up steps (indexers only, before its sparse steps)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="windows per step")
    p.add_argument("--eval-windows", type=int, default=d["eval_windows"], help="held-out windows for the loss")
    p.add_argument("--eval-retrieval", type=int, default=d["eval_retrieval"],
                   help="held-out windows for retrieval (a planted repeat each)")
    p.add_argument("--repeat-offset", type=int, default=d["retrieval_distance"],
                   help=f"retrieval task: a span of {REPEAT_SPAN} random digits, planted in "
                        f"{100 * d['plant_prob']:.0f}%% of the training windows and in the held-out ones, repeats "
                        f"exactly this many tokens later (needs --seq-len >= offset + {REPEAT_SPAN - 1})")
    p.add_argument("--eval-recall", type=int, default=d["eval_recall"], help="windows for indexer recall")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed")
    p.add_argument("--out", default=None, help="directory for the two models (HF format)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the tiny model's ops are too small to gain from more, and one "
                        "thread stays fast on a busy machine)")
    _add_common(p, d["seq_len"])
    p.set_defaults(max_bytes=4 << 20, retrieval_task=d["retrieval"])


def cmd_train(args: argparse.Namespace) -> int:
    """One training stage (SPEC 5); see flashdsa.train."""
    from .train import cmd_train as run
    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """Loss by position, retrieval and indexer recall of a model; see flashdsa.evaluate."""
    from .train import cmd_eval as run
    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Dense pretrain -> (a) dense continued vs (b) DSA warm-up + sparse, at tiny scale."""
    from .train import cmd_demo as run
    return run(args)


# ---- generate / serve: the arguments and the commands in flashdsa.engine.cli ----

def cmd_generate(args: argparse.Namespace) -> int:
    """Complete prompts with the inference engine; see flashdsa.engine.cli."""
    from .engine.cli import cmd_generate as run
    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP server; see flashdsa.engine.server."""
    from .engine.cli import cmd_serve as run
    return run(args)


EXAMPLES = {
    "info": """\
examples:
  flashdsa info""",
    "train": """\
examples:
  flashdsa train --stage dense --preset tiny --steps 600 --out runs/dense
  flashdsa train --stage warmup --init runs/dense/train_state.pt --steps 80 --out runs/warmup
  flashdsa train --stage sparse --init runs/warmup/train_state.pt --steps 220 --out runs/sparse
  flashdsa train --stage sparse --resume runs/sparse/train_state.pt --out runs/sparse
  flashdsa train --stage dense --seq-len 256 --retrieval-task repeat --plant-prob 0.5 --out runs/repeat
  flashdsa train --stage dense --preset small --nproc 2 --out runs/dense2   (FSDP2; or torchrun -m flashdsa train)""",
    "eval": """\
examples:
  flashdsa eval runs/sparse/train_state.pt
  flashdsa eval runs/dense/model --attention dense --json dense.json
  flashdsa eval runs/repeat/model --attention dense --seq-len 256 --retrieval-task repeat""",
    "demo": """\
examples:
  flashdsa demo
  flashdsa demo --pretrain-steps 100 --branch-steps 60 --warmup-steps 20 --quiet""",
    "generate": """\
examples:
  flashdsa generate runs/sparse/model --prompt "def fibonacci(n):" --max-tokens 64
  flashdsa generate random:tiny --prompt "import" --prompt "class" --json
  cat prompts.txt | flashdsa generate runs/sparse/model --temperature 0.8 --top-p 0.95""",
    "serve": """\
examples:
  flashdsa serve runs/sparse/model --port 8000 --served-model-name dsa-tiny
  flashdsa serve random:tiny --port 0""",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``flashdsa`` parser; building it imports neither torch nor triton."""
    from .engine.cli import add_generate_args, add_serve_args
    parser = ArgumentParser(prog="flashdsa", formatter_class=HelpFormatter,
                            description="DeepSeek Sparse Attention in PyTorch and Triton",
                            epilog="Run 'flashdsa <command> --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"flashdsa {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands = [
        ("info", "versions, device and usable backends", None, cmd_info),
        ("train", "train one stage: dense (pretrain/continue), warmup (indexer KL), sparse", add_train_args, cmd_train),
        ("eval", "loss/perplexity by position, retrieval (passkey or repeat), indexer recall", add_eval_args, cmd_eval),
        ("demo", "the whole DSA recipe at tiny scale on CPU, against dense, as a table", add_demo_args, cmd_demo),
        ("generate", "complete prompts with the inference engine (paged DSA)", add_generate_args, cmd_generate),
        ("serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)", add_serve_args,
         cmd_serve),
    ]
    for name, help_text, add_args, func in commands:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                           formatter_class=HelpFormatter)
        if add_args is not None:
            add_args(p)
        # --debug after the command too; SUPPRESS keeps the global flag's value when it is absent here
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``flashdsa`` command on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:   # flashdsa.UsageError is a ValueError
        if args.debug:
            raise
        message = f"{e.strerror}: {e.filename}" if isinstance(e, FileNotFoundError) and e.filename else str(e)
        print(f"flashdsa {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
