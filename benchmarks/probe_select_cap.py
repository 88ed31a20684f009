"""Probe: the paged threshold top-k's select kernel at small decode batches, where its one
program a row is latency-bound: the candidate capacity of a row (its search runs over
the padded capacity, 8192 slots at top-k 2048) and the entries a step of its second pass
takes (SELECT_CHUNK).

Capacities: twice the expected candidates (the product's before this probe), and the expected count plus
``z`` standard deviations of the sample's estimate (the count passing a threshold set at
rank r of the sample has a relative spread of about 1 / sqrt(r)). For each variant: the
time replayed from a CUDA graph, whether it selects the default's sets, and the rows the
fallback redoes (overflow or too few candidates) over ``DRAWS`` random queries.

    python -m benchmarks.probe_select_cap     # -> $OUT/probe_select_cap.json (or benchmarks/results/)

Not a benchmark of record: docs/benchmarks_indexer.md says what it found and what the
product took.
"""
from __future__ import annotations

import math
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import TOPK, decode_inputs, prefill_inputs, threshold_decode_cases  # noqa: E402
from benchmarks.common import bench_ms, kernel_table, measure_ceilings, write_result  # noqa: E402
from benchmarks.cost_curve import graph_us  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer import threshold  # noqa: E402

CASES = ((1, 16384), (1, 32768), (1, 131072), (32, 32768), (128, 32768))
CAPS = (None, 4.0)  # None: twice the expected count; else expected + z * sigma (4: 3980, padded to 4096)
CHUNKS = (1024, 2048, 4096)
DRAWS = 16
PRODUCT_CAP = threshold.candidate_capacity
PRODUCT_CHUNK = threshold.SELECT_CHUNK_ATOMIC


def twice_expected(topk, n_pos, slots):
    """The capacity before the product took CAP_SIGMAS: twice the expected count, both modes."""
    return 2 * (math.ceil(threshold.MARGIN * topk) + threshold.sample_stride(n_pos))


def z_capacity(z):
    """expected + z sigma in both filter modes (the product keeps twice the expected count
    for per-column slots)."""
    def cap(topk, n_pos, slots):
        st = threshold.sample_stride(n_pos)
        expected = math.ceil(threshold.MARGIN * topk) + st
        rank = max(1, math.ceil(threshold.MARGIN * topk / st))
        return expected + math.ceil(z * expected / math.sqrt(rank))
    return cap


def prefill_rows() -> list:
    """Prefill (bench_indexer's 4096 queries): the threshold method under each capacity
    (the product's chunk), against the logits alone."""
    rows = []
    for s_kv in (32768, 131072):
        inp = prefill_inputs(s_kv)
        row = {"s_kv": s_kv, "logits_ms": bench_ms(lambda: ops.indexer_logits(*inp))}
        want = ops.indexer_topk(*inp, TOPK, method="threshold")
        for z in CAPS:
            threshold.candidate_capacity = twice_expected if z is None else z_capacity(z)
            try:
                name = f"cap_{z or 'product'}"
                p = ops.ragged_problem(*inp)
                row[name + "_fallback_rows"] = int(threshold.threshold_topk(p, TOPK, 4 * p.cfg["BLOCK_N"])[1].sum())
                got = ops.indexer_topk(*inp, TOPK, method="threshold")
                row[name + "_same_sets"] = bool((got.sort(1).values == want.sort(1).values).all())
                row[name + "_ms"] = t = bench_ms(lambda: ops.indexer_topk(*inp, TOPK, method="threshold"))
                row[name + "_over_logits"] = round(t / row["logits_ms"], 3)
            except Exception as e:
                row[f"cap_{z or 'product'}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                threshold.candidate_capacity = PRODUCT_CAP
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    rows = []
    for bsz, ctx, (q8, cache, w, cl, bt), p, want in threshold_decode_cases(CASES):
        row = {"batch": bsz, "context": ctx}
        draws = [decode_inputs(bsz, ctx)[0] for _ in range(DRAWS)]
        for z in CAPS:
            threshold.candidate_capacity = twice_expected if z is None else z_capacity(z)
            try:
                row[f"cap_{z or 'product'}"] = threshold.candidate_capacity(TOPK, p.n_pos, False)
                fails = 0
                for qd in draws:
                    pd = ops.paged_problem(qd, cache, w, cl, bt, bt.shape[1] * 64)
                    fails += int(threshold.threshold_topk(pd, TOPK, pd.cfg["BLOCK_N"])[1].sum())
                row[f"cap_{z or 'product'}_fallback_rows"] = fails
                row["rows_drawn"] = DRAWS * bsz
                for chunk in CHUNKS:
                    threshold.SELECT_CHUNK_ATOMIC = chunk
                    name = f"cap_{z or 'product'}_chunk{chunk}"

                    def run():
                        return ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK)

                    row[name + "_same"] = all(set(r.tolist()) == s for r, s in zip(run(), want))
                    row[name + "_us"] = graph_us(run)
                    if z is None and chunk == PRODUCT_CHUNK:
                        row["kernels_product"] = kernel_table(run, top=6)
                    if z == CAPS[-1] and chunk == CHUNKS[-1]:
                        row["kernels_last"] = kernel_table(run, top=6)
            except Exception as e:  # a variant that fails is recorded, not fatal
                row[f"cap_{z or 'product'}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                threshold.candidate_capacity = PRODUCT_CAP
                threshold.SELECT_CHUNK_ATOMIC = PRODUCT_CHUNK
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("kernels")}, flush=True)
    print("wrote", write_result("probe_select_cap", {"ceilings": measure_ceilings(), "rows": rows,
                                                      "prefill": prefill_rows()}))


if __name__ == "__main__":
    main()
