"""Engine correctness on CPU: greedy engine output == step-by-step reference decoding
of the model (sparse path, dense path, chunked prefill, continuous batching,
preemption), the sampler, stop conditions, caches and the allocator."""
import pytest
import torch

from flashdsa.engine import (
    LLM,
    BlockAllocator,
    EngineConfig,
    LLMEngine,
    PagedCaches,
    SamplingParams,
)
from flashdsa.engine.cache import PAGE_SIZE, ROOT, NoFreeBlocks
from flashdsa.engine.sampler import filter_logits
from tests.utils import requires_cuda

from .tiny import boundary_ties, penalized_greedy, reference_greedy, tiny_hf_tokenizer, tiny_model

GREEDY = dict(temperature=0, ignore_eos=True)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_reference_decoding_sparse():
    """Contexts from 3 to 95 tokens with index_topk 8: most queries go through the
    indexer; prompts cross the 64-token page boundary; prefill is chunked (16 tokens a
    step) and the batch mixes prefill chunks with decodes."""
    model = tiny_model()
    prompts = prompts_of([3, 18, 70, 9])
    llm = LLM(model, num_blocks=16, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(max_tokens=25, **GREEDY))
    dense_differs = False
    for p, o in zip(prompts, outs):
        ref = reference_greedy(model, p, 25)
        assert boundary_ties(model, p + ref) == 0     # the reference's selection is unique
        assert o.token_ids == ref, (len(p), o.token_ids, ref)
        assert o.finish_reason == "length"
        dense_differs |= reference_greedy(model, p, 25, attention="dense") != ref
    # the selection matters for these inputs, so the test sees a wrong selection
    assert dense_differs


def test_topk_covering_context_equals_dense_model():
    model = tiny_model(seed=3, index_topk=128)
    prompts = prompts_of([5, 40, 77], seed=2)
    outs = LLM(model, num_blocks=8, max_num_batched_tokens=32).generate(prompts, SamplingParams(max_tokens=30,
                                                                                                **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference_greedy(model, p, 30, attention="dense")


def test_continuous_batching_and_preemption():
    """6 requests join over time into a pool of 3 blocks (192 tokens) that cannot hold
    them all: sequences are preempted and recomputed; outputs stay exact."""
    model = tiny_model(seed=5)
    prompts = prompts_of([30, 50, 12, 61, 25, 7], seed=4)
    engine = LLMEngine(model, config=EngineConfig(num_blocks=3, max_num_batched_tokens=24, max_num_seqs=6))
    params = SamplingParams(max_tokens=30, **GREEDY)
    done = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:           # a new request every third step
            i, p = pending.pop(0)
            engine.add_request(p, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
    assert engine.scheduler.num_preemptions > 0
    assert engine.allocator.num_free == 3       # every block returned
    for i, p in enumerate(prompts):
        assert done[str(i)].token_ids == reference_greedy(model, p, 30), i


def test_request_too_long_is_rejected():
    engine = LLMEngine(tiny_model(), config=EngineConfig(num_blocks=2))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(2, 100)), SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([5, 300], SamplingParams())


def test_stop_tokens_strings_and_max_tokens():
    model = tiny_model(seed=7)
    llm = LLM(model, num_blocks=8)
    prompt = prompts_of([10], seed=6)[0]
    ref = reference_greedy(model, prompt, 12)
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=[stop_tok], **GREEDY))[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(ref[:first])
    # eos stops a request unless ignore_eos
    eos = llm.tokenizer.eos_token_id
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.token_ids == (ref[:ref.index(eos) + 1] if eos in ref else ref)
    assert out.finish_reason == ("stop" if eos in ref else "length")
    # a stop string: text cut before it
    text = llm.tokenizer.decode(ref)
    stop = text[3:5]
    out = llm.generate([prompt], SamplingParams(max_tokens=12, stop=[stop], **GREEDY))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]


def test_incremental_text_equals_decoding_the_whole_output():
    """The engine decodes a few tokens a step, not the whole output: the text grows by
    whole characters (a UTF-8 character split over tokens waits for its last byte, an
    invalid byte is replaced as the full decode replaces it), equals the full decode of
    the output whenever that has no partial character at its end, and at the end (length,
    stop token, stop string) exactly as the full decode gives it."""
    from flashdsa.engine.scheduler import Sequence
    engine = LLMEngine(tiny_model(), config=EngineConfig(num_blocks=8))
    tok = engine.tokenizer
    raw = list("aé€😀 b".encode()) + [0xE2, 0x82, ord("x"), 0x80, ord("y")] + list("ñ end".encode())
    cases = [(raw, SamplingParams(max_tokens=len(raw), **GREEDY), "length", tok.decode(raw)),
             (raw[:2] + [tok.eos_token_id], SamplingParams(max_tokens=99, temperature=0), "stop", tok.decode(raw[:2])),
             (raw, SamplingParams(max_tokens=99, stop=["😀 "], **GREEDY), "stop", "aé€")]
    for ids, params, reason, want in cases:
        seq = Sequence("r", [65], params)
        engine.scheduler.add(seq)
        for i, t in enumerate(ids):
            engine._append(seq, t)
            assert "\ufffd" not in seq.text[-1:] or seq.finished, (i, seq.text)
            full = tok.decode(seq.output_ids)
            if not seq.finished and not full.endswith("\ufffd"):
                assert seq.text == full, (i, seq.text, full)
            if seq.finished:
                break
        assert seq.finish_reason == reason and seq.text == want, (reason, seq.text, want)


