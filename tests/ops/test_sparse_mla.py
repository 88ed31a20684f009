"""Triton sparse MLA forward vs the float64 reference (SPEC 3).

On CPU the kernel runs under the Triton interpreter with fp32/fp16 inputs (bf16 dots
are wrong there); the bf16 accuracy requirement is a GPU test. Outputs are allocated
poisoned with NaN so that an entry the kernel fails to write cannot pass.
"""
import math

import pytest
import torch

import flashdsa
from flashdsa import reference as ref
from flashdsa.ops.sparse_mla import run_sparse_mla_fwd
from tests.utils import KERNEL_DEVICE, rel_err, requires_cuda


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors while the test runs."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def make_inputs(s_q, s_kv, h_q, d_qk, topk, dtype, device=KERNEL_DEVICE):
    q = torch.randn(s_q, h_q, d_qk, dtype=dtype, device=device)
    kv = torch.randn(s_kv, 1, d_qk, dtype=dtype, device=device)
    # invalid entries of both kinds (-1 and >= s_kv) mixed with valid ones, repeats allowed
    idx = torch.randint(-1, s_kv + 4, (s_q, 1, topk), dtype=torch.int32, device=device)
    idx[0] = -1  # a row with no valid index at all
    if s_q > 2:
        idx[2, 0, : topk // 2] = 3  # one row listed many times counts many times
    return q, kv, idx


def check_against_reference(q, kv, idx, sm_scale, d_v, out, max_logits, lse, factor=2.0, floor=1e-5):
    """Kernel error vs float64 must be within ``factor`` x the same-dtype reference's error
    (plus a small floor for fp32, whose reference error can be ~0)."""
    r64 = ref.sparse_mla_fwd(q.double(), kv.double(), idx, sm_scale, d_v)
    rlo = ref.sparse_mla_fwd(q, kv, idx, sm_scale, d_v)
    for name, got, want, low in zip(("out", "max_logits", "lse"), (out, max_logits, lse), r64, rlo):
        assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or invalid arithmetic)"
        err, budget = rel_err(got, want), factor * rel_err(low, want) + floor
        assert err <= budget, f"{name}: rel err {err:.3g} > budget {budget:.3g}"
    empty = (idx[:, 0] < 0) | (idx[:, 0] >= kv.shape[0])
    empty = empty.all(-1)
    assert torch.equal(out[empty].float(), torch.zeros_like(out[empty].float()))
    assert (max_logits[empty] == -math.inf).all() and (lse[empty] == math.inf).all()


# (s_q, s_kv, h_q, d_qk, d_v, topk, dtype): odd sizes, topk not a multiple of BLOCK_K,
# h_q 16 and a non-power-of-two h_q, d_v not a power of two, d_qk == d_v (no tail)
CASES = [
    (3, 50, 16, 80, 64, 37, torch.float32),
    (4, 41, 48, 64, 64, 70, torch.float16),
    (3, 33, 16, 96, 80, 19, torch.float32),
    (2, 30, 32, 64, 64, 5, torch.float32),
]


@pytest.mark.parametrize("s_q,s_kv,h_q,d_qk,d_v,topk,dtype", CASES)
def test_sparse_mla_fwd_matches_reference(poison_empty, s_q, s_kv, h_q, d_qk, d_v, topk, dtype):
    q, kv, idx = make_inputs(s_q, s_kv, h_q, d_qk, topk, dtype)
    sm_scale = d_qk ** -0.5 * 1.3
    out, ml, lse = flashdsa.sparse_mla_fwd(q, kv, idx, sm_scale, d_v, backend="triton")
    assert out.shape == (s_q, h_q, d_v) and out.dtype == dtype
    assert ml.dtype == torch.float32 and lse.dtype == torch.float32
    check_against_reference(q, kv, idx, sm_scale, d_v, out, ml, lse)


@pytest.mark.parametrize("n_split", [2, 3])
def test_split_k_matches_reference(poison_empty, n_split):
    q, kv, idx = make_inputs(3, 60, 16, 80, 101, torch.float32)
    out, ml, lse = run_sparse_mla_fwd(q, kv, idx, 0.2, 64, n_split=n_split)
    check_against_reference(q, kv, idx, 0.2, 64, out, ml, lse)


def test_large_logits_stay_finite(poison_empty):
    """Online softmax must rescale: logits far beyond exp's range still give finite out."""
    q, kv, idx = make_inputs(3, 40, 16, 64, 45, torch.float32)
    out, ml, lse = run_sparse_mla_fwd(q * 30, kv, idx, 1.0, 64)
    check_against_reference(q * 30, kv, idx, 1.0, 64, out, ml, lse)


