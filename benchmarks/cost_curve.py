"""Long-context cost curve: time per token of prefill and decode, DSA against dense.

    python -m benchmarks.cost_curve                      # H200: V3.2 shapes, 8K..128K (about 5 min)
    python -m benchmarks.cost_curve --toy                # CPU: tiny shapes, checks the logic only
    TRITON_INTERPRET=1 python -m benchmarks.cost_curve --toy --backend triton --contexts 128   # kernels too
    python -m benchmarks.cost_curve --plot-from benchmarks/results/cost_curve.json
    python -m benchmarks.cost_curve --profile --contexts 8192 131072   # + each decode step's kernels
    python -m benchmarks.cost_curve --breakdown-from benchmarks/results/cost_curve.json   # kernels by group

What is timed: a stack of ``--layers`` MLA attention layers with DeepSeek-V3.2 shapes
(hidden 7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, indexer 64 x 128, top-k 2048),
bf16 weights, the attention sub-layer only (projections included, no MLP/MoE: those
cost the same per token in both models). The caches hold ``L - chunk`` earlier tokens
of random data (for prefill) or ``L - 1`` (for decode); the step computes the rest.

- DSA prefill: one engine step (flashdsa.engine.attention.paged_mla_attention) over a
  chunk of ``--chunk`` new tokens per sequence at positions [L - chunk, L): latent and
  indexer cache writes, indexer top-k of every query over its L-token paged key cache,
  sparse MLA over the selected 2048 rows. Per token = step time / (batch * chunk).
- Dense prefill (MHA mode, the baseline the issue names): the same projections, keys and
  values expanded through kv_b_proj for the chunk and kept in a per-sequence MHA cache
  [b, 128, L, 192 | 128] (the context's K/V are cached, not re-expanded: generous to the
  baseline), attention through torch SDPA (math backend excluded): one call with a
  bottom-right causal mask when this torch supports it, else the prefix (no mask) and
  the chunk itself (causal) as two calls whose combination is not timed (elementwise).
- DSA decode: one engine decode step (one token per sequence at position L - 1): paged
  indexer top-k kernel over the key cache, sparse MLA decode kernel. Timed as a CUDA
  graph of the engine's capturable decode body (as the engine's ``cuda_graphs`` option
  runs it), and eagerly (``decode_dsa_eager_*``).
- Dense decode (absorbed MLA): every head attends to all L latent rows. Two
  implementations, and the faster one is the baseline: ``bmm`` (scores, softmax, values
  with torch bmm over the sequence's contiguous pages) and ``kernel`` (the sparse decode
  kernel given all L positions: a FlashMLA-style dense pass), each in a CUDA graph too.

Speedups are reported for the whole layers (``*_speedup_*``) and for the attention core
(``*_speedup_core_*``: the time of the shared projections and o_proj, measured alone,
subtracted from both; at batch 1 decode that shared part is the weight read and
dominates both).

Batches: 1 and a serving batch (``--prefill-batch`` sequences of prefill chunks,
``--decode-batch`` decode sequences). Every timing is a median of triton's do_bench
(CUDA events). Results go to benchmarks/results/cost_curve.json ($OUT when set) with the
ceilings measured in the same run, and a plot (SVG, with matplotlib: ``pip install 'flashdsa[plot]'``)
like the paper's cost figure next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, host_table, kernel_table
from flashdsa import api
from flashdsa.config import DSAConfig
from flashdsa.engine.attention import StepMetadata, paged_mla_attention
from flashdsa.engine.cache import PAGE_SIZE, PagedCaches
from flashdsa.layers import MLA
from flashdsa.reference.rope import rope_cos_sin, yarn_inv_freq

V32 = dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
           qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048)
TOY = dict(hidden_size=128, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
           qk_rope_head_dim=16, v_head_dim=32, index_n_heads=4, index_head_dim=32, index_topk=64)


# --- timing -------------------------------------------------------------------------------
def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn(): do_bench on a GPU, perf_counter medians on CPU."""
    if device.type == "cuda":
        return bench_ms(fn, warmup=10, rep=50)
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def graphed(fn, device: torch.device):
    """(replay, True) with fn captured in a CUDA graph, or (fn, False) where that is not
    possible (CPU, or capture failed): decode steps are short enough that kernel-launch
    overhead would otherwise dominate them, for DSA and dense alike."""
    if device.type != "cuda":
        return fn, False
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, True
    except Exception as e:
        torch.cuda.synchronize()
        print(f"graph capture failed, timing eagerly: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return fn, False


def graph_us(fn) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph (the probes' timing of
    decode-step pieces; eagerly where capture fails)."""
    replay, _ = graphed(fn, torch.device("cuda"))
    return round(bench_ms(replay) * 1e3, 2)


# --- the layer stack and its caches ----------------------------------------------------------
def make_layers(cfg: DSAConfig, n: int, device, dtype) -> list[MLA]:
    layers = []
    for _ in range(n):
        m = MLA(cfg)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)
        m = m.to(device=device, dtype=dtype).eval()
        m.merge_projections()   # as the engine does: the DSA step's projections, one GEMM per input
        # RoPE frequencies stay fp32 (module.to(dtype) rounded the buffer)
        m.inv_freq = yarn_inv_freq(m.rope, cfg.rope_theta, cfg.rope_factor, cfg.original_max_position_embeddings,
                                   cfg.max_position_embeddings, cfg.beta_fast, cfg.beta_slow).to(device)
        layers.append(m)
    return layers


def make_caches(cfg: DSAConfig, n_layers: int, n_seqs: int, ctx: int, device, dtype, kv_cache_dtype: str):
    """Paged caches with sequence b in the contiguous blocks [b * nb, (b + 1) * nb),
    filled with random latent rows and indexer keys (written through the engine's
    quantizing cache write, so the key bytes and scales are valid e4m3 / fp32)."""
    nb = -(-ctx // PAGE_SIZE)
    caches = PagedCaches(n_layers, n_seqs * nb, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.index_head_dim,
                         kv_cache_dtype, dtype, device, cfg.kv_lora_rank)
    n_slots = n_seqs * nb * PAGE_SIZE
    step = 1 << 20
    g = torch.Generator(device=device).manual_seed(0)
    for layer in range(n_layers):
        if caches.kv_format == "bf16":
            caches.latent[layer].normal_(generator=g)
        for s0 in range(0, n_slots, step):
            slots = torch.arange(s0, min(s0 + step, n_slots), device=device)
            if caches.kv_format != "bf16":
                rows = torch.randn(slots.numel(), caches.latent_dim, device=device, dtype=dtype, generator=g)
                caches.write_latent(layer, slots, rows)
            keys = torch.randn(slots.numel(), cfg.index_head_dim, device=device, dtype=dtype, generator=g)
            caches.index[layer].store(keys, slots)
    table = torch.arange(n_seqs * nb, device=device, dtype=torch.int32).view(n_seqs, nb)
    return caches, table


def step_metadata(table: torch.Tensor, n_seqs: int, ctx: int, n_new: int) -> StepMetadata:
    """Metadata of one step: ``n_new`` tokens per sequence at positions [ctx - n_new, ctx)."""
    dev = table.device
    pos = torch.arange(ctx - n_new, ctx, device=dev).repeat(n_seqs)                         # [T]
    seq = torch.arange(n_seqs, device=dev).repeat_interleave(n_new)                          # [T]
    bt = table[:n_seqs]
    slots = bt[seq, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
    return StepMetadata(positions=pos, slots=slots, token_seq=seq, block_table=bt.contiguous(),
                        context_lens=torch.full((n_seqs,), ctx, dtype=torch.int32, device=dev),
                        query_start=[i * n_new for i in range(n_seqs + 1)], context_host=[ctx] * n_seqs)


# --- dense baselines ---------------------------------------------------------------------------
def _projections(attn: MLA, x: torch.Tensor, positions: torch.Tensor):
    """q_nope, q_pe, kv, k_pe of MLA.project (the indexer's inputs qr, cos, sin unused here)."""
    return attn.project(x, positions)[1:5]


def sdpa_kernels(device):
    """Context manager restricting SDPA to fused kernels on a GPU (never the math
    backend, which would materialize [b, h, chunk, L] scores)."""
    if device.type != "cuda":
        import contextlib
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def lower_right_mask(c: int, n: int):
    try:
        from torch.nn.attention.bias import causal_lower_right
        return causal_lower_right(c, n)
    except ImportError:
        return None


def dense_prefill(layers, x, positions, kcache, vcache, n_seqs: int, ctx: int, chunk: int, mode: str):
    """MHA-mode prefill of a chunk per sequence; kcache [b, H, ctx, 192], vcache [b, H, ctx, 128]."""
    for attn in layers:
        q_nope, q_pe, kv, k_pe = _projections(attn, x, positions)
        t, h = x.shape[0], attn.n_heads
        k_nope, v = attn.kv_b_proj(kv).view(t, h, attn.nope + attn.v_dim).split((attn.nope, attn.v_dim), -1)
        k = torch.cat((k_nope, k_pe.expand(-1, h, -1)), dim=-1)
        kcache[:n_seqs, :, ctx - chunk:ctx] = k.view(n_seqs, chunk, h, -1).transpose(1, 2)
        vcache[:n_seqs, :, ctx - chunk:ctx] = v.view(n_seqs, chunk, h, -1).transpose(1, 2)
        q = torch.cat((q_nope, q_pe), dim=-1).view(n_seqs, chunk, h, -1).transpose(1, 2)   # [b, H, C, 192]
        kk, vv = kcache[:n_seqs, :, :ctx], vcache[:n_seqs, :, :ctx]
        if mode == "lower_right":
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=lower_right_mask(chunk, ctx),
                                               scale=attn.softmax_scale)
        else:  # "split": prefix without a mask + the chunk causally; their merge is not timed
            o = F.scaled_dot_product_attention(q, kk[:, :, :ctx - chunk], vv[:, :, :ctx - chunk],
                                               scale=attn.softmax_scale)
            o = o + F.scaled_dot_product_attention(q, kk[:, :, ctx - chunk:], vv[:, :, ctx - chunk:],
                                                   is_causal=True, scale=attn.softmax_scale)
        attn.o_proj(o.transpose(1, 2).reshape(t, h * attn.v_dim))


def dense_decode(layers, x, caches, meta, ctx: int, impl: str, all_idx=None, backend="auto"):
    """Absorbed dense MLA decode: every head over all ``ctx`` latent rows of its sequence
    (the latent write and the query as the DSA step computes them)."""
    b = x.shape[0]
    cos, sin = layers[0].rope_cos_sin(meta.positions)
    for i, attn in enumerate(layers):
        _, q, kv_pe, _ = attn.project_inputs(x)
        caches.write_latent_rows(i, meta.slots, kv_pe, attn.kv_a_layernorm, cos, sin)
        q, w_uv = attn.absorbed_query(q, cos, sin)                                           # [b, H, 576]
        if impl == "bmm":
            rows = caches.latent_layer(i).view(-1, caches.latent_dim)
            kvc = rows[: b * meta.block_table.shape[1] * PAGE_SIZE].view(b, -1, caches.latent_dim)[:, :ctx]
            p = torch.softmax(torch.bmm(q, kvc.transpose(1, 2)).float() * attn.softmax_scale, dim=-1)
            o = torch.bmm(p.to(q.dtype), kvc[..., :attn.kv_lora_rank])                   # [b, H, 512]
        else:
            o, _ = api.sparse_mla_decode(q[:, None].contiguous(), caches.latent_layer(i), all_idx,
                                         attn.softmax_scale, attn.kv_lora_rank, caches.kv_format, backend=backend)
            o = o[:, 0]
        attn.o_proj(torch.einsum("thc,hdc->thd", o, w_uv).flatten(1))


def projections_only(layers, x, positions):
    """The part both models share (for the core times): the RoPE cos/sin, the MLA
    projections' GEMMs, the RoPE of the queries and o_proj. The latent's RMSNorm and RoPE
    belong to each model's use of it (the cache write in decode, the MHA keys in dense
    prefill)."""
    cos, sin = layers[0].rope_cos_sin(positions)
    for attn in layers:
        _, q, _, _ = attn.project_inputs(x)
        attn.rope_fn(x)(q[..., attn.nope:], cos, sin)
        attn.o_proj(x.new_zeros(x.shape[0], attn.n_heads * attn.v_dim))


def dsa_step(layers, x, meta, caches, backend="auto", static=False):
    """The engine's step over ``layers`` (its cos/sin once, as ``run_layers``)."""
    cos_sin = layers[0].rope_cos_sin(meta.positions)
    for i, attn in enumerate(layers):
        paged_mla_attention(attn, x, meta, caches, i, backend, static, cos_sin)


# --- the sanity check (same run as the timings) ---------------------------------------------
def boundary_ties(attn, x, qr, cos, sin, meta, caches) -> list[bool]:
    """Per query row: do its k-th and (k+1)-th reference indexer scores tie?"""
    indexer = attn.indexer
    d, k_top = indexer.head_dim, indexer.topk
    q, _, w = indexer.project(x, qr, cos, sin)
    q8, qs = api.act_quant(q, d)
    w = w * qs[..., 0] * d ** -0.5
    out = []
    for b in range(meta.num_seqs):
        n = meta.context_host[b]
        k8, k_scale = caches.read_index(0, meta.slots_of(b, n))
        for t in range(meta.query_start[b], meta.query_start[b + 1]):
            p = int(meta.positions[t])
            ke = torch.tensor([p + 1], dtype=torch.int32, device=x.device)
            row = api.indexer_logits(q8[t:t + 1], k8, k_scale, w[t:t + 1], torch.zeros_like(ke), ke,
                                     backend="reference")[0, :p + 1]
            v = row.sort(descending=True).values
            out.append(bool(p + 1 > k_top and v[k_top - 1] == v[k_top]))
    return out


def check_kernels(cfg, device, dtype, backend="auto") -> dict:
    """The engine's kernel path against its reference path on one layer, context past
    top-k, for a prefill chunk and a decode batch: the overlap of the selected sets
    (near-ties may flip a few rows: fp32 sums in another order), the error of the
    attention given the SAME indices, and the error of the whole layer output."""
    from flashdsa.engine import attention as A
    from flashdsa.engine.attention import sparse_mla_paged
    attn = make_layers(cfg, 1, device, dtype)[0]
    ctx = cfg.index_topk + 500
    caches, table = make_caches(cfg, 1, 4, ctx, device, dtype, "auto")
    out = {}
    for name, n_seqs, n_new in (("prefill", 1, 32), ("decode", 4, 1)):
        meta = step_metadata(table, n_seqs, ctx, n_new)
        x = torch.randn(n_seqs * n_new, cfg.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            cos, sin = rope_cos_sin(meta.positions, attn.inv_freq)
            qr = attn.q_a_layernorm(attn.q_a_proj(x))
            idx_k = A.select_indices(attn, x, qr, cos, sin, meta, caches, 0, backend)
            idx_r = A.select_indices(attn, x, qr, cos, sin, meta, caches, 0, "reference")
            tied = boundary_ties(attn, x, qr, cos, sin, meta, caches)
            # rows whose k-th and (k+1)-th scores tie have no unique top-k set: left out
            overlap = [len(set(a.tolist()) & set(b.tolist())) / cfg.index_topk
                       for a, b, t in zip(idx_k, idx_r, tied) if not t]
            q = torch.randn(x.shape[0], cfg.num_attention_heads, caches.latent_dim, device=device, dtype=dtype)
            o_k = sparse_mla_paged(q, caches, 0, idx_r, attn.softmax_scale, cfg.kv_lora_rank, backend).float()
            o_r = sparse_mla_paged(q, caches, 0, idx_r, attn.softmax_scale, cfg.kv_lora_rank, "reference").float()
            got = paged_mla_attention(attn, x, meta, caches, 0, backend=backend).float()
            ref = paged_mla_attention(attn, x, meta, caches, 0, backend="reference").float()
        out[name] = {"rows": len(tied), "rows_with_boundary_ties": sum(tied),
                     "selection_overlap_min": min(overlap, default=1.0),
                     "selection_overlap_mean": sum(overlap) / max(len(overlap), 1),
                     "attention_rel_err": float((o_k - o_r).norm() / o_r.norm()),
                     "layer_rel_err": float((got - ref).norm() / ref.norm())}
    out["ok"] = all(v["selection_overlap_min"] > 0.98 and v["attention_rel_err"] < 1e-2 for v in out.values())
    return out


# --- the sweep -------------------------------------------------------------------------------
def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = DSAConfig(**(TOY if args.toy else V32), rope_factor=40.0 if not args.toy else 1.0,
                    max_position_embeddings=max(163840, max(args.contexts)))
    result = {"config": {k: getattr(cfg, k) for k in V32}, "layers": args.layers, "chunk": args.chunk,
              "prefill_batches": [1, args.prefill_batch], "decode_batches": [1, args.decode_batch],
              "kv_cache_dtype": args.kv_cache_dtype, "backend": args.backend, "device_type": device.type, "rows": [],
              "errors": [], "profiles": {}}
    if device.type == "cuda":
        from benchmarks.common import environment, measure_ceilings
        result.update(environment())
        result["ceilings"] = measure_ceilings()
    # on CPU both paths are the reference: the check then only exercises the code
    result["check"] = check_kernels(cfg, device, dtype, args.backend)
    print("check (kernels vs reference):", result["check"], flush=True)
    layers = make_layers(cfg, args.layers, device, dtype)
    mask_ok = lower_right_mask(2, 4) is not None
    t_start = time.time()
    for ctx in args.contexts:
        if time.time() - t_start > args.budget_s:
            result["errors"].append(f"context {ctx}: skipped, time budget of {args.budget_s} s spent")
            continue
        n_seqs = max(args.prefill_batch, args.decode_batch)
        caches, table = make_caches(cfg, args.layers, n_seqs, ctx, device, dtype, args.kv_cache_dtype)
        h = cfg.num_attention_heads
        kcache = torch.zeros(args.prefill_batch, h, ctx, cfg.qk_head_dim, device=device, dtype=dtype)
        vcache = torch.zeros(args.prefill_batch, h, ctx, cfg.v_head_dim, device=device, dtype=dtype)
        kcache.normal_()
        vcache.normal_()
        row = {"context": ctx}

        def measure(key, fn, tokens, graph=False):
            try:
                with torch.no_grad():
                    if graph:
                        fn, row[key + "_graphed"] = graphed(fn, device)
                    ms = time_ms(fn, device)
                row[key] = ms * 1e3 / tokens     # microseconds per token
            except Exception as e:  # record and go on: one failing variant must not lose the run
                result["errors"].append(f"context {ctx} {key}: {type(e).__name__}: {str(e)[:300]}")
                row[key] = None

        def profile(key, fn, graph=False, host=False):
            """The kernels of one call of fn, slowest first (torch.profiler), into
            result["profiles"][context][key] (and, with ``host``, its Python functions
            with the most own host time into [key + "_host"]); a failure is recorded."""
            try:
                with torch.no_grad():
                    if graph:
                        fn, _ = graphed(fn, device)
                    prof = result["profiles"].setdefault(str(ctx), {})
                    prof[key] = kernel_table(fn, top=args.profile_top)
                    if host:
                        prof[key + "_host"] = host_table(fn, top=args.profile_top)
            except Exception as e:
                result["errors"].append(f"context {ctx} profile {key}: {type(e).__name__}: {str(e)[:300]}")

        for b in (1, args.prefill_batch):
            meta = step_metadata(table, b, ctx, args.chunk)
            x = torch.randn(b * args.chunk, cfg.hidden_size, device=device, dtype=dtype)
            measure(f"prefill_dsa_b{b}", lambda: dsa_step(layers, x, meta, caches, args.backend), b * args.chunk)
            measure(f"prefill_proj_b{b}", lambda: projections_only(layers, x, meta.positions), b * args.chunk)
            modes = (["lower_right"] if mask_ok else []) + ["split"]
            for mode in modes:
                with sdpa_kernels(device):
                    measure(f"prefill_dense_b{b}", lambda: dense_prefill(layers, x, meta.positions, kcache, vcache,
                                                                         b, ctx, args.chunk, mode), b * args.chunk)
                if row[f"prefill_dense_b{b}"] is not None:
                    row[f"prefill_dense_mode_b{b}"] = mode
                    break
        del kcache, vcache
        for b in (1, args.decode_batch):
            meta = step_metadata(table, b, ctx, 1)
            x = torch.randn(b, cfg.hidden_size, device=device, dtype=dtype)
            static = args.backend == "triton" or (device.type == "cuda" and args.backend == "auto")
            measure(f"decode_dsa_b{b}", lambda: dsa_step(layers, x, meta, caches, args.backend, static), b,
                    graph=static)
            measure(f"decode_dsa_eager_b{b}", lambda: dsa_step(layers, x, meta, caches, args.backend), b)
            measure(f"decode_proj_b{b}", lambda: projections_only(layers, x, meta.positions), b, graph=True)
            measure(f"decode_dense_bmm_b{b}", lambda: dense_decode(layers, x, caches, meta, ctx,
                                                                   "bmm"), b, graph=True)
            all_idx = (table[:b, :, None].long() * PAGE_SIZE + torch.arange(PAGE_SIZE, device=device)).view(b, 1, -1)
            all_idx = all_idx[..., :ctx].to(torch.int32).contiguous()
            measure(f"decode_dense_kernel_b{b}", lambda: dense_decode(layers, x, caches, meta, ctx,
                                                                      "kernel", all_idx, args.backend), b,
                    graph=True)
            dense = [v for v in (row[f"decode_dense_bmm_b{b}"], row[f"decode_dense_kernel_b{b}"]) if v is not None]
            row[f"decode_dense_b{b}"] = min(dense) if dense else None
            if args.profile:
                profile(f"decode_dsa_b{b}", lambda: dsa_step(layers, x, meta, caches, args.backend, static),
                        graph=static)
                profile(f"decode_dsa_eager_b{b}", lambda: dsa_step(layers, x, meta, caches, args.backend), host=True)
                profile(f"decode_dense_bmm_b{b}", lambda: dense_decode(layers, x, caches, meta, ctx,
                                                                       "bmm"), graph=True)
        for phase in ("prefill", "decode"):
            for b in (1, args.prefill_batch if phase == "prefill" else args.decode_batch):
                d, s = row.get(f"{phase}_dense_b{b}"), row.get(f"{phase}_dsa_b{b}")
                row[f"{phase}_speedup_b{b}"] = d / s if d and s else None
                p = row.get(f"{phase}_proj_b{b}")
                # the attention core: what differs between the two (indexer, top-k,
                # attention, cache writes, absorption/expansion), projections subtracted
                row[f"{phase}_speedup_core_b{b}"] = (d - p) / (s - p) if d and s and p and s > p else None
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        del caches, table
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(result, args)
    return result


# --- profile breakdown -------------------------------------------------------------------------
KERNEL_GROUPS = (  # (group, substrings of the kernel names), first match wins
    ("GEMMs (cuBLAS)", ("nvjet", "cublas", "gemm", "gemv")),
    ("indexer scores", ("indexer_scores_kernel",)),
    ("indexer top-k selects", ("rows_topk_kernel", "indexer_select_kernel", "sample_threshold_kernel",
                               "indexer_topk_kernel")),
    ("sparse MLA decode", ("sparse_mla",)),
    ("indexer FP8 operands", ("indexer_prep_kernel", "indexer_cache_write")),
    ("RMSNorm / RoPE kernels", ("rms_norm_kernel", "rope_interleaved_kernel", "rope_cos_sin_kernel")),
    ("softmax (dense)", ("SoftMax",)),
)


def breakdown(table: list, layers: int) -> dict:
    """{group: [launches, device us] per layer} of a profile table (kernel_table rows);
    everything unmatched is "torch elementwise, copies, cat, reductions"."""
    out: dict = {}
    for name, launches, us in table:
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)),
                     "torch elementwise, copies, cat, reductions")
        acc = out.setdefault(group, [0, 0.0])
        acc[0] += launches / layers
        acc[1] += us / layers
    return {g: [round(n, 1), round(t, 1)] for g, (n, t) in sorted(out.items(), key=lambda kv: -kv[1][1])}


