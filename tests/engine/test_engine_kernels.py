"""The engine on the Triton kernels (paged indexer top-k, fused indexer top-k, sparse MLA
decode, cache writes) against the same engine on the reference ops: under the Triton
interpreter on CPU (fp32, tiny odd shapes), and on a GPU in bf16 with the fp8_ds_mla
cache too."""
import copy

import pytest
import torch

from flashdsa.engine import EngineConfig, LLMEngine, SamplingParams
from tests.utils import HAS_CUDA, requires_cuda

from .tiny import tiny_model


def _logits(model, kv, backend, prompts, decode_steps):
    """Logits of the prefill step and of ``decode_steps`` decode steps."""
    engine = LLMEngine(model, config=EngineConfig(num_blocks=32, kv_cache_dtype=kv, backend=backend,
                                                  max_num_batched_tokens=4096))
    return _logits_engine(engine, prompts, decode_steps)


def _logits_engine(engine, prompts, decode_steps):
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=decode_steps + 1, ignore_eos=True))
    out = []
    for _ in range(decode_steps + 1):
        sched = engine.scheduler.schedule()
        lg, which = engine.runner.forward(sched)
        for seq, n in sched:
            seq.num_computed += n
        # both engines get the same next tokens (an argmax could differ between them)
        for b in which:
            seq = sched[b][0]
            seq.output_ids.append(seq.num_tokens * 7 % 256)
        out.append(lg.float())
    return out


@pytest.mark.skipif(HAS_CUDA, reason="the GPU test below covers the kernels on a GPU")
def test_interpreted_kernels_match_reference():
    """fp32 everywhere: both paths accumulate in fp32 (seen: 5e-7 apart); a wrong
    selection, slot or row would move the logits by O(1). Prompts of 20 and 12 tokens
    with index_topk 8: prefill chunks and decodes both go through the indexer."""
    model = tiny_model(seed=31, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (20, 12)]
    got = _logits(model, "auto", "triton", prompts, 2)
    ref = _logits(model, "auto", "reference", prompts, 2)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert float((a - b).norm() / b.norm()) < 1e-4, step


@requires_cuda
def test_kernel_engine_matches_reference_engine():
    """Error budget from the data: against the fp32 model on the reference path, the
    bf16 model on the kernels may err at most 1.5x as much as the bf16 model on the
    reference path (same cache format), plus 1e-3."""
    model32 = tiny_model(seed=31, dtype=torch.float32, std=0.02, kv_lora_rank=512, qk_rope_head_dim=64,
                         hidden_size=256, num_attention_heads=16, index_n_heads=8, index_head_dim=128,
                         index_topk=64, max_position_embeddings=2048).cuda()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (300, 90, 40)]
    exact = _logits(model32, "auto", "reference", prompts, 3)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    for kv in ("bf16", "fp8_ds_mla"):
        got = _logits(model16, kv, "auto", prompts, 3)
        ref = _logits(model16, kv, "reference", prompts, 3)
        for step, (a, b, x) in enumerate(zip(got, ref, exact)):
            err_kernel = float((a - x).norm() / x.norm())
            err_ref = float((b - x).norm() / x.norm())
            assert err_kernel <= 1.5 * err_ref + 1e-3, (kv, step, err_kernel, err_ref)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU test below covers the captured graphs")
def test_graph_decode_body_matches_eager_step():
    """The body that CUDA graphs capture (fixed shapes, padded batch, indexer on every
    row, torch.where for the dense rows) equals the eager decode step, under the
    interpreter. Capture itself needs a GPU."""
    from flashdsa.engine.cuda_graph import DecodeGraphs
    model = tiny_model(seed=41, dtype=torch.float32)
    engine = LLMEngine(model, config=EngineConfig(num_blocks=8, backend="triton"))
    g = torch.Generator().manual_seed(5)
    for n in (20, 12, 5):                      # the last one stays within top-k (dense rows)
        engine.add_request(torch.randint(0, 256, (n,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while not all(s.output_ids for s in engine.sequences.values()):
        engine.step()
    sched = engine.scheduler.schedule()
    assert all(n == 1 for _, n in sched) and len(sched) == 3
    graphs = DecodeGraphs(engine.runner, max_batch=4, max_blocks=4, scratch_block=7)
    assert graphs.can_run(sched) is False       # nothing captured on CPU
    eager, _ = engine.runner.forward(sched)
    static, which = graphs.run(sched)            # batch 3 padded to 4
    assert which == [0, 1, 2]
    assert float((static - eager).norm() / eager.norm()) < 1e-5


@requires_cuda
def test_cuda_graph_decode_matches_eager():
    """Dense-MLP model (MoE is not capturable): captured decode == eager decode."""
    model = tiny_model(seed=43, dtype=torch.bfloat16, std=0.02, n_routed_experts=None, kv_lora_rank=512,
                       qk_rope_head_dim=64, hidden_size=256, num_attention_heads=16, index_n_heads=8,
                       index_head_dim=128, index_topk=64, max_position_embeddings=1024).cuda()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (300, 90, 40)]
    outs = []
    for graphs in (False, True):
        engine = LLMEngine(model, config=EngineConfig(num_blocks=32, max_num_seqs=4, cuda_graphs=graphs))
        assert (engine.runner.graphs is not None) == graphs
        if graphs:
            assert engine.runner.graphs.disabled is None, engine.runner.graphs.disabled
        outs.append(_logits_engine(engine, prompts, 4))
    for step, (a, b) in enumerate(zip(*outs)):
        assert float((a - b).norm() / b.norm()) < 2e-2, step