def test_host_block_table_across_steps():
    """The engine's host block tables (the captured decode's, the eager steps') are
    written row by row as sequences join, leave, grow a block or are preempted (a new
    block list): after every step the table equals one built from scratch."""
    from flashdsa.engine.cache import HostBlockTable
    table = HostBlockTable(torch.full((4, 6), 99, dtype=torch.int32), 99)
    a, b, c = [3, 4], [7], [1, 2, 5]
    steps = [[a, b], [a, b, c], [b, c], [b, c], [c, b, a], [c]]
    for step, lists in enumerate(steps):
        if step == 3:
            b.append(8)          # b grew a block
        if step == 4:
            c = [9]              # c was preempted and came back with a new list
            lists[0] = c
        for i, blocks in enumerate(lists):
            table.set_row(i, blocks)
        for i in range(len(lists), 4):
            table.set_row(i, None)
        want = torch.full((4, 6), 99, dtype=torch.int32)
        for i, blocks in enumerate(lists):
            want[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        assert torch.equal(table.table, want), step


def test_sampling_seed_and_batch_independence():
    model = tiny_model(seed=8)
    prompts = prompts_of([6, 11, 20], seed=9)
    llm = LLM(model, num_blocks=16)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=15, ignore_eos=True)
    alone = llm.generate([prompts[1]], p)[0].token_ids
    batched = llm.generate(prompts, [SamplingParams(temperature=0.7, seed=1, max_tokens=9), p,
                                     SamplingParams(temperature=0, max_tokens=4)])[1].token_ids
    assert alone == batched
    other = llm.generate([prompts[1]], SamplingParams(temperature=1.0, top_p=0.9, seed=124, max_tokens=15,
                                                      ignore_eos=True))[0].token_ids
    assert other != alone
    # top_p so small that only the most likely token survives == greedy
    tiny_p = llm.generate([prompts[0]], SamplingParams(temperature=1.0, top_p=1e-6, seed=0, max_tokens=10,
                                                       ignore_eos=True))[0].token_ids
    assert tiny_p == reference_greedy(model, prompts[0], 10)


def test_logprobs_are_the_models():
    """Each generated token's log-probability and the top ones equal the log-softmax of
    the full model's logits at that step (to 2e-6: the engine samples from fp32 logits),
    for a greedy and a sampled request in one batch (the sampled one's under the
    untempered distribution); a request that does not ask gets None."""
    model = tiny_model(seed=31)
    prompts = prompts_of([12, 70], seed=32)
    params = [SamplingParams(max_tokens=5, logprobs=3, **GREEDY),
              SamplingParams(max_tokens=5, temperature=1.5, seed=3, logprobs=0, ignore_eos=True),
              SamplingParams(max_tokens=2, **GREEDY)]
    outs = LLM(model, num_blocks=8).generate(prompts + prompts[:1], params)
    for p, o, n_top in zip(prompts, outs, (3, 0)):
        assert len(o.logprobs) == len(o.token_ids) == 5
        seq = list(p)
        for tok, lp in zip(o.token_ids, o.logprobs):
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor(seq), backend="reference").logits[-1].double(), -1)
            assert lp.token_id == tok and abs(lp.logprob - float(ref[tok])) < 2e-6
            top = ref.topk(n_top)
            assert [i for i, _ in lp.top] == top.indices.tolist()
            assert all(abs(v - w) < 2e-6 for (_, v), w in zip(lp.top, top.values.tolist()))
            seq.append(tok)
    assert all(lp.top[0][0] == lp.token_id for lp in outs[0].logprobs)     # greedy: the likeliest token
    assert min(lp.logprob for lp in outs[1].logprobs) < float(max(lp.logprob for lp in outs[0].logprobs))
    assert outs[2].logprobs is None
    for bad in (-1, 21, 2.0):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_prompt_logprobs_score_the_whole_prompt():
    """prompt_logprobs: every prompt token after the first gets the log-probability the
    full model gives it after the tokens before it (to 2e-6, fp32), and its top tokens,
    across prefill chunks, beside a request that does not ask, for a prompt whose pages
    are in the prefix cache (computed again: no cached tokens) and under preemption in a
    small pool; max_tokens=0 only scores the prompt."""
    model = tiny_model(seed=33)
    prompts = prompts_of([130, 23], seed=34)

    def check(p, o, n_top):
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor(p), backend="reference").logits.double(), -1)
        for i, lp in enumerate(o.prompt_logprobs[1:], 1):
            assert lp.token_id == p[i] and abs(lp.logprob - float(ref[i - 1, p[i]])) < 2e-6, i
            assert [t for t, _ in lp.top] == ref[i - 1].topk(n_top).indices.tolist()

    llm = LLM(model, num_blocks=8, max_num_batched_tokens=32)
    first = llm.generate(prompts, [SamplingParams(max_tokens=0, prompt_logprobs=2, **GREEDY),
                                   SamplingParams(max_tokens=4, **GREEDY)])
    check(prompts[0], first[0], 2)
    assert first[0].token_ids == [] and first[0].finish_reason == "length"
    assert first[1].prompt_logprobs is None and first[1].token_ids == reference_greedy(model, prompts[1], 4)
    again = llm.generate(prompts[:1], SamplingParams(max_tokens=3, prompt_logprobs=1, **GREEDY))[0]
    assert again.metrics["cached_tokens"] == 0 and again.token_ids == reference_greedy(model, prompts[0], 3)
    check(prompts[0], again, 1)
    small = LLMEngine(model, config=EngineConfig(num_blocks=3, max_num_batched_tokens=24, max_num_seqs=3))
    ids = [small.add_request(p, SamplingParams(max_tokens=30, prompt_logprobs=0, **GREEDY))
           for p in prompts_of([60, 70, 20], seed=35)]
    done = {}
    while small.has_unfinished_requests():
        done.update((o.request_id, o) for o in small.step() if o.finished)
    assert small.scheduler.num_preemptions > 0
    for p, i in zip(prompts_of([60, 70, 20], seed=35), ids):
        check(p, done[i], 0)


