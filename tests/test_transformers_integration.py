"""flashdsa.integrations.transformers: a transformers DeepseekV32ForCausalLM after
``use_flashdsa_attention`` against flashdsa's own model on the same weights (tiny, float32, CPU)."""
import copy
import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import flashdsa
from flashdsa.integrations.transformers import key_ranges, use_flashdsa_attention

TOPK = 8
# Default rope (theta 10000): read alike by every flashdsa config reader.
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
             num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
             v_head_dim=16, qk_nope_head_dim=16, index_topk=TOPK, index_head_dim=32, index_n_heads=16,
             first_k_dense_replace=1, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None)


def _hf_model(**overrides):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV32Config(**{**SIZES, **overrides})
    return transformers.DeepseekV32ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny transformers model and its save_pretrained directory."""
    path = tmp_path_factory.mktemp("hf_v32")
    model = _hf_model()
    model.save_pretrained(path)
    return model, path


def _flashdsa_model(path, indexer):
    return flashdsa.from_pretrained(path, config=_dsa_config(path, indexer)).eval()


def _dsa_config(path, indexer):
    return dataclasses.replace(flashdsa.checkpoint.load_config(path), indexer_numerics=indexer)


def _patched(model, indexer="fp8"):
    return use_flashdsa_attention(copy.deepcopy(model), backend="reference", indexer=indexer)


@pytest.mark.parametrize("indexer", ["fp8", "exact"])
def test_prefill_logits_equal_flashdsa_model(saved, indexer):
    """Sequences longer than index_topk, so the selection matters; batch of two."""
    model, path = saved
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        got = _patched(model, indexer)(ids).logits
        want = _flashdsa_model(path, indexer)(ids, backend="reference").logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_exact_indexer_equals_transformers_attention(saved):
    """With the exact indexer the top-k sets are transformers' own: same logits."""
    model = saved[0]
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        want = model(ids).logits
        got = _patched(model, "exact")(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _greedy(model, ids, new):
    """flashdsa's greedy decoding by full recomputation: ids [1, L] -> [1, L + new]."""
    for _ in range(new):
        with torch.no_grad():
            nxt = model(ids, backend="reference").logits[:, -1].argmax(-1)
        ids = torch.cat((ids, nxt[:, None]), dim=1)
    return ids


def test_generate_equals_flashdsa_greedy(saved):
    """transformers' generate (its DynamicCache, one token per step) past index_topk."""
    model, path = saved
    ids = torch.randint(0, 128, (1, 6))
    got = _patched(model).generate(ids, max_new_tokens=14, do_sample=False)
    want = _greedy(_flashdsa_model(path, "fp8"), ids, 14)
    assert torch.equal(got, want)


def test_generate_left_padded_batch(saved):
    """A left-padded batch gives each row the tokens it gets alone."""
    model = _patched(saved[0])
    long, short = torch.randint(1, 128, (1, 9)), torch.randint(1, 128, (1, 5))
    batch = torch.cat((long, torch.cat((torch.zeros(1, 4, dtype=torch.long), short), dim=1)))
    mask = (torch.arange(9)[None, :] >= torch.tensor([[0], [4]])).long()
    got = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, alone in ((0, long), (1, short)):
        want = model.generate(alone, max_new_tokens=8, do_sample=False)
        assert torch.equal(got[row, -8:], want[0, -8:])


class _LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_dense_mask_or_scores():
    """Prefill of L = 1024: no tensor of L * L elements (no [L, L] mask, no score matrix), while
    transformers' own attention builds them; the layers receive the 2-d padding mask. (The
    reference top-k scores 256 query rows at a time; the Triton kernel scores none in memory.)"""
    length = 1024
    model = _hf_model(index_n_heads=2, num_hidden_layers=1)
    ids = torch.randint(0, 128, (1, length))
    mask = torch.ones(1, length, dtype=torch.long)
    mask[0, :3] = 0                                       # left padding
    with torch.no_grad(), _LargestTensor() as own:
        model(ids, attention_mask=mask)
    assert own.largest >= length * length
    use_flashdsa_attention(model, backend="reference")
    masks = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    with torch.no_grad(), _LargestTensor() as patched:
        model(ids, attention_mask=mask)
    assert patched.largest < length * length
    assert torch.equal(masks[0], mask.bool())


def test_key_ranges():
    """Left and right padding, a cached past; a padding query gets an empty range."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    ks, ke = key_ranges(mask, batch=2, seq=2, past=3, total=5, device="cpu")
    assert ks.tolist() == [2, 2, 5, 5] and ke.tolist() == [4, 5, 8, 8]
    ks, ke = key_ranges(None, batch=1, seq=3, past=0, total=3, device="cpu")
    assert ks.tolist() == [0, 0, 0] and ke.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="attention_mask: .*contiguous"):
        key_ranges(torch.tensor([[1, 0, 1]]), batch=1, seq=3, past=0, total=3, device="cpu")


def test_errors():
    model = _hf_model()
    with pytest.raises(ValueError, match="indexer: expected one of"):
        use_flashdsa_attention(model, indexer="fp16")
    with pytest.raises(ValueError, match="backend: expected one of"):
        use_flashdsa_attention(model, backend="cuda")
    with pytest.raises(TypeError, match="model: expected a transformers DeepseekV32 model"):
        use_flashdsa_attention(torch.nn.Linear(2, 2))
    use_flashdsa_attention(model)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match="position_ids: expected consecutive positions"):
        model(torch.randint(0, 128, (1, 6)), position_ids=packed)


def test_triton_kernels_equal_reference(saved):
    """The Triton kernels (interpreted on CPU) against the reference ops: prefill and generate."""
    model = saved[0]
    ids = torch.randint(0, 128, (1, 12))
    kernels = use_flashdsa_attention(copy.deepcopy(model), backend="triton")
    reference = _patched(model)
    with torch.no_grad():
        assert torch.allclose(kernels(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(kernels.generate(ids, max_new_tokens=3, do_sample=False),
                       reference.generate(ids, max_new_tokens=3, do_sample=False))


def test_benchmark_toy(tmp_path):
    """benchmarks/bench_transformers.py end to end at toy size on CPU: both paths, JSON."""
    from benchmarks.bench_transformers import main
    path = main(["--toy", "--contexts", "40", "--out", str(tmp_path)])
    with open(path) as f:
        rows = json.load(f)["rows"]
    assert [(r["path"], r["context"]) for r in rows] == [("transformers", 40), ("flashdsa", 40)]
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)
    assert rows[1]["prefill_speedup"] > 0
