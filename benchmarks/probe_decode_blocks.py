"""Probe: the sparse MLA decode of few query tokens (batch 1 and 4, 128 heads, top-k 2048),
where split-k leaves the kernel's latency and its fp32 partials as the cost.

- Heads a program (BLOCK_H 64 / 32 / 16, 4 or 8 warps) against splits of the top-k range:
  the partials are n_split x 128 heads x 512 fp32 (8 MB at 32 splits), so fewer heads a
  program buy the same number of programs with fewer splits.
- The combine: the product's (one program a head, a loop over the splits) against a
  variant here that loads a [splits, BLOCK_D] tile at once, d_v split over programs.

Each variant is timed replayed from a CUDA graph and checked against the product's
default output (max abs difference).

    python -m benchmarks.probe_decode_blocks     # -> $OUT/probe_decode_blocks.json (or benchmarks/results/)
    python -m benchmarks.probe_decode_blocks --quick   # batch 1, bf16, 64 and 16 heads, 16 and 32 splits

Not a benchmark of record: docs/benchmarks_sparse_mla.md says what it found and what the
product took.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_sparse_mla_decode as smd  # noqa: E402
from benchmarks.common import kernel_table, measure_ceilings, write_result  # noqa: E402
from benchmarks.cost_curve import graph_us  # noqa: E402
from flashdsa.api import quantize_mla_cache  # noqa: E402
from flashdsa.ops.common import LN2_C  # noqa: E402
from flashdsa.layout import MLA_FP8_BYTES, MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views  # noqa: E402
from flashdsa.ops.sparse_mla import fwd  # noqa: E402
from flashdsa.ops.sparse_mla.decode import sparse_mla_decode  # noqa: E402

BLOCKS = ((64, 8), (32, 4), (32, 8), (16, 4))  # (BLOCK_H, num_warps)
SPLITS = (None, 8, 16, 32, 64)


@triton.jit
def combine_tile_kernel(po_ptr, plse_ptr, pml_ptr, out_ptr, ml_ptr, lse_ptr, n_split, h_q,
                        stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
                        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """The combine with the splits' [BLOCK_S, BLOCK_D] tile loaded at once, one program a
    (head, query, d_v block)."""
    h = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    dblk = tl.program_id(2)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_split
    l_ptrs = offs_s * stride_ls + t * stride_lt + h
    lse2 = tl.load(plse_ptr + l_ptrs, mask=s_mask, other=float("-inf"))
    o = tl.load(po_ptr + offs_s[:, None] * stride_ps + t * stride_pt + h * stride_ph + offs_d[None, :],
                mask=s_mask[:, None], other=0.0)
    big = tl.max(lse2, 0)
    big_use = tl.where(big == float("-inf"), 0.0, big)
    w = tl.math.exp2(lse2 - big_use)
    w_sum = tl.sum(w, 0)
    has = w_sum > 0.0
    out = tl.sum(w[:, None] * o, 0) / tl.where(has, w_sum, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    if dblk == 0:
        mx2 = tl.max(tl.load(pml_ptr + l_ptrs, mask=s_mask, other=float("-inf")), 0)
        tl.store(lse_ptr + t * h_q + h, tl.where(has, (big + tl.math.log2(tl.where(has, w_sum, 1.0))) * LN2_C,
                                                 float("inf")))
        tl.store(ml_ptr + t * h_q + h, mx2 * LN2_C)


def rows_of(cache, fmt):
    if fmt == "fp8_ds_mla":
        c8, sc, pe = mla_byte_views(cache.reshape(-1, MLA_FP8_BYTES))
        return fwd.KvRows(c8, pe[:, MLA_ROPE_OFF:], sc[:, MLA_SCALE_OFF:], c8.shape[0])
    flat = cache.reshape(-1, cache.shape[-1])
    return fwd.KvRows(flat, flat[:, 512:], None, flat.shape[0])


def decode_tile_combine(q, rows, idx, cfg, n_split, block_d):
    """The product's split forward with combine_tile_kernel as its combine."""
    b, s_q, h_q, _ = q.shape
    qf = q.reshape(b * s_q, h_q, -1)
    ix = idx.reshape(b * s_q, -1)
    t_q, topk = qf.shape[0], ix.shape[1]
    n_split, k_per = fwd._split_plan(topk, cfg["BLOCK_K"], n_split)
    kernel, ins, meta = fwd._kernel_and_inputs(qf, ix, rows, smd.SM_SCALE, 512, cfg)
    out = torch.empty(t_q, h_q, 512, dtype=q.dtype, device=q.device)
    ml = torch.empty(t_q, h_q, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(ml)
    p_out = torch.empty(n_split, t_q, h_q, 512, dtype=torch.float32, device=q.device)
    p_lse = torch.empty(n_split, t_q, h_q, dtype=torch.float32, device=q.device)
    p_ml = torch.empty_like(p_lse)
    kernel[(triton.cdiv(h_q, cfg["BLOCK_H"]), t_q, n_split)](
        **ins, **fwd._out_args(p_out, p_ml, p_lse, True), k_per_split=k_per, SPLIT=True, **meta)
    combine_tile_kernel[(h_q, t_q, 512 // block_d)](
        p_out, p_lse, p_ml, out, ml, lse, n_split, h_q, p_out.stride(0), p_out.stride(1), p_out.stride(2),
        p_lse.stride(0), p_lse.stride(1), out.stride(0), out.stride(1),
        BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4)
    return out.reshape(b, s_q, h_q, 512)


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1, bf16 rows, a few variants")
    args = ap.parse_args()
    global BLOCKS, SPLITS
    if args.quick:
        BLOCKS, SPLITS = ((64, 8), (16, 4)), (16, 32)
    rows = []
    for bsz in (1,) if args.quick else (1, 4):
        q, cache, idx = smd.make_problem(bsz, 32768, 1)
        formats = (("bf16", cache),) if args.quick else (("bf16", cache), ("fp8_ds_mla", quantize_mla_cache(cache)))
        for fmt, c in formats:
            ref = sparse_mla_decode(q, c, idx, smd.SM_SCALE, kv_format=fmt)[0].float()
            row = {"batch": bsz, "format": fmt}

            def default(c=c, fmt=fmt):
                return sparse_mla_decode(q, c, idx, smd.SM_SCALE, kv_format=fmt)

            row["default_us"] = graph_us(default)
            row["kernels_default"] = kernel_table(default, top=4)
            kv_rows = rows_of(c, fmt)
            for bh, nw in BLOCKS:
                for ns in SPLITS:
                    cfg = {"BLOCK_H": bh, "num_warps": nw}
                    name = f"h{bh}_w{nw}_s{ns or 'def'}"

                    def prod(cfg=cfg, ns=ns, c=c, fmt=fmt):
                        return sparse_mla_decode(q, c, idx, smd.SM_SCALE, kv_format=fmt, n_split=ns, config=cfg)[0]

                    try:
                        row[name + "_maxdiff"] = float((prod().float() - ref).abs().max())
                        row[name + "_us"] = graph_us(prod)
                    except Exception as e:  # a variant that fails is recorded, not fatal
                        row[name + "_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                        continue
                    if ns is None:
                        continue
                    full = fwd.resolve_config(q.device, 128, 512, fmt != "bf16", cfg)
                    for bd in (64, 128):

                        def tiled(full=full, ns=ns, bd=bd, kv_rows=kv_rows):
                            return decode_tile_combine(q, kv_rows, idx, full, ns, bd)

                        try:
                            row[f"{name}_tile{bd}_maxdiff"] = float((tiled().float() - ref).abs().max())
                            row[f"{name}_tile{bd}_us"] = graph_us(tiled)
                        except Exception as e:
                            row[f"{name}_tile{bd}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            times = {k[:-3]: v for k, v in row.items() if k.endswith("_us") and k != "default_us"}
            row["best"] = min(times, key=times.get)
            rows.append(row)
            print({k: v for k, v in row.items() if not k.startswith("kernels")}, flush=True)
    name = "probe_decode_blocks_quick" if args.quick else "probe_decode_blocks"
    print("wrote", write_result(name, {"ceilings": measure_ceilings(), "rows": rows}))


if __name__ == "__main__":
    main()
