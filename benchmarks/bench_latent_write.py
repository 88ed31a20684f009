"""The engine's latent cache write: the fused kernel (flashdsa.ops.mla_cache.write_latent_rows:
RMSNorm of the latent, RoPE of k_pe and the store, fp8_ds_mla quantization included, one
launch) against the unfused sequence (the RMSNorm and RoPE kernels, a cat, the quantization
kernel for fp8_ds_mla and an indexed store).

    python -m benchmarks.bench_latent_write            # GPU: V3.2 widths, 1 / 32 / 2048 tokens
    TRITON_INTERPRET=1 python -m benchmarks.bench_latent_write --toy --tokens 1 7   # CPU: the logic only

Each variant is timed replayed from a CUDA graph (the decode step's setting: launch
gaps included) and its cache rows compared with the other's. Per token the kernel reads
1152 bytes (kv_pe in bf16) and writes 1152 (bf16 cache) or 656 (fp8_ds_mla); the copy
ceiling of the same run bounds it. Writes $OUT/bench_latent_write.json (or
benchmarks/results/).
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import bench_ms, measure_ceilings, write_result
from benchmarks.cost_curve import graphed
from flashdsa.layers import RMSNorm
from flashdsa.ops.mla_cache import quantize_mla_cache, write_latent_rows
from flashdsa.ops.norm_rope import rms_norm, rope_interleaved
from flashdsa.reference import mla_cache as R


def unfused(cache, kv_format, kv_pe, norm, cos, sin, slots):
    """The latent write through the separate kernels and torch ops: five launches (four for bf16)."""
    c = norm.weight.shape[0]
    kv = rms_norm(kv_pe[:, :c], norm.weight, norm.eps)
    k_pe = rope_interleaved(kv_pe[:, None, c:], cos, sin)[:, 0]
    rows = torch.cat((kv, k_pe), dim=-1)
    flat = cache.view(-1, cache.shape[-1])
    flat[slots] = quantize_mla_cache(rows) if kv_format == "fp8_ds_mla" else rows.to(flat.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 2048])
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.toy
    dev = torch.device("cuda" if cuda else "cpu")
    c, r, blocks = 512, 64, 64
    norm = RMSNorm(c).to(dev)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    result = {"rows": []}
    if cuda:
        result["ceilings"] = measure_ceilings()
    for t in args.tokens:
        kv_pe = torch.randn(t, 2048 + c + r, device=dev, dtype=torch.bfloat16)[:, 2048:]   # a slice of a GEMM's output
        ang = torch.rand(t, r // 2, device=dev) * 1000
        cos, sin = torch.cos(ang), torch.sin(ang)
        slots = torch.randperm(blocks * 64, device=dev)[:t]
        for fmt, width, dtype in (("bf16", c + r, torch.bfloat16), ("fp8_ds_mla", 656, torch.uint8)):
            caches = {name: torch.zeros(blocks, 64, 1, width, dtype=dtype, device=dev) for name in ("fused", "unfused")}
            row = {"tokens": t, "kv_format": fmt}
            with torch.no_grad():
                fns = {"fused": lambda: write_latent_rows(caches["fused"], fmt, kv_pe, norm.weight, norm.eps, cos, sin,
                                                          slots),
                       "unfused": lambda: unfused(caches["unfused"], fmt, kv_pe, norm, cos, sin, slots)}
                for name, fn in fns.items():
                    fn()
                    if cuda:
                        replay, row[f"{name}_graphed"] = graphed(fn, dev)
                        row[f"{name}_us"] = round(bench_ms(replay) * 1e3, 2)
                want = caches["unfused"].view(-1, width)[slots]
                got = caches["fused"].view(-1, width)[slots]
                if fmt == "fp8_ds_mla":
                    want, got = R.dequantize_mla_cache(want, torch.float32), R.dequantize_mla_cache(got, torch.float32)
                row["rel_err_fused_vs_unfused"] = float((got.float() - want.float()).norm()
                                                        / want.float().norm().clamp_min(1e-30))
            if cuda:
                moved = t * ((c + r) * 2 + (width * (2 if fmt == "bf16" else 1)))
                row["fused_gbps"] = round(moved / row["fused_us"] * 1e-3, 1)
                row["fused_over_unfused"] = round(row["fused_us"] / row["unfused_us"], 3)
            result["rows"].append(row)
            print(row, flush=True)
    print("wrote", write_result("bench_latent_write" + ("_toy" if args.toy else ""), result,
                                os.environ.get("OUT") or None))


if __name__ == "__main__":
    main()
