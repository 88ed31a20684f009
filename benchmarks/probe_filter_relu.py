"""Probe: the Gluon filter's ReLU by max for every head, or by max for the even heads and
x + |x| for the odd ones (as ``scores.tile_scores`` does since 2026-12-04), A/B in one
process (issue 17).

The 21:14 UTC run of bench_indexer.py on 2026-12-04 had both in the product and its
threshold top-k came out 2-3% slower than every earlier run, on another machine; this
probe measures the filter change alone. Each variant of ``filter_sm90._keep`` is compiled
into its own copy of ``indexer_filter_sm90_kernel``; the threshold top-k's slot counts,
candidates and selections must be equal between them; then the threshold top-k (and the
filter launch alone, from a kernel table) is timed in turns at 32K and 128K keys
(bench_indexer's prefill: the last 4096 queries of a causal sequence).

    python -m benchmarks.probe_filter_relu        # H200 -> $OUT/probe_filter_relu.json
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, prefill_inputs  # noqa: E402
from benchmarks.common import bench_clocked, environment, kernel_table, measure_ceilings  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer import filter_sm90 as F  # noqa: E402

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402


@gluon.jit
def keep_split(acc, w, kscale, offs, hi, ok, ks, ke, thr, sbase, cnt, SC, bkey_ptr, bidx_ptr):
    """``filter_sm90._keep`` with the even heads' ReLU a max and the odd heads' x + |x|
    (their weights halved here: the product's _row loads them whole)."""
    a, b = gl.split(gl.reshape(acc, [F._BN, 32, 2]))
    relu = gl.convert_layout(gl.reshape(gl.join(gl.maximum(a, 0.0), b + gl.abs(b)), [F._BN, 64]), F.ACC_L)
    heads = gl.arange(0, 64, layout=F.HEAD_L)
    w2 = gl.where(heads % 2 == 1, w * 0.5, w)
    s = gl.sum(relu * w2[None, :], axis=1) * kscale
    bits = s.to(gl.int32, bitcast=True)
    key = gl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    keep = (offs >= ks) & (offs < ke) & (offs < hi) & ok & (key >= thr)
    col = gl.arange(0, F._BN, layout=F.KEY_L)
    ptr = (sbase + col) * SC + cnt
    store = keep & (cnt < SC)
    gl.store(bkey_ptr + ptr, key, mask=store)
    gl.store(bidx_ptr + ptr, offs, mask=store)
    return cnt + keep.to(gl.int32)


VARIANTS = {"max": F._keep, "split": keep_split}
KERNEL = F.indexer_filter_sm90_kernel


def use(variant: str, kernels: dict):
    """Point filter_sm90 at ``variant``'s own copy of the filter kernel."""
    F._keep = VARIANTS[variant]
    if variant not in kernels:
        kernels[variant] = gluon.jit(KERNEL.fn)
    F.indexer_filter_sm90_kernel = kernels[variant]


def main() -> None:
    torch.manual_seed(0)
    out = dict(environment(), command="python -m benchmarks.probe_filter_relu", ceilings=measure_ceilings(),
               sizes=[])
    kernels: dict = {}
    for s_kv in (32768, 131072):
        inp = prefill_inputs(s_kv)
        row = dict(s_kv=s_kv, ms={v: [] for v in VARIANTS}, filter_us={v: [] for v in VARIANTS},
                   sm_mhz={v: [] for v in VARIANTS})
        picks = {}
        for v in VARIANTS:
            use(v, kernels)
            picks[v] = ops.indexer_topk(*inp, TOPK, method="threshold").sort(dim=1).values
        row["same_selection"] = bool(torch.equal(picks["max"], picks["split"]))
        for _ in range(3):
            for v in VARIANTS:
                use(v, kernels)
                ms, clk = bench_clocked(lambda: ops.indexer_topk(*inp, TOPK, method="threshold"))
                row["ms"][v].append(ms)
                row["sm_mhz"][v].append(clk.get("sm_mhz"))
                table = kernel_table(lambda: ops.indexer_topk(*inp, TOPK, method="threshold"))
                row["filter_us"][v].append(next((us for name, _, us in table if "filter_sm90" in name), None))
        print(json.dumps(row), flush=True)
        out["sizes"].append(row)
        del inp, picks
        torch.cuda.empty_cache()
    use("max", kernels)
    path = os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                        "probe_filter_relu.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
