"""Experiment (issue 17): the threshold top-k's sample, sparser and with a wider margin.

    python -m benchmarks.probe_threshold_sample             # H200: every variant at 8K, 16K, 32K, 128K
    TRITON_INTERPRET=1 python -m benchmarks.probe_threshold_sample --small   # CPU logic check
    python -m benchmarks.probe_threshold_sample --decode --variants 16:3:2 32:3:2 64:3:2 64:2:1   # paged rows

At 4096 queries x 32K keys the threshold top-k (flashdsa/ops/indexer/threshold.py) costs
1.41x the logits alone (docs/benchmarks_indexer.md), and its sample pass (the scores of
every SAMPLE_STRIDE-th key and a threshold a row) is about 0.25 of the 0.95 ms it adds. A
sample twice as sparse costs half as much. But the rank it reads (MARGIN x topk /
stride) is then half as deep, so the threshold spreads more (relative spread about
1 / sqrt(rank)). More rows may then fall short of topk and go to the streaming fallback.
A wider MARGIN keeps them above it, at the cost of more candidates for the select.

Each variant (stride, margin) runs in its own process with the module's constants set
before anything compiles. The kernels read them as globals at compile time, so one
process cannot switch between them. Per s_kv it reports: the logits alone, the threshold
top-k (its fallback included), the sample pass alone, the rows flagged for the fallback,
and the worst difference of the selected scores from torch.topk's on sampled rows (0:
exact). Results: ``probe_threshold_sample.json`` under $OUT or benchmarks/results/.

``--decode``: the paged (decode) top-k instead, at batch 1 and 4 of 32K and 128K and
batch 32 of 32K (issue 16: at batch 1 the sample's two launches, the strided scoring
pass and the one-program threshold, are latency-bound, and a sparser sample shortens
both): the threshold method in a CUDA graph as the engine runs it, the rows flagged for
the fallback, and the exactness of the selected scores against torch.topk of the paged
logits on every row. Results: ``probe_threshold_sample_decode.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result

# (SAMPLE_STRIDE, MARGIN_NUM, MARGIN_DEN), the product's first; --variants picks others
VARIANTS = [(16, 3, 2), (32, 3, 2), (32, 7, 4), (32, 2, 1), (64, 2, 1)]


def set_variant(stride: int, num: int, den: int):
    """The threshold module's sample constants, before any of its kernels compiles."""
    import triton.language as tl

    from flashdsa.ops.indexer import threshold as T

    T.SAMPLE_STRIDE = stride
    T.MARGIN_NUM, T.MARGIN_DEN, T.MARGIN = num, den, num / den
    T.MARGIN_NUM_C, T.MARGIN_DEN_C = tl.constexpr(num), tl.constexpr(den)


def inputs(s_q, s_kv, h, d, device):
    """The last s_q queries of one causal sequence of s_kv keys (as bench_indexer.py)."""
    g = torch.Generator(device=device).manual_seed(0)
    q8 = (torch.randn(s_q, h, d, device=device, generator=g) * 2).to(torch.float8_e4m3fn)
    k8 = (torch.randn(s_kv, d, device=device, generator=g) * 2).to(torch.float8_e4m3fn)
    k_scale = torch.rand(s_kv, device=device, generator=g) + 0.25
    weights = torch.randn(s_q, h, device=device, generator=g)
    ke = torch.arange(s_kv - s_q + 1, s_kv + 1, device=device, dtype=torch.int32)
    return q8, k8, k_scale, weights, torch.zeros_like(ke), ke


