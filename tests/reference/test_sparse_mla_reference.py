"""sparse_mla_fwd / dense_mla_fwd references against dense attention with a mask."""
import pytest
import torch

import flashdsa


def _masked_dense(q, kv, mask, sm_scale, d_v):
    """Plain attention of every query over all kv rows, with the non-selected rows masked."""
    logits = torch.einsum("shd,kd->shk", q, kv[:, 0]) * sm_scale
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(logits, -1) @ kv[:, 0, :d_v], logits


@pytest.mark.parametrize("s_q,h_q,d_qk,d_v,s_kv,topk", [(7, 3, 24, 16, 19, 5), (4, 16, 40, 32, 33, 33)])
def test_sparse_equals_masked_dense(s_q, h_q, d_qk, d_v, s_kv, topk):
    q = torch.randn(s_q, h_q, d_qk, dtype=torch.float64)
    kv = torch.randn(s_kv, 1, d_qk, dtype=torch.float64)
    idx = torch.stack([torch.randperm(s_kv)[:topk] for _ in range(s_q)]).to(torch.int32)[:, None, :]
    mask = torch.zeros(s_q, s_kv, dtype=torch.bool).scatter_(1, idx[:, 0].long(), True)
    out, max_logits, lse = flashdsa.sparse_mla_fwd(q, kv, idx, 0.37, d_v)
    want, logits = _masked_dense(q, kv, mask, 0.37, d_v)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(max_logits, logits.amax(-1))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    # lse and out agree: out = sum_j exp(logit_j - lse) v_j
    rows = kv[idx[:, 0].long(), 0]
    l_sel = torch.einsum("shd,skd->shk", q, rows) * 0.37
    torch.testing.assert_close(out, torch.einsum("shk,skd->shd", torch.exp(l_sel - lse[..., None]), rows[..., :d_v]))


def test_permutation_and_invalid_indices_are_ignored():
    s_q, h_q, d, s_kv, topk = 6, 4, 32, 23, 9
    q = torch.randn(s_q, h_q, d, dtype=torch.float64)
    kv = torch.randn(s_kv, 1, d, dtype=torch.float64)
    idx = torch.stack([torch.randperm(s_kv)[:topk] for _ in range(s_q)]).to(torch.int32)[:, None, :]
    base = flashdsa.sparse_mla_fwd(q, kv, idx, 0.2, 16)
    perm = idx[:, :, torch.randperm(topk)]
    for a, b in zip(base, flashdsa.sparse_mla_fwd(q, kv, perm, 0.2, 16)):
        torch.testing.assert_close(a, b)
    junk = torch.tensor([-1, s_kv, s_kv + 100, -1], dtype=torch.int32).expand(s_q, 1, 4)
    padded = torch.cat((junk[..., :2], idx, junk[..., 2:]), -1)
    for a, b in zip(base, flashdsa.sparse_mla_fwd(q, kv, padded, 0.2, 16)):
        torch.testing.assert_close(a, b)


def test_row_with_no_valid_index():
    q = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(5, 1, 8, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[0, 4, -1]], [[-1, 5, 99]], [[2, -1, 2]]], dtype=torch.int32)
    out, max_logits, lse = flashdsa.sparse_mla_fwd(q, kv, idx, 1.0, 8)
    assert (out[1] == 0).all() and (max_logits[1] == float("-inf")).all() and (lse[1] == float("inf")).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[[0, 2]]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kv.grad).all() and (q.grad[1] == 0).all()


def test_reference_gradcheck():
    q = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(7, 1, 6, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[[0, 3, -1, 6]], [[1, 1, 2, 9]], [[5, 4, 0, 2]]], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, b: flashdsa.sparse_mla_fwd(a, b, idx, 0.5, 4)[0], (q, kv))


def test_dense_equals_sparse_with_all_causal_rows():
    lens = [5, 1, 8]
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    t, h, d, d_v = sum(lens), 3, 20, 12
    q = torch.randn(t, h, d, dtype=torch.float64)
    kv = torch.randn(t, 1, d, dtype=torch.float64)
    idx = torch.full((t, 1, 8), -1, dtype=torch.int32)
    for b in range(3):
        for r in range(int(cu[b]), int(cu[b + 1])):
            idx[r, 0, : r - int(cu[b]) + 1] = torch.arange(int(cu[b]), r + 1)
    out, lse = flashdsa.dense_mla_fwd(q, kv, cu, 0.3, d_v)
    s_out, _, s_lse = flashdsa.sparse_mla_fwd(q, kv, idx, 0.3, d_v)
    torch.testing.assert_close(out, s_out)
    torch.testing.assert_close(lse, s_lse)
