"""Build the GPU kernels for sm_90 (Hopper) on any machine, no GPU needed, and report
their resources: registers, spill stack, shared memory (the training kernels, the indexer
top-k's and the paged decode's), and the instructions of each kernel's main loop (the
loop around its tensor-core MMA in the SASS: all of them, the barriers, the shared
memory traffic of layout conversions).

    python -m benchmarks.sm90_build            # table of every kernel at the sm90 block sizes

The host functions run on CPU tensors of the real widths with the sm90 configurations;
each Triton launch is intercepted and compiled instead (``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` with the launcher's specialization: 16-aligned pointers and
ints divisible by 16 hinted, ints equal to 1 made constants), and the resources are read
from the cubin with the wheel's ``cuobjdump``. This catches what the CPU interpreter
cannot: type errors of compiled Triton (e.g. a loop-carried variable changing type),
layouts that need more than the 227 KB of shared memory, and register spills. Triton
versions differ (the H200 device runs 3.6; a CPU machine may have 3.9, which spills where
3.6 does not), so spills are reported, not judged, here.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

SM90_SHARED_BYTES = 232448  # 227 KB: the most shared memory one block can have on Hopper
# the most shared memory one block can have, by compute capability: A100 163 KB, H100/H200
# and B200 227 KB
SHARED_LIMIT = {80: 166912, 90: SM90_SHARED_BYTES, 100: SM90_SHARED_BYTES}
_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
       torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1",
       torch.float8_e4m3fn: "fp8e4nv"}


@contextlib.contextmanager
def capture_launches():
    """Within the block, ``kernel[grid](...)`` records (kernel, args, kwargs) in the yielded
    list instead of launching."""
    launches = []
    run = JITFunction.run

    def record(self, *args, grid, warmup=False, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def _specialize(fn: JITFunction, args, kwargs):
    """(signature, constexprs, attrs) as the launcher would specialize these arguments."""
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, name) in enumerate(zip(fn.params, fn.arg_names)):
        v = bound.arguments[name]
        if p.is_constexpr or v is None:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, TensorDescriptor):
            signature[name] = f"tensordesc<{_TY[v.base.dtype]}[{', '.join(map(str, v.block_shape))}]>"
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TY[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: argument {name} of type {type(v).__name__}")
    return signature, constexprs, attrs


def _nvidia_tool(name: str, cubin: bytes, *flags: str) -> str:
    """stdout of the wheel's ``name`` (cuobjdump, nvdisasm) run on ``cubin``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, *flags, path], capture_output=True, text=True).stdout


