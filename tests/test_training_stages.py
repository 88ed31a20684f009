"""The training stages of MLA (SPEC 5), as the two knobs of its forward: warm-up = dense
attention + indexer loss, sparse training = sparse attention + indexer loss. A toy warm-up
run whose KL falls while only the indexer changes; in the sparse stage the LM loss sends no
gradient into the indexer and the indexer loss none into the rest; blockwise (Triton) ==
naive losses inside MLA."""
import pytest
import torch

from flashdsa.layers import MLA
from tests.utils import HAS_CUDA, KERNEL_DEVICE, rel_err, requires_cuda, tiny_mla_config


def tiny_config(**kw):
    return tiny_mla_config(**{"qk_rope_head_dim": 16, "index_topk": 6, **kw})


def _batch(lens=(9, 14), hidden=64, dtype=torch.float32, device="cpu"):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    x = torch.randn(sum(lens), hidden, dtype=dtype, device=device)
    return x, pos, cu


WARMUP = {"attention": "dense", "indexer_loss": True}
SPARSE = {"attention": "sparse", "indexer_loss": True}
STAGES = {"warmup": WARMUP, "sparse": SPARSE}


def _is_indexer(name):
    return name.startswith("indexer.")


def test_warmup_toy_run_loss_falls_and_only_indexer_changes():
    torch.manual_seed(0)
    m = MLA(tiny_config())
    x, pos, cu = _batch()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    params = MLA.freeze_all_but_indexer(m)
    assert params and all(p.requires_grad == _is_indexer(n) for n, p in m.named_parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(40):
        out, loss = m(x, pos, cu, **WARMUP, backend="reference")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]
    for n, p in m.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == _is_indexer(n), n
    MLA.freeze_all_but_indexer(m, freeze=False)
    assert all(p.requires_grad for p in m.parameters())


def test_warmup_output_is_the_dense_attention():
    m = MLA(tiny_config()).double()
    x, pos, cu = _batch(dtype=torch.float64)
    out, loss = m(x, pos, cu, **WARMUP, backend="reference")
    out_d, none = m(x, pos, cu, attention="dense")
    torch.testing.assert_close(out_d, out)
    assert none is None and loss.item() > 0


def test_sparse_stage_gradients_are_separated():
    torch.manual_seed(1)
    m = MLA(tiny_config()).double()
    x, pos, cu = _batch(dtype=torch.float64)
    x.requires_grad_()
    out, loss = m(x, pos, cu, **SPARSE, backend="reference")
    torch.testing.assert_close(out, m(x, pos, cu, attention="sparse", backend="reference").hidden)
    named = dict(m.named_parameters())
    lm = out.square().mean()  # stands in for the language-model loss
    g_lm = torch.autograd.grad(lm, list(named.values()) + [x], allow_unused=True)
    g_ix = torch.autograd.grad(loss, list(named.values()) + [x], allow_unused=True)
    for (n, _), a, b in zip(named.items(), g_lm, g_ix):
        if _is_indexer(n):
            assert a is None or not a.any(), f"LM loss reached {n}"
            assert b is not None and b.abs().sum() > 0, f"indexer loss missed {n}"
        else:
            assert b is None or not b.any(), f"indexer loss reached {n}"
    assert g_lm[-1] is not None and g_ix[-1] is None  # x: only the LM loss reaches it
    assert any(a is not None and a.abs().sum() > 0 for (n, _), a in zip(named.items(), g_lm) if not _is_indexer(n))


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_stage_triton_backend_equals_reference(stage):
    """The MLA stage through the Triton kernels (interpreter on CPU) matches the naive
    losses: same loss, same indexer gradients, same attention-side gradients."""
    torch.manual_seed(2)
    # On a GPU the fp32 kernels use tf32 dots and the fp8 index scores fp8 MMAs, whose
    # rounding can flip a near-tie in the top-k: there the top-k covers every key (the
    # selection itself is checked in tests/ops/test_indexer.py) and the budgets are tf32's.
    m = MLA(tiny_config(index_topk=5 if not HAS_CUDA else 16)).to(KERNEL_DEVICE)
    tol_out, tol_grad = (1e-4, 1e-3) if not HAS_CUDA else (5e-3, 1e-2)
    x, pos, cu = _batch(lens=(6, 9), device=KERNEL_DEVICE)
    m.probs_precision = "fp16"  # the exact target here; the e4m3 one is checked below
    res = {}
    for backend in ("reference", "triton"):
        m.zero_grad()
        out, loss = m(x, pos, cu, **STAGES[stage], backend=backend)
        (out.square().mean() + loss).backward()
        res[backend] = (out.detach(), loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                      if p.grad is not None})
    (o_r, l_r, g_r), (o_t, l_t, g_t) = res["reference"], res["triton"]
    assert rel_err(o_t, o_r) < tol_out and rel_err(l_t, l_r) < tol_out
    assert g_r.keys() == g_t.keys()
    for n in g_r:
        assert rel_err(g_t[n], g_r[n]) < tol_grad, n
    if stage == "sparse":  # the default e4m3 target: within its rounding (2^-4 per head's probability)
        m.probs_precision = "e4m3"
        _, loss8 = m(x, pos, cu, **STAGES[stage], backend="triton")
        assert rel_err(loss8.detach(), l_r) < 2.0 ** -4


