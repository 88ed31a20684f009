"""Bad inputs at the public boundary raise clear errors naming the argument."""
import pytest
import torch

import flashdsa


def _mla(s_q=4, h=2, d=24, s_kv=9, topk=3):
    return (torch.randn(s_q, h, d), torch.randn(s_kv, 1, d),
            torch.zeros(s_q, 1, topk, dtype=torch.int32))


@pytest.mark.parametrize("case,exc,match", [
    ("kv_head_dim", ValueError, r"kv: expected shape \[\*, 1, 24\]"),
    ("kv_heads", ValueError, r"kv: expected shape \[\*, 1, 24\]"),
    ("kv_dtype", TypeError, "expected one dtype for q, kv"),
    ("q_rank", ValueError, r"q: expected a 3-d tensor \[s_q, h_q, d_qk\]"),
    ("q_int", TypeError, "q: expected dtype"),
    ("idx_dtype", TypeError, r"indices: expected dtype in \(int32\)"),
    ("idx_shape", ValueError, r"indices: expected shape \[4, 1, \*\]"),
    ("d_v", ValueError, r"d_v: expected an int in \[1, d_qk=24\]"),
    ("backend", ValueError, "backend: expected one of"),
    ("probs_precision", ValueError, "probs_precision: expected one of"),
    ("sm_scale", ValueError, "sm_scale: required, got None"),
])
def test_sparse_mla_bad_inputs(case, exc, match):
    q, kv, idx = _mla()
    kw = dict(sm_scale=0.1, d_v=16)
    if case == "kv_head_dim":
        kv = torch.randn(9, 1, 20)
    elif case == "kv_heads":
        kv = torch.randn(9, 2, 24)
    elif case == "kv_dtype":
        kv = kv.double()
    elif case == "q_rank":
        q = q[0]
    elif case == "q_int":
        q = q.long()
    elif case == "idx_dtype":
        idx = idx.long()
    elif case == "idx_shape":
        idx = torch.zeros(5, 1, 3, dtype=torch.int32)
    elif case == "d_v":
        kw["d_v"] = 32
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "probs_precision":
        kw.update(return_probs=True, probs_precision="fp8")
    elif case == "sm_scale":
        kw["sm_scale"] = None
    with pytest.raises(exc, match=match):
        flashdsa.sparse_mla_fwd(q, kv, idx, **kw)


def _indexer(s=4, h=2, d=16, s_kv=6):
    return dict(q8=torch.randn(s, h, d), k8=torch.randn(s_kv, d), k_scale=torch.ones(s_kv),
                weights=torch.ones(s, h), ks=torch.zeros(s, dtype=torch.int32),
                ke=torch.full((s,), s_kv, dtype=torch.int32))


