"""Benchmark of the Triton lightning indexer: FP8 logits, fused top-k, paged decode.

Top-k: the default ("auto": the direct method up to DIRECT_MAX_POS key positions, the
threshold method above; flashdsa.ops.indexer) with each method timed beside it.

Prefill: 4096 query tokens that are the LAST 4096 of one sequence of S_kv tokens
(causal: query t sees keys [0, S_kv - 4096 + t]), H_I 64, d_I 128, S_kv 8K / 32K / 128K.
Decode: batch 1..128, next_n 1, context 8K..128K over the paged uint8 key cache.

TFLOP/s = 2 * pairs * H_I * d_I / time, counting only (query, key) pairs inside the
ranges. Ceilings measured in the same run: an 8192^3 e4m3 matmul (torch._scaled_mm),
an 8192^3 bf16 matmul (cuBLAS), a device-to-device copy. Peak memory is the growth of
torch's peak allocation over what the inputs already hold.

    python benchmarks/bench_indexer.py                 # full benchmark -> indexer.json under $OUT or benchmarks/results
    python benchmarks/bench_indexer.py --sweep         # also time block-size variants
    python benchmarks/bench_indexer.py --only decode --out benchmarks/results/indexer_decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_clocked, bench_ms, environment, measure_ceilings  # noqa: E402
from flashdsa.layout import PAGE_SIZE, indexer_block_bytes  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402

H, D, TOPK, S_Q = 64, 128, 2048, 4096


def prefill_inputs(s_kv, s=S_Q, h=H):
    q8 = (torch.randn(s, h, D, device="cuda") * 2).to(torch.float8_e4m3fn)
    k8 = (torch.randn(s_kv, D, device="cuda") * 2).to(torch.float8_e4m3fn)
    k_scale = torch.rand(s_kv, device="cuda") + 0.25
    weights = torch.randn(s, h, device="cuda")
    ke = torch.arange(s_kv - s + 1, s_kv + 1, device="cuda", dtype=torch.int32)
    ks = torch.zeros_like(ke)
    return q8, k8, k_scale, weights, ks, ke


def peak_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def check_topk_exact(idx, logits, ks, ke, rows):
    """Sorted selected scores of the fused top-k vs torch.topk of the materialized
    logits, on a sample of rows (right count, no duplicates). Returns the max abs
    difference (0 up to fp32 summation-order differences between the two kernels)."""
    worst = 0.0
    for t in rows:
        lg = logits[t]
        sel = idx[t][idx[t] >= 0].long()
        want = min(TOPK, int(ke[t] - ks[t]))
        assert sel.numel() == want and sel.unique().numel() == want, f"row {t}: {sel.numel()} != {want}"
        got = lg[sel].sort(descending=True).values
        best = lg.topk(want).values
        worst = max(worst, float((got - best).abs().max()))
    return worst


def threshold_phases(inp, cfg=None, mode=None):
    """Times of the threshold top-k's passes (sample + thresholds; + filter + select)
    and how many rows it flagged for the streaming fallback."""
    p = ops.ragged_problem(*inp, config=cfg)
    ms = 4 * p.cfg["BLOCK_N"]
    t_sample = bench_ms(lambda: ops.sample_thresholds(p, TOPK))
    t_pass = bench_ms(lambda: ops.threshold_topk(p, TOPK, ms, mode=mode))
    _, fail = ops.threshold_topk(p, TOPK, ms, mode=mode)
    return dict(sample_ms=t_sample, sample_filter_select_ms=t_pass, flagged_rows=int(fail.sum()))


def run_prefill(s_kv, ceil, cfg_logits=None, cfg_topk=None, check=True):
    inp = prefill_inputs(s_kv)
    ks, ke = inp[4], inp[5]
    pairs = int((ke - ks).sum())
    flops = 2 * pairs * H * D
    t_log, clk_log = bench_clocked(lambda: ops.indexer_logits(*inp, config=cfg_logits))
    t_topk, clk_topk = bench_clocked(lambda: ops.indexer_topk(*inp, TOPK, config=cfg_topk))
    t_thr = bench_ms(lambda: ops.indexer_topk(*inp, TOPK, config=cfg_topk, method="threshold"))
    t_direct = bench_ms(lambda: ops.indexer_topk(*inp, TOPK, method="direct")) if s_kv <= 32768 else None
    t_stream = bench_ms(lambda: ops.indexer_topk(*inp, TOPK, method="streaming"), rep=50)
    logits = ops.indexer_logits(*inp, config=cfg_logits)
    t_torch_topk = bench_ms(lambda: torch.topk(logits, TOPK, dim=1))
    mem_logits = peak_bytes(lambda: ops.indexer_logits(*inp, config=cfg_logits))
    mem_topk = peak_bytes(lambda: ops.indexer_topk(*inp, TOPK, config=cfg_topk))
    res = dict(s_q=S_Q, s_kv=s_kv, h=H, d=D, topk=TOPK, pairs=pairs,
               logits_ms=t_log, logits_tflops=flops / t_log / 1e9,
               logits_ratio_to_fp8_matmul=flops / t_log / 1e9 / ceil["fp8_matmul_tflops"],
               fused_topk_ms=t_topk, fused_topk_over_logits=t_topk / t_log,
               fused_topk_tflops=flops / t_topk / 1e9, streaming_topk_ms=t_stream,
               threshold_topk_ms=t_thr, direct_topk_ms=t_direct,
               logits_plus_torch_topk_ms=t_log + t_torch_topk, torch_topk_ms=t_torch_topk,
               peak_mem_logits_mib=mem_logits / 2 ** 20, peak_mem_fused_topk_mib=mem_topk / 2 ** 20,
               logits_sm_mhz=clk_log.get("sm_mhz"), fused_topk_sm_mhz=clk_topk.get("sm_mhz"),
               **threshold_phases(inp, cfg_topk))
    if check:
        rows = list(range(0, S_Q, S_Q // 64)) + [S_Q - 1]
        for method in ("auto", "threshold") + (("direct",) if s_kv <= 32768 else ()):
            idx = ops.indexer_topk(*inp, TOPK, config=cfg_topk, method=method)
            res[f"topk_check_max_abs_diff_{method}"] = check_topk_exact(idx, logits, ks, ke, rows)
    del logits
    return res


def decode_inputs(bsz, ctx, next_n=1):
    blocks = triton.cdiv(ctx, PAGE_SIZE)
    nb = bsz * blocks
    cache = torch.randint(0, 256, (nb, indexer_block_bytes(D)), device="cuda", dtype=torch.uint8) & 0x77  # finite e4m3
    cache.view(torch.float32)[:, PAGE_SIZE * D // 4:] = torch.rand(nb, PAGE_SIZE, device="cuda") + 0.25
    bt = torch.randperm(nb, device="cuda", dtype=torch.int32).view(bsz, blocks)
    cl = torch.full((bsz,), ctx, device="cuda", dtype=torch.int32)
    q8 = (torch.randn(bsz, next_n, H, D, device="cuda") * 2).to(torch.float8_e4m3fn)
    w = torch.randn(bsz * next_n, H, device="cuda")
    return q8, cache, w, cl, bt


def threshold_decode_cases(cases):
    """For each (batch, context) of ``cases`` that the threshold method serves (the direct
    method's are skipped): (batch, context, decode inputs, their paged Problem, each row's
    default top-k set). For the probes of the threshold method's decode passes."""
    for bsz, ctx in cases:
        inputs = decode_inputs(bsz, ctx)
        q8, cache, w, cl, bt = inputs
        p = ops.paged_problem(q8, cache, w, cl, bt, bt.shape[1] * PAGE_SIZE)
        if not ops.prefers_direct(p):
            yield bsz, ctx, inputs, p, [set(r.tolist()) for r in ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK)]


