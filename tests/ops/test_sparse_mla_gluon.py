"""The Hopper Gluon sparse MLA forward (flashdsa/ops/sparse_mla/fwd_sm90.py).

Gluon kernels do not run in the Triton interpreter, so on CPU this file tests the dispatch
(which forward runs for which inputs, and the errors of ``backend="gluon"``);
tests/test_sm90_build.py compiles the kernel for sm_90 and fails on spills. The GPU tests
(sm_90 only) compare it with the float64 reference at full size with adversarial indices.
"""
import pytest
import torch
import triton

import flashdsa
from flashdsa import reference as ref
from flashdsa.ops.sparse_mla import decode, fwd, fwd_sm90
from tests.utils import rel_err, requires_cuda

SM_SCALE = 0.1352


def _inputs(s_q, s_kv, h_q, topk, device="cpu", dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(s_q, h_q, 576, device=device, dtype=dtype, generator=g)
    kv = torch.randn(s_kv, 1, 576, device=device, dtype=dtype, generator=g)
    idx = torch.randint(0, s_kv, (s_q, 1, topk), device=device, dtype=torch.int32, generator=g)
    return q, kv, idx


@pytest.fixture
def gluon_recorder(monkeypatch):
    """The Gluon launcher replaced by a recorder, and every device taken for an sm_90 GPU:
    what the dispatch of run_sparse_mla_fwd would launch there, on CPU tensors."""
    calls = []

    def fake(q, kv, idx, sm_scale, config=None):
        calls.append((q.shape, kv.shape, idx.shape))
        return (torch.zeros(q.shape[0], q.shape[1], 512, dtype=q.dtype), torch.zeros(q.shape[:2]),
                torch.zeros(q.shape[:2]))

    def fake_fp8(q, c8, scales, rope, idx, sm_scale, config=None):
        calls.append(("fp8", q.shape, c8.shape, scales.shape, rope.shape, idx.shape))
        return (torch.zeros(q.shape[0], q.shape[1], 512, dtype=q.dtype), torch.zeros(q.shape[:2]),
                torch.zeros(q.shape[:2]))

    monkeypatch.setattr(fwd, "run_sparse_mla_fwd_sm90", fake)
    monkeypatch.setattr(decode, "run_sparse_mla_fwd_sm90", fake)
    monkeypatch.setattr(decode, "run_sparse_mla_decode_sm90_fp8", fake_fp8)
    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: None)
    return calls


def test_auto_takes_gluon_on_sm90_for_the_fast_shape(gluon_recorder):
    q, kv, idx = _inputs(3, 100, 128, 64)
    fwd.run_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512)
    fwd.run_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512, impl="gluon")
    assert gluon_recorder == [((3, 128, 576), (100, 576), (3, 64))] * 2


@pytest.mark.parametrize("kwargs, why", [
    (dict(return_probs=True), "probabilities"),
    (dict(n_split=2), "split-k"),
    (dict(config=dict(BLOCK_K=32)), "config"),
])
def test_gluon_falls_back_or_refuses(gluon_recorder, monkeypatch, kwargs, why):
    """What the Gluon kernel does not do goes to the Triton kernel under "auto", and is
    refused under "gluon"."""
    q, kv, idx = _inputs(3, 100, 64, 64)
    triton_calls = []
    monkeypatch.setattr(fwd, "run_over_rows", lambda *a, **k: triton_calls.append(1))
    fwd.run_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512, **kwargs)
    assert triton_calls == [1] and gluon_recorder == []
    with pytest.raises(ValueError, match=why):
        fwd.run_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512, impl="gluon", **kwargs)


