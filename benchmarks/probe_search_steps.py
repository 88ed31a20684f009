"""Steps of the top-k's search (flashdsa.ops.indexer.selection.kth_search), on CPU: numpy
models over the int32 score keys of synthetic rows, each checked against a sort. Bisection
without and with the early stop (the search before 2026-12-04 20:00 UTC), and the
interpolated search the kernels run now (probes placed by the bracket's counts, an eighth
inside it, a bisection after a step that did not halve the bracket).

    python -m benchmarks.probe_search_steps      # prints mean / max steps by score shape and row length

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


def interpolated(keys: np.ndarray, k: int) -> tuple[int, int]:
    """(the k-th largest key, steps) of kth_search's interpolated search."""
    lo, hi, c_lo, c_hi, steps, bisect = int(keys.min()), int(keys.max()), len(keys), 0, 0, False
    while hi > lo:
        width = hi + 1 - lo
        guess = lo + (c_lo - k) * width // (c_lo - c_hi)
        guess = min(max(guess, lo + max(width // 8, 1)), hi - width // 8)
        mid = lo + (hi - lo + 1) // 2 if bisect else guess
        c = int((keys >= mid).sum())
        steps += 1
        old = hi - lo
        if c == k:
            lo = hi = mid
            break
        if c >= k:
            lo, c_lo = mid, c
        else:
            hi, c_hi = mid - 1, c
        bisect = not bisect and hi - lo > old // 2
    return int(keys[keys >= lo].min()), steps


def main():
    rng = np.random.default_rng(0)
    shapes = {"relu-sum": lambda n: np.maximum(rng.standard_normal((n, 64)), 0) @ rng.random(64),
              "relu-sum, signed w": lambda n: np.maximum(rng.standard_normal((n, 64)), 0) @ rng.standard_normal(64),
              "normal": lambda n: rng.standard_normal(n),
              "ties (1/8 grid)": lambda n: np.round(rng.standard_normal(n) * 8) / 8}
    # (row length, k, candidates only): a direct row, a threshold select's candidates
    # (the keys at or above about rank 1.5 k of a 32K row), a sample's threshold rank
    cases = ((8192, TOPK, False), (32768, TOPK, True), (2048, 192, False))
    print(f"{'scores':20s} {'n':>6s} {'k':>5s} {'bisect':>8s} {'early stop':>10s} {'interpolated':>12s}   (mean / max steps)")
    for name, gen in shapes.items():
        for n, k, cand in cases:
            runs = {"bisect": [], "early": [], "interp": []}
            for _ in range(20):
                keys = score_keys(gen(n))
                if cand:
                    keys = keys[keys >= np.sort(keys)[-(3 * k) // 2]]
                want = np.sort(keys)[-k]
                for label, (t, st) in (("bisect", search(keys, k, False)), ("early", search(keys, k, True)),
                                       ("interp", interpolated(keys, k))):
                    assert t == want
                    runs[label].append(st)
            cols = " ".join(f"{np.mean(v):5.1f}/{max(v):<3d}" for v in runs.values())
            print(f"{name:20s} {len(keys) if cand else n:6d} {k:5d} {cols}")


if __name__ == "__main__":
    main()
