"""Probe (issue 17): the threshold select's second pass position-major, ending after the
fullest slot's last entry (the product since this commit), against the slot-major pass
over every slot's capacity (the kernel before, kept here as ``old_select_kernel``).

Both select kernels run on the same candidates (one sample + filter run of the product),
each checked against the other (the same index sets and fail flags), then timed
alternately; the product's whole threshold top-k and the logits are timed beside them.

    python -m benchmarks.probe_select_order [--s-kv 32768 131072] [--repeats 3]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.bench_indexer import S_Q, TOPK, prefill_inputs
from benchmarks.common import bench_ms, measure_ceilings, write_result
from flashdsa.ops import indexer as ops
from flashdsa.ops.indexer import threshold
from flashdsa.ops.indexer.scores import SCORES_SLOTS, launch_scores
from flashdsa.ops.indexer.selection import INT32_MIN_C, chunk_take, kth_cut, scratch
from flashdsa.ops.indexer.threshold import row_length
from flashdsa.ops.common import pdl_prologue
from flashdsa.ops.indexer.filter_sm90 import filter_launcher


@triton.jit
def _old_slot_entries(cnt_ptr, r, n_slots, SC, e, SC_PAD: tl.constexpr):
    """(present mask, offset in the row's slot buffers) of entries e of row r, entry e
    being position e % SC_PAD of slot e // SC_PAD."""
    slot = e // SC_PAD
    cnt = tl.load(cnt_ptr + r * n_slots + slot, mask=slot < n_slots, other=0)
    return (e % SC_PAD) < tl.minimum(cnt, SC), (r * n_slots + slot) * SC + e % SC_PAD


@triton.jit
def old_select_kernel(bkey_ptr, bidx_ptr, cnt_ptr, thr_ptr, ks_ptr, ke_ptr, out_ptr, fail_ptr,
                          n_slots, SC, topk, NEXT_N, n_pos,
                          NS_PAD: tl.constexpr, SC_PAD: tl.constexpr, CHUNK: tl.constexpr,
                          TOPK_PAD: tl.constexpr, PAGED: tl.constexpr, PDL: tl.constexpr = False):
    """Second pass of the threshold top-k, one program a row r: its candidates are
    n_slots slots of SC entries (bkey/bidx [rows, n_slots, SC], counts cnt [rows,
    n_slots]); writes out [r, :topk] (indices, -1 padded) and fail [r] = 1 when the
    candidates cannot give the exact answer: a slot overflowed, or fewer than
    min(topk, n) scores passed the threshold thr [r] (n: :func:`row_length`).
    Two passes (:func:`kth_cut` over the keys of all slots, then :func:`chunk_take`
    over CHUNK entries of the slots at a time, where the indices are read; the next
    chunk's keys are loaded while one is taken). PDL: see flashdsa.ops.common.pdl_prologue."""
    pdl_prologue(PDL)
    r = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, NS_PAD)
    cnt = tl.load(cnt_ptr + r * n_slots + slot, mask=slot < n_slots, other=0)
    c = tl.arange(0, SC_PAD)
    inb = c[None, :] < tl.minimum(cnt, SC)[:, None]
    keys = tl.load(bkey_ptr + ((r * n_slots + slot) * SC)[:, None] + c[None, :], mask=inb, other=INT32_MIN_C)
    keys = tl.reshape(keys, [NS_PAD * SC_PAD])
    nvalid = tl.sum(tl.minimum(cnt, SC), axis=0)
    short = nvalid < tl.minimum(topk, row_length(r, ks_ptr, ke_ptr, NEXT_N, n_pos, PAGED))
    tl.store(fail_ptr + r, ((tl.max(cnt) > SC) | short).to(tl.int32))
    T, n_gt, full, cut = kth_cut(keys, nvalid, tl.load(thr_ptr + r), topk)
    out_row = out_ptr + r * topk
    e2 = tl.arange(0, CHUNK)
    n_take = nvalid * 0
    n_eq = nvalid * 0
    present, off = _old_slot_entries(cnt_ptr, r, n_slots, SC, e2, SC_PAD)
    kk_next = tl.load(bkey_ptr + off, mask=present, other=INT32_MIN_C)
    # one slot (atomic appends): its entries are a prefix, the loop ends with them
    e_end = tl.where(n_slots == 1, nvalid, n_slots * SC_PAD)
    for e0 in range(0, e_end, CHUNK):
        present, off = _old_slot_entries(cnt_ptr, r, n_slots, SC, e0 + e2, SC_PAD)
        kk = kk_next
        present_n, off_n = _old_slot_entries(cnt_ptr, r, n_slots, SC, e0 + CHUNK + e2, SC_PAD)
        kk_next = tl.load(bkey_ptr + off_n, mask=present_n, other=INT32_MIN_C)  # in flight while this chunk is taken
        take, pos, n_take, n_eq = chunk_take(kk, present, T, n_gt, full, cut, topk, n_take, n_eq)
        tl.store(out_row + pos, tl.load(bidx_ptr + off, mask=take, other=-1), mask=take)
    p = tl.arange(0, TOPK_PAD)
    tl.store(out_row + p, tl.full([TOPK_PAD], -1, tl.int32), mask=(p >= n_take) & (p < topk))