def test_penalties_match_their_definition():
    """Presence, frequency and repetition penalties, each and together, beside a request
    without any in the same batch: greedy tokens equal decoding the full model with the
    penalties written out; a strong presence penalty repeats no token; logprobs stay the
    model's (unpenalized)."""
    model = tiny_model(seed=41)
    prompt = prompts_of([25], seed=42)[0]
    cases = [dict(presence_penalty=1.5), dict(frequency_penalty=0.7), dict(repetition_penalty=1.8),
             dict(presence_penalty=0.5, frequency_penalty=-0.3, repetition_penalty=0.6), {}]
    outs = LLM(model, num_blocks=16).generate([prompt] * len(cases),
                                              [SamplingParams(max_tokens=12, logprobs=0, **GREEDY, **c)
                                               for c in cases])
    names = {"presence_penalty": "presence", "frequency_penalty": "frequency", "repetition_penalty": "repetition"}
    for c, o in zip(cases, outs):
        assert o.token_ids == penalized_greedy(model, prompt, 12, **{names[k]: v for k, v in c.items()}), c
    assert outs[-1].token_ids == reference_greedy(model, prompt, 12)
    assert any(o.token_ids != outs[-1].token_ids for o in outs[:-1])
    strong = LLM(model, num_blocks=16).generate([prompt], SamplingParams(max_tokens=20, presence_penalty=2.0,
                                                                          **GREEDY))[0]
    assert len(set(strong.token_ids)) == 20
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(prompt), backend="reference").logits[-1].double(), -1)
    assert abs(outs[2].logprobs[0].logprob - float(ref[outs[2].token_ids[0]])) < 2e-6   # penalized from step 1
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty="1"), dict(repetition_penalty=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_filter_logits_top_p_top_k():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    out = filter_logits(logits, 1.0, 0, 0.7)       # 0.5 + 0.3 reach 0.7
    torch.testing.assert_close(out, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    out = filter_logits(logits, 1.0, 3, 1.0)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    sharp = filter_logits(logits, 0.5, 0, 1.0)     # temperature 0.5 squares the odds
    torch.testing.assert_close(sharp, probs ** 2 / (probs ** 2).sum())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_sampler_filters_rows_together_and_draws_their_distribution(device):
    """Rows with their own temperature, top-k and top-p filtered in one batch equal each
    row filtered alone; 20000 seeded draws of each row's token land on its filtered
    distribution (every frequency within 4 standard deviations, filtered-out tokens
    never), with and without the sort that top-k and top-p need. On a GPU the filtering
    runs there."""
    from flashdsa.engine.sampler import filter_sorted, make_generator, sample
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, generator=g) * 2).to(device)
    cfg = [(0.7, 0, 0.8), (1.3, 3, 1.0), (1.0, 2, 0.5)]
    p, order = filter_sorted(logits, torch.tensor([c[0] for c in cfg], device=device),
                             torch.tensor([c[1] for c in cfg], device=device),
                             torch.tensor([c[2] for c in cfg], device=device))
    batched = torch.zeros_like(p).scatter_(1, order, p)
    for r, c in enumerate(cfg):
        torch.testing.assert_close(batched[r], filter_logits(logits[r], *c), rtol=0, atol=0)
    n = 20000
    for params in ([SamplingParams(temperature=c[0], top_k=c[1], top_p=c[2], seed=r) for r, c in enumerate(cfg)],
                   [SamplingParams(temperature=c[0], seed=r) for r, c in enumerate(cfg)]):
        gens = [make_generator(sp) for sp in params]
        counts = torch.zeros(3, 7)
        for _ in range(n):
            for r, t in enumerate(sample(logits, params, gens)):
                counts[r, t] += 1
        want = torch.stack([filter_logits(logits[r], sp.temperature, sp.top_k, sp.top_p)
                            for r, sp in enumerate(params)]).cpu()
        sd = (want * (1 - want) / n).sqrt()
        assert ((counts / n - want).abs() <= 4 * sd + 1e-12).all(), (counts / n, want)


