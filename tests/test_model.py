"""DSAForCausalLM: official 671B shapes on the meta device, wiring of the packed layout,
DSA == dense when top-k covers the context, causality, and the V3 MoE router."""
import dataclasses
import math

import pytest
import torch

from flashdsa.config import DSAConfig
from flashdsa.model import MLP, CausalLMOutput, DSAForCausalLM, DSAOutput, MoE, MoEGate
from tests.utils import OFFICIAL_671B, requires_cuda


def tiny_config(**kw) -> DSAConfig:
    base = dict(vocab_size=67, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=3, n_routed_experts=6,
                n_shared_experts=1, num_experts_per_tok=2, n_group=3, topk_group=2, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                index_head_dim=16, index_topk=4, rope_factor=1.0, max_position_embeddings=512)
    base.update(kw)
    return DSAConfig(**base)


def test_official_671b_config_builds_right_shapes_on_meta():
    cfg = DSAConfig.from_hf_config(OFFICIAL_671B)
    with torch.device("meta"):
        model = DSAForCausalLM(cfg, init=False)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values()), "building on meta must not allocate"
    att = "model.layers.10.self_attn."
    want = {
        "model.embed_tokens.weight": (129280, 7168), "lm_head.weight": (129280, 7168),
        att + "q_a_proj.weight": (1536, 7168), att + "q_a_layernorm.weight": (1536,),
        att + "q_b_proj.weight": (128 * 192, 1536), att + "kv_a_proj_with_mqa.weight": (576, 7168),
        att + "kv_a_layernorm.weight": (512,), att + "kv_b_proj.weight": (128 * 256, 512),
        att + "o_proj.weight": (7168, 128 * 128), att + "indexer.wq_b.weight": (64 * 128, 1536),
        att + "indexer.wk.weight": (128, 7168), att + "indexer.k_norm.weight": (128,),
        att + "indexer.k_norm.bias": (128,), att + "indexer.weights_proj.weight": (64, 7168),
        "model.layers.2.mlp.gate_proj.weight": (18432, 7168), "model.layers.2.mlp.down_proj.weight": (7168, 18432),
        "model.layers.3.mlp.gate.weight": (256, 7168),
        "model.layers.3.mlp.experts.255.up_proj.weight": (2048, 7168),
        "model.layers.60.mlp.shared_experts.down_proj.weight": (7168, 2048),
        "model.norm.weight": (7168,),
    }
    for name, shape in want.items():
        assert tuple(params[name].shape) == shape, name
    assert "model.layers.61.self_attn.q_a_proj.weight" not in params      # no MTP layer
    assert tuple(model.model.layers[3].mlp.gate.e_score_correction_bias.shape) == (256,)
    assert isinstance(model.model.layers[2].mlp, MLP) and isinstance(model.model.layers[3].mlp, MoE)
    # 671B main model (the paper's count, MTP excluded) plus the 61 indexers (~14.2M each).
    indexer = 61 * (64 * 128 * 1536 + 128 * 7168 + 2 * 128 + 64 * 7168)
    total = model.num_parameters()
    assert abs((total - indexer) / 671e9 - 1) < 0.002, total
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


def _seq_lens_packed(model, ids_list, attention):
    ids = torch.cat(ids_list)
    cu = torch.tensor([0] + [len(x) for x in ids_list], dtype=torch.int32).cumsum(0).to(torch.int32)
    return model(ids, cu_seqlens=cu, attention=attention).logits


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_packed_equals_separate_sequences(attention):
    # 16 indexer heads: a score is an exact 0 (a tie) only when all 16 ReLUs are off
    model = DSAForCausalLM(tiny_config(index_n_heads=16)).eval()
    seqs = [torch.randint(0, 67, (n,)) for n in (7, 13, 1)]
    packed = _seq_lens_packed(model, seqs, attention)
    alone = torch.cat([model(s[None], attention=attention).logits[0] for s in seqs])
    assert packed.shape == (21, 67)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_dsa_equals_dense_when_topk_covers_context_and_differs_otherwise():
    ids = torch.randint(0, 67, (2, 11))
    full = DSAForCausalLM(tiny_config(index_topk=16)).eval()
    torch.testing.assert_close(full(ids, attention="sparse").logits, full(ids, attention="dense").logits,
                               rtol=1e-5, atol=1e-5)
    sparse = DSAForCausalLM(tiny_config(index_topk=3)).eval()
    sparse.load_state_dict(full.state_dict())
    a, b = sparse(ids, attention="sparse").logits, sparse(ids, attention="dense").logits
    # rows with <= 3 candidates see everything; later rows must differ
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-5)
    assert (a[:, 4:] - b[:, 4:]).abs().amax() > 1e-3


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_causal(attention):
    model = DSAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 67, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8:] = (ids2[0, 8:] + 1) % 67
    a, b = model(ids, attention=attention).logits, model(ids2, attention=attention).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-5)
    assert (a[:, 8:] - b[:, 8:]).abs().amax() > 1e-4


