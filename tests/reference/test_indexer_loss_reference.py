"""The naive indexer KL losses (SPEC 5) against an independent per-row computation,
gradcheck in float64, the detached attention side, and warm-up == sparse at full topk."""
import pytest
import torch

from flashdsa import reference as ref
from flashdsa.reference import indexer_loss as ref_loss


def _row_kl_direct(q, kv, sm_scale, iq, ik, w, t, rows):
    """KL for one query row over the key rows ``rows`` (a list, repeats allowed), from
    per-head softmaxes over those rows (no lse) and explicit sums: independent of
    ref_loss._kl_rows."""
    if len(rows) == 0:
        return torch.zeros((), dtype=torch.float64)
    r = torch.tensor(rows)
    a = (q[t] @ kv[r, 0].T) * sm_scale  # [H, n]
    p = torch.softmax(a, dim=-1).mean(0)  # [n]
    p = p / p.sum()
    scores = (w[t][:, None] * (iq[t] @ ik[r].T).clamp_min(0)).sum(0)  # [n]
    logq = scores - torch.logsumexp(scores, 0)
    return (p * (p.log() - logq)).sum()


def _setup(T=9, H=3, d_qk=20, d_v=16, HI=4, DI=8):
    q = torch.randn(T, H, d_qk, dtype=torch.float64)
    kv = torch.randn(T, 1, d_qk, dtype=torch.float64)
    iq = torch.randn(T, HI, DI, dtype=torch.float64)
    ik = torch.randn(T, DI, dtype=torch.float64)
    w = torch.randn(T, HI, dtype=torch.float64)
    return q, kv, iq, ik, w, d_v


def _causal(lens):
    ks, ke = [], []
    s = 0
    for n in lens:
        ks += [s] * n
        ke += list(range(s + 1, s + n + 1))
        s += n
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32), cu


def test_warmup_loss_matches_direct_per_row():
    q, kv, iq, ik, w, d_v = _setup()
    ks, ke, cu = _causal([4, 5])
    _, lse = ref.dense_mla_fwd(q, kv, cu, 0.3, d_v)
    kl = ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke, reduction="none")
    want = torch.stack([_row_kl_direct(q, kv, 0.3, iq, ik, w, t, list(range(ks[t], ke[t])))
                        for t in range(q.shape[0])])
    torch.testing.assert_close(kl, want, rtol=1e-10, atol=1e-12)
    assert (kl >= -1e-12).all()
    torch.testing.assert_close(ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke), want.sum())
    torch.testing.assert_close(ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke, "mean"), want.mean())


def test_sparse_loss_matches_direct_per_row():
    q, kv, iq, ik, w, d_v = _setup()
    T, topk = q.shape[0], 5
    idx = torch.stack([torch.randperm(T)[:topk] for _ in range(T)]).int()
    idx[0, 3:] = -1
    idx[1, 2] = T + 1      # out of range: not a member
    idx[2, 1] = idx[2, 0]  # listed twice: counts twice, as in the attention
    idx[4, :] = -1         # empty row: 0
    idx = idx[:, None]
    _, _, lse = ref.sparse_mla_fwd(q, kv, idx, 0.3, d_v)
    kl = ref_loss.sparse_kl_loss(iq, ik, w, q, kv, lse, 0.3, idx, reduction="none")
    want = torch.stack([_row_kl_direct(q, kv, 0.3, iq, ik, w, t,
                                       [int(r) for r in idx[t, 0] if 0 <= r < T]) for t in range(T)])
    torch.testing.assert_close(kl, want, rtol=1e-10, atol=1e-12)
    assert kl[4] == 0