def test_paged_decode_takes_gluon_without_split(gluon_recorder, monkeypatch):
    """The paged path (decode batches, engine prefill chunks) takes the Gluon forward when
    it runs without split-k: over a bf16 cache the cp.async kernel, over an fp8_ds_mla cache
    the dequantizing one, given the cache's three views (e4m3 rows, the scales from their
    offset, the rope values from theirs). Split-k and block configs stay on the Triton kernels."""
    from flashdsa.layout import MLA_FP8_BYTES

    triton_calls = []

    def fake_triton(q, idx, rows, *a, **k):
        triton_calls.append(rows.scales is not None)
        return torch.zeros(q.shape[0], q.shape[1], 512, dtype=q.dtype), None, torch.zeros(q.shape[:2])

    monkeypatch.setattr(decode, "run_over_rows", fake_triton)
    q = torch.randn(2, 3, 128, 576, dtype=torch.bfloat16)
    cache = torch.randn(4, 64, 1, 576, dtype=torch.bfloat16)
    fp8 = torch.zeros(4, 64, 1, MLA_FP8_BYTES, dtype=torch.uint8)
    idx = torch.randint(0, 256, (2, 3, 64), dtype=torch.int32)
    out, lse = decode.sparse_mla_decode(q, cache, idx, SM_SCALE, 512, n_split=1)
    assert gluon_recorder == [((6, 128, 576), (256, 576), (6, 64))]
    assert out.shape == (2, 3, 128, 512) and lse.shape == (2, 3, 128)
    out, lse = decode.sparse_mla_decode(q, fp8, idx, SM_SCALE, 512, "fp8_ds_mla", n_split=1)
    assert gluon_recorder[1:] == [("fp8", (6, 128, 576), (256, 656), (256, 36), (256, 64), (6, 64))]
    assert out.shape == (2, 3, 128, 512) and lse.shape == (2, 3, 128)
    decode.sparse_mla_decode(q, cache, idx, SM_SCALE, 512, n_split=4)
    decode.sparse_mla_decode(q, fp8, idx, SM_SCALE, 512, "fp8_ds_mla", n_split=4)
    decode.sparse_mla_decode(q, fp8, idx, SM_SCALE, 512, "fp8_ds_mla", n_split=1, config=dict(BLOCK_K=32))
    assert len(gluon_recorder) == 2 and triton_calls == [False, True, True]


def test_gluon_fp8_supported_says_why_not(monkeypatch):
    from flashdsa.layout import MLA_FP8_BYTES, MLA_ROPE_OFF, mla_byte_views

    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: None)
    c8, _, pe = mla_byte_views(torch.zeros(8, MLA_FP8_BYTES, dtype=torch.uint8))
    rope = pe[:, MLA_ROPE_OFF:]
    q = torch.zeros(2, 128, 576, dtype=torch.bfloat16)
    assert fwd_sm90.gluon_fp8_supported(q, c8, rope, 512) is None
    assert "bf16 q" in fwd_sm90.gluon_fp8_supported(q.half(), c8, rope, 512)
    assert "multiple of 64" in fwd_sm90.gluon_fp8_supported(q[:, :48], c8, rope, 512)
    assert "d_v 512" in fwd_sm90.gluon_fp8_supported(q, c8, rope, 256)
    assert "16-byte" in fwd_sm90.gluon_fp8_supported(q, c8, pe[:, MLA_ROPE_OFF + 1:], 512)
    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: "not here")
    assert fwd_sm90.gluon_fp8_supported(q, c8, rope, 512) == "not here"


def test_triton_impl_never_takes_gluon(gluon_recorder, monkeypatch):
    q, kv, idx = _inputs(3, 100, 128, 64)
    monkeypatch.setattr(fwd, "run_over_rows", lambda *a, **k: None)
    fwd.run_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512, impl="triton")
    assert gluon_recorder == []


@pytest.mark.parametrize("shape, dtype, d_v, why", [
    ((2, 64, 576), torch.float16, 512, "bf16"),
    ((2, 64, 192), torch.bfloat16, 128, "d_qk 576 and d_v 512"),
    ((2, 48, 576), torch.bfloat16, 512, "multiple of 64"),
])
def test_gluon_supported_says_why_not(monkeypatch, shape, dtype, d_v, why):
    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: None)
    q = torch.zeros(shape, dtype=dtype)
    assert why in fwd_sm90.gluon_fwd_supported(q, torch.zeros(5, shape[2], dtype=dtype), d_v)
    q, kv = torch.zeros(2, 128, 576, dtype=torch.bfloat16), torch.zeros(5, 576, dtype=torch.bfloat16)
    assert fwd_sm90.gluon_fwd_supported(q, kv, 512) is None
    wide = torch.zeros(5, 580, dtype=torch.bfloat16)[:, :576]          # rows 580 elements apart
    shifted = torch.zeros(5 * 576 + 1, dtype=torch.bfloat16)[1:].view(5, 576)   # 2 bytes off alignment
    for bad_q, bad_kv in ((q, wide), (q, shifted), (torch.zeros(2, 128, 580, dtype=torch.bfloat16)[..., :576], kv)):
        assert "16-byte" in fwd_sm90.gluon_fwd_supported(bad_q, bad_kv, 512)


