"""Probe: how finely the decode step's latency-bound kernels split their work at small
batches, where a few programs on a 132-SM GPU leave the launch's latency as the cost.

- The paged top-k: the keys a program of the sample pass and of the filter pass walks
  at least (``min_split``, in BLOCK_N tiles), for the threshold and direct methods,
  timed replayed from a CUDA graph and checked to select what the default does;
  the kernels of the default and of the fastest variant (torch.profiler).
- The sparse MLA decode of one query token: split-k over the top-k range.

    python -m benchmarks.probe_decode_split     # -> $OUT/probe_decode_split.json (or benchmarks/results/)

Not a benchmark of record: docs/engine.md says what it found and what the product took.
"""
from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_sparse_mla_decode as smd  # noqa: E402
from benchmarks.bench_indexer import TOPK, decode_inputs  # noqa: E402
from benchmarks.common import kernel_table, measure_ceilings, write_result  # noqa: E402
from benchmarks.cost_curve import graph_us  # noqa: E402
from flashdsa.api import quantize_mla_cache  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer import direct, threshold  # noqa: E402
from flashdsa.ops.sparse_mla.decode import sparse_mla_decode  # noqa: E402

# (sample pass, filter pass) minimum tiles a program; None: as the product does
SPLITS = ((None, None), (1, 8), (1, 4), (1, 2), (1, 1), (2, 2), (4, 4))
DECODE_SPLITS = (None, 8, 16, 32, 64)


CHUNKS = threshold.scored_chunks


def sample_split(s_tiles):
    """threshold.scored_chunks with the sample pass's min_split set to s_tiles tiles."""
    def chunks(pp, st, budget, min_split):
        return CHUNKS(pp, st, budget, min_split if s_tiles is None else s_tiles * pp.cfg["BLOCK_N"])
    return chunks


def topk_rows() -> list:
    rows = []
    for bsz, ctx in ((1, 8192), (1, 16384), (1, 32768), (1, 131072), (4, 131072), (32, 32768)):
        q8, cache, w, cl, bt = decode_inputs(bsz, ctx)
        p = ops.paged_problem(q8, cache, w, cl, bt, bt.shape[1] * 64)
        bn = p.cfg["BLOCK_N"]
        want = [set(r.tolist()) for r in ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK)]
        row = {"batch": bsz, "context": ctx, "default_method": "direct" if ops.prefers_direct(p) else "threshold"}
        methods = ("threshold", "direct") if ctx <= direct.DIRECT_WAVE_MAX_POS else ("threshold",)
        best = (float("inf"), None, None, None)
        for method in methods:
            for s_tiles, f_tiles in SPLITS:
                name = f"{method}_s{s_tiles or 'def'}_f{f_tiles or 'def'}"
                if method == "direct" and s_tiles not in (None, 1):
                    continue
                f_min = (f_tiles or 8) * bn
                threshold.scored_chunks = sample_split(s_tiles)  # the direct method's scores take f_min

                def run(method=method, f_min=f_min):
                    return threshold.select_topk(p, TOPK, f_min, method=method)

                try:
                    row[name + "_same"] = all(set(r.tolist()) == s for r, s in zip(run(), want))
                    row[name + "_us"] = t = graph_us(run)
                    if t < best[0]:
                        best = (t, run, name, s_tiles)
                except Exception as e:  # a variant that fails is recorded, not fatal
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                finally:
                    threshold.scored_chunks = CHUNKS
        row["kernels_default"] = kernel_table(lambda: ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK), top=8)
        if best[1] is not None:
            row["best"] = best[2]
            threshold.scored_chunks = sample_split(best[3])
            try:
                row["kernels_best"] = kernel_table(best[1], top=8)
            finally:
                threshold.scored_chunks = CHUNKS
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("kernels")}, flush=True)
    return rows


def decode_rows() -> list:
    rows = []
    for bsz in (1, 4):
        q, cache, idx = smd.make_problem(bsz, 32768, 1)
        row = {"batch": bsz, "s_q": 1, "topk": idx.shape[-1]}
        for fmt, c in (("bf16", cache), ("fp8_ds_mla", quantize_mla_cache(cache))):
            ref = sparse_mla_decode(q, c, idx, smd.SM_SCALE, kv_format=fmt)[0].float()
            for ns in DECODE_SPLITS:

                def run(c=c, fmt=fmt, ns=ns):
                    return sparse_mla_decode(q, c, idx, smd.SM_SCALE, kv_format=fmt, n_split=ns)

                name = f"{fmt}_split{ns or 'def'}"
                try:
                    row[name + "_maxdiff"] = float((run()[0].float() - ref).abs().max())
                    row[name + "_us"] = graph_us(run)
                except Exception as e:
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    result = {"ceilings": measure_ceilings(), "topk": topk_rows(), "decode": decode_rows()}
    print("wrote", write_result("probe_decode_split", result))


if __name__ == "__main__":
    main()