def test_logits_rows_and_positions():
    model = DSAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 67, (10,))
    full = model(ids, attention="dense").logits
    rows = torch.tensor([9, 3])
    torch.testing.assert_close(model(ids, attention="dense", logits_rows=rows).logits, full[rows])
    # RoPE is relative: a constant shift changes nothing, a stretch changes the logits
    torch.testing.assert_close(model(ids, positions=torch.arange(10) + 5, attention="dense").logits, full,
                               rtol=1e-4, atol=1e-5)
    assert (model(ids, positions=torch.arange(10) * 3, attention="dense").logits - full).abs().amax() > 1e-4


def _naive_route(gate: MoEGate, x):
    """Per-token loop of the V3 grouped router, straight from its description."""
    weights, ids = [], []
    per = gate.n_experts // gate.n_group
    for row in x:
        s = torch.sigmoid(gate.weight.double() @ row.double())
        b = s + gate.e_score_correction_bias.double()
        gscore = [sorted(b[g * per:(g + 1) * per].tolist())[-2:] for g in range(gate.n_group)]
        best = sorted(range(gate.n_group), key=lambda g: -sum(gscore[g]))[:gate.topk_group]
        cand = [e for e in range(gate.n_experts) if e // per in best]
        chosen = sorted(cand, key=lambda e: -b[e].item())[:gate.top_k]
        w = s[chosen]
        w = w / w.sum() * gate.scale
        weights.append(w)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids)


def test_router_matches_naive_grouped_topk():
    cfg = tiny_config(hidden_size=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = MoEGate(cfg)
    torch.nn.init.normal_(gate.weight)
    gate.e_score_correction_bias.normal_(0, 0.5)    # the bias changes which experts are chosen
    x = torch.randn(9, 16)
    w, ids = gate(x)
    w_ref, ids_ref = _naive_route(gate, x)
    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)
    order, order_ref = ids.argsort(-1), ids_ref.argsort(-1)
    torch.testing.assert_close(w.gather(1, order).double(), w_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)


def test_moe_matches_per_token_loop():
    cfg = tiny_config(hidden_size=16)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    out = moe(x)
    w, ids = moe.gate(x.view(-1, 16))
    ref = torch.stack([sum(w[t, j] * moe.experts[int(ids[t, j])](x.view(-1, 16)[t]) for j in range(ids.shape[1]))
                       + moe.shared_experts(x.view(-1, 16)[t]) for t in range(10)])
    torch.testing.assert_close(out.view(-1, 16), ref, rtol=1e-5, atol=1e-5)


def _moe(dtype, device="cpu", **kw):
    moe = MoE(tiny_config(hidden_size=16, **kw))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.bfloat16, marks=requires_cuda)])