def test_bad_knobs():
    m = MLA(tiny_config())
    x, pos, cu = _batch()
    with pytest.raises(ValueError, match="attention"):
        m(x, pos, cu, attention="warmup", indexer_loss=True)
    with pytest.raises(TypeError, match="indexer_loss"):
        m(x, pos, cu, indexer_loss=None)


@requires_cuda
@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_stage_bf16_gpu(stage):
    """bf16 on the GPU through the Triton path at the real attention widths (latent 512,
    rope 64, indexer 64 x 128): finite loss close to the reference backend's, gradients
    in the indexer only from the loss."""
    torch.manual_seed(3)
    cfg = tiny_config(num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, index_n_heads=64,
                      index_head_dim=128, index_topk=64, hidden_size=256, q_lora_rank=128)
    m = MLA(cfg).cuda().to(torch.bfloat16)
    x, pos, cu = _batch(lens=(70, 130), hidden=256, dtype=torch.bfloat16, device="cuda")
    out, loss = m(x, pos, cu, **STAGES[stage], backend="triton")
    (out.float().square().mean() + loss).backward()
    assert torch.isfinite(loss) and m.indexer.wq_b.weight.grad.abs().sum() > 0
    with torch.no_grad():
        _, loss_ref = m(x, pos, cu, **STAGES[stage], backend="reference")
    # Sparse: the two backends' FP8 top-k may swap near-tied rows at the k-th place, which
    # moves the loss a little; the kernels themselves are compared exactly elsewhere.
    assert rel_err(loss, loss_ref) < (2e-2 if stage == "warmup" else 1e-1)


@requires_cuda
def test_warmup_takes_the_lse_from_the_gpu_attention():
    """On the GPU the warm-up's dense attention also returns each head's lse (torch's cuDNN
    attention; SDPA returns none), so the loss skips its own lse pass: the same output as
    SDPA, the lse of an fp32 computation from the same operands, and the same loss as with
    the lse the loss computes itself."""
    if not torch.backends.cudnn.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cuDNN attention on Hopper or later")
    from flashdsa.layers import causal_ranges
    from flashdsa import api

    torch.manual_seed(4)
    cfg = tiny_config(num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, index_n_heads=64,
                      index_head_dim=128, index_topk=64, hidden_size=256, q_lora_rank=128)
    m = MLA(cfg).cuda().to(torch.bfloat16)
    x, pos, cu = _batch(lens=(70, 130), hidden=256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        qr, q_nope, q_pe, kv, k_pe, cos, sin = m.project(x, pos)
        out, lse = m._dense(q_nope, q_pe, kv, k_pe, cu, need_lse=True)
        plain, none = m._dense(q_nope, q_pe, kv, k_pe, cu)
        assert lse is not None and lse.shape == (200, 16) and none is None
        assert rel_err(out.float(), plain.float()) < 2 ** -8  # bf16 outputs of two kernels
        k_nope = m.kv_b_proj(kv).view(200, 16, -1)[..., :m.nope]
        q = torch.cat((q_nope, q_pe), -1).float()
        k = torch.cat((k_nope, k_pe.expand(-1, 16, -1)), -1).float()
        for s0, s1 in ((0, 70), (70, 200)):
            a = torch.einsum("thd,shd->hts", q[s0:s1], k[s0:s1]) * m.softmax_scale
            a = a.masked_fill(torch.ones(s1 - s0, s1 - s0, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
            # fp32 sums of 192 bf16 products in another order: 1e-3 covers them with room
            assert (torch.logsumexp(a, -1).T - lse[s0:s1]).abs().max() < 1e-3
        iq, ik, iw = m.indexer.project(x, qr, cos, sin)
        iw = iw * m.indexer.head_dim ** -0.5
        q_full, kv_full, _ = m.absorb(q_nope, q_pe, kv, k_pe)
        ks, ke = causal_ranges(cu, 200)
        given = api.warmup_kl_loss(iq, ik, iw, q_full, kv_full, lse, m.softmax_scale, ks, ke, backend="triton")
        own = api.warmup_kl_loss(iq, ik, iw, q_full, kv_full, None, m.softmax_scale, ks, ke, backend="triton")
        # the loss's own lse comes from the absorbed logits (q_nope through W_UK in bf16), which
        # differ from the multi-head ones at bf16 rounding: the bound of the backends' test above
        assert rel_err(given, own) < 2e-2
