"""The two-stage DSA recipe of SPEC 5, on top of any dense pretraining.

Stages (``TrainConfig.stage``):
  "dense"   all parameters, language-model loss, dense causal attention (pretraining, or
            continued dense training: the baseline DSA is compared against).
  "warmup"  dense attention; every parameter except the lightning indexers is frozen; loss =
            KL(dense attention distribution summed over heads || indexer softmax), per layer.
  "sparse"  top-k sparse attention; all parameters; loss = LM loss + KL restricted to the
            selected set. The indexer's input is detached inside MLA, so the indexer learns
            only from its KL and the rest of the model only from the LM loss.

A run is a sequence of optimizer steps over batches that are a pure function of
(data seed, data step) (flashdsa.data), so "the same tokens" for two branches means the
same data steps. ``TrainState`` checkpoints hold model, optimizer, schedule position, RNG
states and the data step: a resumed run reproduces the uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import DSAConfig
from .data import BOS, EOS, VOCAB_SIZE, Corpus, training_batch
from .model import DSAForCausalLM

STAGES = ("dense", "warmup", "sparse")


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
    seed: int = 0                    # data seed: batches are a function of (seed, data step)
    plant_prob: float = 0.25         # share of windows carrying a planted passkey
    min_distance: int | None = None  # passkey distance floor; default 4 * index_topk + 1
    indexer_loss_weight: float = 1.0
    backend: str = "auto"
    amp: bool | None = None          # bf16 autocast; default on for CUDA
    save_every: int = 0              # steps between TrainState checkpoints (0: only at the end)
    log_every: int = 10
    out_dir: str | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {self.stage!r}")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"steps/batch_size/seq_len: expected >= 0, >= 1, >= 2, got "
                             f"{self.steps}, {self.batch_size}, {self.seq_len}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``warmup_steps``, then cosine from 1 to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_trainable(model: DSAForCausalLM, stage: str) -> list[torch.nn.Parameter]:
    """requires_grad per stage (warm-up: the indexers only) and the trainable list."""
    for name, p in model.named_parameters():
        p.requires_grad_(stage != "warmup" or ".indexer." in name)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms, biases)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if all(p.is_cuda for p in params) and params else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), **kw)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class Progress:
    """A dependency-free progress line: step, loss, tokens/s, ETA. Redrawn in place on a
    terminal, one line every ``every`` steps otherwise (logs, pytest)."""

    def __init__(self, total: int, label: str, every: int = 10, stream=None, start: int = 0):
        self.total, self.label, self.every, self.start = total, label, max(every, 1), start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, tokens: int, **metrics):
        done = step + 1
        if not (self.tty or done % self.every == 0 or done == self.total):
            return
        el = time.perf_counter() - self.t0
        eta = el / max(done - self.start, 1) * (self.total - done)
        width = 20
        bar = "#" * int(width * done / max(self.total, 1))
        vals = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        line = (f"{self.label} [{bar:<{width}}] {done}/{self.total} {vals} "
                f"{tokens / max(el, 1e-9):,.0f} tok/s eta {eta:.0f}s")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class TrainState:
    """Everything a stage needs to resume exactly."""

    step: int = 0                    # optimizer steps done in this stage
    data_step: int = 0               # next data step (global across stages)
    tokens: int = 0                  # training tokens of this stage
    train_seconds: float = 0.0
    history: list = field(default_factory=list)   # (step, loss, lm, indexer)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_train_state(path: str | os.PathLike, model, optimizer, cfg: TrainConfig, state: TrainState) -> None:
    """Write a resumable checkpoint (torch.save of plain containers) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    blob = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "train_config": dataclasses.asdict(cfg), "state": dataclasses.asdict(state),
            "model_config": model.config.to_hf_config(), "rng": _rng_state(device)}
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
    model.load_state_dict(blob["model"])
    return model


def _forward_loss(model, x, y, cfg: TrainConfig):
    """(total loss to backpropagate, lm loss, indexer loss) for one batch."""
    if cfg.stage == "dense":
        logits = model(x, mode="dense", backend=cfg.backend)
        lm = lm_loss(logits, y)
        return lm, lm, torch.zeros((), device=x.device)
    logits, idx = model(x, stage=cfg.stage, backend=cfg.backend)
    idx = idx / x.numel()        # per-token KL, summed over layers
    if cfg.stage == "warmup":    # the LM loss is only logged: nothing it reaches is trainable
        lm = lm_loss(logits.detach(), y)
        return cfg.indexer_loss_weight * idx, lm, idx
    lm = lm_loss(logits, y)
    return lm + cfg.indexer_loss_weight * idx, lm, idx


def train(model: DSAForCausalLM, corpus: Corpus, cfg: TrainConfig, data_step: int = 0,
          resume: str | os.PathLike | None = None, progress: bool = True) -> TrainState:
    """Run one stage on ``model`` in place and return its TrainState.

    ``data_step``: the first data step (continue the token stream where the previous
    stage stopped: pass the previous state's ``data_step``). ``resume``: a TrainState
    file of this stage; model, optimizer, schedule, RNG and data position are restored.
    With ``cfg.out_dir`` a TrainState is written to ``out_dir/train_state.pt`` every
    ``save_every`` steps and at the end."""
    device = next(model.parameters()).device
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    min_distance = cfg.min_distance if cfg.min_distance is not None else 4 * model.config.index_topk + 1
    min_distance = min(min_distance, cfg.seq_len - cfg.seq_len // 16 - 48)
    params = set_trainable(model, cfg.stage)
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    state = TrainState(data_step=data_step)
    if resume is not None:
        blob = torch.load(resume, map_location=device, weights_only=False)
        if blob["train_config"]["stage"] != cfg.stage:
            raise ValueError(f"resume: {resume} is a {blob['train_config']['stage']!r} checkpoint, "
                             f"this run is stage {cfg.stage!r}")
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        state = TrainState(**blob["state"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg), last_epoch=state.step - 1) \
            if state.step else sched
        torch.set_rng_state(blob["rng"]["cpu"])
        if "cuda" in blob["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(blob["rng"]["cuda"], device)
    ckpt = Path(cfg.out_dir) / "train_state.pt" if cfg.out_dir else None
    bar = Progress(cfg.steps, f"{cfg.stage:>6}", cfg.log_every, start=state.step) if progress else None
    model.train()
    t_start = time.perf_counter() - state.train_seconds
    tokens_run = 0
    while state.step < cfg.steps:
        batch = training_batch(corpus, state.data_step, cfg.batch_size, cfg.seq_len, cfg.seed,
                               cfg.plant_prob, min_distance).to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, lm, idx = _forward_loss(model, x, y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        state.step += 1
        state.data_step += 1
        state.tokens += x.numel()
        tokens_run += x.numel()
        if state.step % max(cfg.log_every, 1) == 0 or state.step == cfg.steps:
            state.history.append((state.step, float(loss), float(lm), float(idx)))
        if bar is not None:
            bar.update(state.step - 1, tokens_run, loss=float(loss), lm=float(lm),
                       **({"kl": float(idx)} if cfg.stage != "dense" else {}))
        state.train_seconds = time.perf_counter() - t_start
        if ckpt and cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
            save_train_state(ckpt, model, opt, cfg, state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.train_seconds = time.perf_counter() - t_start
    if ckpt:
        save_train_state(ckpt, model, opt, cfg, state)
    set_trainable(model, "dense")
    model.eval()
    return state