def _resources(cubin: bytes) -> dict:
    text = _nvidia_tool("cuobjdump", cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource usage: {text[-300:]!r}")
    return dict(regs=int(m.group(1)), spill_stack=int(m.group(2)))


_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_MMA = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA")   # wgmma (sm_90) and mma.sync tensor-core ops
LOOP_OPS = ("BAR", "STS", "LDS", "STG", "LDL", "STL")


def main_loop(sass: str) -> dict | None:
    """Instructions of a kernel's main loop, from its SASS (nvdisasm): the innermost loop (a
    label and a later branch back to it) around the first tensor-core MMA. {"instr": all of
    them, and the count of each of LOOP_OPS: barriers, shared stores and loads (layout
    conversions go through shared memory between two barriers), global stores, local
    memory (spills)}; None without an MMA inside a loop."""
    lines = sass.splitlines()
    mma = next((i for i, l in enumerate(lines) if (m := _SASS_OP.match(l)) and m.group(1) in _MMA), None)
    if mma is None:
        return None
    for start in range(mma, -1, -1):
        m = _LABEL.match(lines[start])
        if not m:
            continue
        end = next((i for i in range(mma, len(lines)) if "BRA" in lines[i] and f"({m.group(1)})" in lines[i]), None)
        if end is None:
            continue
        ops = [m.group(1).split(".")[0] for l in lines[start:end + 1] if (m := _SASS_OP.match(l))]
        return dict(instr=len(ops), **{op: ops.count(op) for op in LOOP_OPS})
    return None


@contextlib.contextmanager
def dispatch_as(arch: int):
    """Within the block, the launchers pick what they pick on a GPU of compute capability
    ``arch`` (80, 90, 100) for the CPU tensors they are given: TMA (sm_90 and later), the
    e4m3 type (sm_89 and later), programmatic dependent launch (sm_90 and later), the
    indexer's block-size family, and the capability the config tables read
    (``torch.cuda.get_device_capability``)."""
    from flashdsa.ops.indexer import direct, prep, scores, streaming, threshold
    from flashdsa.ops.sparse_mla import decode, fwd, fwd_fp8

    def pdl(device):
        return dict(PDL=True, launch_pdl=True) if arch >= 90 else dict(PDL=False)

    with contextlib.ExitStack() as stack:
        for mod in (fwd, scores, threshold, direct, streaming, prep):
            stack.enter_context(mock.patch.object(mod, "pdl_launch", pdl))
        for mod in (fwd, fwd_fp8, decode, scores):
            if hasattr(mod, "has_tma"):
                stack.enter_context(mock.patch.object(mod, "has_tma", lambda device: arch >= 90))
            if hasattr(mod, "fp8_native"):
                stack.enter_context(mock.patch.object(mod, "fp8_native", lambda device: arch >= 89))
        stack.enter_context(mock.patch.object(scores, "_family", lambda device: "sm90" if arch >= 89 else "sm80"))
        stack.enter_context(mock.patch("torch.cuda.get_device_capability", lambda device=None: divmod(arch, 10)))
        yield


def build(launches, arch: int = 90, keep_going: bool = False) -> list[dict]:
    """Compile each recorded launch for sm_<arch>: name, warps, stages, shared bytes,
    registers, spill stack bytes. Raises the compiler's error for a kernel that does not
    build, or with ``keep_going`` records it (``error``) and goes on."""
    rows = []
    target = GPUTarget("cuda", arch, 32)
    for fn, args, kwargs in launches:
        kwargs = dict(kwargs)
        opts = dict(num_warps=kwargs.pop("num_warps", 4), num_stages=kwargs.pop("num_stages", 3))  # Triton's defaults
        if kwargs.pop("launch_pdl", False):
            opts["launch_pdl"] = True
        if "maxnreg" in kwargs:  # a launch option (the warp-specialized Gluon kernel's register budget)
            opts["maxnreg"] = kwargs.pop("maxnreg")
        if isinstance(fn, GluonJITFunction):  # a Gluon kernel takes num_warps as a parameter too
            kwargs["num_warps"] = opts["num_warps"]
        signature, constexprs, attrs = _specialize(fn, args, kwargs)
        source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
        try:
            k = triton.compile(source(fn, signature, constexprs, attrs), target=target, options=opts)
        except Exception as e:
            if not keep_going:
                raise
            rows.append(dict(kernel=fn.fn.__name__, **opts, error=str(e).strip().splitlines()[-1][:160]))
            continue
        loop = main_loop(_nvidia_tool("nvdisasm", k.asm["cubin"], "-c"))
        rows.append(dict(kernel=fn.fn.__name__, **opts, shared=k.metadata.shared, **_resources(k.asm["cubin"]),
                         **({"loop": loop} if loop else {})))
    return rows


def training_launches(arch: int = 90) -> dict[str, list]:
    """The launches of the training path at the real widths (d_qk 576, d_v 512, H_I 64,
    d_I 128) with the configurations a GPU of compute capability ``arch`` gets, by case name."""
    from flashdsa.ops import indexer_loss as L
    from flashdsa.ops.sparse_mla import bwd as B
    from flashdsa.ops.sparse_mla import fwd as F

    g = torch.Generator().manual_seed(0)
    T, S, topk, HI, DI = 8, 1024, 256, 64, 128
    bf = dict(dtype=torch.bfloat16)
    cases = {}
    for h in (64, 128):
        q = torch.randn(T, h, 576, generator=g, **bf)
        kv = torch.randn(S, 1, 576, generator=g, **bf)
        idx = torch.randint(0, S, (T, 1, topk), dtype=torch.int32, generator=g)
        lse = torch.rand(T, h, generator=g)
        for name, dt in (("fp16", torch.float16), ("e4m3", torch.float8_e4m3fn)):
            with capture_launches() as launches, dispatch_as(arch):
                cfg = F.default_config(torch.device("cuda"), h, 512)  # what that GPU gets
                F.run_sparse_mla_fwd(q, kv, idx, 0.04, 512, config=cfg, return_probs=True, probs_dtype=dt)
            cases[f"sparse_mla_fwd probs {name} h{h}"] = launches
        with capture_launches() as launches:
            out = torch.randn(T, h, 512, generator=g, **bf)
            B.run_sparse_mla_bwd(q, kv, idx, out, out.clone(), lse, 0.04, 512, config=B.CONFIGS["sm90"])
        cases[f"sparse_mla_bwd h{h}"] = launches
        iq = torch.randn(T, HI, DI, generator=g, **bf)
        ik = torch.randn(S, DI, generator=g, **bf)
        w = torch.randn(T, HI, generator=g)
        stats, p, dkl = torch.zeros(T, 2), torch.rand(T, topk, generator=g), torch.ones(T)
        cfg = L.config_for(h, divmod(arch, 10))   # what that GPU gets
        ks, ke = torch.zeros(T, dtype=torch.int32), torch.arange(1, T + 1, dtype=torch.int32)
        with capture_launches() as launches:
            L.indexer_kl_fwd(q, kv, lse, iq, ik, w, idx, None, None, 0.04, cfg)
            L.indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, idx, None, None, stats, p, 0.04, cfg)
        cases[f"sparse_kl_loss h{h}"] = launches
        with capture_launches() as launches:
            L.indexer_kl_fwd(q, kv, None, iq, ik, w, None, ks, ke, 0.04, cfg)
            L.indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, None, ks, ke, stats, p, 0.04, cfg)
        cases[f"warmup_kl_loss h{h}"] = launches
    # the query-tiled warm-up kernels: 16 heads and 16 indexer heads at the real widths
    # (4 queries a program), and the quality study's layer (8 heads of 288, 8 of 64: 8 queries)
    for h, d, hi, di in ((16, 576, 16, 128), (8, 288, 8, 64)):
        qs, kvs = torch.randn(T, h, d, generator=g, **bf), torch.randn(S, 1, d, generator=g, **bf)
        iqs, iks = torch.randn(T, hi, di, generator=g, **bf), torch.randn(S, di, generator=g, **bf)
        ws, lses = torch.randn(T, hi, generator=g), torch.rand(T, h, generator=g)
        tiled = L.config_for(64, divmod(arch, 10))  # a tile of at most 64 attention rows
        with capture_launches() as launches:
            L.indexer_kl_fwd(qs, kvs, None, iqs, iks, ws, None, ks, ke, 0.04, tiled)
            L.indexer_kl_bwd(dkl, qs, kvs, lses, iqs, iks, ws, None, ks, ke, stats, p, 0.04, tiled)
        cases[f"warmup_kl_loss h{h} d{d} hi{hi} d_i{di}, query-tiled"] = launches
    with capture_launches() as launches:
        L.indexer_kl_fwd(None, None, None, iq, ik, w, idx, None, None, 0.0, L.config_for(None, divmod(arch, 10)),
                         probs=p)
        L.indexer_kl_bwd(dkl, None, None, None, iq, ik, w, idx, None, None, stats, p, 0.0,
                         L.config_for(None, divmod(arch, 10)))
    cases["sparse_kl_loss_from_probs"] = launches
    with capture_launches() as launches:  # torch.use_deterministic_algorithms(True): dik in a fixed order
        L.indexer_kl_bwd(dkl, None, None, None, iq, ik, w, idx, None, None, stats, p, 0.0, L.config_for(None, divmod(arch, 10)),
                         deterministic=True)
        L.indexer_kl_bwd(dkl, q, kv, lse, iq, ik, w, None, ks, ke, stats, p, 0.04, cfg, deterministic=True)
    cases["kl_loss bwd, deterministic"] = launches
    return cases