@pytest.mark.parametrize("tokens", [1, 7, 37])
def test_stacked_experts_grouped_forward_equals_per_expert_forward(device, dtype, tokens):
    """After stack_experts, forwards without autograd take two grouped GEMMs (one token:
    most experts get none); against the float64 module both forwards err alike (budget:
    twice the per-expert forward's error, plus fp32 rounding). Names, values and the
    trainable path stay as they were. On a GPU: torch's CUDA grouped GEMM (bf16)."""
    moe = _moe(dtype, device)
    exact = _moe(torch.float64, device)
    exact.load_state_dict(moe.state_dict())
    x = torch.randn(tokens, 16, dtype=torch.float64, device=device)
    with torch.no_grad():
        ref = exact(x)
        per_expert = moe(x.to(dtype)).double()
        state = {k: v.clone() for k, v in moe.state_dict().items()}
        moe.stack_experts()
        assert moe.grouped_unsupported() is None
        assert all(torch.equal(v, state[k]) for k, v in moe.state_dict().items())
        w13, w2, _ = moe._stacked
        assert moe.experts[1].up_proj.weight.data_ptr() == w13[1, 16:].data_ptr()
        assert moe.experts[2].down_proj.weight.data_ptr() == w2[2].data_ptr()
        calls = []
        grouped = moe.grouped_forward
        moe.grouped_forward = lambda *a: calls.append(1) or grouped(*a)
        got = moe(x.to(dtype)).double()
        assert calls == [1]
    err_grouped = float((got - ref).abs().max())
    err_expert = float((per_expert - ref).abs().max())
    assert err_grouped <= 2 * err_expert + 1e-6 * float(ref.abs().max()), (err_grouped, err_expert)
    moe.grouped_forward = lambda *a: pytest.fail("autograd must take the per-expert forward")
    moe(x.to(dtype)).float().sum().backward()
    chosen = moe.gate(x.to(dtype))[1].unique().tolist()
    assert all(moe.experts[e].gate_proj.weight.grad is not None for e in chosen)


def test_grouped_moe_forward_has_no_host_sync():
    """The grouped forward traces into one graph (torch.compile fullgraph: a host read of
    the expert counts would break it, as it does for the per-expert forward), which is
    what lets a CUDA graph capture an MoE decode step."""
    moe = _moe(torch.bfloat16)
    moe.stack_experts()
    x = torch.randn(9, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        w, ids = moe.gate(x)
        want = moe.grouped_forward(x, w, ids)
        got = torch.compile(moe.grouped_forward, backend="eager", fullgraph=True)(x, w, ids)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(Exception, match="[Dd]ata.dependent|tolist|GuardOnDataDependent"):
            torch.compile(moe._sorted_forward, backend="eager", fullgraph=True)(x, w, ids)


def test_grouped_moe_unsupported_says_why():
    """Where torch's grouped GEMM does not take the weights the per-expert forward runs, and
    grouped_unsupported names the reason (the engine's CUDA-graph check reports it)."""
    from flashdsa.model import grouped_mm_unsupported
    assert "float64" in grouped_mm_unsupported(torch.float64, torch.device("cpu"))
    assert "bf16" in grouped_mm_unsupported(torch.float32, torch.device("cuda"))
    assert "16 bytes" in grouped_mm_unsupported(torch.bfloat16, torch.device("cuda"), (7168, 100))
    moe = _moe(torch.float64)
    assert "not stacked" in moe.grouped_unsupported()
    moe.stack_experts()
    assert "float64" in moe.grouped_unsupported()
    moe.float()   # moving the module gives the experts their own storage again
    assert "not stacked" in moe.grouped_unsupported()


def test_bad_arguments_are_named():
    model = DSAForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="attention"):
        model(torch.zeros(1, 4, dtype=torch.long), attention="full")
    with pytest.raises(TypeError, match="indexer_loss"):
        model(torch.zeros(1, 4, dtype=torch.long), indexer_loss="warmup")
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 2, 4, dtype=torch.long))


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_per_sequence_attention_equals_packed(attention):
    """The CPU shortcut (attention called per sequence) computes the packed function."""
    model = DSAForCausalLM(tiny_config(index_n_heads=16)).eval()
    layer = model.model.layers[0]
    lens = [5, 12, 9]
    cu = torch.tensor([0, 5, 17, 26], dtype=torch.int32)
    x = torch.randn(26, 32)
    pos = torch.cat([torch.arange(n) for n in lens])
    for indexer_loss in (False, True):
        a = layer(x, pos, cu, attention=attention, indexer_loss=indexer_loss, per_sequence=False)
        b = layer(x, pos, cu, attention=attention, indexer_loss=indexer_loss, per_sequence=True)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
        if indexer_loss:   # the per-token mean over the packed batch, either way
            torch.testing.assert_close(a.indexer_loss, b.indexer_loss, rtol=1e-5, atol=1e-6)
        else:
            assert a.indexer_loss is None and b.indexer_loss is None