def print_breakdown(result: dict) -> None:
    for ctx, profiles in result.get("profiles", {}).items():
        for key, table in profiles.items():
            if key.endswith("_host"):
                continue
            groups = breakdown(table, result["layers"])
            total = sum(t for _, t in groups.values())
            launches = sum(n for n, _ in groups.values())
            print(f"context {ctx} {key}: {total:.1f} us in {launches:.0f} launches a layer (top kernels only)")
            for g, (n, t) in groups.items():
                print(f"    {g:<45} {n:>5.1f} launches {t:>7.1f} us")


# --- output ------------------------------------------------------------------------------------
def write(result: dict, args) -> None:
    out_dir = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    name = "cost_curve_toy" if args.toy else "cost_curve"
    path = os.path.join(out_dir, name + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, os.path.join(out_dir, name + ".svg"))
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print(f"no plot: {e}; then: python -m benchmarks.cost_curve --plot-from {path}")


def plot(result: dict, path: str) -> str:
    """Two panels like the paper's cost figure: microseconds per token against the
    token's position (context), prefill left and decode right, dense in grey and DSA in
    blue, batch 1 solid and the serving batch dashed. Log-2 x axis, linear y axis from 0."""
    from benchmarks.plot import pyplot, save
    plt = pyplot()
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("prefill", "decode")):
        for method, color in (("dense", "#777777"), ("dsa", "#1f5fbf")):
            for j, b in enumerate(result[f"{phase}_batches"]):
                pts = [(r["context"], r[f"{phase}_{method}_b{b}"]) for r in rows
                       if r.get(f"{phase}_{method}_b{b}") is not None]
                ax.plot([c for c, _ in pts], [v for _, v in pts], color=color, linestyle="--" if j else "-",
                        marker="o", markersize=3, label=f"{'DSA' if method == 'dsa' else 'dense'} b={b}")
        contexts = [r["context"] for r in rows]
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
        ax.set_ylim(bottom=0)
        ax.set(title=f"{phase}: time per token (us), {result['layers']} layers", xlabel="context (token position)")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    return save(fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--layers", type=int, default=2, help="attention layers in the stack")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk per sequence (default 2048; toy 32)")
    ap.add_argument("--prefill-batch", type=int, default=None, help="serving batch of prefill (default 4; toy 2)")
    ap.add_argument("--decode-batch", type=int, default=None, help="serving batch of decode (default 32; toy 4)")
    ap.add_argument("--kv-cache-dtype", default=None, choices=("bf16", "fp8_ds_mla", "auto"),
                    help="latent cache of the DSA path (default bf16; toy: auto = fp32)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no new context after this many seconds")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                    help="of the DSA path and the dense decode kernel (toy + triton: the Triton interpreter)")
    ap.add_argument("--toy", action="store_true", help="tiny shapes on CPU: checks the logic, times nothing useful")
    ap.add_argument("--profile", action="store_true",
                    help="also record each decode step's kernels (torch.profiler: DSA in a graph and eagerly, "
                         "dense) and the eager DSA step's host time by function (cProfile) into the JSON's "
                         "'profiles'")
    ap.add_argument("--profile-top", type=int, default=25, help="kernels kept per profiled step")
    ap.add_argument("--out", default=None, help="output folder (default $OUT or benchmarks/results)")
    ap.add_argument("--plot-from", default=None, metavar="JSON",
                    help="only redraw the plot of a result JSON (SVG into --out, default next to the JSON; "
                         "needs matplotlib: pip install 'flashdsa[plot]')")
    ap.add_argument("--breakdown-from", default=None, metavar="JSON",
                    help="only print the per-layer kernel breakdown of a --profile result JSON")
    args = ap.parse_args()
    if args.breakdown_from:
        with open(args.breakdown_from) as f:
            print_breakdown(json.load(f))
        return
    if args.plot_from:
        with open(args.plot_from) as f:
            result = json.load(f)
        stem = os.path.splitext(os.path.basename(args.plot_from))[0]
        try:
            path = plot(result, os.path.join(args.out or os.path.dirname(args.plot_from), stem + ".svg"))
        except ModuleNotFoundError as e:
            raise SystemExit(str(e)) from None
        print("wrote", path)
        return
    toy = args.toy
    args.contexts = args.contexts or ([128, 256, 512] if toy else [8192, 16384, 32768, 65536, 131072])
    args.chunk = args.chunk or (32 if toy else 2048)
    args.prefill_batch = args.prefill_batch or (2 if toy else 4)
    args.decode_batch = args.decode_batch or (4 if toy else 32)
    args.kv_cache_dtype = args.kv_cache_dtype or ("auto" if toy else "bf16")
    if toy and args.kv_cache_dtype == "fp8_ds_mla":
        raise SystemExit("--toy shapes have no fp8_ds_mla layout (needs 512 + 64 latent dims)")
    result = run(args)
    def x(r, key):
        v = r.get(key)
        return f"x{v:.2f}" if v else "  -  "

    pb, db = args.prefill_batch, args.decode_batch
    print("dense / DSA time per token (layer | attention core), batch 1 and serving batch")
    for r in result["rows"]:
        print(f"context {r['context']:>7}: prefill b=1 {x(r, 'prefill_speedup_b1')} | {x(r, 'prefill_speedup_core_b1')}"
              f", b={pb} {x(r, f'prefill_speedup_b{pb}')} | {x(r, f'prefill_speedup_core_b{pb}')}; "
              f"decode b=1 {x(r, 'decode_speedup_b1')} | {x(r, 'decode_speedup_core_b1')}, "
              f"b={db} {x(r, f'decode_speedup_b{db}')} | {x(r, f'decode_speedup_core_b{db}')}")
    for e in result["errors"]:
        print("error:", e)


if __name__ == "__main__":
    main()
