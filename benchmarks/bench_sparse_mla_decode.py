"""Paged sparse MLA decode on the GPU, bf16 and fp8_ds_mla caches.

    python -m benchmarks.bench_sparse_mla_decode [--sweep] [--contexts 8192 32768 131072]

Shapes (issue 3): batch 1, 32, 128; s_q 1 and 2; context 8K to 128K tokens per
sequence; h_q 128, d_qk 576, d_v 512, topk 2048; pages of 64 tokens in a shuffled
block table; indices = random positions inside each query's causal window, mapped to
physical slots. FLOPs = 2 * b * s_q * h_q * topk * (d_qk + d_v). The kernel is timed as
one replay of a CUDA graph holding the whole call (split-k + combine), as a serving
engine runs decode, and also eagerly (eager_ms: includes Python and launch overhead,
which dominates at batch 1). Beside the kernel:
- naive: gather the selected rows (dequantized for fp8), then the bf16 PyTorch
  einsum reference;
- dense: absorbed-MQA dense decode over the whole context with torch bmm (bf16 cache),
  a memory-bound pass over b * context * 1152 bytes; reported in ms.
Also the fp8 cache write (quantize kernel) bandwidth. With --sweep, block-size variants
of the fp8 kernel are timed at batch 128, s_q 2, context 32K first.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import ClockMonitor, bench_ms, measure_ceilings, print_table, write_result

H_Q, D_QK, D_V, TOPK, PAGE = 128, 576, 512, 2048, 64
SM_SCALE = 0.1352
# (format, BLOCK_K, num_warps, num_stages); the variants that lost are in docs/benchmarks_sparse_mla.md
VARIANTS = [("fp8_ds_mla", 64, 8, 2), ("fp8_ds_mla", 32, 8, 2), ("fp8_ds_mla", 32, 8, 3),
            ("bf16", 64, 8, 2), ("bf16", 32, 8, 2)]


def flops(b, s_q, topk=TOPK):
    return 2.0 * b * s_q * H_Q * topk * (D_QK + D_V)


def make_problem(b, ctx, s_q, seed=0, device="cuda"):
    """bf16 paged cache for b sequences of ``ctx`` tokens, q, and physical-slot indices."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_pages = -(-ctx // PAGE)
    num_blocks = b * n_pages
    table = torch.randperm(num_blocks, device=device, generator=g).view(b, n_pages)
    cache = torch.randn(num_blocks, PAGE, 1, D_QK, device=device, dtype=torch.bfloat16, generator=g)
    q = torch.randn(b, s_q, H_Q, D_QK, device=device, dtype=torch.bfloat16, generator=g)
    topk = min(TOPK, ctx - s_q + 1)
    # query j sees positions < ctx - s_q + j + 1; random positions (repeats allowed) in it
    hi = torch.arange(ctx - s_q + 1, ctx + 1, device=device)  # [s_q]
    pos = (torch.rand(b, s_q, topk, device=device, generator=g) * hi[None, :, None]).long()
    slots = table.gather(1, (pos // PAGE).view(b, -1)).view(b, s_q, topk) * PAGE + pos % PAGE
    return q, cache, slots.int()


def naive(q, rows, idx):
    """Gather by slot, then the bf16 einsum reference (softmax in fp32)."""
    b, s_q, h, d = q.shape
    sel = rows[idx.long()]  # [b, s_q, k, 576]
    logits = torch.einsum("bshd,bskd->bshk", q, sel).float() * SM_SCALE
    p = torch.softmax(logits, -1).to(q.dtype)
    return torch.einsum("bshk,bskd->bshd", p, sel[..., :D_V])


def dense_bmm(q, cache_rows, b, ctx):
    """Dense absorbed decode: every head of every query over the whole context."""
    kv = cache_rows.view(b, ctx, D_QK)  # pages of one sequence taken as contiguous: same bytes
    qq = q.reshape(b, -1, D_QK)
    logits = torch.bmm(qq, kv.transpose(1, 2)).float() * SM_SCALE
    p = torch.softmax(logits, -1).to(q.dtype)
    return torch.bmm(p, kv[..., :D_V])


def graph_ms(fn):
    """Median time of one replay of a CUDA graph holding ``fn()`` (as a serving engine runs
    decode): no Python or launch overhead between the kernels."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench_ms(g.replay)


def sweep(results):
    """Time VARIANTS at batch 128, s_q 2, context 32K; return the best config per format."""
    from flashdsa.api import quantize_mla_cache
    from flashdsa.ops.sparse_mla import sparse_mla_decode
    from flashdsa.reference.sparse_mla import sparse_mla_decode as ref_decode

    q, cache, idx = make_problem(128, 32768, 2)
    caches = {"bf16": cache, "fp8_ds_mla": quantize_mla_cache(cache)}
    few = slice(0, 4)  # float64 reference on 4 sequences
    refs = {fmt: ref_decode(q[few], c, idx[few], SM_SCALE, D_V, fmt, compute_dtype=torch.float64)[0]
            for fmt, c in caches.items()}
    rows = []
    for fmt, bk, nw, ns in VARIANTS:
        cfg = dict(BLOCK_H=64, BLOCK_K=bk, num_warps=nw, num_stages=ns)
        row = {"format": fmt, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
        c = caches[fmt]
        try:
            out = sparse_mla_decode(q[few], c, idx[few], SM_SCALE, D_V, fmt, config=cfg)[0]
            r = refs[fmt]
            row["rel_err"] = float((out.double() - r).norm() / r.norm())
            ms = bench_ms(lambda: sparse_mla_decode(q, c, idx, SM_SCALE, D_V, fmt, config=cfg))
            row["ms"], row["tflops"] = ms, flops(128, 2) / ms * 1e-9
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row, flush=True)
    results["sweep_b128_sq2_ctx32k"] = rows
    print_table(rows, ["format", "BLOCK_K", "num_warps", "num_stages", "rel_err", "ms", "tflops"])
    best = {}
    for fmt in caches:
        ok = [r for r in rows if r["format"] == fmt and "tflops" in r and r["rel_err"] < 2e-2]
        if ok:
            b = max(ok, key=lambda r: r["tflops"])
            best[fmt] = dict(BLOCK_H=64, BLOCK_K=b["BLOCK_K"], num_warps=b["num_warps"], num_stages=b["num_stages"])
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--config", default=None, help="BLOCK_K,num_warps,num_stages (both formats)")
    args = ap.parse_args()
    from flashdsa.api import quantize_mla_cache
    from flashdsa.ops.sparse_mla import sparse_mla_decode
    from flashdsa.reference.mla_cache import dequantize_mla_cache

    results = {"ceilings": measure_ceilings()}
    ceil = results["ceilings"]
    print("ceilings", ceil, flush=True)
    configs = {"bf16": None, "fp8_ds_mla": None}
    if args.config:
        v = [int(x) for x in args.config.split(",")]
        configs = {k: dict(BLOCK_H=64, BLOCK_K=v[0], num_warps=v[1], num_stages=v[2]) for k in configs}
    if args.sweep:
        configs.update(sweep(results))
    results["configs"] = configs
    rows = []
    quant = None
    for ctx in args.contexts:
        for b in args.batches:
            q2, cache, idx2 = make_problem(b, ctx, 2, seed=ctx + b)
            cache8 = quantize_mla_cache(cache)
            if quant is None and b * ctx >= 2 ** 20:
                n_tok = b * ctx
                ms = bench_ms(lambda: quantize_mla_cache(cache))
                quant = {"tokens": n_tok, "ms": ms, "gbps": n_tok * (1152 + 656) / ms * 1e-6}
                print("quantize", quant, flush=True)
            rows_bf16 = cache.view(-1, D_QK)
            for s_q in (1, 2):
                q, idx = q2[:, :s_q].contiguous(), idx2[:, :s_q].contiguous()
                topk = idx.shape[-1]
                f = flops(b, s_q, topk)
                for fmt, c in (("bf16", cache), ("fp8_ds_mla", cache8)):
                    cfg = configs[fmt]
                    call = (lambda q=q, c=c, idx=idx, fmt=fmt, cfg=cfg:
                            sparse_mla_decode(q, c, idx, SM_SCALE, D_V, fmt, config=cfg))
                    eager = bench_ms(call)
                    try:
                        with ClockMonitor() as mon:
                            ms = graph_ms(call)
                        timing = "cuda_graph"
                    except Exception as e:  # noqa: BLE001 - keep the eager number
                        print("graph capture failed:", str(e)[:200], flush=True)
                        ms, timing = eager, "eager"
                    row = {"format": fmt, "batch": b, "s_q": s_q, "context": ctx, "topk": topk, "ms": ms,
                           "timing": timing, "eager_ms": eager, "tflops": f / ms * 1e-9, **mon.summary()}
                    row["vs_bf16_matmul"] = row["tflops"] / ceil["bf16_matmul_tflops"]
                    if b * s_q * topk * D_QK * 2 <= 2 ** 31:
                        if fmt == "bf16":
                            n_ms = bench_ms(lambda: naive(q, rows_bf16, idx), warmup=5, rep=20)
                        else:
                            rows8 = cache8.view(-1, 656)
                            n_ms = bench_ms(lambda: naive(q, dequantize_mla_cache(rows8[idx.long()].view(-1, 656))
                                                          .view(-1, D_QK), torch.arange(idx.numel(), device="cuda")
                                                          .view(idx.shape).int()), warmup=5, rep=20)
                        row["naive_ms"], row["naive_tflops"] = n_ms, f / n_ms * 1e-9
                    if fmt == "bf16" and b * ctx <= 2 ** 22:
                        try:
                            row["dense_bmm_ms"] = bench_ms(lambda: dense_bmm(q, rows_bf16, b, ctx), warmup=5, rep=20)
                        except torch.OutOfMemoryError:
                            row["dense_bmm_ms"] = None
                    rows.append(row)
                    print(row, flush=True)
            del q2, cache, cache8, idx2, rows_bf16
            torch.cuda.empty_cache()
    results["decode"] = rows
    results["quantize_mla_cache"] = quant
    from benchmarks.bench_sparse_mla import kernel_resources
    results["kernel_resources"] = kernel_resources()
    print_table(rows, ["format", "batch", "s_q", "context", "ms", "eager_ms", "tflops", "vs_bf16_matmul",
                       "naive_tflops", "dense_bmm_ms"])
    print("written", write_result("sparse_mla_decode", results))


if __name__ == "__main__":
    main()