def test_block_allocator():
    a = BlockAllocator(3)
    x = a.allocate(2)
    assert x == [0, 1] and a.num_free == 1
    with pytest.raises(NoFreeBlocks):
        a.allocate(2)
    assert a.num_free == 1                           # a failed allocation takes nothing
    a.free([0])
    assert a.allocate(2) == [0, 2]
    with pytest.raises(ValueError, match="double free"):
        a.free([0, 0])


def test_block_allocator_prefix_cache():
    """Blocks are found by their tokens AND every token before them; a block held by
    two sequences is released by the second free; unheld cached blocks count as free and
    are evicted only when no uncached block is, the end of a sequence first."""
    a_tok, b_tok, c_tok = ([i] * PAGE_SIZE for i in (1, 2, 3))
    a = BlockAllocator(4, prefix_caching=True)
    x = a.allocate(3)
    n0 = a.register(x[0], ROOT, a_tok)
    n1 = a.register(x[1], n0, b_tok)
    assert a.match(a_tok + b_tok + c_tok, 3) == ([x[0], x[1]], [n0, n1])
    assert a.match(a_tok + b_tok, 1) == ([x[0]], [n0])            # at most max_blocks
    assert a.match(a_tok + c_tok + b_tok, 3) == ([x[0]], [n0])     # stops at the first miss
    assert a.match(b_tok + b_tok, 2) == ([], [])                   # b_tok cached only after a_tok
    assert a.match(a_tok[:-1] + [9] + b_tok, 2) == ([], [])         # one token differs
    assert a.register(x[2], ROOT, a_tok) == n0                     # same contents: the cached block stays
    a.acquire([x[0], x[1]])                                        # a second sequence takes the prefix
    a.free(x)                                                      # the first ends
    assert a.num_free == 2 and a.num_idle([x[0], x[1]]) == 0       # x[2] (uncached) and block 3
    a.free([x[0], x[1]])
    assert a.num_free == 4 and a.num_idle(x) == 2
    assert a.allocate(2) == [2, 3]                                 # uncached blocks go first
    assert a.allocate(1) == [x[1]]                                 # then the sequence's end is evicted
    assert a.match(a_tok + b_tok, 2) == ([x[0]], [n0])
    with pytest.raises(ValueError, match="not allocated"):
        a.register(x[0], ROOT, c_tok)                              # x[0] is cached but nobody holds it
    a.acquire([x[0]])
    assert a.num_free == 0
    with pytest.raises(NoFreeBlocks):
        a.allocate(1)
    off = BlockAllocator(2)
    y = off.allocate(1)
    assert off.register(y[0], ROOT, a_tok) == ROOT and off.match(a_tok + b_tok, 1) == ([], [])
    off.free(y)
    assert off.num_free == 2 and off.num_idle(y) == 0