def indexer_launches(arch: int = 90) -> dict[str, list]:
    """The launches of the indexer top-k (prefill and decode) at the real widths (H_I 64,
    d_I 128, topk 2048) with the block sizes a GPU of compute capability ``arch`` gets, by
    case name."""
    from flashdsa.layout import PAGE_SIZE, indexer_block_bytes
    from flashdsa.ops import indexer as I
    from flashdsa.ops.indexer import paged as P
    from flashdsa.ops.indexer import scores as Sc
    from flashdsa.ops.indexer import threshold as Th

    g = torch.Generator().manual_seed(0)
    S, H, D, topk = 64, 64, 128, 2048
    cases = {}
    with dispatch_as(arch):
        for s_kv in (8192, 16384, 32768):
            q8 = torch.randn(S, H, D, generator=g).to(torch.float8_e4m3fn)
            k8 = torch.randn(s_kv, D, generator=g).to(torch.float8_e4m3fn)
            ke = torch.arange(s_kv - S + 1, s_kv + 1, dtype=torch.int32)
            p = I.ragged_problem(q8, k8, torch.rand(s_kv, generator=g), torch.randn(S, H, generator=g),
                                 torch.zeros_like(ke), ke)
            with capture_launches() as launches:
                I.direct_topk(p, topk, 4 * p.cfg["BLOCK_N"])
            cases[f"direct top-k {s_kv // 1024}K"] = launches[1:]  # (the scores kernel: below)
        for warps in (4, 8):
            with capture_launches() as launches, mock.patch.object(Th, "select_warps", lambda p, w=warps: w):
                I.threshold_topk(p, topk, 4 * p.cfg["BLOCK_N"])
            cases[f"threshold top-k 32K, select {warps} warps"] = launches if warps == 4 else launches[3:]
        few_rows = mock.patch.object(Th, "select_warps", lambda p: 8)  # a decode batch: fewer rows than SMs
        with capture_launches() as launches, few_rows:
            I.threshold_topk(p, topk, 4 * p.cfg["BLOCK_N"], n_split=8)
        cases["threshold top-k, atomic appends"] = launches[2:]
        with capture_launches() as launches:
            I.streaming_topk(p, topk, 4 * p.cfg["BLOCK_N"], out=torch.empty(S, topk, dtype=torch.int32),
                             fail=torch.zeros(S, dtype=torch.int32))
        cases["streaming top-k (fallback)"] = launches
        bsz, ctx = 4, 32768
        blocks = ctx // PAGE_SIZE
        cache = torch.zeros(bsz * blocks, indexer_block_bytes(D), dtype=torch.uint8)
        bt = torch.arange(bsz * blocks, dtype=torch.int32).view(bsz, blocks)
        cl = torch.full((bsz,), ctx, dtype=torch.int32)
        q8 = torch.randn(bsz, 1, H, D, generator=g).to(torch.float8_e4m3fn)
        pp = P.paged_problem(q8, cache, torch.randn(bsz, H, generator=g), cl, bt, ctx,
                             P.PAGED_SM90["logits"] if arch >= 90 else None)
        h200 = mock.patch.object(Sc, "num_sms", lambda device: 132)  # the key axis split as on an H200
        with capture_launches() as launches, few_rows, h200:
            I.direct_topk(pp, topk, 8 * pp.cfg["BLOCK_N"])
            I.threshold_topk(pp, topk, 8 * pp.cfg["BLOCK_N"])
        cases["paged top-k 32K (direct, threshold)"] = launches
    return cases


