"""Probe: which retrieval tasks the demo's tiny model (preset "tiny": 2 layers, width 64)
learns within a CPU demo's budget of steps, on synthetic windows alone (no code text).

    python -m benchmarks.probe_induction            # -> benchmarks/results/probe_induction.json

Tasks (256-token windows, batch 8, dense attention, AdamW):

- ``repeat``: 128 random digits and the same digits again 129 tokens later
  (flashdsa.data.plant_repeat, the demo's retrieval task with the whole window as its
  span): the copy sits at a fixed offset, which relative position alone can find.
- ``copy``: random digits with one span of 48 copied to a later random offset: the copy
  must be found by content (a match on the preceding digits).
- ``copy_wide``: the same with the copied span drawn from the 128 byte values 128-255
  (none of which occur around it), so one preceding token locates the copy.
- ``recall``: random digits with 8 (marker, value) pairs in the first half and the 8
  markers again in the second half (markers are unique bytes 1..8): predict the value
  after each repeated marker, a one-token content match.

``--model vanilla`` trains a plain pre-norm transformer of the same width, depth and head
count instead (full multi-head attention with RoPE on every dimension, a GELU MLP, no MLA
latent, no indexer): whether a task's failure belongs to flashdsa's model or to the budget.

Reported: the accuracy of the predictable tokens (the repeat after its first token, the
copy after its first two; the value after each repeated marker; flashdsa.evaluate's
score_answers, on the training batch) every 50 steps, and the step where it first
reaches 50%. Chance is 10% for every task.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment  # noqa: E402
from flashdsa.data import plant_repeat  # noqa: E402
from flashdsa.evaluate import score_answers  # noqa: E402
from flashdsa.train import DSAForCausalLM, preset_config, seed_everything  # noqa: E402

SEQ, BATCH = 256, 8


def repeat_window(g):
    x = torch.randint(0, 10, (SEQ + 1,), generator=g) + 48
    return plant_repeat(x, SEQ // 2 + 1, g, span=SEQ // 2)    # (window, logits rows whose next token is predictable)


def copy_window(g, span=48, alphabet=None):
    """``alphabet``: (first token, count) of the copied span's symbols (default: the window's digits)."""
    x = torch.randint(0, 10, (SEQ + 1,), generator=g) + 48
    a = int(torch.randint(0, SEQ // 2 - span, (1,), generator=g))
    b = int(torch.randint(a + span + 8, SEQ + 1 - span, (1,), generator=g))
    if alphabet is not None:
        x[a:a + span] = torch.randint(0, alphabet[1], (span,), generator=g) + alphabet[0]
    x[b:b + span] = x[a:a + span]
    return x, torch.arange(b + 1, b + span - 1)


def copy_wide_window(g):
    return copy_window(g, alphabet=(128, 128))


def recall_window(g, pairs=8):
    x = torch.randint(0, 10, (SEQ + 1,), generator=g) + 48
    keys = torch.randperm(SEQ // 4 - 1, generator=g)[:pairs] * 2
    queries = torch.randperm(SEQ // 4 - 1, generator=g)[:pairs] * 2 + SEQ // 2
    values = torch.randint(0, 10, (pairs,), generator=g) + 65
    for i in range(pairs):
        x[keys[i]], x[keys[i] + 1] = 1 + i, values[i]
        x[queries[i]], x[queries[i] + 1] = 1 + i, values[i]
    return x, queries


TASKS = {"repeat": repeat_window, "copy": copy_window, "copy_wide": copy_wide_window, "recall": recall_window}


def _rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on every dimension of x [B, heads, T, d] (pairs of adjacent dims)."""
    d, t = x.shape[-1], x.shape[-2]
    ang = torch.arange(t, dtype=torch.float32)[:, None] / 10000.0 ** (torch.arange(0, d, 2) / d)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)


class _Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 3 * width), torch.nn.GELU(), torch.nn.Linear(3 * width, width))

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(_rope(q), _rope(k), v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class VanillaLM(torch.nn.Module):
    """The ``--model vanilla`` baseline: the tiny preset's width, depth, heads and vocabulary."""

    def __init__(self):
        super().__init__()
        cfg = preset_config("tiny", SEQ)
        w = cfg.hidden_size
        self.embed = torch.nn.Embedding(cfg.vocab_size, w)
        self.blocks = torch.nn.ModuleList(_Block(w, cfg.num_attention_heads) for _ in range(cfg.num_hidden_layers))
        self.norm, self.head = torch.nn.LayerNorm(w), torch.nn.Linear(w, cfg.vocab_size)

    def forward(self, x, attention=None):
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        return types.SimpleNamespace(logits=self.head(self.norm(h)))


def run(task: str, lr: float, steps: int, seed: int = 0, model_name: str = "tiny", every: int = 50) -> dict:
    seed_everything(seed)
    model = VanillaLM() if model_name == "vanilla" else DSAForCausalLM(preset_config("tiny", SEQ))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    curve, first_half, t0 = [], None, time.perf_counter()
    for step in range(steps):
        windows = [TASKS[task](g) for _ in range(BATCH)]
        x = torch.stack([w for w, _ in windows])
        logits = model(x[:, :-1], attention="dense").logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0 or step == steps - 1:
            rows = torch.stack([r for _, r in windows])
            acc = score_answers(logits.detach(), x, rows)[0].float().mean().item()
            curve.append({"step": step, "loss": loss.item(), "accuracy": acc})
            if first_half is None and acc >= 0.5:
                first_half = step
            print(f"{task} lr {lr:g} step {step}: loss {loss.item():.3f}, accuracy {acc:.2f}", flush=True)
    return {"model": model_name, "task": task, "lr": lr, "steps": steps, "first_step_at_50pct": first_half, "curve": curve,
            "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 4e-3])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--model", default="tiny", choices=("tiny", "vanilla"),
                    help="the DSA tiny preset (dense attention) or a plain transformer of its size")
    ap.add_argument("--every", type=int, default=50, help="steps between accuracy reports")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "probe_induction.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = dict(**environment(), model=args.model, seq_len=SEQ, batch_size=BATCH,
                  runs=[run(task, lr, args.steps, model_name=args.model, every=args.every)
                        for task in args.tasks for lr in args.lr])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
