"""Probe of the indexer top-k: where its time goes, kernel by kernel (torch.profiler),
and the direct method's in-register select timed alone over materialized scores, by
row length and warp count.

    python -m benchmarks.probe_topk      # -> $OUT/probe_topk.json (or benchmarks/results/)

Not a benchmark of record (that is benchmarks/bench_indexer.py): a tool to place the
time before changing a kernel. docs/benchmarks_indexer.md says what it found.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import S_Q, TOPK, check_topk_exact, decode_inputs, prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, environment, kernel_table, measure_ceilings  # noqa: E402
from flashdsa.layout import PAGE_SIZE  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer.direct import rows_topk_kernel  # noqa: E402


def select_alone(scores, ks, ke, topk, num_warps):
    """rows_topk_kernel over materialized ragged scores (keys [ks, ke) of each row)."""
    rows, width = scores.shape
    out = torch.empty(rows, topk, dtype=torch.int32, device=scores.device)
    rows_topk_kernel[(rows,)](scores, ks, ke, ks, out, scores.stride(0), 0, topk, 1, width,
                              BLOCK=triton.next_power_of_2(width), CHUNK=min(1024, triton.next_power_of_2(width)),
                              TOPK_PAD=triton.next_power_of_2(topk),
                              PAGE=PAGE_SIZE, PAGED=False, num_warps=num_warps)
    return out


def main():
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    t0 = time.time()
    res = dict(**environment(), ceilings=measure_ceilings(), prefill=[], decode=[])

    def save(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
        with open(os.path.join(out_dir, "probe_topk.json"), "w") as f:
            json.dump(res, f, indent=1)

    save(res["ceilings"])
    for s_kv in (8192, 16384, 32768, 131072):
        inp = prefill_inputs(s_kv)
        r = dict(s_kv=s_kv, logits_ms=bench_ms(lambda: ops.indexer_logits(*inp)),
                 auto_ms=bench_ms(lambda: ops.indexer_topk(*inp, TOPK)),
                 auto_kernels=kernel_table(lambda: ops.indexer_topk(*inp, TOPK)))
        if s_kv <= 32768:
            logits = ops.indexer_logits(*inp)
            rows = list(range(0, S_Q, S_Q // 16)) + [S_Q - 1]
            for nw in (2, 4, 8, 16):
                if s_kv // (32 * nw) > 256:  # more than 256 scores a thread
                    continue
                r[f"select_w{nw}_ms"] = bench_ms(lambda: select_alone(logits, inp[4], inp[5], TOPK, nw))
                r[f"select_w{nw}_diff"] = check_topk_exact(select_alone(logits, inp[4], inp[5], TOPK, nw), logits,
                                                           inp[4], inp[5], rows)
            del logits
        res["prefill"].append(r)
        save(r)
    for bsz, ctx in ((1, 131072), (32, 32768), (128, 32768), (32, 131072)):
        q8, cache, w, cl, bt = decode_inputs(bsz, ctx)
        width = bt.shape[1] * PAGE_SIZE
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK)
        r = dict(batch=bsz, context=ctx, auto_graph_ms=bench_ms(g.replay), auto_graph_kernels=kernel_table(g.replay))
        if ctx <= 32768:
            logits = ops.paged_indexer_logits(q8, cache, w, cl, bt, width)
            zero = torch.zeros_like(cl)
            for nw in (8, 16, 32):
                r[f"select_w{nw}_ms"] = bench_ms(lambda: select_alone(logits, zero, cl, TOPK, nw))
        res["decode"].append(r)
        save(r)


if __name__ == "__main__":
    main()