FP16_ULP = 2.0 ** -11  # relative rounding of the probabilities' fp16 scratch
E4M3_ULP = 2.0 ** -4   # and of the e4m3 one


def check_probs(q, kv, idx, sm_scale, d_v, probs, factor=2.0, rounding=FP16_ULP):
    """probs vs the float64 reference's: within ``factor`` x the same-dtype reference's
    error plus the scratch's rounding; exactly 0 at invalid slots and empty rows."""
    want = ref.sparse_mla_fwd(q.double(), kv.double(), idx, sm_scale, d_v, return_probs=True)[3]
    low = ref.sparse_mla_fwd(q, kv, idx, sm_scale, d_v, return_probs=True)[3]
    assert probs.shape == want.shape and probs.dtype == torch.float32
    err, budget = rel_err(probs, want), factor * rel_err(low, want) + rounding
    assert err <= budget, f"probs: rel err {err:.3g} > budget {budget:.3g}"
    invalid = (idx[:, 0] < 0) | (idx[:, 0] >= kv.shape[0])
    assert (probs[invalid] == 0).all()
    # each row's probabilities over its valid slots sum to 1 (0 for a row with none)
    sums = probs.double().sum(-1)
    any_valid = (~invalid).any(-1)
    torch.testing.assert_close(sums, any_valid.double(), atol=8 * rounding, rtol=0)


@pytest.mark.parametrize("s_q,s_kv,h_q,d_qk,d_v,topk,dtype", CASES)
def test_return_probs_matches_reference(poison_empty, s_q, s_kv, h_q, d_qk, d_v, topk, dtype):
    q, kv, idx = make_inputs(s_q, s_kv, h_q, d_qk, topk, dtype)
    sm_scale = d_qk ** -0.5 * 1.3
    out, ml, lse, probs = flashdsa.sparse_mla_fwd(q, kv, idx, sm_scale, d_v, backend="triton", return_probs=True,
                                                  probs_precision="fp16")
    check_against_reference(q, kv, idx, sm_scale, d_v, out, ml, lse)
    check_probs(q, kv, idx, sm_scale, d_v, probs)


def test_return_probs_several_head_blocks(poison_empty):
    """h_q 40 over head blocks of 16 (the last one padded): the per-block sums add up."""
    q, kv, idx = make_inputs(5, 70, 40, 80, 53, torch.float32)
    out, ml, lse, probs = run_sparse_mla_fwd(q * 3, kv, idx, 0.2, 64, config=dict(BLOCK_H=16, BLOCK_K=16),
                                             return_probs=True, probs_dtype=torch.float16)
    check_against_reference(q * 3, kv, idx, 0.2, 64, out, ml, lse)
    check_probs(q * 3, kv, idx, 0.2, 64, probs)


def test_return_probs_e4m3_scratch(poison_empty):
    """The 1-byte scratch, the public op's default: probs within the e4m3 rounding; out, lse unchanged."""
    q, kv, idx = make_inputs(5, 70, 40, 80, 53, torch.float32)
    out, ml, lse, probs = flashdsa.sparse_mla_fwd(q * 3, kv, idx, 0.2, 64, backend="triton", return_probs=True)
    check_against_reference(q * 3, kv, idx, 0.2, 64, out, ml, lse)
    check_probs(q * 3, kv, idx, 0.2, 64, probs, rounding=E4M3_ULP)
    e4m3 = run_sparse_mla_fwd(q * 3, kv, idx, 0.2, 64, return_probs=True, probs_dtype=torch.float8_e4m3fn)[3]
    assert torch.equal(probs, e4m3)
    fp16 = run_sparse_mla_fwd(q * 3, kv, idx, 0.2, 64, return_probs=True, probs_dtype=torch.float16)[3]
    assert rel_err(probs, fp16) > FP16_ULP  # the e4m3 path really ran


