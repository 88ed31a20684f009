"""Where the time of ``sparse_mla_fwd(return_probs=True)`` goes, by differences.

    python -m benchmarks.probe_probs_store [--heads 64] [--repeat 1]

Builds variants of the forward kernel from its source (each a copy of
flashdsa/ops/sparse_mla.py with one change, imported as its own module) and times each
at the sparse benchmark's shapes (s_q 4096, s_kv 8192, topk 2048, e4m3 scratch). Variants
that drop a store compute wrong probabilities: they only time what the store costs.
Also splits the real forward's time per kernel (torch.profiler).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import torch

from benchmarks.bench_indexer_loss import D_QK, D_V, S_KV, S_Q, TOPK, make
from benchmarks.common import bench_ms, measure_ceilings, print_table, write_result

_P_TMA = "ps_desc.store([pid_t * h_q + pid_h * BLOCK_H, k0], p_st)"
_P_STORE = "tl.store(ps_ptr + pid_t.to(tl.int64) * stride_pst + offs_h[:, None] * stride_psh + kk[None, :],\n" \
           "                         p_st, mask=h_mask[:, None] & (kk < k_end)[None, :])"
_M_STORE = "_store_in_place(ms_ptr + pid_t.to(tl.int64) * stride_mst + (k0 // BLOCK_K) * stride_msb + offs_h, m_use,\n" \
           "                            h_mask, ASM_STORE)"
_PTX_ONLY_BESIDE_TL_STORE = "and not tma and _nvidia_compiled()"
# (name, source edits, config overrides)
VARIANTS = [
    ("as shipped", [], {}),
    ("no m store", [(_M_STORE, "pass")], {}),
    ("no p store", [(_P_TMA, "pass"), (_P_STORE, "pass")], {}),
    ("no stores", [(_P_TMA, "pass"), (_P_STORE, "pass"), (_M_STORE, "pass")], {}),
    ("TMA, maxima by PTX", [(_PTX_ONLY_BESIDE_TL_STORE, "and _nvidia_compiled()")], {}),
    ("p tile by tl.store, maxima by PTX", [], dict(TMA_STORE=False)),
    ("both by tl.store", [], dict(TMA_STORE=False, ASM_STORE=False)),
    ("reduction in 2 warps", [], dict(REDUCE_WARPS=2)),
    ("reduction in 4 warps", [], dict(REDUCE_WARPS=4)),
]


def _variant_module(name: str, edits, tmp: str):
    src = open(os.path.join(os.path.dirname(__file__), "..", "flashdsa", "ops", "sparse_mla.py")).read()
    src = src.replace("from .mla_cache import", "from flashdsa.ops.mla_cache import")
    for old, new in edits:
        if src.count(old) != 1:
            raise RuntimeError(f"variant {name!r}: edit target found {src.count(old)} times")
        src = src.replace(old, new)
    path = os.path.join(tmp, f"sparse_mla_{len(os.listdir(tmp))}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _kernel_ms(fn, n: int = 10) -> dict:
    """Mean device time per call of each kernel that ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = e.self_cuda_time_total
        if t > 0:
            out[e.key[:60]] = t / 1e3 / n
    return out


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, nargs="+", default=[64])
    ap.add_argument("--repeat", type=int, default=1, help="time the variants this many times, in turn")
    args = ap.parse_args()
    ceil = measure_ceilings()
    print("ceilings:", {k: round(v, 1) for k, v in ceil.items()})
    e4 = torch.float8_e4m3fn
    rows, breakdown = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        mods = {name: (_variant_module(name, edits, tmp), cfg) for name, edits, cfg in VARIANTS}
        for h in args.heads:
            q, kv, _, _, _, idx = make(h, S_Q, S_KV, TOPK)
            sm = D_QK ** -0.5
            base = mods["as shipped"][0]
            t_plain = bench_ms(lambda: base.sparse_mla_fwd(q, kv, idx, sm, D_V))
            rows.append(dict(h=h, variant="no probs", ms=t_plain, added_ms=0.0))
            want = base.sparse_mla_fwd(q, kv, idx, sm, D_V, return_probs=True, probs_dtype=e4)[3]
            for rep in range(args.repeat):
                for name, (mod, cfg) in mods.items():
                    cfg = dict(mod.CONFIGS["sm90"], **cfg)
                    fn = lambda: mod.sparse_mla_fwd(q, kv, idx, sm, D_V, return_probs=True,  # noqa: E731
                                                    probs_dtype=e4, config=cfg)
                    got = fn()[3]
                    t = bench_ms(fn)
                    rows.append(dict(h=h, variant=name, rep=rep, ms=t, added_ms=t - t_plain,
                                     probs_rel_err_vs_shipped=float(((got - want).norm() / want.norm()).item())))
            breakdown[h] = _kernel_ms(lambda: base.sparse_mla_fwd(q, kv, idx, sm, D_V, return_probs=True,
                                                                  probs_dtype=e4))
            print(h, breakdown[h])
    path = write_result("probe_probs_store", dict(shapes=dict(s_q=S_Q, s_kv=S_KV, topk=TOPK, d_qk=D_QK, d_v=D_V),
                                                  ceilings=ceil, rows=rows, kernel_ms_shipped=breakdown))
    print_table(rows, ["h", "variant", "rep", "ms", "added_ms", "probs_rel_err_vs_shipped"])
    print("wrote", path)


if __name__ == "__main__":
    main()
