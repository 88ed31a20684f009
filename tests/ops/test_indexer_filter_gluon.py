"""The Hopper Gluon filter of the threshold top-k (flashdsa/ops/indexer/filter_sm90.py).

Gluon kernels do not run in the Triton interpreter, so on CPU this file tests which
problems the Gluon filter takes and that the threshold top-k runs the filter it is given;
tests/test_sm90_build.py compiles the kernel for sm_90 and fails on spills. The GPU tests
(sm_90 only) run the top-k through it at full size against the float64 reference, and its
slots against the Triton filter's.
"""
import dataclasses

import pytest
import torch

from flashdsa.ops import indexer as ops
from flashdsa.ops.indexer import filter_sm90, threshold
from flashdsa.ops.sparse_mla import fwd_sm90
from tests.ops.test_indexer import check_topk, make_inputs, ref64
from tests.utils import requires_cuda

sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                          reason="the Gluon kernels are built for sm_90")
SM90_BLOCKS = dict(BLOCK_N=64, BLOCK_Q=4)


def _served(s=6, s_kv=300, h=64, d=128, **config):
    """A ragged problem of the shape the Gluon filter serves (e4m3 operands, as on a GPU
    with e4m3 dots, whatever this machine's Triton takes)."""
    q8, k8, ksc, w, ks, ke = make_inputs(s, s_kv, h, d, device="cpu")
    p = ops.ragged_problem(q8, k8, ksc, w, ks, ke, dict(SM90_BLOCKS, **config))
    return dataclasses.replace(p, q=q8, k=k8)


def test_gluon_filter_supported_says_why_not(monkeypatch):
    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: None)
    p = _served()
    assert filter_sm90.gluon_filter_supported(p) is None
    assert filter_sm90.filter_launcher(p) is filter_sm90.run_filter_sm90
    assert "ragged" in filter_sm90.gluon_filter_supported(dataclasses.replace(p, paged=True))
    assert "e4m3" in filter_sm90.gluon_filter_supported(_served(h=32))
    assert "e4m3" in filter_sm90.gluon_filter_supported(_served(d=64))
    assert "e4m3" in filter_sm90.gluon_filter_supported(dataclasses.replace(p, q=p.q.view(torch.uint8)))
    assert "BLOCK_N" in filter_sm90.gluon_filter_supported(_served(BLOCK_N=32))
    assert "contiguous" in filter_sm90.gluon_filter_supported(dataclasses.replace(p, w=p.w.t().contiguous().t()))
    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: "built for sm_90")
    assert filter_sm90.gluon_filter_supported(p) == "built for sm_90"
    assert filter_sm90.filter_launcher(p) is None


@pytest.mark.parametrize("n_split, gluon_runs", [(2, True), (8, False)])
def test_threshold_topk_runs_the_filter_it_is_given(monkeypatch, n_split, gluon_runs):
    """Where filter_launcher returns a filter, the threshold top-k's slots pass is that
    filter (here a recorder that runs the Triton filter, so the result stays checkable);
    with the atomic appends of a finely split key axis it is the Triton filter."""
    calls = []

    def recorder(p, split, thr, bkey, bidx, cnt, sc):
        calls.append(split)
        ops.launch_scores(p, ops.SCORES_SLOTS, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)

    monkeypatch.setattr(threshold, "filter_launcher", lambda p: recorder)
    inputs = make_inputs(9, 1500, 4, 32, ranges="causal")
    p = ops.ragged_problem(*inputs)
    idx = ops.select_topk(p, 24, 4 * p.cfg["BLOCK_N"], n_split, method="threshold")
    assert bool(calls) == gluon_runs
    r64 = ref64(*inputs)
    fin = torch.isfinite(r64)
    logits = ops.indexer_logits(*inputs).cpu()
    check_topk(idx, r64, *inputs[4:], 24, 2 * float((logits[fin].double() - r64[fin]).abs().max()) + 1e-12)


