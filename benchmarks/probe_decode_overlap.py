"""Probe: the decode step with the MLA query path on a second CUDA stream, beside the
indexer's top-k chain (issue 16, decode at batch 1).

At batch 1 the indexer's top-k is a chain of latency-bound launches (sample pass, sample
threshold, filter pass, select: one row, few busy SMs), while the query projection
q_b_proj (75 MB of weights a layer at V3.2 shapes), the absorption through W_UK and the
latent cache write wait for nothing of it. The product's step
(``flashdsa.engine.attention.paged_mla_attention``) runs them one after the other, the
query projection merged with the indexer's wq_b into one GEMM. The variant here
(:func:`overlapped_attention`) computes the indexer's queries first (wq_b alone), forks a
side stream for the latent write, q_b_proj, RoPE and the absorption, runs the indexer's
operands and top-k on the main stream, and joins before the sparse decode.

    python -m benchmarks.probe_decode_overlap                    # H200 (about 2 min)
    python -m benchmarks.probe_decode_overlap --toy              # CPU: the logic only
    TRITON_INTERPRET=1 python -m benchmarks.probe_decode_overlap --toy --backend triton   # + the kernels

For each context and batch: both steps of ``--layers`` V3.2 layers, captured in CUDA
graphs (as the engine and ``benchmarks.cost_curve`` run decode), timed in turns
``--turns`` times (median microseconds a step each turn), and the variant's output
against the product's (relative error; the noise floor: the product against itself).
Writes $OUT/probe_decode_overlap.json (or benchmarks/results/) with the ceilings of the
same run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from benchmarks.cost_curve import TOY, V32, graphed, make_caches, make_layers, step_metadata, time_ms
from flashdsa.config import DSAConfig
from flashdsa.engine.attention import StepMetadata, select_indices, sparse_mla_paged

_SIDE = {}


def _side_stream(device: torch.device):
    """The second stream of ``device`` (made once: not while a graph is being captured)."""
    if device.type != "cuda":
        return None
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def overlapped_attention(attn, x: torch.Tensor, meta: StepMetadata, caches, layer: int, backend: str,
                         static: bool, cos_sin) -> torch.Tensor:
    """``paged_mla_attention`` with the query path beside the top-k chain (see the module
    docstring); the same math, the merged weights of ``MLA.merge_projections``."""
    t = x.shape[0]
    ix = attn.indexer
    cos, sin = cos_sin
    w_x, w_qr, n_x = attn._merged
    outs = F.linear(x, w_x).split([attn.q_a_proj.out_features, attn.kv_a_proj_with_mqa.out_features,
                                   ix.head_dim, ix.n_heads][:n_x], dim=-1)
    qa, kv_pe, ik = outs[:3]
    iw = outs[3] if n_x == 4 else ix.weights_proj(x.float())
    qr = attn.q_a_layernorm(qa)
    nq = attn.q_b_proj.out_features
    side = _side_stream(x.device)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        caches.write_latent_rows(layer, meta.slots, kv_pe, attn.kv_a_layernorm, cos, sin)
        q = F.linear(qr, w_qr[:nq]).view(t, attn.n_heads, attn.nope + attn.rope)
        q_full, w_uv = attn.absorbed_query(q, cos, sin)
    iq = F.linear(qr, w_qr[nq:])
    raw = (iq.view(t, ix.n_heads, ix.head_dim), ik, iw)
    indices = select_indices(attn, x, qr, cos, sin, meta, caches, layer, backend, static, raw)
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
    o_lat = sparse_mla_paged(q_full, caches, layer, indices, attn.softmax_scale, attn.kv_lora_rank, backend)
    out = torch.einsum("thc,hdc->thd", o_lat, w_uv)
    return attn.o_proj(out.flatten(1))


def overlapped_step(layers, x, meta, caches, backend="auto", static=False):
    cos_sin = layers[0].rope_cos_sin(meta.positions)
    return [overlapped_attention(attn, x, meta, caches, i, backend, static, cos_sin) for i, attn in enumerate(layers)]


def product_step(layers, x, meta, caches, backend="auto", static=False):
    from flashdsa.engine.attention import paged_mla_attention
    cos_sin = layers[0].rope_cos_sin(meta.positions)
    return [paged_mla_attention(attn, x, meta, caches, i, backend, static, cos_sin) for i, attn in enumerate(layers)]


def rel_err(a: list, b: list) -> float:
    return max(float((p.float() - q.float()).norm() / q.float().norm().clamp_min(1e-30)) for p, q in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 8192 32768 131072 (toy 256)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--backend", default=None, help="default: auto on a GPU, reference on CPU")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.toy
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = args.backend or ("auto" if cuda else "reference")
    contexts = args.contexts or ([256] if args.toy else [8192, 32768, 131072])
    cfg = DSAConfig(**(TOY if args.toy else V32), rope_factor=1.0 if args.toy else 40.0,
                    max_position_embeddings=max(163840, max(contexts)))
    result = {"command": "python -m benchmarks.probe_decode_overlap", "layers": args.layers,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    if cuda:
        from benchmarks.common import environment, measure_ceilings
        result.update(environment())
        result["ceilings"] = measure_ceilings()
    layers = make_layers(cfg, args.layers, device, dtype)
    variants = {"product": product_step, "overlap": overlapped_step}
    for ctx in contexts:
        caches, table = make_caches(cfg, args.layers, max(args.batches), ctx, device, dtype, "bf16")
        for b in args.batches:
            meta = step_metadata(table, b, ctx, 1)
            x = torch.randn(b, cfg.hidden_size, device=device, dtype=dtype)
            row = {"context": ctx, "batch": b}
            with torch.no_grad():
                outs = {name: fn(layers, x, meta, caches, backend, cuda) for name, fn in variants.items()}
                again = product_step(layers, x, meta, caches, backend, cuda)
                row["rel_err_overlap"] = rel_err(outs["overlap"], outs["product"])
                row["rel_err_product_again"] = rel_err(again, outs["product"])
                runs = {}
                for name, fn in variants.items():
                    runs[name], row[f"{name}_graphed"] = graphed(
                        lambda fn=fn: fn(layers, x, meta, caches, backend, cuda), device)
                for turn in range(args.turns):
                    for name in variants:
                        row.setdefault(f"{name}_us", []).append(round(time_ms(runs[name], device) * 1e3, 2))
            row["overlap_over_product"] = round(sorted(row["overlap_us"])[len(row["overlap_us"]) // 2]
                                                / sorted(row["product_us"])[len(row["product_us"]) // 2], 4)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        del caches, table
        if cuda:
            torch.cuda.empty_cache()
    print("wrote", write_result("probe_decode_overlap", result, os.environ.get("OUT")))


if __name__ == "__main__":
    main()
