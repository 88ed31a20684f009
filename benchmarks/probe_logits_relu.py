"""Probe: how the logits kernel's epilogue takes the ReLU (issue 17).

The scores kernel's epilogue is bound by the ALU pipe (docs/benchmarks_indexer.md: "math
pipe throttle" stalls on its FMNMX, one a head score), while its multiply-adds use the FMA
pipe. 2 * ReLU(x) = x + |x| exactly (an FADD with an absolute-value operand, FMA pipe), so
ReLU(x) * w = (x + |x|) * (w / 2) with the same single rounding in the multiply-add. Variants
of ``scores.tile_scores``, each compiled into its own copy of ``indexer_scores_kernel``:

- ``max``: the product (FMNMX + FFMA a head score);
- ``absadd``: every head score by FADD |x| + FFMA (all on the FMA pipe);
- ``split``: even heads by FMNMX, odd heads by FADD |x| (the two pipes shared);
- ``quarter``: one head in four by FADD |x|, the others by FMNMX.

Each variant's logits are compared with the product's (bit-equal entries, largest
difference), then all are timed in turns at 8K, 32K and 128K keys (bench_indexer's
prefill: the last 4096 queries of a causal sequence).

    python -m benchmarks.probe_logits_relu        # -> $OUT/probe_logits_relu.json
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import D, H, S_Q, prefill_inputs  # noqa: E402
from benchmarks.common import bench_clocked, environment, measure_ceilings  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer import scores  # noqa: E402


@triton.jit
def _dot(k8, qT, DOT: tl.constexpr):
    if DOT == 0:
        acc = tl.dot(k8, qT)
    elif DOT == 1:
        acc = tl.dot(scores._fp16(k8), scores._fp16(qT))
    else:
        acc = tl.dot(k8.to(tl.float32), qT.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def tile_scores_absadd(k8, kscale, qT, w, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
                       DOT: tl.constexpr):
    acc = _dot(k8, qT, DOT)
    acc = (acc + tl.abs(acc)) * (w * 0.5)[None, :]
    s = tl.sum(tl.reshape(acc, [BLOCK_N, BLOCK_Q, H_PAD]), axis=2)
    return s * kscale[:, None]


@triton.jit
def tile_scores_split(k8, kscale, qT, w, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
                      DOT: tl.constexpr):
    acc = _dot(k8, qT, DOT)
    QH: tl.constexpr = BLOCK_Q * H_PAD
    a, b = tl.split(tl.reshape(acc, [BLOCK_N, QH // 2, 2]))
    r = tl.reshape(tl.join(tl.maximum(a, 0.0), b + tl.abs(b)), [BLOCK_N, QH])
    wa, wb = tl.split(tl.reshape(w, [QH // 2, 2]))
    w2 = tl.reshape(tl.join(wa, wb * 0.5), [QH])
    s = tl.sum(tl.reshape(r * w2[None, :], [BLOCK_N, BLOCK_Q, H_PAD]), axis=2)
    return s * kscale[:, None]


@triton.jit
def _halves(x, N: tl.constexpr, C: tl.constexpr):
    """x [N, C] -> the columns c with bit 3 clear and set ([N, C // 2] each): in the
    wgmma accumulator those are two registers of the same thread."""
    y = tl.permute(tl.reshape(x, [N, C // 16, 2, 8]), (0, 1, 3, 2))
    lo, hi = tl.split(y)
    return tl.reshape(lo, [N, C // 2]), tl.reshape(hi, [N, C // 2])


@triton.jit
def _unhalves(lo, hi, N: tl.constexpr, C: tl.constexpr):
    y = tl.join(tl.reshape(lo, [N, C // 16, 8]), tl.reshape(hi, [N, C // 16, 8]))
    return tl.reshape(tl.permute(y, (0, 1, 3, 2)), [N, C])


@triton.jit
def tile_scores_quarter(k8, kscale, qT, w, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
                        DOT: tl.constexpr):
    acc = _dot(k8, qT, DOT)
    QH: tl.constexpr = BLOCK_Q * H_PAD
    a, b = tl.split(tl.reshape(acc, [BLOCK_N, QH // 2, 2]))
    b0, b1 = _halves(b, BLOCK_N, QH // 2)
    b = _unhalves(tl.maximum(b0, 0.0), b1 + tl.abs(b1), BLOCK_N, QH // 2)
    r = tl.reshape(tl.join(tl.maximum(a, 0.0), b), [BLOCK_N, QH])
    wa, wb = tl.split(tl.reshape(w, [QH // 2, 2]))
    wb0, wb1 = _halves(wb[None, :], 1, QH // 2)
    wb = tl.reshape(_unhalves(wb0, wb1 * 0.5, 1, QH // 2), [QH // 2])
    w2 = tl.reshape(tl.join(wa, wb), [QH])
    s = tl.sum(tl.reshape(r * w2[None, :], [BLOCK_N, BLOCK_Q, H_PAD]), axis=2)
    return s * kscale[:, None]


VARIANTS = {"max": scores.tile_scores, "absadd": tile_scores_absadd, "split": tile_scores_split,
            "quarter": tile_scores_quarter}
KERNEL = scores.indexer_scores_kernel


def use(variant: str, kernels: dict):
    """Point the scores module at ``variant``'s own copy of the kernel (compiled on first
    use with that tile_scores)."""
    scores.tile_scores = VARIANTS[variant]
    if variant not in kernels:
        kernels[variant] = triton.jit(KERNEL.fn)
    scores.indexer_scores_kernel = kernels[variant]


def main() -> None:
    torch.manual_seed(0)
    out = dict(environment(), command="python -m benchmarks.probe_logits_relu", ceilings=measure_ceilings(),
               sizes=[])
    kernels: dict = {}
    for s_kv in (8192, 32768, 131072):
        inp = prefill_inputs(s_kv)
        pairs = sum(min(s_kv - S_Q + 1 + t, s_kv) for t in range(S_Q))
        flop = 2.0 * pairs * H * D
        row = dict(s_kv=s_kv, check={}, ms={v: [] for v in VARIANTS}, sm_mhz={v: [] for v in VARIANTS})
        use("max", kernels)
        ref = ops.indexer_logits(*inp)
        for v in VARIANTS:
            use(v, kernels)
            got = ops.indexer_logits(*inp)
            fin = torch.isfinite(ref)
            row["check"][v] = dict(
                same_inf=bool(torch.equal(torch.isinf(got), torch.isinf(ref))),
                bit_equal_fraction=float((got == ref).float().mean()),
                max_rel_diff=float(((got - ref).abs()[fin] / ref.abs()[fin].clamp_min(1e-6)).max()))
        for _ in range(3):
            for v in VARIANTS:
                use(v, kernels)
                ms, clk = bench_clocked(lambda: ops.indexer_logits(*inp))
                row["ms"][v].append(ms)
                row["sm_mhz"][v].append(clk.get("sm_mhz"))
        row["tflops"] = {v: flop / (sorted(t)[1] * 1e-3) / 1e12 for v, t in row["ms"].items()}
        row["x_fp8"] = {v: f / out["ceilings"]["fp8_matmul_tflops"] for v, f in row["tflops"].items()}
        print(json.dumps(row), flush=True)
        out["sizes"].append(row)
        del inp, ref, got
        torch.cuda.empty_cache()
    use("max", kernels)
    path = os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                        "probe_logits_relu.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