def test_sparse_from_probs_of_the_attention_equals_sparse_loss():
    """The target handed over by the attention (return_probs) gives the same loss as the
    recomputed one; a rescaled target too (it is L1-normalized per row)."""
    q, kv, iq, ik, w, d_v = _setup()
    T = q.shape[0]
    idx = torch.stack([torch.randperm(T)[:5] for _ in range(T)]).int()
    idx[0, 3:] = -1
    idx[1, 2] = T + 1
    idx[4, :] = -1
    idx = idx[:, None]
    _, _, lse, probs = ref.sparse_mla_fwd(q, kv, idx, 0.3, d_v, return_probs=True)
    want = ref_loss.sparse_kl_loss(iq, ik, w, q, kv, lse, 0.3, idx, reduction="none")
    got = ref_loss.sparse_kl_loss_from_probs(iq, ik, w, probs, idx, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    scaled = probs * torch.rand(T, 1, dtype=probs.dtype).add(0.5)
    torch.testing.assert_close(ref_loss.sparse_kl_loss_from_probs(iq, ik, w, scaled, idx, reduction="none"), want,
                               rtol=1e-10, atol=1e-12)


def test_sparse_with_every_causal_key_equals_warmup():
    q, kv, iq, ik, w, d_v = _setup()
    ks, ke, cu = _causal([4, 5])
    T = q.shape[0]
    _, lse = ref.dense_mla_fwd(q, kv, cu, 0.3, d_v)
    idx = torch.full((T, 1, 7), -1, dtype=torch.int32)
    for t in range(T):
        rows = torch.arange(int(ks[t]), int(ke[t]), dtype=torch.int32)
        idx[t, 0, :len(rows)] = rows.flip(0)
    torch.testing.assert_close(ref_loss.sparse_kl_loss(iq, ik, w, q, kv, lse, 0.3, idx),
                               ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke))


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_gradcheck_float64_and_attention_detached(stage):
    q, kv, iq, ik, w, d_v = _setup(T=6, H=2, d_qk=10, d_v=8, HI=3, DI=5)
    ks, ke, cu = _causal([2, 4])
    T = q.shape[0]
    if stage == "warmup":
        _, lse = ref.dense_mla_fwd(q, kv, cu, 0.5, d_v)
        fn = lambda iq, ik, w: ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.5, ks, ke, "none")  # noqa: E731
    else:
        idx = torch.stack([torch.randperm(T)[:3] for _ in range(T)]).int()[:, None]
        _, _, lse = ref.sparse_mla_fwd(q, kv, idx, 0.5, d_v)
        fn = lambda iq, ik, w: ref_loss.sparse_kl_loss(iq, ik, w, q, kv, lse, 0.5, idx, "none")  # noqa: E731
    args = [x.clone().requires_grad_() for x in (iq, ik, w)]
    assert torch.autograd.gradcheck(fn, args)
    # The target is detached: the attention inputs receive no gradient.
    qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()
    if stage == "warmup":
        loss = ref_loss.warmup_kl_loss(*args, qg, kvg, lse, 0.5, ks, ke)
    else:
        loss = ref_loss.sparse_kl_loss(*args, qg, kvg, lse, 0.5, idx)
    assert loss.grad_fn is not None
    loss.backward()
    assert qg.grad is None and kvg.grad is None


def test_loss_is_zero_when_indexer_matches_target():
    """KL(p || p) = 0: with softmax(I) equal to p the loss vanishes (and is > 0 otherwise)."""
    q, kv, iq, ik, w, d_v = _setup()
    T = q.shape[0]
    ks, ke, cu = _causal([T])
    _, lse = ref.dense_mla_fwd(q, kv, cu, 0.3, d_v)
    p = ref_loss.attention_probs_headsum(q, kv, lse, 0.3)
    member = torch.arange(T)[None, :] < ke[:, None]
    kl_same = ref_loss._kl_rows(p, p.clamp_min(1e-300).log(), member)
    assert kl_same.abs().max() < 1e-12
    assert ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke) > 0


def test_bad_reduction():
    q, kv, iq, ik, w, d_v = _setup()
    ks, ke, cu = _causal([q.shape[0]])
    _, lse = ref.dense_mla_fwd(q, kv, cu, 0.3, d_v)
    with pytest.raises(ValueError, match="reduction"):
        ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke, reduction="avg")


def test_lse_none_equals_the_attention_lse():
    """lse=None (computed inside the loss) gives the loss of the attention's own lse."""
    q, kv, iq, ik, w, d_v = _setup()
    ks, ke, cu = _causal([4, 5])
    _, lse = ref.dense_mla_fwd(q, kv, cu, 0.3, d_v)
    torch.testing.assert_close(ref_loss.warmup_kl_loss(iq, ik, w, q, kv, None, 0.3, ks, ke),
                               ref_loss.warmup_kl_loss(iq, ik, w, q, kv, lse, 0.3, ks, ke))
    T = q.shape[0]
    idx = torch.stack([torch.randperm(T)[:5] for _ in range(T)]).int()
    idx[1, 2] = idx[1, 0]
    idx[2, :] = -1
    idx = idx[:, None]
    _, _, lse = ref.sparse_mla_fwd(q, kv, idx, 0.3, d_v)
    torch.testing.assert_close(ref_loss.sparse_kl_loss(iq, ik, w, q, kv, None, 0.3, idx),
                               ref_loss.sparse_kl_loss(iq, ik, w, q, kv, lse, 0.3, idx))