def decode_launches(arch: int = 90) -> dict[str, list]:
    """The launches of the paged sparse MLA decode (bf16 and fp8_ds_mla caches; batch 4 x
    s_q 2, 128 heads, top-k 2048, split-k 4) with the block sizes a GPU of compute
    capability ``arch`` gets, of the indexer's fused FP8 operands (64 tokens, 64 x 128
    queries) and key-cache write, and of the inference RMSNorm and RoPE kernels, by case name."""
    from flashdsa.layout import MLA_FP8_BYTES
    from flashdsa.ops.sparse_mla import fwd as F
    from flashdsa.ops.sparse_mla.decode import ONE_QUERY_SM90, sparse_mla_decode

    g = torch.Generator().manual_seed(0)
    b, s_q, h, topk, blocks = 4, 2, 128, 2048, 256
    q = torch.randn(b, s_q, h, 576, generator=g, dtype=torch.bfloat16)
    idx = torch.randint(0, blocks * 64, (b, s_q, topk), dtype=torch.int32, generator=g)
    cases = {}
    for fmt, cache in (("bf16", torch.zeros(blocks, 64, 1, 576, dtype=torch.bfloat16)),
                       ("fp8_ds_mla", torch.zeros(blocks, 64, 1, MLA_FP8_BYTES, dtype=torch.uint8))):
        with capture_launches() as launches, dispatch_as(arch):
            cfg = F.default_config(torch.device("cuda"), h, 512, fmt != "bf16")   # what that GPU gets
            sparse_mla_decode(q, cache, idx, 0.04, 512, fmt, n_split=4, config=cfg)
            if fmt == "bf16":   # one query token on Hopper: 16 heads a program
                sparse_mla_decode(q[:1, :1], cache, idx[:1, :1], 0.04, 512, fmt, n_split=16,
                                  config=dict(cfg, **ONE_QUERY_SM90))
        cases[f"sparse_mla_decode {fmt}"] = launches
    from flashdsa.cache import PagedIndexerCache
    from flashdsa.ops.indexer import indexer_cache_write
    from flashdsa.ops.indexer.prep import indexer_operands
    t, hi, d = 64, 64, 128
    cos, sin = torch.randn(t, 32), torch.randn(t, 32)
    had = torch.randn(d, d, dtype=torch.bfloat16)
    with capture_launches() as launches, dispatch_as(arch):
        indexer_operands(torch.randn(t, hi, d, dtype=torch.bfloat16), torch.randn(t, hi, dtype=torch.bfloat16),
                         torch.randn(t, d, dtype=torch.bfloat16), torch.nn.LayerNorm(d), cos, sin, 64, had,
                         PagedIndexerCache(4, d).kv, torch.arange(t))
        indexer_cache_write(PagedIndexerCache(4, d).kv, torch.randn(t, d, dtype=torch.bfloat16), torch.arange(t))
    cases["indexer fp8 operands (q and k to cache; cache write)"] = launches
    from flashdsa.ops.norm_rope import rms_norm, rope_cos_sin, rope_interleaved
    with capture_launches() as launches:
        for d in (7168, 1536, 512):
            rms_norm(torch.randn(1, d, dtype=torch.bfloat16), torch.ones(d), 1e-6)
        rope_interleaved(torch.randn(4, 128, 64, dtype=torch.bfloat16), cos, sin)
        rope_cos_sin(torch.arange(t), torch.rand(32), 0.8)
    cases["rms_norm, rope, rope cos/sin (hidden, q_lora, kv_lora; 128 heads)"] = launches
    from flashdsa.ops.mla_cache import write_latent_rows
    with capture_launches() as launches:
        kv_pe = torch.randn(t, 576, dtype=torch.bfloat16)
        write_latent_rows(torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16), "bf16", kv_pe, torch.ones(512), 1e-6,
                          cos, sin, torch.arange(t))
        write_latent_rows(torch.zeros(2, 64, 1, 656, dtype=torch.uint8), "fp8_ds_mla", kv_pe, torch.ones(512),
                          1e-6, cos, sin, torch.arange(t))
    cases["latent cache write (RMSNorm + RoPE + store; bf16, fp8_ds_mla)"] = launches
    return cases