def test_prefix_caching_skips_cached_tokens_and_keeps_outputs():
    """Requests that share leading blocks with earlier ones compute only the rest and
    decode the reference's tokens: a shared prefix, a repeated prompt of whole blocks
    (its last block is computed again, for its logits), the next turn of a chat (prompt +
    answer + more), and a prompt whose second block equals a cached one after another
    first block (no hit). The last case and the token counts fail if blocks were found
    by their own tokens alone or not skipped."""
    model = tiny_model(seed=21)
    prefix, tails = prompts_of([150], seed=22)[0], prompts_of([7, 30, 1], seed=23)
    engine = LLMEngine(model, config=EngineConfig(num_blocks=24, max_num_batched_tokens=64))
    steps = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    params = SamplingParams(max_tokens=6, **GREEDY)

    def run(prompts):
        ids = [engine.add_request(p, params) for p in prompts]
        done, steps[:] = {}, []
        while engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        return [done[i] for i in ids], sum(n for step in steps for _, n in step)

    (first,), n_first = run([prefix + tails[0]])
    assert first.metrics["cached_tokens"] == 0 and n_first == 157 + 5
    outs, n = run([prefix + t for t in tails])
    assert [o.metrics["cached_tokens"] for o in outs] == [128] * 3
    assert n == sum(150 + len(t) - 128 + 5 for t in tails)
    second_turn = prefix + tails[0] + first.token_ids + tails[1]
    whole = prefix[:128]
    r, t = prompts_of([64, 64], seed=24)
    other_first = r + t + tails[2]                 # caches t's block after r's
    outs2, _ = run([second_turn, whole, other_first])
    assert [o.metrics["cached_tokens"] for o in outs2] == [128, 64, 0]
    crossed = prefix[:64] + t + tails[1]           # t's block is cached, but not after prefix[:64]
    (last,), _ = run([crossed])
    assert last.metrics["cached_tokens"] == 64
    for p, o in zip([prefix + tails[0]] + [prefix + t for t in tails] + [second_turn, whole, other_first, crossed],
                    [first] + outs + outs2 + [last]):
        assert o.token_ids == reference_greedy(model, p, 6), len(p)
    assert engine.allocator.num_free == 24


def test_requests_arriving_together_compute_a_shared_start_once():
    """Three requests with a 150-token shared start, added together with room for all in
    one step: the later two wait while the first computes the shared pages, then take
    them from the cache (128 tokens each), and all decode the reference's tokens."""
    model = tiny_model(seed=37)
    shared = prompts_of([150], seed=38)[0]
    prompts = [shared + t for t in prompts_of([7, 30, 2], seed=39)]
    engine = LLMEngine(model, config=EngineConfig(num_blocks=24, max_num_batched_tokens=512))
    steps = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    ids = [engine.add_request(p, SamplingParams(max_tokens=4, **GREEDY)) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [done[i].metrics["cached_tokens"] for i in ids] == [0, 128, 128]
    assert sum(n for step in steps for _, n in step) == sum(len(p) + 3 for p in prompts) - 2 * 128
    for p, i in zip(prompts, ids):
        assert done[i].token_ids == reference_greedy(model, p, 4)


def check_pool(engine) -> None:
    """The allocator's books against the sequences: every block is free, cached-idle or
    held, by as many live sequences as hold it; a block two sequences hold is a cached one
    inside both computed prefixes; a cached block a sequence holds holds its tokens."""
    a = engine.allocator
    live = [s for s in engine.scheduler.running] + [s for s in engine.scheduler.waiting if s.blocks]
    holders = {}
    for s in live:
        for b in s.blocks:
            holders[b] = holders.get(b, 0) + 1
    assert holders == a._refs
    assert not set(a._free) & set(holders) and not set(a._idle) & set(holders)
    assert len(a._free) + len(a._idle) + len(holders) == a.num_blocks
    for s in live:
        for i, b in enumerate(s.blocks):
            if holders[b] > 1:
                assert b in a._key_of and (i + 1) * PAGE_SIZE <= s.num_computed
        for i, node in enumerate(s.block_nodes):
            key = a._key_of.get(s.blocks[i])
            if key is not None and key[1] == node:
                assert list(key[0][1]) == s.token_slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)


def test_generate_n_choices():
    """SamplingParams(n=3): one output per prompt, its ``choices`` the three (greedy: all
    the reference's; seeded: choice i what seed + i gives alone), a 150-token prompt's
    full pages computed once; one engine request is one choice."""
    model = tiny_model(seed=47)
    prompt = prompts_of([150], seed=48)[0]
    llm = LLM(model, num_blocks=24, max_num_batched_tokens=512)
    greedy, sampled = llm.generate([prompt, prompt[:40]], [SamplingParams(n=3, max_tokens=5, **GREEDY),
                                                           SamplingParams(n=3, max_tokens=5, temperature=1.0,
                                                                          seed=7, ignore_eos=True)])
    want = reference_greedy(model, prompt, 5)
    assert len(greedy.choices) == 3 and greedy.choices[0] is not None and greedy.token_ids == want
    assert [c.token_ids for c in greedy.choices] == [want] * 3
    assert [c.metrics["cached_tokens"] for c in greedy.choices] == [0, 128, 128]
    alone = [llm.generate([prompt[:40]], SamplingParams(max_tokens=5, temperature=1.0, seed=7 + i,
                                                        ignore_eos=True))[0].token_ids for i in range(3)]
    assert [c.token_ids for c in sampled.choices] == alone and sampled.token_ids == alone[0]
    assert llm.generate([prompt[:40]], SamplingParams(max_tokens=2, **GREEDY))[0].choices is None
    with pytest.raises(ValueError, match="one choice"):
        llm.engine.add_request(prompt, SamplingParams(n=2))
    with pytest.raises(ValueError, match="n:"):
        SamplingParams(n=0)