def test_return_probs_e4m3_scratch_without_the_e4m3_type(poison_empty, monkeypatch):
    """Where Triton has no e4m3 type (before sm_89, e.g. the A100) the scratch holds the e4m3
    bytes encoded and decoded with integer operations (round to nearest even, as torch's
    cast): probabilities within the e4m3 rounding, the rest of the forward unchanged."""
    from flashdsa.ops.sparse_mla import fwd
    q, kv, idx = make_inputs(5, 70, 40, 80, 53, torch.float32)
    native = run_sparse_mla_fwd(q * 3, kv, idx, 0.2, 64, return_probs=True, probs_dtype=torch.float8_e4m3fn)
    monkeypatch.setattr(fwd, "fp8_native", lambda device: False)
    out, ml, lse, probs = run_sparse_mla_fwd(q * 3, kv, idx, 0.2, 64, return_probs=True,
                                             probs_dtype=torch.float8_e4m3fn)
    assert torch.equal(out, native[0]) and torch.equal(ml, native[1]) and torch.equal(lse, native[2])
    check_probs(q * 3, kv, idx, 0.2, 64, probs, rounding=E4M3_ULP)
    fp16 = run_sparse_mla_fwd(q * 3, kv, idx, 0.2, 64, return_probs=True, probs_dtype=torch.float16)[3]
    assert rel_err(probs, fp16) > FP16_ULP  # the e4m3 path really ran


def test_return_probs_in_query_chunks(poison_empty):
    """A scratch of 3 queries: 7 queries run in chunks of 3, 3, 1 and give the same result."""
    q, kv, idx = make_inputs(7, 50, 16, 80, 37, torch.float32)
    full = run_sparse_mla_fwd(q, kv, idx, 0.2, 64, return_probs=True, probs_dtype=torch.float16)
    chunked = run_sparse_mla_fwd(q, kv, idx, 0.2, 64, return_probs=True, probs_dtype=torch.float16,
                                 scratch_bytes=3 * 16 * 37 * 2)
    for a, b in zip(full, chunked):
        assert torch.equal(a, b)
    check_probs(q, kv, idx, 0.2, 64, chunked[3])


def test_return_probs_keeps_gradients_and_refuses_split(monkeypatch):
    q, kv, idx = make_inputs(3, 40, 16, 80, 29, torch.float32)
    # the fixed-order dkv reduction, so that the two backward passes can be compared bitwise
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    grads = []
    for with_probs in (False, True):
        qq, kk = q.clone().requires_grad_(), kv.clone().requires_grad_()
        res = flashdsa.sparse_mla_fwd(qq, kk, idx, 0.2, 64, backend="triton", return_probs=with_probs)
        assert len(res) == (4 if with_probs else 3)
        assert not with_probs or not res[3].requires_grad
        (res[0].square().sum() + res[2][res[2].isfinite()].sum()).backward()
        grads.append((qq.grad, kk.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="probs"):
        run_sparse_mla_fwd(q, kv, idx, 0.2, 64, n_split=2, return_probs=True)


def bf16_torch_reference(q, kv, idx, sm_scale, d_v):
    """Naive gather + einsum with bf16 tensors (softmax in fp32, probabilities cast to bf16):
    the 'bf16 PyTorch reference' the kernel's accuracy is measured against."""
    s_kv = kv.shape[0]
    i = idx[:, 0].long()
    valid = (i >= 0) & (i < s_kv)
    rows = kv[:, 0][i.clamp(0, s_kv - 1)]  # [s, k, d] bf16
    logits = torch.einsum("shd,skd->shk", q, rows).float() * sm_scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - lse[..., None]).to(torch.bfloat16)
    return torch.einsum("shk,skd->shd", p, rows[..., :d_v]), lse


@requires_cuda
@pytest.mark.parametrize("h_q", [64, 128])
def test_bf16_error_within_2x_of_bf16_torch_reference(h_q):
    torch.manual_seed(1)
    s_q, s_kv, topk, d_qk, d_v = 256, 8192, 2048, 576, 512
    q = torch.randn(s_q, h_q, d_qk, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(s_kv, 1, d_qk, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(s_kv, device="cuda")[:topk] for _ in range(s_q)]).int()[:, None]
    idx[1, 0, 100:] = -1
    sm_scale = 0.1352
    o64, m64, l64 = ref.sparse_mla_fwd(q.double(), kv.double(), idx, sm_scale, d_v)
    o16, l16 = bf16_torch_reference(q, kv, idx, sm_scale, d_v)
    e_r, el_r = rel_err(o16, o64), rel_err(l16, l64)
    out, ml, lse = flashdsa.sparse_mla_fwd(q, kv, idx, sm_scale, d_v, backend="triton")
    e_k, el_k = rel_err(out, o64), rel_err(lse, l64)
    assert e_k <= 2 * e_r, f"out: kernel {e_k:.3g} vs bf16 torch reference {e_r:.3g}"
    assert el_k <= 2 * el_r + 1e-6, f"lse: kernel {el_k:.3g} vs bf16 torch reference {el_r:.3g}"
    assert rel_err(ml, m64) < 1e-2
    # the head-mean probabilities (training target): out unchanged, probs at bf16 accuracy
    out, ml, lse, probs = flashdsa.sparse_mla_fwd(q, kv, idx, sm_scale, d_v, backend="triton", return_probs=True,
                                                  probs_precision="fp16")
    assert rel_err(out, o64) <= 2 * e_r
    check_probs(q, kv, idx, sm_scale, d_v, probs)


