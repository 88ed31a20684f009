"""A tiny random DSAForCausalLM for engine tests, step-by-step reference decoding (greedy,
and with the penalties written out) and a tiny Hugging Face tokenizer."""
import torch

from flashdsa.config import DSAConfig
from flashdsa.model import DSAForCausalLM


def tiny_model(seed: int = 0, dtype=torch.float64, std: float = 0.2, **kw) -> DSAForCausalLM:
    """2 layers (one dense MLP, one MoE), odd head counts, YaRN RoPE, a 259-token
    vocabulary (bytes + pad/bos/eos) and index_topk 8 so that sparse selection starts early.

    7 indexer heads of 32: with fewer, many keys score exactly 0 (every head's ReLU off)
    and the top-k boundary falls in a tie that two correct implementations may break
    differently (SPEC 2); :func:`boundary_ties` checks that the tests avoid that."""
    base = dict(vocab_size=259, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=3, n_routed_experts=4,
                n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=7,
                index_head_dim=32, index_topk=8, rope_factor=4.0, original_max_position_embeddings=32,
                max_position_embeddings=512, bos_token_id=257, eos_token_id=258)
    base.update(kw)
    torch.manual_seed(seed)
    # a larger init than 0.02 gives peaked next-token distributions: greedy tokens then
    # do not hinge on rounding-level differences
    model = DSAForCausalLM(DSAConfig(**base))
    model.init_weights(std=std)
    return model.to(dtype).eval()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_tokens: int, attention: str = "sparse", stop_ids=()) -> list[int]:
    """Greedy decoding by re-running the whole model on the full sequence every step."""
    seq = list(prompt)
    out = []
    for _ in range(max_tokens):
        logits = model(torch.tensor(seq), attention=attention, backend="reference").logits
        tok = int(logits[-1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stop_ids:
            break
    return out


@torch.no_grad()
def boundary_ties(model, seq: list[int]) -> int:
    """Queries of ``seq`` (over all layers) whose k-th and (k+1)-th indexer scores are
    equal, i.e. whose top-k set is not unique."""
    from flashdsa import api
    from flashdsa.reference.rope import rope_cos_sin
    inputs = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a))
             for i, layer in enumerate(model.model.layers)]
    model(torch.tensor(seq), backend="reference")
    for h in hooks:
        h.remove()
    n, ties = len(seq), 0
    for i, layer in enumerate(model.model.layers):
        attn, (x, pos) = layer.self_attn, inputs[i][:2]
        k_top, d = attn.indexer.topk, attn.indexer.head_dim
        cos, sin = rope_cos_sin(pos, attn.inv_freq)
        q, k, w = attn.indexer.project(x, attn.q_a_layernorm(attn.q_a_proj(x)), cos, sin)
        q8, qs = api.act_quant(q, d)
        k8, ks = api.act_quant(k, d)
        logits = api.indexer_logits(q8, k8, ks[:, 0], w * qs[..., 0] * d ** -0.5,
                                    torch.zeros(n, dtype=torch.int32), torch.arange(1, n + 1, dtype=torch.int32))
        for t in range(k_top, n):
            v = logits[t, :t + 1].sort(descending=True).values
            ties += bool(v[k_top - 1] == v[k_top])
    return ties


@torch.no_grad()
def penalized_greedy(model, prompt, n, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy decoding of the full model with the penalties written out (the OpenAI API's
    presence and frequency penalties, Hugging Face's repetition penalty)."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor(seq), backend="reference").logits[-1].double()
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        for t in set(seq):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def tiny_hf_tokenizer(chat_template: bool = True):
    """A Hugging Face tokenizer: a byte-level BPE trained here (the 256 bytes, a few merges,
    <s> and </s>), of fewer tokens than the tiny model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, sparse attention keeps the top tokens"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        hf.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant:{% endif %}")
    return hf