def paged_inputs(bsz, ctx, h, d, device):
    """A paged key cache of ``bsz`` sequences of ``ctx`` keys in shuffled pages (as
    bench_indexer.py's decode inputs), one query a sequence."""
    from flashdsa.layout import PAGE_SIZE, indexer_block_bytes
    g = torch.Generator(device=device).manual_seed(0)
    blocks = -(-ctx // PAGE_SIZE)
    nb = bsz * blocks
    cache = torch.randint(0, 256, (nb, indexer_block_bytes(d)), device=device, dtype=torch.uint8, generator=g) & 0x77
    cache.view(torch.float32)[:, PAGE_SIZE * d // 4:] = torch.rand(nb, PAGE_SIZE, device=device, generator=g) + 0.25
    bt = torch.randperm(nb, device=device, dtype=torch.int32, generator=g).view(bsz, blocks)
    cl = torch.full((bsz,), ctx, device=device, dtype=torch.int32)
    q8 = (torch.randn(bsz, 1, h, d, device=device, generator=g) * 2).to(torch.float8_e4m3fn)
    w = torch.randn(bsz, h, device=device, generator=g)
    return q8, cache, w, cl, bt


def decode_child(variant, cases, device):
    """One variant's rows over paged decode ``cases`` (bsz, ctx, h, d, topk)."""
    from flashdsa.layout import PAGE_SIZE
    from flashdsa.ops import indexer as ops
    from flashdsa.ops.indexer import threshold

    set_variant(*variant)
    rows = []
    for bsz, ctx, h, d, topk in cases:
        q8, cache, w, cl, bt = inp = paged_inputs(bsz, ctx, h, d, device)
        width = bt.shape[1] * PAGE_SIZE
        p = ops.paged_problem(q8, cache, w, cl, bt, width)
        _, fail = ops.threshold_topk(p, topk, 8 * p.cfg["BLOCK_N"])
        idx = ops.paged_indexer_topk(*inp, topk, method="threshold")
        logits = ops.paged_indexer_logits(*inp, width)
        logical = torch.empty(bt.numel() * PAGE_SIZE, dtype=torch.long, device=device)   # physical slot -> position
        slots = (bt.long()[:, :, None] * PAGE_SIZE + torch.arange(PAGE_SIZE, device=device)).view(bsz, -1)
        logical[slots] = torch.arange(width, device=device).expand(bsz, -1)
        worst = 0.0
        for r in range(bsz):
            sel = idx[r][idx[r] >= 0].long()
            assert sel.numel() == topk and sel.unique().numel() == topk, (r, sel.numel())
            got = logits[r][logical[sel]].sort(descending=True).values
            worst = max(worst, float((got - logits[r].topk(topk).values).abs().max()))
        row = dict(stride=threshold.sample_stride(p.n_pos), margin=variant[1] / variant[2], batch=bsz, context=ctx,
                   flagged_rows=int(fail.sum()), topk_max_abs_diff=worst)
        if device == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ops.paged_indexer_topk(*inp, topk, method="threshold")
            row["threshold_graph_us"] = round(bench_ms(graph.replay) * 1e3, 2)
        rows.append(row)
        del logits, idx
    return rows


def child(variant, shapes, device):
    """One variant's rows (this process has set its constants)."""
    from flashdsa.ops import indexer as ops

    set_variant(*variant)
    time = bench_ms if device == "cuda" else (lambda fn, **kw: None)
    rows = []
    for s_q, s_kv, h, d, topk in shapes:
        inp = inputs(s_q, s_kv, h, d, device)
        ks, ke = inp[4], inp[5]
        p = ops.ragged_problem(*inp)
        min_split = 4 * p.cfg["BLOCK_N"]
        _, fail = ops.threshold_topk(p, topk, min_split)
        idx = ops.indexer_topk(*inp, topk, method="threshold")
        logits = ops.indexer_logits(*inp)
        worst = 0.0
        for t in list(range(0, s_q, max(1, s_q // 32))) + [s_q - 1]:
            sel = idx[t][idx[t] >= 0].long()
            want = min(topk, int(ke[t] - ks[t]))
            assert sel.numel() == want and sel.unique().numel() == want, (t, sel.numel(), want)
            got = logits[t][sel].sort(descending=True).values
            worst = max(worst, float((got - logits[t].topk(want).values).abs().max()))
        row = dict(stride=variant[0], margin=variant[1] / variant[2], s_q=s_q, s_kv=s_kv,
                   flagged_rows=int(fail.sum()), topk_max_abs_diff=worst,
                   logits_ms=time(lambda: ops.indexer_logits(*inp)),
                   threshold_ms=time(lambda: ops.indexer_topk(*inp, topk, method="threshold")),
                   auto_ms=time(lambda: ops.indexer_topk(*inp, topk)),
                   sample_ms=time(lambda: ops.sample_thresholds(p, topk)))
        if row["logits_ms"]:
            row["threshold_over_logits"] = row["threshold_ms"] / row["logits_ms"]
        rows.append(row)
        del logits, idx
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="shapes small enough for the interpreter (CPU)")
    ap.add_argument("--variants", nargs="+", metavar="STRIDE:NUM:DEN",
                    help="variants to run (default: %s)" % " ".join(":".join(map(str, v)) for v in VARIANTS))
    ap.add_argument("--decode", action="store_true", help="the paged (decode) top-k at batch 1, 4 and 32")
    ap.add_argument("--child", type=int, nargs=3, metavar=("STRIDE", "NUM", "DEN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.decode:
        shapes = ([(1, 1500, 8, 64, 96), (3, 700, 8, 64, 64)] if args.small
                  else [(1, 32768, 64, 128, 2048), (1, 131072, 64, 128, 2048), (4, 131072, 64, 128, 2048),
                        (32, 32768, 64, 128, 2048)])
    else:
        shapes = ([(48, 600, 8, 64, 64), (40, 1500, 8, 64, 96)] if args.small
                  else [(4096, s_kv, 64, 128, 2048) for s_kv in (8192, 16384, 32768, 131072)])
    if args.child:
        run = decode_child if args.decode else child
        print(json.dumps(run(tuple(args.child), shapes, device)), flush=True)
        return
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants] if args.variants else VARIANTS
    results = {"ceilings": measure_ceilings() if device == "cuda" else None, "variants": variants, "rows": []}
    for v in variants:
        cmd = [sys.executable, "-m", "benchmarks.probe_threshold_sample", "--child", *map(str, v)]
        cmd += (["--small"] if args.small else []) + (["--decode"] if args.decode else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            results["rows"].append(dict(stride=v[0], margin=v[1] / v[2], error=r.stderr.strip()[-400:]))
            print(results["rows"][-1], flush=True)
            continue
        rows = json.loads(r.stdout.strip().splitlines()[-1])
        results["rows"] += rows
        for row in rows:
            print(row, flush=True)
    ok = [r for r in results["rows"] if "error" not in r]
    if ok:
        print_table(ok, list(ok[0].keys()))
    print("written", write_result("probe_threshold_sample_decode" if args.decode else "probe_threshold_sample",
                                  results))


if __name__ == "__main__":
    main()