def test_gluon_device_on_this_machine(monkeypatch):
    """CPU tensors (and the interpreter) never take the Gluon kernel, nor a Triton older
    than the Gluon API the kernels are written against."""
    assert fwd_sm90.gluon_device(torch.device("cpu")) is not None
    assert fwd_sm90._triton_version("3.6.0") == (3, 6) and fwd_sm90._triton_version("3.10.0+git1") == (3, 10)
    monkeypatch.setattr(fwd_sm90.triton, "__version__", "3.5.1")
    assert "Triton >= 3.6, found 3.5.1" in fwd_sm90.gluon_device(torch.device("cuda"))


def test_backend_gluon_errors():
    q, kv, idx = _inputs(3, 100, 64, 64)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        flashdsa.sparse_mla_fwd(q, kv, idx, SM_SCALE, backend="gluon")
    with pytest.raises(ValueError, match="no Gluon kernel"):
        flashdsa.act_quant(torch.randn(4, 128), backend="gluon")
    with pytest.raises(ValueError, match="expected one of"):
        flashdsa.sparse_mla_fwd(q, kv, idx, SM_SCALE, backend="cutlass")


sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                          reason="the Gluon kernel runs on sm_90 GPUs")


def _adversarial_slots(idx, n, seed):
    """Valid indices of ``idx`` [..., topk] (into n rows) mixed with repeats, -1 holes,
    indices >= n and < -1; the first query gets no valid slot, the second none in its
    second half."""
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    kind = torch.randint(0, 10, idx.shape, device="cuda", generator=g)
    far = torch.randint(0, 1000, idx.shape, device="cuda", generator=g).int()
    idx = torch.where(kind == 0, -1, idx)
    idx = torch.where(kind == 1, n + far, idx)
    idx = torch.where(kind == 2, -2 - far, idx)
    idx = torch.where(kind == 3, idx.roll(1, dims=-1), idx)
    flat = idx.view(-1, idx.shape[-1])
    flat[0] = -1
    flat[1, idx.shape[-1] // 2:] = n
    return idx


def _adversarial(s_q, s_kv, h_q, topk, seed):
    q, kv, idx = _inputs(s_q, s_kv, h_q, topk, "cuda", seed=seed)
    return q, kv, _adversarial_slots(idx, s_kv, seed)


@pytest.mark.skipif(not fwd_sm90.GLUON_AVAILABLE or fwd_sm90._triton_version(triton.__version__) < (3, 9),
                    reason="reads a shared layout's linear layout (Triton 3.9's Python API)")
def test_fp8_staging_lies_under_the_upper_column_chunks():
    """The fp8_ds_mla producer stages a block's e4m3 bytes in the upper 32 KB of the stage's
    [64, 512] bf16 tile and dequantizes in place, which is right only if that tile (the
    layout _allocate gives it) stores [64, 64] column chunks one after another: the three
    highest offset bits must step the column by 64, 128 and 256, and no lower bit by 64
    or more. Checked here, on CPU, against Triton's own linear layout."""
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl

    ctx = ir.context()
    ir.load_dialects(ctx)
    builder = gluon_ir.GluonOpBuilder(ctx)
    layout = gl.NVMMASharedLayout.get_default_for([fwd_sm90.SM90_GLUON["BLOCK_K"], 512], gl.bfloat16)
    bases = builder.to_linear_layout(layout._to_ir(builder), [fwd_sm90.SM90_GLUON["BLOCK_K"], 512]).offset_bases
    assert [list(b) for b in bases[-3:]] == [[0, 64], [0, 128], [0, 256]]
    assert all(col < 64 for _, col in bases[:-3])


@requires_cuda
@sm90
@pytest.mark.parametrize("h_q, s_kv, topk", [(128, 65536, 2048), (64, 65536, 2048), (128, 3000, 1000)])
def test_gpu_gluon_matches_float64_reference(h_q, s_kv, topk):
    """Full shapes with every kind of index, outputs poisoned with NaN first: the Gluon
    forward's error against the float64 reference is within 1.25x the Triton kernel's on
    the same inputs (both round the output to bf16), lse and max_logits to 1e-4, the empty
    row gives out 0, lse +inf, max_logits -inf."""
    q, kv, idx = _adversarial(24, s_kv, h_q, topk, seed=h_q + topk)
    r_out, r_ml, r_lse = ref.sparse_mla_fwd(q.double(), kv.double(), idx, SM_SCALE, 512)
    t_out = fwd.run_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512, impl="triton")[0]
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # freed: the next outputs reuse it
    out, ml, lse = fwd.run_sparse_mla_fwd(q, kv, idx, SM_SCALE, 512, impl="gluon")
    assert not torch.isnan(out).any()
    assert rel_err(out, r_out) <= 1.25 * rel_err(t_out, r_out) + 1e-5
    fin = torch.isfinite(r_lse)
    assert (lse.double() - r_lse)[fin].abs().max() < 1e-4
    assert (ml.double() - r_ml)[fin].abs().max() < 1e-4
    assert (out[0] == 0).all() and (lse[0] == float("inf")).all() and (ml[0] == float("-inf")).all()


