"""Steps of the top-k's binary search (flashdsa.ops.indexer.selection.kth_search) with and
without its early stop, on CPU: a numpy model of the same search over the int32 score keys
of synthetic rows, checked against a sort.

    python -m benchmarks.probe_search_steps      # prints mean steps by score shape and row length

Rows: sums of 64 ReLU'd normals weighted by uniforms (the shape of index scores), plain
normals, and normals rounded to 1/8 (heavy ties: the early stop never fires there).
"""
from __future__ import annotations

import numpy as np

TOPK = 2048


def score_keys(x: np.ndarray) -> np.ndarray:
    b = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(b >= 0, b, b ^ 0x7FFFFFFF)


def search(keys: np.ndarray, k: int, early: bool) -> tuple[int, int]:
    """(the k-th largest key, steps) of the bisection with invariant
    count(>= lo) >= k > count(>= hi + 1)."""
    lo, hi, steps = int(keys.min()), int(keys.max()), 0
    while hi > lo:
        mid = lo + (hi - lo + 1) // 2
        c = int((keys >= mid).sum())
        steps += 1
        if early and c == k:
            lo = hi = mid
            break
        lo, hi = (mid, hi) if c >= k else (lo, mid - 1)
    return int(keys[keys >= lo].min()), steps


def main():
    rng = np.random.default_rng(0)
    shapes = {"relu-sum": lambda n: np.maximum(rng.standard_normal((n, 64)), 0) @ rng.random(64),
              "normal": lambda n: rng.standard_normal(n),
              "ties (1/8 grid)": lambda n: np.round(rng.standard_normal(n) * 8) / 8}
    print(f"{'scores':16s} {'n':>6s} {'steps':>6s} {'early stop':>10s}")
    for name, gen in shapes.items():
        for n in (6000, 8192, 32768):
            full, early = [], []
            for _ in range(20):
                keys = score_keys(gen(n))
                t_full, s_full = search(keys, TOPK, False)
                t_early, s_early = search(keys, TOPK, True)
                assert t_full == t_early == np.sort(keys)[-TOPK]
                full.append(s_full)
                early.append(s_early)
            print(f"{name:16s} {n:6d} {np.mean(full):6.1f} {np.mean(early):10.1f}")


if __name__ == "__main__":
    main()
