"""The engine on the Triton kernels (paged indexer top-k, fused indexer top-k, sparse MLA
decode, cache writes) against the same engine on the reference ops: under the Triton
interpreter on CPU (fp32, tiny odd shapes), and on a GPU in bf16 with the fp8_ds_mla
cache too. Besides the logits, every step's selected key slots are compared per query
row: the two engines must pick the same top-k set up to ties at the k-th score."""
import copy

import pytest
import torch

from flashdsa import api
from flashdsa.engine import EngineConfig, LLMEngine, SamplingParams
from flashdsa.engine import attention as engine_attention
from tests.utils import HAS_CUDA, requires_cuda

from .tiny import tiny_model


def _logits(model, kv, backend, prompts, decode_steps, budget=4096):
    """Logits of the prefill step and of ``decode_steps`` decode steps (``budget``:
    tokens a step; small, the prefill is chunked and mixed with decodes)."""
    engine = LLMEngine(model, config=EngineConfig(num_blocks=32, kv_cache_dtype=kv, backend=backend,
                                                  max_num_batched_tokens=budget))
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


@torch.no_grad()
def _slot_scores(attn, x, qr, cos, sin, meta, caches, layer) -> torch.Tensor:
    """[T, num_blocks * 64] float64 reference index scores of each query row over the
    physical slots of its causal candidates (-inf elsewhere), from the keys the engine
    cached."""
    indexer = attn.indexer
    d = indexer.head_dim
    q, _, w = indexer.project(x, qr, cos, sin)
    q8, q_scale = api.act_quant(q, d)
    w = w * q_scale[..., 0] * d ** -0.5
    out = torch.full((x.shape[0], caches.num_blocks * 64), float("-inf"), dtype=torch.float64)
    for b in range(meta.num_seqs):
        t0, t1 = meta.query_start[b], meta.query_start[b + 1]
        slots = meta.slots_of(b, int(meta.context_lens[b]))    # (context_host is fake in graphs)
        k8, k_scale = caches.read_index(layer, slots)
        ke = (meta.positions[t0:t1] + 1).to(torch.int32)
        lg = api.indexer_logits(q8[t0:t1].double(), k8.double(), k_scale.double(), w[t0:t1].double(),
                                torch.zeros_like(ke), ke, backend="reference")
        out[t0:t1, slots.cpu()] = lg.cpu()
    return out


def _record_selections(monkeypatch) -> list:
    """Record, for every engine.attention.select_indices call (eager steps), the selected
    slots [T, topk] and the reference scores of the step's queries (see _slot_scores)."""
    log = []
    real = engine_attention.select_indices

    def recording(attn, x, qr, cos, sin, meta, caches, layer, backend, static=False, raw=None):
        idx = real(attn, x, qr, cos, sin, meta, caches, layer, backend, static, raw)
        log.append((idx.cpu().long(), _slot_scores(attn, x, qr, cos, sin, meta, caches, layer)))
        return idx

    monkeypatch.setattr(engine_attention, "select_indices", recording)
    return log


def _assert_same_selections(got: list, want: list, rel: float) -> None:
    """Per query row the two selections hold the same number of slots and the same set,
    except for slots whose score ties the k-th selected score: within twice the largest
    score difference between the two runs' inputs, plus ``rel`` of the row's largest
    |score| (the kernels' own rounding)."""
    assert len(got) == len(want) > 0
    for call, ((ia, sa), (ib, sb)) in enumerate(zip(got, want)):
        assert ia.shape == ib.shape, call
        for t in range(ia.shape[0]):
            a = set(ia[t][ia[t] >= 0].tolist())
            b = set(ib[t][ib[t] >= 0].tolist())
            assert len(a) == len(b) == int((ib[t] >= 0).sum()), (call, t, len(a), len(b))
            diff = a ^ b
            if not diff:
                continue
            fin = torch.isfinite(sb[t])
            tol = 2 * float((sa[t][fin] - sb[t][fin]).abs().max()) + rel * float(sb[t][fin].abs().max())
            kth = float(sb[t][sorted(b)].min())
            off = [s for s in diff if abs(float(sb[t][s]) - kth) > tol]
            assert not off, f"step call {call}, row {t}: slots {off} are no tie at the k-th score {kth}"