def candidates(p, topk):
    """The product's sample and filter (slots mode), as threshold_topk runs them."""
    split = threshold.filter_split(p, 4 * p.cfg["BLOCK_N"])
    assert split[0] <= threshold.SLOTS_MAX_SPLIT
    cap = threshold.candidate_capacity(topk, p.n_pos, True)
    n_slots = split[0] * p.cfg["BLOCK_N"]
    sc = triton.cdiv(cap, n_slots) + 16
    cnt = scratch(p.rows * n_slots, device=p.q.device)
    thr = threshold.sample_thresholds(p, topk)
    bkey = scratch(p.rows * n_slots * sc, device=p.q.device)
    bidx = scratch(p.rows * n_slots * sc, device=p.q.device)
    run_filter = filter_launcher(p)
    if run_filter is not None:
        run_filter(p, split, thr, bkey, bidx, cnt, sc)
    else:
        launch_scores(p, SCORES_SLOTS, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)
    return bkey, bidx, cnt, thr, n_slots, sc


def select(kernel, p, topk, bkey, bidx, cnt, thr, n_slots, sc, chunk):
    out = scratch(p.rows, topk, device=p.q.device)
    fail = scratch(p.rows, device=p.q.device)
    kernel[(p.rows,)](bkey, bidx, cnt, thr, p.ks, p.ke, out, fail, n_slots, sc, topk, p.next_n, p.n_pos,
                      NS_PAD=triton.next_power_of_2(n_slots), SC_PAD=triton.next_power_of_2(sc), CHUNK=chunk,
                      TOPK_PAD=triton.next_power_of_2(topk), PAGED=p.paged, num_warps=threshold.select_warps(p))
    return out, fail


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s-kv", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res = {"ceilings": measure_ceilings(), "cases": []}
    print("ceilings", res["ceilings"], flush=True)
    for s_kv in args.s_kv:
        torch.manual_seed(0)
        inp = prefill_inputs(s_kv)
        p = ops.ragged_problem(*inp)
        bkey, bidx, cnt, thr, n_slots, sc = candidates(p, TOPK)
        ns_pad, sc_pad = triton.next_power_of_2(n_slots), triton.next_power_of_2(sc)
        chunk_old = min(threshold.SELECT_CHUNK, ns_pad * sc_pad)
        chunk_new = max(ns_pad, chunk_old)
        o_old, f_old = select(old_select_kernel, p, TOPK, bkey, bidx, cnt, thr, n_slots, sc, chunk_old)
        o_new, f_new = select(threshold.indexer_select_kernel, p, TOPK, bkey, bidx, cnt, thr, n_slots, sc, chunk_new)
        same = bool(torch.equal(o_old.sort(dim=1).values, o_new.sort(dim=1).values)) and bool(torch.equal(f_old, f_new))
        if not same:  # ties at the k-th score may be cut differently: then the selected scores must agree
            logits = ops.indexer_logits(*inp)
            def scores(o):
                return torch.where(o >= 0, logits.gather(1, o.clamp(min=0).long()), float("-inf")).sort(dim=1).values
            assert torch.equal(f_old, f_new) and torch.equal(scores(o_old), scores(o_new)), f"s_kv {s_kv}: selects differ"
            del logits
        row = {"s_kv": s_kv, "rows": p.rows, "n_slots": n_slots, "slot_capacity": sc, "max_count": int(cnt.max()),
               "mean_count": float(cnt.float().mean()), "flagged": int(f_new.sum()), "same_sets": same,
               "old_select_ms": [], "new_select_ms": [], "topk_ms": [], "logits_ms": []}
        for _ in range(args.repeats):
            row["old_select_ms"].append(bench_ms(lambda: select(old_select_kernel, p, TOPK, bkey, bidx, cnt, thr,
                                                                n_slots, sc, chunk_old)))
            row["new_select_ms"].append(bench_ms(lambda: select(threshold.indexer_select_kernel, p, TOPK, bkey, bidx,
                                                                cnt, thr, n_slots, sc, chunk_new)))
            row["topk_ms"].append(bench_ms(lambda: ops.indexer_topk(*inp, TOPK)))
            row["logits_ms"].append(bench_ms(lambda: ops.indexer_logits(*inp)))
        med = {k: sorted(row[k])[len(row[k]) // 2] for k in ("old_select_ms", "new_select_ms", "topk_ms", "logits_ms")}
        row["median"] = med
        row["topk_over_logits"] = med["topk_ms"] / med["logits_ms"]
        res["cases"].append(row)
        print(row, flush=True)
        del inp, p, bkey, bidx, cnt, thr
        torch.cuda.empty_cache()
    print("written", write_result("probe_select_order", res))


if __name__ == "__main__":
    main()
