"""The two-stage DSA recipe of SPEC 5, on top of any dense pretraining.

Stages (``TrainConfig.stage``):
  "dense"   all parameters, language-model loss, dense causal attention (pretraining, or
            continued dense training: the baseline DSA is compared against).
  "warmup"  dense attention; every parameter except the lightning indexers is frozen; loss =
            KL(dense attention distribution summed over heads || indexer softmax), per layer.
  "sparse"  top-k sparse attention; all parameters; loss = LM loss + KL restricted to the
            selected set. The indexer's input is detached inside MLA, so the indexer learns
            only from its KL and the rest of the model only from the LM loss.
Each stage is one setting of the model's two forward knobs, ``attention`` and
``indexer_loss`` (:data:`STAGES`).

A run is a sequence of optimizer steps over batches that are a pure function of
(data seed, data step) (flashdsa.data), so "the same tokens" for two branches means the
same data steps. ``TrainState`` checkpoints hold model, optimizer, the run's settings, the
corpus it reads, schedule position, RNG states and the data step: a resumed run reproduces
the uninterrupted one exactly. The stages a model went through are recorded in its config
(:data:`STAGES_KEY`, kept in config.json), so that evaluation can tell an indexer that was
never trained.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from tqdm import tqdm

from .config import DSAConfig
from .data import BOS, EOS, VOCAB_SIZE, Corpus, check_repeat, curriculum_distances, training_batch
from .errors import UsageError
from .layers import MLA
from .model import DSAForCausalLM
from .recipe import REPEAT_SPAN, RETRIEVAL_TASKS, STAGES, ComparisonConfig


# The model config's key (written to config.json) listing the stages the model was trained
# in, in order; "warmup" or "sparse" in it means the indexer was trained.
STAGES_KEY = "flashdsa_stages"


def _data_mesh(model):
    """The FSDP2 mesh of a sharded model, None for a plain one. flashdsa.distributed (and
    the torch.distributed modules it loads, a second at import) is imported only when a
    process group exists, which a sharded model needs."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from .distributed.fsdp import data_mesh
    return data_mesh(model)


def seed_everything(seed: int) -> None:
    """Seed every random number generator a run may draw from: Python's ``random``,
    NumPy's global generator (when NumPy is installed), torch's CPU and CUDA generators.
    Model initialization draws from torch's; the training batches have their own
    generators, a function of (seed, data step) (flashdsa.data)."""
    random.seed(seed)
    np_random = _numpy_random()
    if np_random is not None:
        np_random.seed(seed)
    torch.manual_seed(seed)     # also seeds every CUDA device


def preset_config(name: str, seq_len: int = 512) -> DSAConfig:
    """Model presets for the byte-level corpus.

    "tiny": 2 layers, width 64: the CPU demo (seconds per hundred steps on 2 cores).
    "small": 8 layers, width 512, dense SwiGLU: the GPU quality study (about 25M parameters).
    Both are dense-MLP models (no MoE) with RoPE untouched by YaRN (rope_factor 1) and
    index_topk = seq_len / 16."""
    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=BOS, eos_token_id=EOS, n_routed_experts=None,
                  rope_factor=1.0, max_position_embeddings=max(seq_len, 512), tie_word_embeddings=False,
                  index_topk=max(seq_len // 16, 1))
    if name == "tiny":
        return DSAConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                         index_n_heads=4, index_head_dim=32, **common)
    if name == "small":
        return DSAConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                         v_head_dim=64, index_n_heads=8, index_head_dim=64, **common)
    raise ValueError(f"preset: expected 'tiny' or 'small', got {name!r}")


@dataclass
class TrainConfig:
    """One training stage. Defaults suit the tiny CPU preset."""

    stage: str = "dense"
    steps: int = 200                 # optimizer steps of this stage
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20           # linear learning-rate warm-up (not the DSA warm-up stage)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0                    # data seed: batches are a function of (seed, data step); `flashdsa train`
                                     # also seeds every generator with it (seed_everything)
    plant_prob: float = 0.25         # share of windows carrying a planted retrieval task
    plant: str = "passkey"           # that task, one of flashdsa.recipe.RETRIEVAL_TASKS
    plant_distance: int | None = None  # passkey: distance floor, default 4 * index_topk + 1 (capped to fit the
                                       # window); repeat: its offset, required
    plant_max_distance: int | None = None  # the largest distance planted (passkey default: anywhere earlier;
                                           # repeat default: plant_distance exactly)
    plant_curriculum: int = 0        # for data steps below this, the largest distance (passkey) or offset
                                     # (repeat) grows geometrically from 64 tokens to the window
                                     # (flashdsa.data.curriculum_distances); 0: none
    indexer_loss_weight: float = 1.0
    backend: str = "auto"
    amp: bool | None = None          # bf16 autocast; default on for CUDA
    save_every: int = 0              # steps between TrainState checkpoints (0: only at the end)
    log_every: int = 10
    out_dir: str | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {tuple(STAGES)}, got {self.stage!r}")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"steps/batch_size/seq_len: expected >= 0, >= 1, >= 2, got "
                             f"{self.steps}, {self.batch_size}, {self.seq_len}")
        if self.plant not in RETRIEVAL_TASKS:
            raise ValueError(f"plant: expected one of {RETRIEVAL_TASKS}, got {self.plant!r}")
        if self.plant == "repeat" and self.plant_prob > 0:
            if self.plant_distance is None:
                raise ValueError("plant 'repeat': plant_distance (its offset) is required")
            check_repeat(self.seq_len + 1, self.plant_distance)
        if self.plant_max_distance is not None and self.plant_distance is not None \
                and self.plant_max_distance < self.plant_distance:
            raise ValueError(f"plant_max_distance: expected >= plant_distance ({self.plant_distance}), got "
                             f"{self.plant_max_distance}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine from 1 to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_trainable(model: DSAForCausalLM, stage: str) -> list[torch.nn.Parameter]:
    """requires_grad per stage (warm-up: the indexers only) and the trainable list."""
    return MLA.freeze_all_but_indexer(model, freeze=stage == "warmup")


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms, biases)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if all(p.is_cuda for p in params) and params else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), **kw)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@dataclass
class TrainState:
    """Everything a stage needs to resume exactly."""

    step: int = 0                    # optimizer steps done in this stage
    data_step: int = 0               # next data step (global across stages)
    tokens: int = 0                  # training tokens of this stage
    train_seconds: float = 0.0
    history: list = field(default_factory=list)   # (step, loss, lm, indexer)