@pytest.mark.skipif(HAS_CUDA, reason="the GPU test below covers the kernels on a GPU")
def test_interpreted_kernels_match_reference(monkeypatch):
    """fp32 everywhere: both paths accumulate in fp32 (seen: 5e-7 apart); a wrong
    selection, slot or row would move the logits by O(1). Prompts of 20 and 12 tokens
    with index_topk 8: prefill chunks and decodes both go through the indexer, and
    select the same slots up to ties."""
    model = tiny_model(seed=31, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (20, 12)]
    log = _record_selections(monkeypatch)
    got = _logits(model, "auto", "triton", prompts, 2)
    sel_got = log[:]
    log.clear()
    ref = _logits(model, "auto", "reference", prompts, 2)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert float((a - b).norm() / b.norm()) < 1e-4, step
    _assert_same_selections(sel_got, log, rel=1e-5)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU test below covers the kernels on a GPU")
def test_interpreted_mixed_steps_match_reference(monkeypatch):
    """Steps of 16 tokens: the first prompt (12 tokens) decodes beside the second's
    prefill chunks. The kernels' engine selects those decode rows with one paged top-k a
    step and layer (counted) and matches the reference engine: logits and selections."""
    from flashdsa.ops import indexer as ix_ops
    model = tiny_model(seed=31, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (12, 40)]
    rows = []
    real = ix_ops.paged_indexer_topk
    monkeypatch.setattr(ix_ops, "paged_indexer_topk", lambda q8, *a, **k: rows.append(q8.shape[0]) or real(q8, *a, **k))
    log = _record_selections(monkeypatch)
    got = _logits(model, "auto", "triton", prompts, 4, budget=16)
    sel_got = log[:]
    log.clear()
    ref = _logits(model, "auto", "reference", prompts, 4, budget=16)
    assert rows[:6] == [1] * 6, rows   # three mixed steps of one decode row, two layers each
    for step, (a, b) in enumerate(zip(got, ref)):
        assert float((a - b).norm() / b.norm()) < 1e-4, step
    _assert_same_selections(sel_got, log, rel=1e-5)


@requires_cuda
@pytest.mark.parametrize("budget", [4096, 128])
def test_kernel_engine_matches_reference_engine(monkeypatch, budget):
    """Error budget from the data: against the fp32 model on the reference path, the
    bf16 model on the kernels may err at most 1.5x as much as the bf16 model on the
    reference path (same cache format), plus 1e-3. The selections agree up to ties
    (the fp8 tensor-core dot's shortened accumulator: 2^-10 of the largest score).
    ``budget`` 128 tokens a step: chunked prefill with the shorter prompts' decodes
    beside it (mixed steps)."""
    model32 = tiny_model(seed=31, dtype=torch.float32, std=0.02, kv_lora_rank=512, qk_rope_head_dim=64,
                         hidden_size=256, num_attention_heads=16, index_n_heads=8, index_head_dim=128,
                         index_topk=64, max_position_embeddings=2048).cuda()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (300, 90, 40)]
    exact = _logits(model32, "auto", "reference", prompts, 3, budget)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    log = _record_selections(monkeypatch)
    for kv in ("bf16", "fp8_ds_mla"):
        log.clear()
        got = _logits(model16, kv, "auto", prompts, 3, budget)
        sel_got = log[:]
        log.clear()
        ref = _logits(model16, kv, "reference", prompts, 3, budget)
        for step, (a, b, x) in enumerate(zip(got, ref, exact)):
            if not x.numel():   # no sequence finished its prompt in this step: no logits
                continue
            err_kernel = float((a - x).norm() / x.norm())
            err_ref = float((b - x).norm() / x.norm())
            assert err_kernel <= 1.5 * err_ref + 1e-3, (kv, step, err_kernel, err_ref)
        _assert_same_selections(sel_got, log, rel=2.0 ** -10)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU test below covers the captured graphs")
def test_graph_decode_body_matches_eager_step(monkeypatch):
    """The body that CUDA graphs capture (fixed shapes, padded batch, indexer on every
    row, also those within top-k, which must select their whole context) equals the eager decode step, under the
    interpreter, and selects the same slots. Capture itself needs a GPU."""
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
    log = _record_selections(monkeypatch)
    eager, _ = engine.runner.forward(sched)
    sel_eager = log[:]
    log.clear()
    static, which = graphs.run(sched)            # batch 3 padded to 4
    assert which == [0, 1, 2]
    assert float((static - eager).norm() / eager.norm()) < 1e-5
    _assert_same_selections([(idx[:3], sc[:3]) for idx, sc in log], sel_eager, rel=1e-5)


@requires_cuda
@pytest.mark.parametrize("experts", [None, 4])
def test_cuda_graph_decode_matches_eager(experts):
    """Dense-MLP and MoE models (the engine's stacked experts: grouped GEMMs): captured
    decode == eager decode."""
    model = tiny_model(seed=43, dtype=torch.bfloat16, std=0.02, n_routed_experts=experts, kv_lora_rank=512,
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
