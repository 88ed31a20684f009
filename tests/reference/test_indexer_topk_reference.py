"""indexer_logits / topk_indices references against explicit loops."""
import pytest
import torch

import flashdsa


def _ragged_ranges(s, s_kv):
    ks = torch.randint(0, s_kv, (s,), dtype=torch.int32)
    ke = torch.minimum(ks + torch.randint(0, s_kv, (s,), dtype=torch.int32), torch.tensor(s_kv, dtype=torch.int32))
    return ks, ke


def test_indexer_logits_equals_relu_weighted_formula():
    s, h, d, s_kv = 5, 3, 8, 11
    q = torch.randn(s, h, d, dtype=torch.float64)
    k = torch.randn(s_kv, d, dtype=torch.float64)
    k_scale = torch.rand(s_kv, dtype=torch.float64) + 0.5
    w = torch.randn(s, h, dtype=torch.float64)
    ks, ke = _ragged_ranges(s, s_kv)
    got = flashdsa.indexer_logits(q, k, k_scale, w, ks, ke)
    for t in range(s):
        for j in range(s_kv):
            if ks[t] <= j < ke[t]:
                want = k_scale[j] * sum(w[t, i] * max(float(q[t, i] @ k[j]), 0.0) for i in range(h))
                assert abs(float(got[t, j]) - float(want)) <= 1e-12 * (1 + abs(float(want)))
            else:
                assert got[t, j] == float("-inf")


def test_indexer_logits_fp8_inputs_match_dequantized_math():
    s, h, d, s_kv = 6, 4, 128, 9
    q8, q_scale = flashdsa.act_quant(torch.randn(s, h, d), d)
    k8, k_scale = flashdsa.act_quant(torch.randn(s_kv, d), d)
    w = torch.randn(s, h)
    ks, ke = torch.zeros(s, dtype=torch.int32), torch.full((s,), s_kv, dtype=torch.int32)
    got = flashdsa.indexer_logits(q8, k8, k_scale[:, 0], w, ks, ke)
    want = torch.einsum("th,ths->ts", w.double(), torch.einsum("thd,sd->ths", q8.double(), k8.double()).relu())
    want = want * k_scale[:, 0].double()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 4, 13, 40])
def test_topk_picks_largest_inside_range(topk):
    s, s_kv = 17, 29
    logits = torch.randn(s, s_kv, dtype=torch.float64)
    ks, ke = _ragged_ranges(s, s_kv)
    idx = flashdsa.topk_indices(logits, ks, ke, topk)
    assert idx.shape == (s, topk) and idx.dtype == torch.int32
    for t in range(s):
        chosen = idx[t][idx[t] >= 0].long()
        n = int(ke[t] - ks[t])
        assert len(chosen) == min(topk, n) and (idx[t][len(chosen):] == -1).all(), "-1 padding at the end"
        assert len(set(chosen.tolist())) == len(chosen)
        assert ((chosen >= ks[t]) & (chosen < ke[t])).all()
        want = logits[t, ks[t]:ke[t]].sort(descending=True).values[:topk]
        torch.testing.assert_close(logits[t, chosen].sort(descending=True).values, want, rtol=0, atol=0)


def test_indexer_topk_chunked_reference_equals_unfused():
    s, h, d, s_kv, topk = 37, 2, 16, 41, 7
    q, k = torch.randn(s, h, d), torch.randn(s_kv, d)
    k_scale, w = torch.rand(s_kv) + 0.1, torch.rand(s, h)
    ks, ke = _ragged_ranges(s, s_kv)
    logits = flashdsa.indexer_logits(q, k, k_scale, w, ks, ke)
    got = flashdsa.indexer_topk(q, k, k_scale, w, ks, ke, topk, backend="reference", chunk=5)
    want = flashdsa.topk_indices(logits, ks, ke, topk)
    sel = lambda ix: torch.where(ix >= 0, logits.gather(1, ix.long().clamp_min(0)), float("-inf"))
    torch.testing.assert_close(sel(got).sort(1).values, sel(want).sort(1).values)