@requires_cuda
@sm90
def test_gpu_auto_is_gluon_and_trains():
    """backend="auto" runs the Gluon forward on sm_90 (same outputs as backend="gluon"), and
    the gradients through it match the Triton forward's."""
    q, kv, idx = _inputs(40, 5000, 128, 512, "cuda")
    outs = {b: flashdsa.sparse_mla_fwd(q, kv, idx, SM_SCALE, backend=b) for b in ("auto", "gluon")}
    assert all(torch.equal(a, b) for a, b in zip(outs["auto"], outs["gluon"]))
    grads = {}
    for b in ("auto", "triton"):
        qq, kk = q.clone().requires_grad_(), kv.clone().requires_grad_()
        out, _, lse = flashdsa.sparse_mla_fwd(qq, kk, idx, SM_SCALE, backend=b)
        (out.float().square().sum() + lse.sum()).backward()
        grads[b] = (qq.grad, kk.grad)
    for a, b in zip(grads["auto"], grads["triton"]):
        assert rel_err(a, b) < 1e-2
    with pytest.raises(ValueError, match="probabilities"):
        flashdsa.sparse_mla_fwd(q, kv, idx, SM_SCALE, backend="gluon", return_probs=True)


@requires_cuda
@sm90
@pytest.mark.parametrize("s_q, topk", [(2, 2048), (1, 1000)])
def test_gpu_gluon_fp8_decode_matches_float64_reference(s_q, topk):
    """The paged decode over an fp8_ds_mla cache of 64K slots without split-k, every kind of
    slot (valid, repeated, -1, past the cache, < -1; an empty row, a half-valid row), outputs
    poisoned with NaN: the Gluon kernel's error against the float64 reference on the same
    dequantized rows is within 1.25x the Triton fp8 kernel's, lse within 1e-4, the empty row
    0 / +inf."""
    from flashdsa.layout import MLA_FP8_BYTES, MLA_ROPE_OFF, mla_byte_views
    from flashdsa.reference.sparse_mla import sparse_mla_decode as ref_decode

    b, blocks = 6, 1024
    g = torch.Generator(device="cuda").manual_seed(topk)
    cache = flashdsa.quantize_mla_cache(torch.randn(blocks, 64, 1, 576, device="cuda", dtype=torch.bfloat16,
                                                    generator=g))
    q = torch.randn(b, s_q, 128, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    n = blocks * 64
    idx = _adversarial_slots(torch.randint(0, n, (b, s_q, topk), device="cuda", dtype=torch.int32, generator=g),
                             n, topk)
    c8, _, pe = mla_byte_views(cache.reshape(-1, MLA_FP8_BYTES))
    assert fwd_sm90.gluon_fp8_supported(q.reshape(b * s_q, 128, 576), c8, pe[:, MLA_ROPE_OFF:], 512) is None
    r_out, r_lse = ref_decode(q.double(), cache, idx, SM_SCALE, 512, "fp8_ds_mla", compute_dtype=torch.float64)
    t_out, _ = decode.sparse_mla_decode(q, cache, idx, SM_SCALE, 512, "fp8_ds_mla", n_split=1,
                                        config=fwd.resolve_config(q.device, 128, 512, True, None))
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # freed: the next outputs reuse it
    out, lse = decode.sparse_mla_decode(q, cache, idx, SM_SCALE, 512, "fp8_ds_mla", n_split=1)
    assert not torch.isnan(out).any()
    assert rel_err(out, r_out) <= 1.25 * rel_err(t_out, r_out) + 1e-5
    fin = torch.isfinite(r_lse)
    assert (lse.double() - r_lse)[fin].abs().max() < 1e-4
    assert (out[0, 0] == 0).all() and (lse[0, 0] == float("inf")).all()
