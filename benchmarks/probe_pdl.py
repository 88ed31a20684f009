"""Probe: programmatic dependent launch (PDL) in a chain of short dependent Triton kernels
replayed from a CUDA graph, as a decode step at batch 1 runs them.

Each kernel of the chain adds 1 to a vector the previous one wrote. With PDL each is
launched with ``launch_pdl=True`` and starts with ``gdc_wait`` (the previous kernel's
writes are visible after it) then ``gdc_launch_dependents`` (the next kernel may be
scheduled while this one runs): the launch latency of each kernel overlaps the one
before it. Timed per kernel of the chain, for a few grid sizes and work sizes, and
checked (the vector must hold the number of kernels run).

    python -m benchmarks.probe_pdl     # -> $OUT/probe_pdl.json (or benchmarks/results/)

Not a benchmark of record: docs/engine.md says what it found and what the product took.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, measure_ceilings, write_result  # noqa: E402

CHAIN = 16


@triton.jit
def add_one_kernel(x_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for i in range(0, n, BLOCK * tl.num_programs(0)):
        m = i + offs < n
        tl.store(x_ptr + i + offs, tl.load(x_ptr + i + offs, mask=m) + 1.0, mask=m)


def chain_us(x, grid, pdl) -> float:
    def run():
        for _ in range(CHAIN):
            if pdl:
                add_one_kernel[(grid,)](x, x.numel(), PDL=True, BLOCK=1024, launch_pdl=True)
            else:
                add_one_kernel[(grid,)](x, x.numel(), PDL=False, BLOCK=1024)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    x.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ok = bool((x == CHAIN).all())
    t = bench_ms(graph.replay) * 1e3 / CHAIN
    return round(t, 3), ok


def main() -> None:
    rows = []
    for n in (1024, 1 << 20):
        x = torch.zeros(n, device="cuda")
        for grid in (1, 64, 132):
            row = {"elements": n, "grid": grid}
            for pdl in (False, True):
                try:
                    row[f"pdl_{pdl}_us_per_kernel"], row[f"pdl_{pdl}_correct"] = chain_us(x, grid, pdl)
                except Exception as e:
                    row[f"pdl_{pdl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(row, flush=True)
    print("wrote", write_result("probe_pdl", {"triton": triton.__version__, "chain": CHAIN,
                                              "ceilings": measure_ceilings(), "rows": rows}))


if __name__ == "__main__":
    main()
