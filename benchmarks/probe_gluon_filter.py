"""Experiment (issue 17): the threshold top-k's Gluon filter (flashdsa/ops/indexer/
filter_sm90.py, which the product runs on sm_90) against the Triton filter (flashdsa/ops/
indexer/scores.py, MODE SCORES_SLOTS, which other GPUs run) and the logits kernel.

    python -m benchmarks.probe_gluon_filter     # H200: check, then time (4096 queries x 8K-128K)

The check compares the two filters' slots (counts, entries) from the same thresholds and
the threshold top-k's selected sets with either filter in its slots pass, at odd sizes
and bench_indexer's 4096 x 32K. The timing: the logits, each filter alone, the
threshold top-k with each, and the kernels of the product's (torch.profiler).
``python -m benchmarks.sm90_build`` reports both kernels'
registers and main loops. docs/benchmarks_indexer.md says what it found.
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, kernel_table, measure_ceilings, print_table, write_result  # noqa: E402
from flashdsa.ops.indexer import scores as Sc  # noqa: E402
from flashdsa.ops.indexer import threshold as Th  # noqa: E402
from flashdsa.ops.indexer.filter_sm90 import run_filter_sm90  # noqa: E402
from flashdsa.ops.sparse_mla.fwd_sm90 import GLUON_AVAILABLE  # noqa: E402

TOPK = 2048


def _triton_filter(p, split, thr, bkey, bidx, cnt, sc):
    Sc.launch_scores(p, Sc.SCORES_SLOTS, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)


# the filters compared (same arguments as run_filter_sm90), and what the top-k runs with each
FILTERS = {"triton": _triton_filter, "gluon": run_filter_sm90}


def with_filter(name):
    """The threshold top-k with filter ``name`` in its slots pass."""
    return mock.patch.object(Th, "filter_launcher", lambda p: FILTERS[name])


def prefill_problem(s_q: int, s_kv: int, seed: int):
    """The last s_q tokens of a causal sequence of s_kv (bench_indexer's prefill shape),
    random e4m3 inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q8 = torch.randn(s_q, 64, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    k8 = torch.randn(s_kv, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    ksc = torch.rand(s_kv, device="cuda", generator=g) + 0.5
    w = torch.randn(s_q, 64, device="cuda", generator=g)
    ke = torch.arange(s_kv - s_q + 1, s_kv + 1, device="cuda", dtype=torch.int32)
    ks = torch.zeros_like(ke)
    return (q8, k8, ksc, w, ks, ke), Sc.ragged_problem(q8, k8, ksc, w, ks, ke)


def filter_buffers(p):
    """The product's filter inputs and buffers for ``p`` (threshold_topk's slots mode)."""
    bn = p.cfg["BLOCK_N"]
    split = Th.filter_split(p, 4 * bn)
    cap = Th.candidate_capacity(TOPK, p.n_pos, True)
    sc = triton.cdiv(cap, split[0] * bn) + 16
    thr = Th.sample_thresholds(p, TOPK)
    n = p.rows * split[0] * bn
    return split, sc, thr, n


def _slots(launch, p, split, sc, thr, n):
    """(counts [n], keys [n, sc], indices [n, sc]) of one filter ``launch`` on ``p``, into
    buffers poisoned beforehand (-7 counts, -1 indices)."""
    cnt = torch.full((n, ), -7, dtype=torch.int32, device="cuda")
    bkey = torch.zeros(n * sc, dtype=torch.int32, device="cuda")
    bidx = torch.full((n * sc, ), -1, dtype=torch.int32, device="cuda")
    launch(p, split, thr, bkey, bidx, cnt, sc)
    return cnt, bkey.view(n, sc), bidx.view(n, sc)


def check(results) -> bool:
    """Each Gluon configuration against the Triton filter (slot counts, entries) and the
    threshold top-k with each (selected sets), at odd sizes and bench_indexer's 4096 x 32K."""
    rows = []
    for seed, (s_q, s_kv) in enumerate([(4096, 32768), (333, 9000), (1000, 20000), (7, 5000)]):
        _, p = prefill_problem(s_q, s_kv, seed)
        split, sc, thr, n = filter_buffers(p)
        c0, k0, i0 = _slots(FILTERS["triton"], p, split, sc, thr, n)
        filled = torch.arange(sc, device="cuda")[None, :] < c0.clamp(max=sc)[:, None]
        with with_filter("triton"):
            want = Th.select_topk(p, TOPK, 4 * p.cfg["BLOCK_N"], method="threshold").cpu()
        row = {"s_q": s_q, "s_kv": s_kv, "n_split": split[0]}
        for name in list(FILTERS)[1:]:
            c1, k1, i1 = _slots(FILTERS[name], p, split, sc, thr, n)
            both = filled & (c0 == c1)[:, None]   # entries of slots that kept as many in both
            with with_filter(name):
                have = Th.select_topk(p, TOPK, 4 * p.cfg["BLOCK_N"], method="threshold").cpu()
            same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(want, have)]
            row[name] = {"slots_same_count": float((c0 == c1).float().mean()),
                         "entries_same": float(((k0 == k1) & (i0 == i1))[both].float().mean()) if both.any() else 1.0,
                         "max_key_diff": int((k0 - k1)[both].abs().max()) if both.any() else 0,
                         "topk_rows_same": sum(same) / len(same)}
        rows.append(row)
        print(row, flush=True)
    results["check"] = rows
    ok = all(r[n]["slots_same_count"] > 0.999 and r[n]["topk_rows_same"] > 0.999 for r in rows for n in list(FILTERS)[1:])
    results["check_passed"] = ok
    print("check passed" if ok else "CHECK FAILED", flush=True)
    return ok


def speed(results):
    """Milliseconds at 4096 queries x 8K / 32K / 128K: the logits, each filter alone, and the
    threshold top-k with each filter."""
    rows = []
    for s_kv in (8192, 32768, 131072):
        (q8, k8, ksc, w, ks, ke), p = prefill_problem(4096, s_kv, 0)
        split, sc, thr, n = filter_buffers(p)
        cnt = torch.empty(n, dtype=torch.int32, device="cuda")
        bkey = torch.empty(n * sc, dtype=torch.int32, device="cuda")
        bidx = torch.empty(n * sc, dtype=torch.int32, device="cuda")
        row = dict(s_kv=s_kv, logits_ms=bench_ms(lambda: Sc.indexer_logits(q8, k8, ksc, w, ks, ke)))
        for name, run in FILTERS.items():
            row[f"filter_{name}_ms"] = bench_ms(lambda run=run: run(p, split, thr, bkey, bidx, cnt, sc))
            with with_filter(name):
                row[f"topk_{name}_ms"] = t = bench_ms(lambda: Th.select_topk(
                    p, TOPK, 4 * p.cfg["BLOCK_N"], method="threshold", mode=Sc.SCORES_SLOTS))
            row[f"topk_{name}_over_logits"] = t / row["logits_ms"]
        row["kernels_topk_gluon"] = kernel_table(lambda: Th.select_topk(p, TOPK, 4 * p.cfg["BLOCK_N"],
                                                                        method="threshold"), top=8)
        rows.append(row)
        print(row, flush=True)
    results["speed"] = rows
    print_table(rows, [k for k in rows[0] if not k.startswith("kernels")])
    for r in rows:
        print(r["s_kv"], r["kernels_topk_gluon"], flush=True)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    if not GLUON_AVAILABLE:
        raise SystemExit("this Triton has no Gluon")
    results = {"ceilings": measure_ceilings()}
    print("ceilings", results["ceilings"], flush=True)
    try:
        if check(results):
            speed(results)
    finally:
        print("written", write_result("probe_gluon_filter", results))


if __name__ == "__main__":
    main()