def _store_paths_agree(cases, config_a, config_b, device="cuda"):
    """The forward with probs under two store configurations: bitwise-equal outputs for both
    scratch types on each (s_q, s_kv, h_q, topk, scratch_bytes) case, and probs within the
    scratch's rounding of the reference's."""
    for (s_q, s_kv, h_q, topk, scratch) in cases:
        q, kv, idx = make_inputs(s_q, s_kv, h_q, 576, topk, torch.bfloat16, device)
        for dt in (torch.float16, torch.float8_e4m3fn):
            res = [run_sparse_mla_fwd(q, kv, idx, 576 ** -0.5, 512, return_probs=True, probs_dtype=dt,
                                      scratch_bytes=scratch, config=cfg) for cfg in (config_a, config_b)]
            for a, b in zip(*res):
                assert torch.equal(a, b)
            check_probs(q, kv, idx, 576 ** -0.5, 512, res[0][3],
                        rounding=E4M3_ULP if dt == torch.float8_e4m3fn else FP16_ULP)


@requires_cuda
def test_gpu_probs_maxima_by_inline_ptx_equal_tl_store():
    """The per-block maxima stored by inline PTX from the accumulator's registers (ASM_STORE,
    the default on NVIDIA GPUs where the p tile is not stored by TMA) equal tl.store's: odd
    sizes, several head blocks, a row with no valid slot (make_inputs)."""
    _store_paths_agree([(5, 300, 16, 77, 1 << 30), (7, 1000, 48, 333, 1 << 30), (4, 3000, 128, 2048, 1 << 30)],
                       dict(ASM_STORE=True, TMA_STORE=False), dict(ASM_STORE=False, TMA_STORE=False))


@requires_cuda
def test_gpu_probs_tile_by_tma_equal_tl_store():
    """The p tile stored by TMA (TMA_STORE, the default on Hopper) equals tl.store's: a tail
    block that the descriptor's bounds clip (topk 336), two head blocks, chunks of queries (a
    small scratch_bytes), and h_q 48 where the rows of a head block would overrun (TMA is
    then not used)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or later")
    _store_paths_agree([(5, 1000, 64, 336, 1 << 30), (7, 3000, 128, 2048, 2 * 128 * 2048 * 2),
                        (6, 700, 48, 80, 1 << 30)], dict(TMA_STORE=True), dict(TMA_STORE=False))


@requires_cuda
def test_gpu_bf16_odd_shapes_and_split():
    """The compiled (non-interpreted) path on odd sizes: masks, tails, split-k."""
    for (s_q, s_kv, h_q, d_qk, d_v, topk) in [(5, 300, 16, 576, 512, 77), (7, 1000, 48, 576, 512, 333),
                                              (3, 500, 128, 512, 512, 200)]:
        q, kv, idx = make_inputs(s_q, s_kv, h_q, d_qk, topk, torch.bfloat16, "cuda")
        for n_split in (1, 3):
            out, ml, lse = run_sparse_mla_fwd(q, kv, idx, d_qk ** -0.5, d_v, n_split=n_split, config=dict(BLOCK_K=64))
            check_against_reference(q, kv, idx, d_qk ** -0.5, d_v, out, ml, lse, factor=2.0, floor=2e-3)


def test_forward_block_sizes_by_gpu(monkeypatch):
    """The forward's table by compute capability (CPU check of the dispatch): the A100 gets
    "sm80", Hopper "sm90" (e4m3 rows: "sm90_fp8"), Blackwell "sm100", whose blocks fit its
    227 KB of shared memory where Triton's sm_100 build of "sm90"'s does not."""
    from flashdsa.ops.sparse_mla import fwd
    monkeypatch.setattr(fwd, "interpreted", lambda: False)
    for cap, fp8, key in (((8, 0), False, "sm80"), ((9, 0), False, "sm90"), ((9, 0), True, "sm90_fp8"),
                          ((10, 0), False, "sm100")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        cfg = fwd.default_config(torch.device("cuda"), 128, 512, fp8)
        assert cfg == fwd.CONFIGS[key], (cap, fp8)