def test_prefix_caching_random_traffic_keeps_books_and_outputs():
    """Seeded random traffic over a pool of 6 pages: prompts drawn from a few shared
    starts and from turns of earlier requests, arrivals at random steps, some aborted,
    preemptions: after every step the allocator's books hold (check_pool), and every
    request that finishes decodes the reference's tokens (those whose reference selection
    has a tie at the top-k boundary, which two correct runs may break differently, are
    not compared: at most a third)."""
    model = tiny_model(seed=43, index_n_heads=16)   # 16 indexer heads: few keys score exactly 0
    g = torch.Generator().manual_seed(44)
    starts = prompts_of([70, 130, 20], seed=45)
    engine = LLMEngine(model, config=EngineConfig(num_blocks=6, max_num_batched_tokens=48, max_num_seqs=5))
    done, prompts, aborted = {}, {}, set()
    for _ in range(400):
        if len(prompts) < 14 and int(torch.randint(0, 3, (1,), generator=g)) == 0:
            base = starts[int(torch.randint(0, 3, (1,), generator=g))]
            if done and int(torch.randint(0, 2, (1,), generator=g)):
                prev = list(done.values())[int(torch.randint(0, len(done), (1,), generator=g))]
                base = prev.prompt_token_ids + prev.token_ids
            tail = torch.randint(0, 256, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            p = (base + tail)[:200]
            prompts[engine.add_request(p, SamplingParams(max_tokens=12, **GREEDY))] = p
        if engine.sequences and int(torch.randint(0, 25, (1,), generator=g)) == 0:
            rid = list(engine.sequences)[0]
            engine.abort_request(rid)
            aborted.add(rid)
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        check_pool(engine)
        if len(prompts) >= 14 and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests() and engine.allocator.num_free == 6
    assert engine.scheduler.num_preemptions > 0 and sum(o.metrics["cached_tokens"] > 0 for o in done.values()) >= 3
    compared = 0
    for rid, o in done.items():
        assert rid not in aborted
        ref = reference_greedy(model, prompts[rid], 12)
        if boundary_ties(model, prompts[rid] + ref) == 0:
            assert o.token_ids == ref, rid
            compared += 1
    assert compared >= 2 * len(done) / 3, (compared, len(done))


def test_prefix_caching_under_eviction_and_preemption():
    """A pool too small to keep every request's blocks: cached blocks are evicted and
    sequences preempted (and readmitted onto cached blocks), and every output stays
    the reference's; the same requests without prefix caching decode the same."""
    model = tiny_model(seed=25)
    base = prompts_of([70], seed=26)[0]
    prompts = [base + t for t in prompts_of([20, 45, 3, 60, 11], seed=27)]
    outs = {}
    for caching in (True, False):
        engine = LLMEngine(model, config=EngineConfig(num_blocks=4, max_num_batched_tokens=32, max_num_seqs=5,
                                                      enable_prefix_caching=caching))
        done = {}
        pending = list(enumerate(prompts))
        steps = 0
        while pending or engine.has_unfinished_requests():
            if pending and steps % 4 == 0:
                i, p = pending.pop(0)
                engine.add_request(p, SamplingParams(max_tokens=20, **GREEDY), request_id=str(i))
            done.update((o.request_id, o) for o in engine.step() if o.finished)
            steps += 1
        assert engine.scheduler.num_preemptions > 0 and engine.allocator.num_free == 4
        outs[caching] = [done[str(i)] for i in range(len(prompts))]
    assert any(o.metrics["cached_tokens"] for o in outs[True])
    assert not any(o.metrics["cached_tokens"] for o in outs[False])
    for p, a, b in zip(prompts, outs[True], outs[False]):
        assert a.token_ids == b.token_ids == reference_greedy(model, p, 20)


def test_rope_cos_sin_once_a_step(monkeypatch):
    """The layers of a step share one RoPE cos/sin computation: three steps, three
    computations, and the reference's tokens."""
    from flashdsa.layers import MLA
    model = tiny_model(seed=29)
    prompt = prompts_of([20], seed=30)[0]
    want = reference_greedy(model, prompt, 3)
    calls = []
    compute = MLA.rope_cos_sin
    monkeypatch.setattr(MLA, "rope_cos_sin", lambda self, pos: calls.append(self) or compute(self, pos))
    llm = LLM(model, num_blocks=8)
    assert llm.generate([prompt], SamplingParams(max_tokens=3, **GREEDY))[0].token_ids == want
    assert len(calls) == 3                                      # the prefill and two decodes


def test_fp8_ds_mla_cache_roundtrip_and_engine():
    """V3.2 latent widths (512 + 64) with the fp8_ds_mla cache: rows come back as the
    reference quantizer's values, and the engine's first logits stay within fp8 error
    of the unquantized cache."""
    from flashdsa.reference.mla_cache import dequantize_mla_cache, quantize_mla_cache
    caches = PagedCaches(1, 2, 576, 16, "fp8_ds_mla", torch.float32, "cpu", 512)
    rows = torch.randn(5, 576)
    slots = torch.tensor([3, 64, 65, 127, 0])
    caches.write_latent(0, slots, rows)
    back = caches.read_latent(slots, 0, torch.float32)
    torch.testing.assert_close(back, dequantize_mla_cache(quantize_mla_cache(rows), torch.float32), rtol=0, atol=0)
    assert (back - rows).norm() / rows.norm() < 0.05

    model = tiny_model(seed=11, dtype=torch.float32, kv_lora_rank=512, qk_rope_head_dim=64, hidden_size=32,
                       num_attention_heads=2, index_head_dim=64)
    prompt = prompts_of([40], seed=12)[0]

    def first_logits(kv_cache_dtype, simulate_fp8=False):
        engine = LLMEngine(model, config=EngineConfig(num_blocks=2, kv_cache_dtype=kv_cache_dtype))
        if simulate_fp8:   # unquantized cache fed with quantized-then-dequantized rows
            write = engine.caches.write_latent
            engine.caches.write_latent = lambda layer, slots, rows: write(
                layer, slots, dequantize_mla_cache(quantize_mla_cache(rows), rows.dtype))
        engine.add_request(prompt, SamplingParams(max_tokens=1))
        return engine.runner.forward(engine.scheduler.schedule())[0]

    with torch.no_grad():
        ref = model(torch.tensor(prompt)).logits[-1:]
    fp8, plain, simulated = first_logits("fp8_ds_mla"), first_logits("auto"), first_logits("auto", True)
    assert (plain - ref).norm() / ref.norm() < 1e-5
    assert (fp8 - simulated).norm() / simulated.norm() < 1e-5     # exactly the fp8_ds_mla rounding
    assert (fp8 - ref).norm() / ref.norm() > 1e-3                 # ... which is not nothing
    with pytest.raises(ValueError, match="fp8_ds_mla"):
        LLMEngine(tiny_model(), config=EngineConfig(num_blocks=2, kv_cache_dtype="fp8_ds_mla"))


def test_scheduler_limits_and_joining():
    """Every step respects the token budget and max_num_seqs; a request added while
    others decode joins the very next step, beside them (continuous batching)."""
    engine = LLMEngine(tiny_model(seed=13), config=EngineConfig(num_blocks=16, max_num_batched_tokens=20,
                                                                max_num_seqs=3))
    steps = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    for p in prompts_of([45, 5], seed=14):
        engine.add_request(p, SamplingParams(max_tokens=12, **GREEDY))
    while not all(len(s.output_ids) >= 2 for s in engine.sequences.values()):
        engine.step()
    late = engine.add_request(prompts_of([30], seed=15)[0], SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    assert {s.request_id for s, _ in steps[-1]} == {"0", "1", late}   # two decodes + the new prefill
    for p in prompts_of([9, 30, 17], seed=16):
        engine.add_request(p, SamplingParams(max_tokens=5, **GREEDY))
    while engine.has_unfinished_requests():
        engine.step()
    for sched in steps:
        assert sum(n for _, n in sched) <= 20 and len(sched) <= 3
    assert max(len(sched) for sched in steps) == 3
    assert engine.allocator.num_free == 16


def test_llm_from_checkpoint_directory(tmp_path):
    model = tiny_model(seed=17, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    prompts = prompts_of([12, 30], seed=18)
    params = SamplingParams(max_tokens=8, **GREEDY)
    from_dir = LLM(str(tmp_path), device="cpu").generate(prompts, params)
    direct = LLM(model).generate(prompts, params)
    assert [o.token_ids for o in from_dir] == [o.token_ids for o in direct]


def test_llm_reads_the_checkpoint_directorys_tokenizer(tmp_path, capsys):
    """LLM(directory) takes the directory's Hugging Face tokenizer: its ids (one BOS, also
    after the chat template, which writes it), its decoded text, its eos; a directory
    without tokenizer files and a vocabulary the byte tokenizer does not fit warns; a
    tokenizer larger than the vocabulary, a chat without a template and a --tokenizer
    directory without files are errors that say so."""
    from flashdsa.cli import main
    from flashdsa.engine.tokenizer import HFTokenizer
    model = tiny_model(seed=17, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    hf = tiny_hf_tokenizer()
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), device="cpu")
    assert isinstance(llm.tokenizer, HFTokenizer) and llm.tokenizer.eos_token_id == hf.eos_token_id
    out = llm.generate(["hello world"], SamplingParams(max_tokens=6, **GREEDY))[0]
    assert out.prompt_token_ids == hf.encode("hello world") and out.prompt_token_ids.count(hf.bos_token_id) == 1
    assert out.token_ids == reference_greedy(model, out.prompt_token_ids, 6)
    assert out.text == hf.decode(out.token_ids, skip_special_tokens=True)
    ids = hf.encode("hello wörld", add_special_tokens=False)     # byte-level: a token's bytes, for logprobs
    assert b"".join(llm.tokenizer.token_bytes(i) for i in ids) == "hello wörld".encode()
    assert llm.tokenizer.token_bytes(hf.bos_token_id) == b""
    chat = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=2, **GREEDY))
    assert chat.prompt_token_ids[0] == hf.bos_token_id and chat.prompt_token_ids.count(hf.bos_token_id) == 1
    no_template = tmp_path / "no_template"
    model.save_pretrained(no_template)
    tiny_hf_tokenizer(chat_template=False).save_pretrained(no_template)
    with pytest.raises(ValueError, match="chat template"):
        LLM(str(no_template), device="cpu").chat([{"role": "user", "content": "hello"}])
    wide = tmp_path / "wide"
    tiny_model(seed=17, dtype=torch.float32, vocab_size=300).save_pretrained(wide)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        LLM(str(wide), device="cpu")
    small = tmp_path / "small"
    tiny_model(seed=17, dtype=torch.float32, vocab_size=100).save_pretrained(small)
    hf.save_pretrained(small)
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        LLM(str(small), device="cpu")
    assert main(["generate", str(tmp_path), "--tokenizer", str(wide), "--prompt", "x"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_cuda_graphs_switch():
    """cuda_graphs: None (default) decodes eagerly without a word where graphs cannot run
    (here: CPU), True says why it cannot, False is off; anything else is an error. The
    CLI's --cuda-graphs / --no-cuda-graphs map to True / False, absent to None."""
    import warnings

    from flashdsa.cli import build_parser

    model = tiny_model()
    assert EngineConfig().cuda_graphs is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LLMEngine(model, config=EngineConfig(num_blocks=8)).runner.graphs is None
        assert LLMEngine(model, config=EngineConfig(num_blocks=8, cuda_graphs=False)).runner.graphs is None
    with pytest.warns(UserWarning, match="cuda_graphs requested but off: CUDA graphs need a CUDA device"):
        assert LLMEngine(model, config=EngineConfig(num_blocks=8, cuda_graphs=True)).runner.graphs is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        LLMEngine(model, config=EngineConfig(num_blocks=8, cuda_graphs="on"))
    parser = build_parser()
    for flags, want in (([], None), (["--cuda-graphs"], True), (["--no-cuda-graphs"], False)):
        assert parser.parse_args(["generate", "random:tiny", *flags]).cuda_graphs is want


def test_engine_stacks_experts_and_captures_moe_models(tmp_path):
    """The engine stacks every MoE layer's experts (the grouped forward: no host sync), so
    CUDA graphs refuse an MoE model only where torch's grouped GEMM does not take its
    weights (here float64), and say so; the model still saves and reloads with its
    values; without the memory to stack a layer's experts it warns and leaves them."""
    from flashdsa.checkpoint import from_pretrained, save_pretrained
    from flashdsa.engine.cuda_graph import graphs_supported
    from flashdsa.engine.llm import stack_experts
    from flashdsa.model import MoE
    cuda = torch.device("cuda")   # the check itself needs no GPU
    for dtype, why in ((torch.bfloat16, None), (torch.float64, "float64")):
        model = tiny_model(seed=5, dtype=dtype)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert "MoE" in graphs_supported(model, cuda, "auto")
        LLMEngine(model, config=EngineConfig(num_blocks=4))
        moe = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
        assert moe and all(m._stacked is not None for m in moe)
        got = graphs_supported(model, cuda, "auto")
        assert got is None if why is None else why in got, got
        save_pretrained(model, tmp_path / str(dtype))
        again = from_pretrained(tmp_path / str(dtype))
        assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    model = tiny_model(seed=5, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="stacking an MoE layer's experts needs"):
        stack_experts(model, free_bytes=1000)   # the tiny MoE layer's experts take 18 KB in bf16
    assert "not stacked" in graphs_supported(model, cuda, "auto")


def test_engine_merges_projections_and_model_stays_usable(tmp_path):
    """The engine merges each layer's projections (views of one tensor per input): the
    model keeps its values, still saves and reloads through save_pretrained, and its own
    forward gives the same logits as before."""
    from flashdsa.checkpoint import from_pretrained, save_pretrained
    model = tiny_model(seed=5, dtype=torch.float32, n_routed_experts=None)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    LLMEngine(model, config=EngineConfig(num_blocks=4))
    attn = model.model.layers[0].self_attn
    assert attn._merged is not None and attn.q_a_proj.weight.data_ptr() == attn._merged[0].data_ptr()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    save_pretrained(model, tmp_path)
    again = from_pretrained(tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