@pytest.mark.parametrize("case,exc,match", [
    ("ks_gt_ke", ValueError, "ks must be <= ke for every row, row 2"),
    ("ke_too_big", ValueError, r"must lie in \[0, 6\]"),
    ("k_dim", ValueError, r"k8: expected shape \[\*, 16\]"),
    ("k_dtype", TypeError, "k8: expected dtype"),
    ("weights_shape", ValueError, r"weights: expected shape \[4, 2\]"),
    ("ks_dtype", TypeError, r"ks: expected dtype in \(int32\)"),
])
def test_indexer_bad_inputs(case, exc, match):
    a = _indexer()
    if case == "ks_gt_ke":
        a["ks"][2], a["ke"][2] = 5, 3
    elif case == "ke_too_big":
        a["ke"][0] = 7
    elif case == "k_dim":
        a["k8"] = torch.randn(6, 8)
    elif case == "k_dtype":
        a["k8"] = a["k8"].half()
    elif case == "weights_shape":
        a["weights"] = torch.ones(4, 3)
    elif case == "ks_dtype":
        a["ks"] = a["ks"].long()
    with pytest.raises(exc, match=match):
        flashdsa.indexer_logits(**a)
    with pytest.raises(exc, match=match):
        flashdsa.indexer_topk(**a, topk=2)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="power of two"):
        flashdsa.hadamard_transform(torch.randn(2, 96))
    with pytest.raises(ValueError, match="multiple of block_size=128"):
        flashdsa.act_quant(torch.randn(3, 100))
    with pytest.raises(ValueError, match="topk: expected a positive int"):
        flashdsa.topk_indices(torch.randn(2, 3), torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to 5"):
        flashdsa.dense_mla_fwd(torch.randn(5, 2, 8), torch.randn(5, 1, 8), torch.tensor([0, 3, 2, 5]), 0.3, d_v=8)
    with pytest.raises(NotImplementedError, match="no Triton kernel"):
        flashdsa.hadamard_transform(torch.randn(2, 8), backend="triton")


def _loss_inputs(T=5, H=2, d_qk=24, HI=3, DI=16, S=9, topk=4):
    return dict(iq=torch.randn(T, HI, DI), ik=torch.randn(S, DI), weights=torch.randn(T, HI),
                q=torch.randn(T, H, d_qk), kv=torch.randn(S, 1, d_qk), lse=torch.randn(T, H),
                indices=torch.zeros(T, 1, topk, dtype=torch.int32), attn_probs=torch.rand(T, topk),
                ks=torch.zeros(T, dtype=torch.int32), ke=torch.arange(1, T + 1, dtype=torch.int32))


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("loss,arg,bad,exc,match", [
    ("from_probs", "attn_probs", torch.rand(5, 5), ValueError, r"attn_probs: expected shape \[5, 4\]"),
    ("from_probs", "weights", torch.randn(5, 4), ValueError, r"weights: expected shape \[5, 3\]"),
    ("from_probs", "ik", torch.randn(9, 18), ValueError, r"ik: expected shape \[\*, 16\]"),
    ("from_probs", "ik", torch.randn(9, 16).double(), TypeError, "expected one dtype for iq, ik"),
    ("from_probs", "indices", torch.zeros(6, 1, 4, dtype=torch.int32), ValueError, r"indices: expected shape \[5, 1, \*\]"),
    ("from_probs", "indices", torch.zeros(5, 1, 4), TypeError, "indices: expected dtype"),
    ("from_probs", "iq", torch.randn(5, 48), ValueError, r"iq: expected a 3-d tensor \[T, H_I, d_I\]"),
    ("sparse", "kv", torch.randn(8, 1, 24), ValueError, r"kv: expected shape \[9, 1, 24\]"),
    ("sparse", "q", torch.randn(4, 2, 24), ValueError, r"q: expected shape \[5, \*, \*\]"),
    ("sparse", "lse", torch.randn(5, 3), ValueError, r"lse: expected shape \[5, 2\]"),
    ("warmup", "ke", torch.arange(1, 5, dtype=torch.int32), ValueError, r"ke: expected shape \[5\]"),
    ("warmup", "ks", torch.zeros(5), TypeError, "ks: expected dtype"),
])
def test_indexer_loss_bad_inputs(impl, loss, arg, bad, exc, match):
    """The public indexer losses reject malformed arguments by name on both backends (the
    kernels would otherwise read out of bounds or give a silent wrong answer)."""
    x = _loss_inputs()
    x[arg] = bad
    calls = {
        "from_probs": lambda: flashdsa.sparse_kl_loss_from_probs(x["iq"], x["ik"], x["weights"], x["attn_probs"],
                                                                 x["indices"], backend=impl),
        "sparse": lambda: flashdsa.sparse_kl_loss(x["iq"], x["ik"], x["weights"], x["q"], x["kv"], x["lse"], 0.2,
                                                  x["indices"], backend=impl),
        "warmup": lambda: flashdsa.warmup_kl_loss(x["iq"], x["ik"], x["weights"], x["q"], x["kv"], x["lse"], 0.2,
                                                  x["ks"], x["ke"], backend=impl),
    }
    with pytest.raises(exc, match=match):
        calls[loss]()