def run_decode(bsz, ctx, ceil, next_n=1, cfg=None):
    q8, cache, w, cl, bt = decode_inputs(bsz, ctx, next_n)
    width = bt.shape[1] * PAGE_SIZE
    flops = 2 * bsz * sum(ctx - next_n + j + 1 for j in range(next_n)) * H * D
    t_log = bench_ms(lambda: ops.paged_indexer_logits(q8, cache, w, cl, bt, width, config=cfg))
    t_topk = bench_ms(lambda: ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK, config=cfg))
    t_stream = bench_ms(lambda: ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK, config=cfg, method="streaming"))

    def graph_ms(fn):  # as the engine's decode runs it: no launch overhead
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay)

    t_graph = graph_ms(lambda: ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK, config=cfg))
    t_log_graph = graph_ms(lambda: ops.paged_indexer_logits(q8, cache, w, cl, bt, width, config=cfg))
    t_graph_thr = graph_ms(lambda: ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK, config=cfg, method="threshold"))
    t_graph_direct = (graph_ms(lambda: ops.paged_indexer_topk(q8, cache, w, cl, bt, TOPK, config=cfg,
                                                              method="direct")) if ctx <= 32768 else None)
    p = ops.paged_problem(q8, cache, w, cl, bt, width, cfg)
    _, fail = ops.threshold_topk(p, TOPK, 8 * p.cfg["BLOCK_N"])
    kv_bytes = bsz * ctx * (D + 4)
    return dict(batch=bsz, context=ctx, next_n=next_n, logits_ms=t_log, logits_tflops=flops / t_log / 1e9,
                logits_cache_gbps=kv_bytes / t_log / 1e6,
                logits_gbps_incl_output=(kv_bytes + bsz * next_n * width * 4) / t_log / 1e6,
                fused_topk_ms=t_topk, fused_topk_cache_gbps=kv_bytes / t_topk / 1e6,
                fused_topk_over_logits=t_topk / t_log, streaming_topk_ms=t_stream, flagged_rows=int(fail.sum()),
                fused_topk_graph_ms=t_graph, logits_graph_ms=t_log_graph,
                topk_over_logits_graph=t_graph / t_log_graph, threshold_graph_ms=t_graph_thr,
                direct_graph_ms=t_graph_direct,
                copy_ratio=(kv_bytes / t_topk / 1e6) / ceil["copy_gbps"])


