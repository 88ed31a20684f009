"""Probe: how far the bf16 engine's logits are from the fp32 model's, on the model and
prompts of tests/engine/test_engine_kernels.py::test_kernel_engine_matches_reference_engine
(300/90/40-token prompts, 3 decode steps), printing the numbers that test bounds:

- the bf16 reference engine against the fp32 one, with the RoPE frequencies in fp32 (as
  MLA keeps them) and, for comparison, rounded to bf16 (as a cast model had them before
  ``MLA._apply`` kept them fp32);
- on a GPU, the kernel engine (bf16 and fp8_ds_mla caches) against the fp32 model next to
  the reference engine, and whether their selections agree up to ties.

    python -m benchmarks.probe_engine_error     # CPU: the reference rows; GPU: all

Not a benchmark of record: docs/engine.md says what it found.
"""
from __future__ import annotations

import copy

import torch

from tests.engine import test_engine_kernels as T
from tests.engine.tiny import tiny_model


class _Patch:
    """The one monkeypatch method T._record_selections uses (outside pytest)."""

    def setattr(self, obj, name, value):
        setattr(obj, name, value)


def rel(a, x) -> float:
    return round(float((a - x).norm() / x.norm()), 5)


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model32 = tiny_model(seed=31, dtype=torch.float32, std=0.02, kv_lora_rank=512, qk_rope_head_dim=64,
                         hidden_size=256, num_attention_heads=16, index_n_heads=8, index_head_dim=128,
                         index_topk=64, max_position_embeddings=2048).to(dev)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (300, 90, 40)]
    exact = T._logits(model32, "auto", "reference", prompts, 3)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    ref = T._logits(model16, "bf16", "reference", prompts, 3)
    print("bf16 reference engine vs fp32, fp32 RoPE frequencies:", [rel(a, x) for a, x in zip(ref, exact)])
    bf16_rope = copy.deepcopy(model16)
    for m in bf16_rope.modules():
        if hasattr(m, "inv_freq"):
            m.inv_freq = m.inv_freq.to(torch.bfloat16)   # assigned after the cast: _apply does not run
    old = T._logits(bf16_rope, "bf16", "reference", prompts, 3)
    print("bf16 reference engine vs fp32, bf16 RoPE frequencies:", [rel(a, x) for a, x in zip(old, exact)])
    if dev != "cuda":
        return
    log = T._record_selections(_Patch())
    for kv in ("bf16", "fp8_ds_mla"):
        log.clear()
        got = T._logits(model16, kv, "auto", prompts, 3)
        sel_got = log[:]
        log.clear()
        ref = T._logits(model16, kv, "reference", prompts, 3)
        for step, (a, b, x) in enumerate(zip(got, ref, exact)):
            print(kv, "step", step, "kernel engine", rel(a, x), "reference engine", rel(b, x))
        try:
            T._assert_same_selections(sel_got, log, rel=2.0 ** -10)
            print(kv, "selections agree up to ties")
        except AssertionError as e:
            print(kv, "selections differ:", str(e)[:300])


if __name__ == "__main__":
    main()