def gluon_launches(arch: int = 90) -> dict[str, list]:
    """The launches of the Gluon kernels: the sparse MLA forward (flashdsa/ops/sparse_mla/
    fwd_sm90.py) at 64 and 128 heads, over bf16 rows and over fp8_ds_mla rows, and the
    indexer's threshold filter (flashdsa/ops/indexer/filter_sm90.py); they are built for
    sm_90 only (no case for other targets)."""
    if arch != 90:
        return {}
    from flashdsa.layout import MLA_FP8_BYTES, MLA_ROPE_OFF, MLA_SCALE_OFF, mla_byte_views
    from flashdsa.ops.sparse_mla.fwd_sm90 import run_sparse_mla_decode_sm90_fp8, run_sparse_mla_fwd_sm90

    g = torch.Generator().manual_seed(0)
    cases = {}
    for h in (64, 128):
        q = torch.randn(8, h, 576, generator=g, dtype=torch.bfloat16)
        kv = torch.randn(1024, 576, generator=g, dtype=torch.bfloat16)
        idx = torch.randint(0, 1024, (8, 2048), dtype=torch.int32, generator=g)
        with capture_launches() as launches:
            run_sparse_mla_fwd_sm90(q, kv, idx, 0.04)
        cases[f"sparse_mla_fwd gluon h{h}"] = launches
    c8, sc, pe = mla_byte_views(torch.zeros(1024, MLA_FP8_BYTES, dtype=torch.uint8))
    with capture_launches() as launches:
        run_sparse_mla_decode_sm90_fp8(q, c8, sc[:, MLA_SCALE_OFF:], pe[:, MLA_ROPE_OFF:], idx, 0.04)
    cases["sparse_mla_decode gluon fp8_ds_mla h128"] = launches
    from flashdsa.ops.indexer import ragged_problem
    from flashdsa.ops.indexer.filter_sm90 import run_filter_sm90

    with dispatch_as(90):   # the indexer's sm90 block sizes, e4m3 operands
        s, s_kv = 64, 32768
        ke = torch.arange(s_kv - s + 1, s_kv + 1, dtype=torch.int32)
        p = ragged_problem(torch.randn(s, 64, 128, generator=g).to(torch.float8_e4m3fn),
                           torch.randn(s_kv, 128, generator=g).to(torch.float8_e4m3fn),
                           torch.rand(s_kv, generator=g), torch.randn(s, 64, generator=g), torch.zeros_like(ke), ke)
        n = p.rows * p.cfg["BLOCK_N"]
        buf = torch.zeros(n * 64, dtype=torch.int32)
        with capture_launches() as launches:
            run_filter_sm90(p, (1, s_kv), torch.zeros(s, dtype=torch.int32), buf, buf, buf[:n], 64)
    cases["indexer threshold filter gluon"] = launches
    return cases


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT),
                    help="compute capabilities to build for, with the configurations each gets (default 90)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a kernel does not build or needs more shared memory than its target has, "
                         "or if a Gluon kernel spills registers")
    ap.add_argument("--json", default=None, help="also write every kernel's row (by target and case) here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    over = 0
    from benchmarks.common import environment

    report = {**environment(), "shared_limit": {}, "rows": []}
    for arch in args.arch:
        limit = SHARED_LIMIT[arch]
        report["shared_limit"][f"sm_{arch}"] = limit
        print(f"triton {triton.__version__}, target sm_{arch}; shared memory limit {limit} bytes")
        cases = {**training_launches(arch), **indexer_launches(arch), **decode_launches(arch), **gluon_launches(arch)}
        for case, launches in cases.items():
            for r in build(launches, arch, keep_going=True):
                report["rows"].append(dict(target=f"sm_{arch}", case=case, **r,
                                           over_limit="error" not in r and r["shared"] > limit))
                if "error" in r:
                    print(f"sm_{arch} {case:34s} {r['kernel']:34s} BUILD ERROR: {r['error']}", flush=True)
                    over += 1
                    continue
                flag = "  SPILLS" if r["spill_stack"] else ""
                if r["spill_stack"] and "gluon" in case:
                    flag += " (a Gluon kernel: its registers are laid out by hand)"
                    over += 1
                if r["shared"] > limit:
                    flag += "  OVER SHARED LIMIT"
                    over += 1
                loop = (f"  loop {r['loop']['instr']:4d} instr, {r['loop']['BAR']:2d} BAR, "
                        f"{r['loop']['STS'] + r['loop']['LDS']:2d} STS/LDS" if "loop" in r else "")
                print(f"sm_{arch} {case:34s} {r['kernel']:34s} warps {r['num_warps']} stages {r['num_stages']}  "
                      f"shared {r['shared']:6d}  regs {r['regs']:3d}  spill {r['spill_stack']:4d}{loop}{flag}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.check and over:
        raise SystemExit(f"{over} kernel(s) over the shared memory limit, not built, or a Gluon kernel spilling")


if __name__ == "__main__":
    main()