def _numpy_random():
    """``numpy.random`` when NumPy is installed (flashdsa does not need it), else None."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random


def _rng_state(device: torch.device) -> dict:
    """The states of the generators :func:`seed_everything` seeds."""
    state = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    np_random = _numpy_random()
    if np_random is not None:
        state["numpy"] = np_random.get_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`_rng_state`'s states (those this machine has)."""
    # (map_location moved the RNG byte tensors too; the setters take CPU tensors)
    torch.set_rng_state(state["cpu"].cpu())
    random.setstate(state["python"])
    np_random = _numpy_random()
    if np_random is not None and "numpy" in state:
        np_random.set_state(state["numpy"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def trained_stages(model: DSAForCausalLM) -> list[str] | None:
    """The stages ``model`` was trained in (:data:`STAGES_KEY` of its config), in order;
    None when its config has no record (a model from elsewhere, e.g. an official checkpoint)."""
    return model.config.extra.get(STAGES_KEY)


def save_train_state(path: str | os.PathLike, model, optimizer, cfg: TrainConfig, state: TrainState,
                     corpus: Corpus) -> None:
    """Write a resumable checkpoint (torch.save of plain containers) atomically: model,
    optimizer, ``cfg``, ``state``, the corpus's :attr:`~flashdsa.data.Corpus.load_args`,
    the model config and the RNG states."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    blob = {"train_config": dataclasses.asdict(cfg), "state": dataclasses.asdict(state),
            "corpus": corpus.load_args, "model_config": model.config.to_hf_config(), "rng": _rng_state(device)}
    if _data_mesh(model) is not None:     # model and optimizer: sharded, beside the file
        from .distributed.fsdp import save_sharded
        blob["sharded"] = path.stem + ".dcp"
        save_sharded(path.parent / blob["sharded"], model, optimizer)
        if torch.distributed.get_rank():
            return
    else:
        blob.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_model(path: str | os.PathLike, device="cpu") -> DSAForCausalLM:
    """A model from a TrainState file (``*.pt``) or a Hugging Face directory."""
    path = Path(path)
    if path.is_dir():
        from .checkpoint import from_pretrained
        return from_pretrained(path, device=device, dtype=torch.float32)
    blob = torch.load(path, map_location=device, weights_only=False)
    model = DSAForCausalLM(DSAConfig.from_hf_config(blob["model_config"]), init=False).to(device)
    if "sharded" in blob:
        from .distributed.fsdp import load_sharded
        load_sharded(path.parent / blob["sharded"], model)
        model.reset_buffers()
    else:
        model.load_state_dict(blob["model"])
    return model


def _forward_loss(model, x, y, cfg: TrainConfig, context_parallel=None):
    """(total loss to backpropagate, lm loss, indexer loss) for one batch; with a
    ``context_parallel`` mesh, each window split over its ranks (the losses this rank's
    tokens' means, averaged over the windows)."""
    attention, indexer_loss = STAGES[cfg.stage]
    if context_parallel is None:
        logits, idx = model(x, attention=attention, indexer_loss=indexer_loss, backend=cfg.backend)
    else:
        from .distributed.context_parallel import context_parallel_forward, zigzag_split
        world, rank = context_parallel.size(), context_parallel.get_local_rank()
        positions = zigzag_split(torch.arange(x.shape[1], device=x.device), world, rank)
        outs = [context_parallel_forward(model, zigzag_split(row, world, rank), positions, attention, indexer_loss,
                                         context_parallel.get_group(), cfg.backend) for row in x]
        logits = torch.stack([o.logits for o in outs])
        idx = torch.stack([o.indexer_loss for o in outs]).mean() if indexer_loss else None
        y = torch.stack([zigzag_split(row, world, rank) for row in y])
    if idx is None:
        lm = lm_loss(logits, y)
        return lm, lm, torch.zeros((), device=x.device)
    # idx: per-token KL, summed over layers
    if cfg.stage == "warmup":    # the LM loss is only logged: nothing it reaches is trainable
        lm = lm_loss(logits.detach(), y)
        return cfg.indexer_loss_weight * idx, lm, idx
    lm = lm_loss(logits, y)
    return lm + cfg.indexer_loss_weight * idx, lm, idx


def train(model: DSAForCausalLM, corpus: Corpus, cfg: TrainConfig, data_step: int = 0,
          resume: str | os.PathLike | None = None, progress: bool = True,
          stop_after: int | None = None, context_parallel=None, deadline: float | None = None) -> TrainState:
    """Run one stage on ``model`` in place and return its TrainState.

    ``data_step``: the first data step (continue the token stream where the previous
    stage stopped: pass the previous state's ``data_step``). ``resume``: a TrainState
    file of this stage; model, optimizer, schedule, RNG and data position are restored
    (``cfg`` and ``corpus`` are the caller's: ``flashdsa train --resume`` rebuilds both
    from the file). With ``cfg.out_dir`` a TrainState is written to
    ``out_dir/train_state.pt`` every ``save_every`` steps and at the end. ``stop_after``:
    leave after that many steps of this call (a time-limited job), saving the state so
    that ``resume`` continues it. ``deadline`` (a ``time.perf_counter()`` value): likewise,
    leave after the step during which it passed. ``progress``: a tqdm bar on a terminal's stderr; on any
    other stderr (a log, pytest) one plain line every ``cfg.log_every`` steps. The stage
    is appended to the model's :func:`trained_stages` once it trains a step.
    ``context_parallel``: a DeviceMesh over which every window is split
    (:func:`~flashdsa.distributed.context_parallel.context_parallel_forward`); the model is
    replicated on its ranks, which average their gradients, and rank 0 writes the checkpoints."""
    device = next(model.parameters()).device
    mesh = _data_mesh(model)      # FSDP2: each rank reads its share of every batch, rank 0 reports
    ranks = mesh if mesh is not None else context_parallel
    if ranks is not None:
        from .distributed.fsdp import load_full, local_rows, mean_over_ranks
    progress = progress and (ranks is None or torch.distributed.get_rank() == 0)
    writes = context_parallel is None or context_parallel.get_rank() == 0
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    distance = cfg.plant_distance
    if cfg.plant == "passkey":
        distance = distance if distance is not None else 4 * model.config.index_topk + 1
        distance = min(distance, cfg.seq_len - cfg.seq_len // 16 - 48)
    params = set_trainable(model, cfg.stage)
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    state = TrainState(data_step=data_step)
    if resume is not None:
        blob = torch.load(resume, map_location=device, weights_only=False)
        if blob["train_config"]["stage"] != cfg.stage:
            raise ValueError(f"resume: {resume} is a {blob['train_config']['stage']!r} checkpoint, "
                             f"this run is stage {cfg.stage!r}")
        if "sharded" in blob:
            from .distributed.fsdp import load_sharded
            load_sharded(Path(resume).parent / blob["sharded"], model, opt)
        elif mesh is not None:      # one process's checkpoint, continued on several
            load_full(model, opt, blob["model"], blob["optimizer"])
        else:
            model.load_state_dict(blob["model"])
            opt.load_state_dict(blob["optimizer"])
        state = TrainState(**blob["state"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg), last_epoch=state.step - 1) \
            if state.step else sched
        _set_rng_state(blob["rng"], device)
        if STAGES_KEY in blob["model_config"]:
            model.config.extra[STAGES_KEY] = list(blob["model_config"][STAGES_KEY])
    ckpt = Path(cfg.out_dir) / "train_state.pt" if cfg.out_dir else None
    model.train()
    t_start = time.perf_counter() - state.train_seconds
    t_run = time.perf_counter()
    tokens_run = 0
    last = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
    stages = trained_stages(model) or []
    if state.step < last and stages[-1:] != [cfg.stage]:
        model.config.extra[STAGES_KEY] = stages + [cfg.stage]
    live = progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=cfg.stage, unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not live)
    first_step = state.step
    while state.step < last:
        lo, hi = curriculum_distances(state.data_step, distance, cfg.seq_len, cfg.plant_curriculum,
                                      cfg.plant_max_distance)
        batch = training_batch(corpus, state.data_step, cfg.batch_size, cfg.seq_len, cfg.seed,
                               cfg.plant_prob, lo, cfg.plant, hi).to(device, non_blocking=True)
        n_tokens = batch[:, 1:].numel()
        if mesh is not None:
            batch = local_rows(batch, mesh)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, lm, idx = _forward_loss(model, x, y, cfg, context_parallel)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if context_parallel is not None:     # the ranks' shares averaged: the whole windows' gradient
            for p in params:
                if p.grad is not None:
                    p.grad.copy_(mean_over_ranks(p.grad, context_parallel))
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses = torch.stack([loss.detach(), lm.detach(), idx.detach()])
        loss, lm, idx = (losses if ranks is None else mean_over_ranks(losses, ranks)).tolist()
        state.step += 1
        state.data_step += 1
        state.tokens += n_tokens
        tokens_run += n_tokens
        if state.step % max(cfg.log_every, 1) == 0 or state.step == cfg.steps:
            state.history.append((state.step, loss, lm, idx))
        if progress:
            elapsed = time.perf_counter() - t_run
            metrics = {"loss": f"{loss:.4f}", "lm": f"{lm:.4f}",
                       **({"kl": f"{idx:.4f}"} if cfg.stage != "dense" else {}),
                       "tok/s": f"{tokens_run / elapsed:,.0f}"}
            bar.set_postfix(metrics, refresh=False)
            bar.update()
            if not live and (state.step % max(cfg.log_every, 1) == 0 or state.step == cfg.steps):
                print(tqdm.format_meter(state.step, cfg.steps, elapsed, prefix=cfg.stage, unit="step", ascii=True,
                                        initial=first_step, postfix=", ".join(f"{k}={v}" for k, v in metrics.items())),
                      file=sys.stderr, flush=True)
        state.train_seconds = time.perf_counter() - t_start
        if ckpt and writes and cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
            save_train_state(ckpt, model, opt, cfg, state, corpus)
        if deadline is not None and time.perf_counter() >= deadline:
            break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.train_seconds = time.perf_counter() - t_start
    if ckpt and writes:
        save_train_state(ckpt, model, opt, cfg, state, corpus)
    set_trainable(model, "dense")
    model.eval()
    return state


class Paused(Exception):
    """A time-limited :func:`run_comparison` stopped inside ``stage``; its state is saved."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


def run_comparison(cc: ComparisonConfig, corpus: Corpus, device="cpu", model_config: DSAConfig | None = None,
                   out_dir: str | None = None, progress: bool = True, log=print,
                   state_dir: str | os.PathLike | None = None, deadline: float | None = None) -> dict:
    """Run the comparison and evaluate every branch; returns a JSON-able dict with
    "rows" (one per evaluated model) and the configs. ``out_dir`` gets HF exports.

    ``state_dir``: make the run resumable across processes (a GPU machine's time-limited
    calls): each training stage checkpoints into ``state_dir/<stage>/`` and, once done,
    leaves its weights and summary there; the evaluations of a branch are kept beside
    them. A call with the same ``state_dir`` skips what is done and resumes the stage in
    progress exactly (flashdsa.train.train's TrainState). ``deadline`` (a
    ``time.perf_counter()`` value): stop training once it passes; the result is then
    ``{"paused": stage, ...}`` and the same call again continues.

    ``cc.pretrain_gate`` > 0: after pretraining, the dense model's retrieval is evaluated
    (kept in the pretraining stage's summary as "retrieval"); below the gate the branches
    are not run and the result is ``{"gated": {...}, "stages", "comparison"}``: a
    comparison of retrieval is moot when the dense model has not learned it."""
    from .evaluate import distance_buckets, evaluate, retrieval_accuracy, throughput

    seed_everything(cc.seed)
    mcfg = model_config or preset_config(cc.preset, cc.seq_len)
    if cc.branch_steps < 1 or cc.warmup_steps < 1:
        raise ValueError(f"branch_steps and warmup_steps must be >= 1, got {cc.branch_steps} and {cc.warmup_steps}")
    model = DSAForCausalLM(mcfg).to(device)
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {mcfg.num_hidden_layers} layers, width "
        f"{mcfg.hidden_size}, context {cc.seq_len}, index_topk {mcfg.index_topk}; corpus {corpus.source} "
        f"({len(corpus.train) / 1e6:.1f}M train / {len(corpus.val) / 1e6:.2f}M held-out tokens)")
    base = dict(batch_size=cc.batch_size, seq_len=cc.seq_len, seed=cc.seed, plant_prob=cc.plant_prob,
                plant=cc.retrieval, plant_distance=cc.retrieval_distance, plant_max_distance=cc.retrieval_max_distance,
                plant_curriculum=cc.plant_curriculum, backend=cc.backend, log_every=cc.log_every)
    ranged = cc.retrieval == "passkey" or cc.retrieval_max_distance is not None
    buckets = distance_buckets(cc.seq_len, mcfg.index_topk, cc.retrieval) if cc.eval_by_distance and ranged else None
    eval_kw = dict(n_windows=cc.eval_windows, n_retrieval=cc.eval_retrieval, n_recall=cc.eval_recall,
                   retrieval=cc.retrieval, retrieval_distance=cc.retrieval_distance, backend=cc.backend,
                   retrieval_buckets=buckets, retrieval_max_distance=cc.retrieval_max_distance)
    stages = {}
    root = Path(state_dir) if state_dir is not None else None

    def run(name, key, tc, data_step):
        sdir = root / key if root is not None else None
        if sdir is not None and (sdir / "done.json").exists():
            done = json.loads((sdir / "done.json").read_text())
            model.load_state_dict(torch.load(sdir / "model.pt", map_location=device, weights_only=True))
            stages[name] = done["summary"]
            return TrainState(**done["state"])
        resume = sdir / "train_state.pt" if sdir is not None and (sdir / "train_state.pt").exists() else None
        tc = dataclasses.replace(tc, out_dir=str(sdir) if sdir is not None else None)
        st = train(model, corpus, tc, data_step=data_step, resume=resume, progress=progress, deadline=deadline)
        tok_s = st.tokens / max(st.train_seconds, 1e-9)
        flops = model.train_flops_per_token(cc.seq_len, tc.stage)
        stages[name] = {"steps": st.step, "tokens": st.tokens, "seconds": st.train_seconds,
                        "tokens_per_s": tok_s, "flops_per_token": flops, "model_tflops": tok_s * flops / 1e12,
                        "first_data_step": data_step,
                        "final_loss": st.history[-1][1] if st.history else None, "history": st.history}
        if st.step < tc.steps:
            raise Paused(key)
        if sdir is not None:
            torch.save(model.state_dict(), sdir / "model.pt")
            (sdir / "done.json").write_text(json.dumps({"summary": stages[name],
                                                        "state": dataclasses.asdict(st)}) + "\n")
        return st

    def rows_of(key, make):
        """The evaluated rows of a branch: computed once, kept in the state dir."""
        path = root / f"{key}_rows.json" if root is not None else None
        if path is not None and path.exists():
            return json.loads(path.read_text())
        made = make()
        if path is not None:
            path.write_text(json.dumps(made) + "\n")
        return made

    def rows_a():
        made = [{"name": "(a) dense continued",
                 **evaluate(model, corpus, cc.seq_len, "dense", **dict(eval_kw, n_recall=0))}]
        made[-1]["forward_tokens_per_s"] = throughput(model, cc.batch_size, cc.seq_len, "dense", cc.backend)
        if cc.untrained_indexer_row:
            made.append({"name": "(a) + DSA, untrained indexer",
                         **evaluate(model, corpus, cc.seq_len, "sparse", **eval_kw)})
            made[-1]["forward_tokens_per_s"] = throughput(model, cc.batch_size, cc.seq_len, "sparse", cc.backend)
        return made

    def rows_b():
        made = [{"name": "(b) DSA warm-up + sparse", **evaluate(model, corpus, cc.seq_len, "sparse", **eval_kw)}]
        made[-1]["forward_tokens_per_s"] = throughput(model, cc.batch_size, cc.seq_len, "sparse", cc.backend)
        return made

    try:
        pre = run("pretrain (dense)", "pretrain", TrainConfig(stage="dense", steps=cc.pretrain_steps, lr=cc.lr,
                                                             warmup_steps=max(cc.pretrain_steps // 20, 1), **base), 0)
        if cc.pretrain_gate > 0:
            got = rows_of("pretrain_retrieval", lambda: retrieval_accuracy(
                model, corpus, cc.seq_len, n=cc.eval_retrieval, distance=cc.retrieval_distance, task=cc.retrieval,
                attention="dense", backend=cc.backend, max_distance=cc.retrieval_max_distance))
            stages["pretrain (dense)"]["retrieval"] = got
            log(f"pretrained dense model: {100 * got['digit_accuracy']:.1f}% of the {cc.retrieval} digits right "
                f"(gate {100 * cc.pretrain_gate:.1f}%)")
            if got["digit_accuracy"] < cc.pretrain_gate:
                return {"gated": dict(digit_accuracy=got["digit_accuracy"], gate=cc.pretrain_gate),
                        "stages": stages, "comparison": dataclasses.asdict(cc)}
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        branch = dict(warmup_steps=max(cc.branch_steps // 20, 1), **base)
        run("(a) dense continued", "dense", TrainConfig(stage="dense", steps=cc.branch_steps, lr=cc.branch_lr,
                                                        **branch), pre.data_step)
        rows = rows_of("dense", rows_a)
        if out_dir:
            model.save_pretrained(Path(out_dir) / "dense_continued")
        model.load_state_dict(start)
        # (b): the warm-up trains the indexers alone on the branch's first batches, then the
        # sparse stage trains the LM on exactly (a)'s batches with (a)'s schedule: equal LM steps
        run("(b) DSA warm-up", "warmup",
            TrainConfig(stage="warmup", steps=cc.warmup_steps, lr=cc.warmup_lr,
                        **dict(branch, warmup_steps=max(cc.warmup_steps // 10, 1))), pre.data_step)
        run("(b) DSA sparse", "sparse", TrainConfig(stage="sparse", steps=cc.branch_steps, lr=cc.branch_lr,
                                                    **branch), pre.data_step)
        rows = rows + rows_of("sparse", rows_b)
    except Paused as p:
        return {"paused": p.stage, "stages": stages, "comparison": dataclasses.asdict(cc)}
    if out_dir:
        model.save_pretrained(Path(out_dir) / "dsa")
    for r in rows:
        name = {"(a) dense continued": "(a) dense continued", "(a) + DSA, untrained indexer": "(a) dense continued",
                "(b) DSA warm-up + sparse": "(b) DSA sparse"}[r["name"]]
        r["train_tokens_per_s"] = stages[name]["tokens_per_s"]
    return {"model_config": mcfg.to_hf_config(), "comparison": dataclasses.asdict(cc), "stages": stages,
            "rows": rows, "device": _device_name(device)}


def format_table(result: dict) -> str:
    """The comparison as a plain-text table (one row per evaluated model)."""
    rows = result["rows"]
    buckets = rows[0]["lm"]["buckets"]
    late = buckets[-1]
    head = ["model", "attn", "loss", "ppl", f"ppl@{late['start']}-{late['end']}", "retrieval all/digits/loss",
            "idx recall", "train tok/s", "fwd tok/s"]
    table = []
    for r in rows:
        rec, rt = r.get("indexer_recall"), r["retrieval"]
        table.append([r["name"], r["attention"], f"{r['lm']['loss']:.4f}", f"{r['lm']['ppl']:.3f}",
                      f"{r['lm']['buckets'][-1]['ppl']:.3f}",
                      f"{100 * rt['accuracy']:.1f}% / {100 * rt['digit_accuracy']:.1f}% / {rt['answer_loss']:.2f}",
                      "-" if rec is None else f"{100 * rec['mean']:.1f}%",
                      f"{r.get('train_tokens_per_s', 0):,.0f}", f"{r.get('forward_tokens_per_s', 0):,.0f}"])
    lines = tabulate(table, headers=head, disable_numparse=True,
                     colalign=("left", "left") + ("right",) * (len(head) - 2)).splitlines()
    rt, topk = rows[0]["retrieval"], rows[0]["index_topk"]
    if rt["task"] == "repeat" and rt.get("max_distance") is not None:
        task = (f"{REPEAT_SPAN} random digits in held-out code, repeated {rt['distance']} to {rt['max_distance']} "
                f"tokens ({rt['distance'] / topk:g} to {rt['max_distance'] / topk:g} x index_topk) later; scored: "
                f"the copy's digits after its first")
    elif rt["task"] == "repeat":
        task = (f"{REPEAT_SPAN} random digits in held-out code, repeated exactly {rt['distance']} tokens "
                f"({rt['distance'] / topk:g} x index_topk) later; scored: the copy's digits after its first")
    else:
        task = (f"a passkey in held-out code more than {rt['distance'] - 1} tokens "
                f"({(rt['distance'] - 1) / topk:g} x index_topk) back; scored: its digits")
    lines.append(f"loss/ppl: per byte on held-out code. idx recall: dense attention mass on the top-{topk} "
                 f"selection.")
    lines.append(f"retrieval: {task}; samples with all digits right / digits right / loss per digit "
                 f"(ln 10 = 2.30 is a guess).")
    return "\n".join(lines)


# ---- command line (flashdsa train / eval / demo; their arguments are defined in flashdsa.cli) ----

def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# The settings of a `flashdsa train` run that --resume restores, by argument name: those that
# change the run's losses (a contradicting flag is an error unless --override names it), then
# those that do not (a flag given replaces the checkpoint's value).
RUN_SETTINGS = ("stage", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
                "grad_clip", "seed", "plant_prob", "retrieval_task", "repeat_offset", "data_step", "no_amp", "data",
                "max_bytes")
FREE_SETTINGS = ("save_every", "log_every", "backend")


def _saved_settings(blob: dict) -> dict:
    """A train_state.pt's settings of the run, keyed by `flashdsa train`'s argument names."""
    tc, st = blob["train_config"], blob["state"]
    saved = {k: tc[k] for k in RUN_SETTINGS + FREE_SETTINGS if k in tc}
    task = tc.get("plant", "passkey")
    saved.update(retrieval_task=task, repeat_offset=tc.get("plant_distance") if task == "repeat" else None,
                 data_step=st["data_step"] - st["step"], no_amp=tc["amp"] is False,
                 data=blob["corpus"]["data"], max_bytes=blob["corpus"]["max_bytes"])
    return saved


def _shown(value) -> str:
    """A setting's value as a flag takes it (a switch as on/off, paths space-separated)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _flag(name: str, value=None) -> str:
    """``--name value`` as typed (a switch without its value)."""
    flag = "--" + name.replace("_", "-")
    return flag if value is None or isinstance(value, bool) else f"{flag} {_shown(value)}"


def restore_settings(args, blob: dict) -> None:
    """Fill ``args`` (`flashdsa train`'s) from the checkpoint ``blob``: every setting of the
    run not given on the command line comes from the file. A flag given in ``args.given``
    that contradicts a setting of :data:`RUN_SETTINGS` raises a UsageError naming both
    values, unless ``args.override`` names it."""
    overrides = {o.replace("-", "_") for o in args.override or ()}
    if args.data:
        args.data = [str(Path(d).resolve()) for d in args.data]
    for name, value in _saved_settings(blob).items():
        if name not in args.given:
            setattr(args, name, value)
            continue
        given = getattr(args, name)
        if name in RUN_SETTINGS and given != value and name not in overrides:
            fix = "" if name == "stage" else f" or pass --override {name.replace('_', '-')}"
            raise UsageError(f"{_flag(name, given)} contradicts the checkpoint's {name.replace('_', '-')} "
                             f"{_shown(value)} ({args.resume}); drop the flag{fix}")


def retrieval_setting(args) -> tuple[str, int | None]:
    """The retrieval task and distance of `flashdsa train`, `eval` or `demo`'s ``args``
    (``retrieval_task``, ``repeat_offset``, ``seq_len``): a repeat at --repeat-offset
    (default :attr:`ComparisonConfig.retrieval_distance`), or a passkey at its default
    distance (None). A --repeat-offset without the repeat task, or one that the windows of
    --seq-len cannot hold (:func:`~flashdsa.data.check_repeat`), is a UsageError naming it."""
    if args.retrieval_task != "repeat":
        if args.repeat_offset is not None:
            raise UsageError(f"--repeat-offset {args.repeat_offset}: applies to --retrieval-task repeat only, "
                             f"got --retrieval-task {args.retrieval_task}")
        return args.retrieval_task, None
    offset = ComparisonConfig.retrieval_distance if args.repeat_offset is None else args.repeat_offset
    try:
        check_repeat(args.seq_len + 1, offset)
    except ValueError as e:
        raise UsageError(f"--repeat-offset {offset} with --seq-len {args.seq_len}: {e}") from None
    return "repeat", offset


def cmd_train(args) -> int:
    """`flashdsa train`: one stage from a preset, --init or --resume (see flashdsa.cli)."""
    if args.override and not args.resume:
        raise UsageError("--override applies to --resume only")
    for name in args.override or ():
        if name.replace("-", "_") not in args.given:
            raise UsageError(f"--override {name} without {_flag(name)}: give the new value too")
    blob = None
    if args.resume:
        blob = torch.load(args.resume, map_location="cpu", weights_only=False)
        if "corpus" not in blob or "python" not in blob.get("rng", {}):
            raise UsageError(f"--resume: {args.resume} holds no saved corpus or Python RNG state (written by an "
                             "older flashdsa), so the run cannot be continued exactly; start a new run from its "
                             "weights with --init instead")
        restore_settings(args, blob)
        args.out = args.out or str(Path(args.resume).parent)
    elif args.stage is None or args.out is None:
        raise UsageError(f"{'--stage' if args.stage is None else '--out'} is required (unless --resume is given)")
    task, distance = retrieval_setting(args)
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    if args.context_parallel < 1:
        raise UsageError(f"--context-parallel: expected >= 1, got {args.context_parallel}")
    if args.context_parallel > 1:
        if world != args.context_parallel:
            raise UsageError(f"--context-parallel {args.context_parallel}: needs as many processes, got {world} "
                             "(--nproc or torchrun's WORLD_SIZE)")
        if args.seq_len % (2 * world):
            raise UsageError(f"--seq-len {args.seq_len}: --context-parallel {world} needs a multiple of {2 * world}")
    elif world < 1 or args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} does not split evenly over {world} processes (--nproc or "
                         "torchrun's WORLD_SIZE)")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:    # --nproc: this command again in N processes
        from .distributed.fsdp import launch
        launch(cmd_train, args.nproc, args)
        return 0
    mesh, cp, device = None, None, _device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:              # a rank of torchrun or of --nproc: FSDP2
        from .distributed.fsdp import init_from_env, leave_process_group, save_pretrained, shard_model
        mesh, device = init_from_env(device.type)
        if args.context_parallel > 1:                           # or context parallel, the model replicated
            mesh, cp = None, mesh
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0  # prints, writes --json
    seed_everything(args.seed)
    corpus = Corpus.load(args.data, max_bytes=args.max_bytes)
    data_step = args.data_step
    if blob is not None:
        model = DSAForCausalLM(DSAConfig.from_hf_config(blob["model_config"]), init=False)
        model.reset_buffers()
    elif args.init:
        model = load_model(args.init)
        if data_step is None and not Path(args.init).is_dir():
            data_step = torch.load(args.init, map_location="cpu", weights_only=False)["state"]["data_step"]
    else:
        model = DSAForCausalLM(preset_config(args.preset or "tiny", args.seq_len))
    model.to(device)
    if mesh is not None:
        shard_model(model, mesh)
    lr = args.lr if args.lr is not None else {"dense": 2e-3, "warmup": 1e-3, "sparse": 6e-4}[args.stage]
    cfg = TrainConfig(stage=args.stage, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                      min_lr_ratio=args.min_lr_ratio,
                      warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(args.steps // 20, 1),
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                      plant_prob=args.plant_prob, plant=task, plant_distance=distance, backend=args.backend,
                      amp=False if args.no_amp else None,
                      save_every=args.save_every, log_every=args.log_every, out_dir=args.out)
    start = f"resuming {args.resume} at step {blob['state']['step']}, " if blob is not None else ""
    on = device if mesh is None else f"{mesh.size()} ranks (FSDP2, {device.type})"
    if cp is not None:
        on = f"{cp.size()} ranks (context parallel, {device.type})"
    if rank0:
        print(f"stage {cfg.stage}: {start}{model.num_parameters() / 1e6:.2f}M parameters on {on}, {cfg.steps} "
              f"steps of {cfg.batch_size} x {cfg.seq_len} tokens from data step {data_step or 0}, seed {cfg.seed}; "
              f"corpus {corpus.source}", flush=True)
    st = train(model, corpus, cfg, data_step=data_step or 0, resume=args.resume, context_parallel=cp)
    if mesh is not None:
        save_pretrained(model, Path(args.out) / "model")
    elif rank0:
        model.save_pretrained(Path(args.out) / "model")
    if mesh is not None or cp is not None:
        leave_process_group()
    tok_s = st.tokens / max(st.train_seconds, 1e-9)
    model_tflops = tok_s * model.train_flops_per_token(cfg.seq_len, cfg.stage) / 1e12
    summary = {"stage": cfg.stage, "steps": st.step, "data_step": st.data_step, "tokens": st.tokens,
               "seconds": st.train_seconds, "tokens_per_s": tok_s, "model_tflops": model_tflops,
               "final": st.history[-1] if st.history else None, "history": st.history}
    if rank0:
        print(f"done: {st.step} steps, {st.tokens:,} tokens, {tok_s:,.0f} tok/s ({model_tflops:.3g} model TFLOP/s); "
              f"wrote {Path(args.out) / 'train_state.pt'} and {Path(args.out) / 'model'}")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def indexer_trained(model: DSAForCausalLM) -> bool | None:
    """Whether ``model``'s recorded training (:func:`trained_stages`) has a stage that
    trains the indexer (warmup or sparse); None without a record."""
    stages = trained_stages(model)
    return None if stages is None else any(STAGES[s][1] for s in stages)


def cmd_eval(args) -> int:
    """`flashdsa eval`: refuses sparse attention on a model whose indexer was never trained
    unless --allow-untrained-indexer, and says which attention it ran."""
    from .evaluate import evaluate
    task, distance = retrieval_setting(args)
    device = _device(args.device)
    model = load_model(args.model, device)
    trained, stages = indexer_trained(model), trained_stages(model)
    history = "no training record" if stages is None else "stages: " + " -> ".join(stages)
    if args.attention == "sparse" and trained is False:
        if not args.allow_untrained_indexer:
            raise UsageError(f"--attention sparse: the indexer of {args.model} was never trained ({history}: no "
                             f"warmup or sparse stage), so its top-k selection is arbitrary; evaluate with "
                             f"--attention dense, train a warmup stage first, or pass --allow-untrained-indexer")
        print(f"warning: sparse attention with an untrained indexer ({history})", file=sys.stderr)
    corpus = Corpus.load(args.data, max_bytes=args.max_bytes)
    res = evaluate(model, corpus, args.seq_len, args.attention, args.backend, n_windows=args.windows,
                   n_retrieval=args.retrieval, n_recall=args.recall_windows, retrieval=task,
                   retrieval_distance=distance)
    res.update(model=str(args.model), trained_stages=stages, indexer_trained=trained)
    lm, rt = res["lm"], res["retrieval"]
    ran = (f"sparse attention (DSA: each query attends to the indexer's top-{model.config.index_topk} keys)"
           if args.attention == "sparse" else "dense attention (all keys)")
    indexer = {True: "trained", False: "never trained", None: "unknown"}[trained]
    print(f"{args.model}: {ran}, context {args.seq_len}; indexer {indexer} ({history})")
    print(f"  held-out loss {lm['loss']:.4f}  ppl {lm['ppl']:.3f}  over {lm['tokens']:,} tokens")
    for b in lm["buckets"]:
        print(f"    positions [{b['start']:>6}, {b['end']:>6}): loss {b['loss']:.4f}  ppl {b['ppl']:.3f}")
    scored = (f"repeat retrieval ({REPEAT_SPAN} digits repeated exactly {rt['distance']} tokens later)"
              if task == "repeat" else f"passkey retrieval (> {rt['distance'] - 1} tokens back)")
    print(f"  {scored}: {100 * rt['accuracy']:.1f}% "
          f"({100 * rt['digit_accuracy']:.1f}% of digits, {rt['n']} samples)")
    if res["indexer_recall"]:
        rc = res["indexer_recall"]
        print(f"  indexer recall: {100 * rc['mean']:.1f}% (per layer "
              + ", ".join(f"{100 * v:.1f}%" for v in rc["per_layer"]) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def cmd_demo(args) -> int:
    """`flashdsa demo`: refuses a --repeat-offset that the windows of --seq-len cannot hold
    (:func:`retrieval_setting`) before loading anything, then runs :func:`run_comparison`
    and prints its table."""
    task, distance = retrieval_setting(args)
    device = _device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = Corpus.load(args.data, max_bytes=args.max_bytes)
    cc = ComparisonConfig(preset="tiny", seq_len=args.seq_len, batch_size=args.batch_size,
                          pretrain_steps=args.pretrain_steps, branch_steps=args.branch_steps,
                          warmup_steps=args.warmup_steps, retrieval=task, retrieval_distance=distance,
                          seed=args.seed, backend=args.backend,
                          eval_windows=args.eval_windows, eval_retrieval=args.eval_retrieval,
                          eval_recall=args.eval_recall)
    print(f"flashdsa demo: dense pretraining ({cc.pretrain_steps} steps), then from the same weights "
          f"(a) dense for {cc.branch_steps} steps vs (b) DSA warm-up {cc.warmup_steps} steps (indexers only) "
          f"+ sparse {cc.branch_steps} steps on (a)'s tokens; {device}", flush=True)
    res = run_comparison(cc, corpus, device, out_dir=args.out, progress=not args.quiet)
    res["wall_seconds"] = time.perf_counter() - t0
    print()
    print(format_table(res))
    print(f"total {res['wall_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _device_name(device) -> str:
    """The accelerator's name for result files (torch.cuda.get_device_name), else the device string."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