def test_paged_filter_split_fills_the_gpu_with_few_rows(monkeypatch):
    """Decode rows split the key axis to about FILTER_PROGRAMS_PER_SM programs an SM, with
    at least FILTER_MIN_TILES key tiles a program and never fewer splits than choose_split
    gives (batch 1 x 4K: its 32); prefill rows keep choose_split's split, and an explicit
    n_split is kept."""
    from flashdsa.ops.indexer import scores

    monkeypatch.setattr(scores, "num_sms", lambda device: 132)
    monkeypatch.setattr(threshold, "num_sms", lambda device: 132)
    bn = 128
    for bsz, n_pos, want in [(1, 131072, 256), (4, 131072, 256), (32, 32768, 32), (128, 131072, 9), (1, 4096, 32)]:
        p = dataclasses.replace(_served(), paged=True, n_pos=n_pos, ctx=torch.zeros(bsz, dtype=torch.int32),
                                cfg=dict(BLOCK_N=bn, BLOCK_Q=1))
        n_split, split_len = threshold.filter_split(p, bn)
        assert n_split == want and split_len % bn == 0 and n_split * split_len >= n_pos, (bsz, n_pos, n_split)
        assert threshold.filter_split(p, bn, n_split=3)[0] == 3
    p = _served(s=64, s_kv=32768)
    assert threshold.filter_split(p, 256) == scores.choose_split(p.n_prog(), p.n_pos, 64, p.q.device, 256)


def _adversarial_ranges(s, s_kv, topk, device):
    """The last s of s_kv tokens of a causal sequence, but row 0 empty, row 1 shorter than
    topk, row 2 exactly topk keys from an odd offset, row 3 from key 5 to the end."""
    ke = torch.arange(s_kv - s + 1, s_kv + 1, device=device)
    ks = torch.zeros_like(ke)
    ks[0], ke[0] = 17, 17
    ks[1], ke[1] = 40, 40 + topk // 3
    ks[2], ke[2] = 1001, 1001 + topk
    ks[3] = 5
    return ks.int(), ke.int()


@requires_cuda
@sm90
@pytest.mark.parametrize("s, s_kv", [(4096, 32768), (333, 9001), (1000, 20000)])
def test_gpu_gluon_filter_topk_matches_float64_reference(s, s_kv):
    """bench_indexer's prefill shape and odd ones, with adversarial ranges: the threshold
    top-k through the Gluon filter selects the float64 reference's top-k scores (up to the
    fp8 dot's rounding, measured on these inputs) on sampled rows, before and after the
    fallback; its slot counts equal the Triton filter's."""
    topk = 2048
    q8, k8, ksc, w, _, _ = make_inputs(s, s_kv, 64, 128, device="cuda")
    ks, ke = _adversarial_ranges(s, s_kv, topk, "cuda")
    p = ops.ragged_problem(q8, k8, ksc, w, ks, ke)
    assert filter_sm90.filter_launcher(p) is filter_sm90.run_filter_sm90
    rows = torch.cat([torch.arange(4), torch.randperm(s - 4)[:44] + 4]).sort().values
    sub = (q8[rows], k8, ksc, w[rows], ks[rows], ke[rows])
    r64 = ref64(*sub)
    logits = ops.indexer_logits(*sub).cpu()
    fin = torch.isfinite(r64)
    atol = 2 * float((logits[fin].double() - r64[fin]).abs().max()) + 1e-12
    out, fail = threshold.threshold_topk(p, topk, 4 * p.cfg["BLOCK_N"])
    ok = (fail.cpu()[rows] == 0).nonzero()[:, 0]
    check_topk(out.cpu()[rows][ok], r64[ok], ks.cpu()[rows][ok], ke.cpu()[rows][ok], topk, atol)
    idx = threshold.select_topk(p, topk, 4 * p.cfg["BLOCK_N"], method="threshold")
    check_topk(idx.cpu()[rows], r64, ks.cpu()[rows], ke.cpu()[rows], topk, atol)

    # the slots against the Triton filter's, from the same thresholds
    split = threshold.filter_split(p, 4 * p.cfg["BLOCK_N"])
    cap = threshold.candidate_capacity(topk, p.n_pos, True)
    n_slots = split[0] * p.cfg["BLOCK_N"]
    sc = -(-cap // n_slots) + 16
    thr = threshold.sample_thresholds(p, topk)
    counts = []
    for run in (filter_sm90.run_filter_sm90, None):
        cnt = torch.full((p.rows * n_slots, ), -7, dtype=torch.int32, device="cuda")
        bkey = torch.empty(p.rows * n_slots * sc, dtype=torch.int32, device="cuda")
        bidx = torch.empty_like(bkey)
        if run is None:
            ops.launch_scores(p, ops.SCORES_SLOTS, split, thr=thr, bkey=bkey, bidx=bidx, cnt=cnt, sc=sc)
        else:
            run(p, split, thr, bkey, bidx, cnt, sc)
        counts.append(cnt.view(p.rows, n_slots))
    assert (counts[0] >= 0).all(), "a slot count was never written"
    assert float((counts[0] == counts[1]).float().mean()) > 0.999
    assert float((counts[0].sum(1) - counts[1].sum(1)).abs().max()) <= 2
