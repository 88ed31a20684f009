"""Experiment (issue 17): more select programs an SM in the threshold top-k.

The select kernel (flashdsa/ops/indexer/threshold.py, one program a row) takes about
290 us of the 3.0 ms threshold top-k of 4096 rows over 32K keys (kernel table of
``python -m benchmarks.probe_gluon_filter``, 2026-12-04 18:01 UTC), the largest piece
after the filter pass. Its search is a chain of dependent block reductions, so it is
bound by latency, and at 4 warps and 123 registers (``python -m benchmarks.sm90_build``)
four programs share an SM. Here the same kernel is launched with a register cap
(``maxnreg``: 80 registers -> six programs, 64 -> eight) or with 2 warps. The same
selection, so the indices must equal the product's.

    python -m benchmarks.probe_select_regs --build   # CPU: registers and spills for sm_90
    python -m benchmarks.probe_select_regs           # H200: check, then time

Results: ``probe_select_regs.json`` under $OUT or benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer import threshold as Th  # noqa: E402

# variant -> (maxnreg or None, warps or None)
VARIANTS = {"r80": (80, None), "r64": (64, None), "w2": (None, 2)}


class _Capped:
    """The select kernel, launched with a register cap."""

    def __init__(self, kernel, maxnreg):
        self.kernel, self.maxnreg = kernel, maxnreg

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *a, **k: launch(*a, maxnreg=self.maxnreg, **k)


@contextlib.contextmanager
def variant(name):
    regs, warps = VARIANTS[name]
    with contextlib.ExitStack() as st:
        if regs:
            st.enter_context(mock.patch.object(Th, "indexer_select_kernel", _Capped(Th.indexer_select_kernel, regs)))
        if warps:
            st.enter_context(mock.patch.object(Th, "select_warps", lambda p, w=warps: w))
        yield


def topk(inp):
    return ops.indexer_topk(*inp, TOPK, method="threshold")


def check(results) -> bool:
    ok = True
    for s_kv in (8192, 32768):
        inp = prefill_inputs(s_kv)
        want = topk(inp)
        for v in VARIANTS:
            with variant(v):
                got = topk(inp)
            same = torch.equal(got, want)
            ok &= same
            results.append(dict(s_kv=s_kv, variant=v, equal=same))
            print(results[-1], flush=True)
    return ok


def speed(results):
    for s_kv in (8192, 32768, 131072):
        inp = prefill_inputs(s_kv)
        row = dict(s_kv=s_kv, logits_ms=round(bench_ms(lambda: ops.indexer_logits(*inp)), 4))
        for _ in range(3):  # alternating, so that a drift of the clock shows
            for name in ["product", *VARIANTS]:
                with (variant(name) if name != "product" else contextlib.nullcontext()):
                    ms = bench_ms(lambda: topk(inp))
                row.setdefault(f"{name}_runs", []).append(round(ms, 4))
        for name in ["product", *VARIANTS]:
            r = sorted(row[f"{name}_runs"])
            row[f"{name}_ms"] = r[len(r) // 2]
            row[f"{name}_over_logits"] = round(r[len(r) // 2] / row["logits_ms"], 4)
        results.append(row)
        print(row, flush=True)


def build() -> None:
    """Registers and spills of the select kernel per variant, built for sm_90."""
    from benchmarks.sm90_build import build as build_launches
    from benchmarks.sm90_build import indexer_launches

    base = indexer_launches(90)["threshold top-k 32K, select 4 warps"]
    sel = [launch for launch in base if launch[0].fn.__name__ == "indexer_select_kernel"]
    for name in VARIANTS:
        regs, warps = VARIANTS[name]
        fn, args, kwargs = sel[0]
        kw = dict(kwargs, **({"maxnreg": regs} if regs else {}), **({"num_warps": warps} if warps else {}))
        row = build_launches([(fn, args, kw)], keep_going=True)[0]
        print(dict(variant=name, **row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="build for sm_90 on this machine (CPU) and report")
    args = ap.parse_args()
    if args.build:
        build()
        return
    results = {"check": []}
    ok = check(results["check"])
    results["checks_pass"] = ok
    print("checks equal:", ok, flush=True)
    results["ceilings"] = measure_ceilings()
    results["speed"] = []
    speed(results["speed"])
    print_table(results["speed"], ["s_kv", "logits_ms"] + [k for k in results["speed"][0] if k.endswith("_ms") and k != "logits_ms"])
    print("wrote", write_result("probe_select_regs", results))


if __name__ == "__main__":
    main()