@pytest.mark.parametrize("attention,indexer_loss", [("dense", False), ("sparse", False), ("dense", True),
                                                     ("sparse", True)])
def test_one_return_type(attention, indexer_loss):
    """The model always returns CausalLMOutput (DSAModel a DSAOutput); the indexer loss
    is a scalar fp32 summed over layers when asked for, None otherwise."""
    model = DSAForCausalLM(tiny_config())
    ids = torch.randint(0, 67, (2, 9))
    out = model(ids, attention=attention, indexer_loss=indexer_loss)
    assert isinstance(out, CausalLMOutput) and out.logits.shape == (2, 9, 67)
    inner = model.model(ids, attention=attention, indexer_loss=indexer_loss)
    assert isinstance(inner, DSAOutput) and inner.hidden.shape == (2, 9, 32)
    if indexer_loss:
        assert out.indexer_loss.dim() == 0 and out.indexer_loss.dtype == torch.float32
        assert out.indexer_loss.item() > 0
        torch.testing.assert_close(out.indexer_loss, inner.indexer_loss)
    else:
        assert out.indexer_loss is None and inner.indexer_loss is None


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_renormalizes_for_every_top_k(top_k):
    """norm_topk_prob: the chosen weights sum to routed_scaling_factor, one expert included
    (as transformers' router and DeepSeek's inference code); without it they stay the raw
    sigmoid affinities."""
    cfg = tiny_config(hidden_size=16, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=top_k)
    gate = MoEGate(cfg)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(7, 16)
    w, ids = gate(x)
    torch.testing.assert_close(w.sum(-1), torch.full((7,), cfg.routed_scaling_factor))
    gate.norm_topk_prob = False
    w_raw, ids_raw = gate(x)
    assert torch.equal(ids_raw, ids)
    sig = torch.sigmoid(x @ gate.weight.T).gather(1, ids)
    torch.testing.assert_close(w_raw, sig * cfg.routed_scaling_factor)


def _counted_flops(model, seq_len, batch=2):
    """(weight matmuls, attention bmms) FLOPs a token of a dense training step, counted by
    torch's FlopCounterMode on the reference path (its attention over the full square)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, attention="dense", backend="reference").logits.mean().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    tokens = batch * seq_len
    return counts.get("aten.mm", 0) / tokens, counts.get("aten.bmm", 0) / tokens


@pytest.mark.parametrize("moe", [False, True])
def test_train_flops_per_token_match_torchs_flop_counter(moe):
    """The dense stage's model FLOPs equal what torch's FlopCounterMode counts in a forward
    and backward: the weight matmuls as counted (routed experts: only those a token is
    sent to), the attention's full-square bmms halved to the causal mean context."""
    from flashdsa.train import preset_config
    torch.manual_seed(0)
    seq_len = 96
    cfg = preset_config("tiny", seq_len)
    if moe:
        cfg = dataclasses.replace(cfg, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                                  first_k_dense_replace=1, moe_intermediate_size=48, n_shared_experts=1)
    model = DSAForCausalLM(cfg)
    mm, bmm = _counted_flops(model, seq_len)
    want = mm + bmm * (seq_len + 1) / (2 * seq_len)
    got = model.train_flops_per_token(seq_len, "dense")
    assert abs(got - want) <= 1e-6 * want, (got, want, mm, bmm)
    sparse = model.train_flops_per_token(seq_len, "sparse")
    warmup = model.train_flops_per_token(seq_len, "warmup")
    assert 0 < warmup < got and sparse > 0
    with pytest.raises(ValueError, match="stage"):
        model.train_flops_per_token(seq_len, "pretrain")
