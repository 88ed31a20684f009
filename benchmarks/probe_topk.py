"""Probe for the indexer top-k (issue 17), variants run: an in-register exact select over
materialized score rows by three k-th-largest searches (bisection; interpolation
steps; interpolation, then compaction of the last candidates to scratch), by row
length and warp count, and the k-th largest of the sample rows against torch.topk.

    python -m benchmarks.probe_topk      # -> $OUT/probe_topk2.json (or benchmarks/results/)
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_indexer import S_Q, TOPK, decode_inputs, prefill_inputs  # noqa: E402
from benchmarks.common import bench_ms, environment, measure_ceilings  # noqa: E402
from flashdsa.ops import indexer as ops  # noqa: E402
from flashdsa.ops.indexer.selection import INT32_MIN_C, score_key  # noqa: E402


@triton.jit
def kth_search(keys, valid, nvalid, k, scr_ptr, VARIANT: tl.constexpr, CAP: tl.constexpr):
    """k-th largest key of a row tile. VARIANT 0: bisection of the int32 key range;
    1: interpolation steps (bisection when a step did not halve the band) until the
    band [L, H) holds one key value; 2: as 1 until the band holds at most CAP keys,
    which are then compacted to scratch and bisected there."""
    if VARIANT == 0:
        big = tl.where(valid, keys, INT32_MIN_C)
        lo = tl.min(tl.where(valid, keys, 2147483647), axis=0).to(tl.int64)
        hi = tl.max(big, axis=0).to(tl.int64)
        lo = tl.where(nvalid >= k, lo, hi)
        while hi > lo:
            mid = lo + (hi - lo + 1) // 2
            c = tl.sum((big >= mid.to(tl.int32)).to(tl.int32), axis=0)
            ok = c >= k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        return lo.to(tl.int32)
    else:
        big = tl.where(valid, keys, INT32_MIN_C)
        L = tl.min(tl.where(valid, keys, 2147483647), axis=0).to(tl.int64)
        H = tl.max(big, axis=0).to(tl.int64) + 1
        H = tl.where(nvalid > k, H, L + 1)
        cL = nvalid.to(tl.int64)
        cH = (nvalid * 0).to(tl.int64)
        bis = cH != 0
        lim = 0 if VARIANT == 1 else CAP
        while (H - L > 1) & (cL - cH > lim):
            band = cL - cH
            p = tl.where(bis, L + (H - L) // 2, L + ((H - L) * (cL - k)) // band)
            p = tl.minimum(tl.maximum(p, L + 1), H - 1)
            c = tl.sum((big >= p.to(tl.int32)).to(tl.int32), axis=0).to(tl.int64)
            ok = c >= k
            L = tl.where(ok, p, L)
            cL = tl.where(ok, c, cL)
            H = tl.where(ok, H, p)
            cH = tl.where(ok, cH, c)
            bis = 2 * (cL - cH) > band
        if VARIANT == 2:
            if H - L > 1:
                inband = valid & (keys >= L.to(tl.int32)) & (keys < H.to(tl.int32))
                bpos = tl.cumsum(inband.to(tl.int32), axis=0) - 1
                tl.store(scr_ptr + bpos, keys, mask=inband)
                tl.debug_barrier()
                b = tl.arange(0, CAP)
                bk = tl.load(scr_ptr + b, mask=b < (cL - cH), other=INT32_MIN_C)
                k2 = k - cH
                lo = L
                hi = H - 1
                while hi > lo:
                    mid = lo + (hi - lo + 1) // 2
                    c2 = tl.sum((bk >= mid.to(tl.int32)).to(tl.int32), axis=0)
                    ok2 = c2 >= k2
                    lo = tl.where(ok2, mid, lo)
                    hi = tl.where(ok2, hi, mid - 1)
                L = lo
        return L.to(tl.int32)


@triton.jit
def row_select_kernel(s_ptr, ks_ptr, ke_ptr, out_ptr, scr_ptr, stride_s, topk, BLOCK: tl.constexpr,
                      TOPK_PAD: tl.constexpr, VARIANT: tl.constexpr, CAP: tl.constexpr, KTH_ONLY: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    ks = tl.load(ks_ptr + r)
    ke = tl.load(ke_ptr + r)
    e = tl.arange(0, BLOCK)
    valid = (e >= ks) & (e < ke)
    keys = score_key(tl.load(s_ptr + r * stride_s + e, mask=valid, other=float("-inf")))
    nvalid = tl.sum(valid.to(tl.int32), axis=0)
    T = kth_search(keys, valid, nvalid, topk, scr_ptr + r * CAP, VARIANT, CAP)
    if KTH_ONLY:
        tl.store(out_ptr + r, T)
    else:
        gt = valid & (keys > T)
        eq = valid & (keys == T)
        n_gt = tl.sum(gt.to(tl.int32), axis=0)
        take = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= topk - n_gt))
        take = tl.where(nvalid > topk, take, valid)
        pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
        n_take = tl.minimum(nvalid, topk)
        tl.store(out_ptr + r * topk + pos, e, mask=take)
        p = tl.arange(0, TOPK_PAD)
        tl.store(out_ptr + r * topk + p, tl.full([TOPK_PAD], -1, tl.int32), mask=(p >= n_take) & (p < topk))


def row_select(logits, ks, ke, topk, num_warps, variant=0, cap=1024, kth_only=False):
    rows, n = logits.shape
    out = torch.empty(rows, 1 if kth_only else topk, dtype=torch.int32, device=logits.device)
    scr = torch.empty(rows, cap, dtype=torch.int32, device=logits.device)
    row_select_kernel[(rows,)](logits, ks, ke, out, scr, logits.stride(0), topk, BLOCK=triton.next_power_of_2(n),
                               TOPK_PAD=triton.next_power_of_2(topk), VARIANT=variant, CAP=cap,
                               KTH_ONLY=kth_only, num_warps=num_warps)
    return out


def check(idx, logits, ks, ke, rows):
    worst = 0.0
    for t in rows:
        lg = logits[t]
        sel = idx[t][idx[t] >= 0].long()
        want = min(TOPK, int(ke[t] - ks[t]))
        assert sel.numel() == want and sel.unique().numel() == want, f"row {t}: {sel.numel()} != {want}"
        worst = max(worst, float((lg[sel].sort(descending=True).values - lg.topk(want).values).abs().max()))
    return worst


def main():
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    t0 = time.time()
    res = dict(**environment(), ceilings=measure_ceilings(), prefill=[], decode=[], sample=[])

    def save(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
        with open(os.path.join(out_dir, "probe_topk2.json"), "w") as f:
            json.dump(res, f, indent=1)

    save(res["ceilings"])
    for s_kv in (8192, 16384, 32768):
        inp = prefill_inputs(s_kv)
        ks, ke = inp[4], inp[5]
        r = dict(s_kv=s_kv, logits_ms=bench_ms(lambda: ops.indexer_logits(*inp)))
        logits = ops.indexer_logits(*inp)
        rows = list(range(0, S_Q, S_Q // 16)) + [S_Q - 1]
        for nw in ((4, 8) if s_kv < 32768 else (8, 16)):
            for v in (0, 1, 2):
                for cap in ((1024,) if v < 2 else (512, 2048)):
                    key = f"select_w{nw}_v{v}_cap{cap}"
                    try:
                        r[key + "_ms"] = bench_ms(lambda: row_select(logits, ks, ke, TOPK, nw, v, cap))
                        r[key + "_diff"] = check(row_select(logits, ks, ke, TOPK, nw, v, cap), logits, ks, ke, rows)
                    except Exception as e:
                        r[key + "_error"] = repr(e)[:300]
        del logits
        res["prefill"].append(r)
        save(r)
    for n_s in (512, 2048, 8192):
        samp = torch.randn(S_Q, n_s, device="cuda")
        sks = torch.zeros(S_Q, dtype=torch.int32, device="cuda")
        ske = torch.full((S_Q,), n_s, dtype=torch.int32, device="cuda")
        r = dict(n_s=n_s, torch_topk_ms=bench_ms(lambda: samp.topk(min(n_s, 194), dim=1)))
        for v in (0, 1, 2):
            r[f"kth_w4_v{v}_ms"] = bench_ms(lambda: row_select(samp, sks, ske, min(n_s, 194), 4, v, 512, True))
        res["sample"].append(r)
        save(r)
    for bsz, ctx in ((32, 32768), (128, 32768), (32, 8192), (8, 32768)):
        q8, cache, w, cl, bt = decode_inputs(bsz, ctx)
        width = bt.shape[1] * 64
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ops.paged_indexer_logits(q8, cache, w, cl, bt, width)
        r = dict(batch=bsz, context=ctx, logits_graph_ms=bench_ms(g.replay))
        logits = ops.paged_indexer_logits(q8, cache, w, cl, bt, width)
        ks = torch.zeros(bsz, dtype=torch.int32, device="cuda")
        ke = cl.clone()
        for nw in (8, 16):
            for v in (1, 2):
                r[f"select_w{nw}_v{v}_ms"] = bench_ms(lambda: row_select(logits, ks, ke, TOPK, nw, v, 1024))
        res["decode"].append(r)
        save(r)


if __name__ == "__main__":
    main()
