"""Probe of the indexer top-k: where its time goes, kernel by kernel (torch.profiler),
the direct method's in-register select timed alone over materialized scores (whole,
and its first pass alone) by row length, warp count and second-pass chunk, and the
logits kernel's block sizes.

    python -m benchmarks.probe_topk      # -> $OUT/probe_topk.json (or benchmarks/results/)
    PROBE_SKV=8192,32768 python -m benchmarks.probe_topk   # prefill sizes to probe

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
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import D, H, S_Q, TOPK, check_topk_exact, decode_inputs, prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, environment, kernel_table, measure_ceilings  # noqa: E402
from flashdsa.layout import PAGE_SIZE  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer.direct import rows_topk_kernel  # noqa: E402
from flashdsa.ops.indexer.selection import INT32_MIN_C, kth_cut, score_key  # noqa: E402


# logits block sizes tried: (BLOCK_N, BLOCK_Q, num_warps, num_stages); the first is CONFIGS["sm90"]
LOGITS_CONFIGS = ((64, 4, 4, 3), (64, 4, 8, 3), (64, 4, 8, 4), (64, 4, 8, 5), (64, 4, 8, 6), (128, 4, 8, 3))


@triton.jit
def kth_only_kernel(s_ptr, ks_ptr, ke_ptr, t_ptr, stride_s, topk, BLOCK: tl.constexpr):
    """The first pass of rows_topk_kernel alone (ragged rows): the row's keys and kth_cut."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(ks_ptr + r)
    end = tl.load(ke_ptr + r)
    e = tl.arange(0, BLOCK)
    inr = (e >= start) & (e < end)
    keys = tl.where(inr, score_key(tl.load(s_ptr + r * stride_s + e, mask=inr, other=0.0)), INT32_MIN_C)
    T, n_gt, full, cut = kth_cut(keys, end - start, INT32_MIN_C, topk)
    tl.store(t_ptr + r, T + n_gt + full.to(tl.int32) + cut.to(tl.int32))


def first_pass_ms(scores, ks, ke, topk, nw):
    """Time of the select's first pass alone (kth_only_kernel)."""
    rows, width = scores.shape
    t = torch.empty(rows, dtype=torch.int32, device=scores.device)
    return bench_ms(lambda: kth_only_kernel[(rows,)](scores, ks, ke, t, scores.stride(0), topk,
                                                      BLOCK=triton.next_power_of_2(width), num_warps=nw))


def select_alone(scores, ks, ke, topk, num_warps, chunk=1024):
    """rows_topk_kernel over materialized ragged scores (keys [ks, ke) of each row)."""
    rows, width = scores.shape
    out = torch.empty(rows, topk, dtype=torch.int32, device=scores.device)
    rows_topk_kernel[(rows,)](scores, ks, ke, ks, out, scores.stride(0), 0, topk, 1, width,
                              BLOCK=triton.next_power_of_2(width), CHUNK=min(chunk, triton.next_power_of_2(width)),
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
    for s_kv in [int(x) for x in os.environ.get("PROBE_SKV", "8192,16384,32768,131072").split(",")]:
        inp = prefill_inputs(s_kv)
        r = dict(s_kv=s_kv, logits_ms=bench_ms(lambda: ops.indexer_logits(*inp)),
                 auto_ms=bench_ms(lambda: ops.indexer_topk(*inp, TOPK)),
                 auto_kernels=kernel_table(lambda: ops.indexer_topk(*inp, TOPK)))
        if s_kv <= 32768:
            logits = ops.indexer_logits(*inp)
            rows = list(range(0, S_Q, S_Q // 16)) + [S_Q - 1]
            for nw in (4, 8, 16):
                if s_kv // (32 * nw) > 256 or s_kv // (32 * nw) < 8:  # 8 to 256 scores a thread
                    continue
                for chunk in (1024, 2048):
                    name = f"select_w{nw}" + ("" if chunk == 1024 else f"_c{chunk}")
                    r[f"{name}_ms"] = bench_ms(lambda: select_alone(logits, inp[4], inp[5], TOPK, nw, chunk))
                    r[f"{name}_diff"] = check_topk_exact(select_alone(logits, inp[4], inp[5], TOPK, nw, chunk),
                                                         logits, inp[4], inp[5], rows)
                r[f"select_w{nw}_first_pass_ms"] = first_pass_ms(logits, inp[4], inp[5], TOPK, nw)
            del logits
        if s_kv >= 32768:
            flops = 2 * H * D * sum(int(e) - int(s) for s, e in zip(inp[4].tolist(), inp[5].tolist()))
            for bn, bq, nw, st in LOGITS_CONFIGS:
                cfg = dict(BLOCK_N=bn, BLOCK_Q=bq, num_warps=nw, num_stages=st)
                t = bench_ms(lambda: ops.indexer_logits(*inp, config=cfg))
                r[f"logits_n{bn}_q{bq}_w{nw}_s{st}"] = dict(ms=t, tflops=flops / t / 1e9,
                                                           of_fp8=flops / t / 1e9 / res["ceilings"]["fp8_matmul_tflops"])
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
            for nw in (4, 8, 16, 32):
                r[f"select_w{nw}_ms"] = bench_ms(lambda: select_alone(logits, zero, cl, TOPK, nw))
                r[f"select_w{nw}_first_pass_ms"] = first_pass_ms(logits, zero, cl, TOPK, nw)
        res["decode"].append(r)
        save(r)


if __name__ == "__main__":
    main()