# scores-kernel variants of the logits (store) pass, beside the product's ({}); "n_split"
# splits the key axis (the product's choice is 1 at 4096 queries)
SWEEP_LOGITS = [
    {},
    dict(store_warps=4),
    dict(num_stages=2),
    dict(num_stages=4),
    dict(num_stages=5),
    dict(BLOCK_Q=8),
    dict(BLOCK_Q=2),
    dict(BLOCK_N=128, BLOCK_Q=2),
    dict(n_split=2),
]
# the threshold top-k's candidate modes, at the default block sizes of the scoring pass
SWEEP_TOPK = [dict(mode=ops.SCORES_SLOTS), dict(mode=ops.SCORES_ATOMIC),
              dict(mode=ops.SCORES_SLOTS, cfg=dict(num_stages=4))]


def sweep(ceil, log):
    out = dict(logits=[], topk=[])
    for s_kv in (32768, 131072):
        inp = prefill_inputs(s_kv)
        flops = 2 * int((inp[5] - inp[4]).sum()) * H * D
        for v in SWEEP_LOGITS:
            cfg = {k: x for k, x in v.items() if k != "n_split"}
            try:
                t = bench_ms(lambda: ops.indexer_logits(*inp, config=cfg, n_split=v.get("n_split")))
                out["logits"].append(dict(s_kv=s_kv, variant=v, ms=t, tflops=flops / t / 1e9,
                                          ratio_to_fp8_matmul=flops / t / 1e9 / ceil["fp8_matmul_tflops"]))
            except Exception as e:  # a variant that fails to compile must not stop the others
                out["logits"].append(dict(s_kv=s_kv, variant=v, error=repr(e)[:300]))
            log(f"sweep logits {s_kv} {out['logits'][-1]}")
        del inp
    inp = prefill_inputs(131072)
    logits = ops.indexer_logits(*inp)
    rows = list(range(0, S_Q, S_Q // 16)) + [S_Q - 1]
    for v in SWEEP_TOPK:
        try:
            p = ops.ragged_problem(*inp, config=v.get("cfg"))
            ms = 4 * p.cfg["BLOCK_N"]
            t = bench_ms(lambda: ops.select_topk(p, TOPK, ms, mode=v["mode"]))
            diff = check_topk_exact(ops.select_topk(p, TOPK, ms, mode=v["mode"]), logits, inp[4], inp[5], rows)
            out["topk"].append(dict(s_kv=131072, variant=v, ms=t, check_max_abs_diff=diff,
                                    **threshold_phases(inp, v.get("cfg"), v["mode"])))
        except Exception as e:  # includes a failed check
            out["topk"].append(dict(s_kv=131072, variant=v, error=repr(e)[:300]))
        log(f"sweep topk 128K {out['topk'][-1]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time block-size variants first")
    ap.add_argument("--no-main", action="store_true", help="only the sweep")
    ap.add_argument("--only", choices=("prefill", "decode"), default=None,
                    help="run one of the two tables (decode: about half a minute)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"), "indexer.json"),
                    help="result JSON (default: indexer.json under $OUT when set, else benchmarks/results)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    ceil = measure_ceilings()
    log(f"ceilings {ceil}")
    result = dict(**environment(), configs=dict(logits=ops.default_config(torch.device("cuda"), H),
                               topk=ops.default_config(torch.device("cuda"), H, topk=True)),
                  ceilings=ceil, prefill=[], decode=[])

    def save():
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    cfg_topk = None
    if args.sweep:
        result["sweep"] = sweep(ceil, log)
        save()
    if args.no_main:
        return
    for s_kv in (8192, 16384, 32768, 131072) if args.only != "decode" else ():
        try:
            r = run_prefill(s_kv, ceil, cfg_topk=cfg_topk)
        except Exception as e:
            r = dict(s_kv=s_kv, error=repr(e)[:500])
        result["prefill"].append(r)
        log(f"prefill {r}")
        save()
    for bsz in (1, 8, 32, 128) if args.only != "prefill" else ():
        for ctx in (8192, 32768, 131072):
            try:
                r = run_decode(bsz, ctx, ceil)
            except Exception as e:
                r = dict(batch=bsz, context=ctx, error=repr(e)[:500])
            result["decode"].append(r)
            log(f"decode {r}")
            save()
    if args.only != "prefill":
        try:
            r = run_decode(32, 32768, ceil, next_n=2)
        except Exception as e:
            r = dict(batch=32, context=32768, next_n=2, error=repr(e)[:500])
        result["decode"].append(r)
        log(f"decode {r}")
        save()
    print_table(f"\n{'S_kv':>7} {'logits ms':>10} {'TFLOP/s':>8} {'% fp8':>6} {'topk ms':>8} {'topk/log':>8} "
                f"{'torch topk ms':>13} {'peak MiB l/t':>14} {'stream ms':>9} {'flagged':>7}", result["prefill"],
                lambda r: f"{r['s_kv']:>7} {r['logits_ms']:>10.3f} {r['logits_tflops']:>8.1f} "
                          f"{100 * r['logits_ratio_to_fp8_matmul']:>5.1f}% {r['fused_topk_ms']:>8.3f} "
                          f"{r['fused_topk_over_logits']:>8.2f} {r['torch_topk_ms']:>13.3f} "
                          f"{r['peak_mem_logits_mib']:>6.0f}/{r['peak_mem_fused_topk_mib']:<6.0f} "
                          f"{r['streaming_topk_ms']:>9.3f} {r['flagged_rows']:>7}")
    print_table(f"\n{'B':>4} {'ctx':>7} {'logits ms':>10} {'GB/s':>7} {'topk ms':>8} {'topk GB/s':>9} "
                f"{'topk/log':>8} {'stream ms':>9} {'flagged':>7} {'graph ms':>8} {'log graph':>9}", result["decode"],
                lambda r: f"{r['batch']:>4} {r['context']:>7} {r['logits_ms']:>10.3f} {r['logits_cache_gbps']:>7.0f} "
                          f"{r['fused_topk_ms']:>8.3f} {r['fused_topk_cache_gbps']:>9.0f} "
                          f"{r['fused_topk_over_logits']:>8.2f} {r['streaming_topk_ms']:>9.3f} "
                          f"{r['flagged_rows']:>7} {r['fused_topk_graph_ms']:>8.3f} {r['logits_graph_ms']:>8.3f}"
                          + ("" if r["next_n"] == 1 else "  (next_n 2)"))


def print_table(header, rows, line):
    """The header, then ``line(r)`` of each result row (the row itself when it failed)."""
    print(header)
    for r in rows:
        print(r if "error" in r else line(r))

if __name__ == "__main__":
    main()
