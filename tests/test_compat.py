"""flashdsa.compat: calls written as FlashMLA's and DeepGEMM's READMEs and tests write them
run on flashdsa, against independent float64 computations of the documented results (the
base-2 lse of flash_mla_sparse_fwd, the [b, h_q, s_q] decode lse, DeepGEMM's 4-d paged key
cache and its compressed logits). CPU: the reference backend, and the Triton kernels under
the interpreter where the shapes are small."""
import math

import pytest
import torch

from flashdsa.compat import deep_gemm
from flashdsa.compat.flash_mla import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata
from tests.ops.test_indexer import FP8_MMA_REL
from tests.utils import KERNEL_DEVICE, rel_err

BACKENDS = ["reference", "triton"]
PAGE = 64


def _dev(backend):
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def _attention64(q, rows, valid, sm_scale, d_v):
    """Float64 attention of q [n, h, d] over rows [n, k, d] where valid [n, k]: (out [n, h, d_v],
    natural-log lse [n, h], max logit [n, h]); a query with nothing valid gets 0, +inf, -inf."""
    logits = torch.einsum("nhd,nkd->nhk", q.double(), rows.double()) * sm_scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    mx = logits.amax(-1)
    lse = torch.logsumexp(logits, -1)
    empty = ~valid.any(-1)[:, None].expand_as(lse)
    p = torch.exp(logits - lse.masked_fill(empty, 0)[..., None]).nan_to_num(0.0)
    out = torch.einsum("nhk,nkd->nhd", p, rows[..., :d_v].double())
    return out, lse.masked_fill(empty, float("inf")), mx


# ---- FlashMLA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_mla_sparse_fwd_returns_base2_max_logits_and_lse(backend):
    torch.manual_seed(0)
    dev = _dev(backend)
    s_q, s_kv, h_q, d_qk, d_v, topk = 5, 40, 16, 80, 64, 12
    q = torch.randn(s_q, h_q, d_qk, device=dev) / 3
    kv = torch.randn(s_kv, 1, d_qk, device=dev) / 3
    indices = torch.stack([torch.randperm(s_kv)[:topk] for _ in range(s_q)]).to(torch.int32)[:, None, :]
    indices[1, 0, :4] = s_kv        # >= s_kv: invalid, as in FlashMLA's tests
    indices[2, 0, 5:] = -1
    indices[3, 0, :] = -1           # a query with no valid index
    indices = indices.to(dev)
    sm_scale = 1 / math.sqrt(d_qk)

    out, max_logits, lse = flash_mla_sparse_fwd(q, kv, indices, sm_scale=sm_scale, d_v=d_v, backend=backend)

    idx = indices[:, 0].cpu().long()
    valid = (idx >= 0) & (idx < s_kv)
    rows = kv[:, 0].cpu()[idx.clamp(0, s_kv - 1)]
    ref_out, ref_lse, ref_max = _attention64(q.cpu(), rows, valid, sm_scale, d_v)
    log2e = math.log2(math.e)
    assert out.shape == (s_q, h_q, d_v) and lse.shape == max_logits.shape == (s_q, h_q)
    assert rel_err(out.cpu(), ref_out) < 1e-5
    assert rel_err(lse.cpu(), ref_lse * log2e) < 1e-6           # log2(sum 2^P), P = logits * log2(e)
    assert rel_err(max_logits.cpu(), ref_max * log2e) < 1e-6
    assert (out[3] == 0).all() and (lse[3] == float("inf")).all() and (max_logits[3] == float("-inf")).all()


def _quantize_flashmla_fp8(rows):
    """FlashMLA's fp8 KV cache layout, written out: [n, 576] -> [n, 656] float8_e4m3fn
    "bytes": 512 e4m3 values in 4 tiles of 128 with power-of-two scales, the 4 fp32
    scales, then the 64 rope values in bf16."""
    nope, rope = rows[:, :512].float(), rows[:, 512:].to(torch.bfloat16)
    amax = nope.view(-1, 4, 128).abs().amax(-1).clamp_min(1e-4)
    scale = torch.pow(2, (amax / 448.0).log2().ceil())                                   # [n, 4]
    q8 = (nope.view(-1, 4, 128) / scale[..., None]).view(-1, 512).to(torch.float8_e4m3fn)
    return torch.cat([q8.view(torch.uint8), scale.view(torch.uint8), rope.view(torch.uint8)], -1) \
        .view(torch.float8_e4m3fn)


def _dequantize_flashmla_fp8(cache):
    b = cache.view(torch.uint8).reshape(-1, 656)
    nope = b[:, :512].contiguous().view(torch.float8_e4m3fn).double().view(-1, 4, 128)
    scale = b[:, 512:528].contiguous().view(torch.float32).double()
    rope = b[:, 528:].contiguous().view(torch.bfloat16).double()
    return torch.cat([(nope * scale[..., None]).view(-1, 512), rope], -1)                 # [n, 576]


def _abs_to_kvcache_indices(abs_idx, block_table):
    """Logical positions [b, s_q, topk] -> physical slots, -1 kept (FlashMLA's tests' helper)."""
    b = abs_idx.shape[0]
    blocks = block_table[torch.arange(b)[:, None, None], abs_idx.clamp_min(0) // PAGE]
    return torch.where(abs_idx >= 0, blocks * PAGE + abs_idx.clamp_min(0) % PAGE, -1).to(torch.int32)


def test_flash_mla_with_kvcache_sparse_fp8_as_the_readme_calls_it():
    """Sparse decode over FlashMLA's "FP8 with scale" cache: lse [b, h_q, s_q], natural log."""
    torch.manual_seed(1)
    b, s_q, h_q, h_kv, d, dv, topk = 2, 2, 4, 1, 576, 512, 20
    cache_seqlens = torch.tensor([70, 130], dtype=torch.int32)
    max_blocks = 3
    block_table = torch.randperm(b * max_blocks).view(b, max_blocks).to(torch.int32)
    num_blocks = b * max_blocks
    # as FlashMLA's quantize_k_cache builds it: pages of block_size + 1 rows, the last one unused
    blocked_k = torch.randn(num_blocks, PAGE, h_kv, d) / 4
    padded = torch.empty(num_blocks, PAGE + 1, 656, dtype=torch.float8_e4m3fn)
    padded[:, :PAGE] = _quantize_flashmla_fp8(blocked_k.view(-1, d)).view(num_blocks, PAGE, 656)
    kvcache = padded[:, :PAGE].view(num_blocks, PAGE, 1, 656)
    abs_idx = torch.stack([torch.stack([torch.randperm(int(n))[:topk] for _ in range(s_q)])
                           for n in cache_seqlens])                                         # [b, s_q, topk]
    abs_idx[0, 1, 3:] = -1
    indices = _abs_to_kvcache_indices(abs_idx, block_table)
    q = (torch.randn(b, s_q, h_q, d) / 4).to(torch.bfloat16)

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, h_q, True, topk)
    out, lse = flash_mla_with_kvcache(q, kvcache, block_table, cache_seqlens, dv, tile_scheduler_metadata,
                                      num_splits, causal=False, is_fp8_kvcache=True, indices=indices)

    assert out.shape == (b, s_q, h_q, dv) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    rows = _dequantize_flashmla_fp8(kvcache)[indices.long().clamp_min(0)].view(b * s_q, topk, d)
    ref_out, ref_lse, _ = _attention64(q.view(b * s_q, h_q, d), rows, (indices >= 0).view(b * s_q, topk),
                                       d ** -0.5, dv)                  # FlashMLA's default softmax_scale
    assert rel_err(out.view(b * s_q, h_q, dv), ref_out) < 1e-2        # bf16 q and output
    assert rel_err(lse, ref_lse.view(b, s_q, h_q).transpose(1, 2)) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_mla_with_kvcache_dense(backend, causal):
    """Dense decode (indices None) over bf16-format pages: every token < cache_seqlens[b]
    through block_table; causal: query j of s_q sees positions <= cache_seqlens[b] - s_q + j."""
    torch.manual_seed(2)
    dev = _dev(backend)
    b, s_q, h_q, d, dv = 3, 2, 16, 80, 64
    cache_seqlens = torch.tensor([1, 65, 100], dtype=torch.int32, device=dev)
    max_blocks = 2
    block_table = torch.randperm(b * max_blocks).view(b, max_blocks).to(torch.int32).to(dev)
    blocked_k = torch.randn(b * max_blocks, PAGE, 1, d, device=dev) / 3
    q = torch.randn(b, s_q, h_q, d, device=dev) / 3
    sm_scale = 0.7 / math.sqrt(d)

    meta, splits = get_mla_metadata(cache_seqlens, s_q * h_q, 1)
    out, lse = flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, dv, meta, splits,
                                      softmax_scale=sm_scale, causal=causal, backend=backend)

    for i in range(b):
        n = int(cache_seqlens[i])
        rows = blocked_k[block_table[i].long()].reshape(-1, d)[:n].cpu()
        for j in range(s_q):
            seen = n - s_q + j + 1 if causal else n
            valid = torch.arange(n) < seen
            o, l_, _ = _attention64(q[i, j].cpu()[None], rows[None], valid[None], sm_scale, dv)
            assert rel_err(out[i, j].cpu(), o[0]) < 1e-5, (i, j)
            assert rel_err(lse[i, :, j].cpu(), l_[0]) < 1e-6, (i, j)
    assert (out[0, 0] == 0).all() == causal and (lse[0, :, 0] == float("inf")).all() == causal


def test_flash_mla_with_kvcache_errors_name_the_argument():
    q = torch.randn(1, 1, 16, 80)
    with pytest.raises(ValueError, match="k_cache"):   # pages of 32 tokens: not flashdsa's layout
        flash_mla_with_kvcache(q, torch.randn(2, 32, 1, 80), None, None, 64, None, None,
                               indices=torch.zeros(1, 1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="causal"):
        flash_mla_with_kvcache(q, torch.randn(2, 64, 1, 80), None, None, 64, None, None, causal=True,
                               indices=torch.zeros(1, 1, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="block_table"):
        flash_mla_with_kvcache(q, torch.randn(2, 64, 1, 80), None, torch.ones(1, dtype=torch.int32), 64, None, None)
    meta, splits = get_mla_metadata(torch.ones(3, dtype=torch.int32), 16, 1)
    assert meta.dtype == splits.dtype == torch.int32 and meta.shape == (1, 8) and splits.shape == (4,)


# ---- DeepGEMM -------------------------------------------------------------------------------------
def _per_token_fp8(x):
    """[n, d] -> (e4m3 [n, d], fp32 scale [n]): amax / 448 per row, as DeepGEMM's tests cast keys."""
    sf = x.abs().float().amax(-1).clamp_min(1e-4) / 448.0
    return (x / sf[:, None]).to(torch.float8_e4m3fn), sf


def _fp8_budget(logits, ref, mag):
    """Relative error allowed against the float64 ``ref``: fp32 summation order, plus on a
    GPU the e4m3 tensor-core accumulation, FP8_MMA_REL of the scores of |q|, |k|, |w|
    (``mag``, as tests/ops/test_indexer.py bounds the indexer kernels)."""
    budget = 1e-5
    if logits.is_cuda:
        fin = torch.isfinite(ref)
        budget += FP8_MMA_REL * float(mag[fin].norm() / ref[fin].norm())
    return budget


def _mqa_logits64(q8, k, weights, lo, hi):
    """DeepGEMM README's formula in float64: out[i, j] = sum_h relu(q[i, h] . k_j) * w[i, h]
    for lo[i] <= j < hi[i], -inf elsewhere; k the dequantized keys [n, d]."""
    score = torch.einsum("mhd,nd->mhn", q8.double(), k.double())
    logits = (score.relu() * weights.double()[..., None]).sum(1)
    j = torch.arange(k.shape[0])
    return logits.masked_fill(~((j[None] >= lo[:, None]) & (j[None] < hi[:, None])), float("-inf"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_mqa_logits_as_deepgemm_tests_call_it(backend):
    torch.manual_seed(3)
    dev = _dev(backend)
    seq_len, seq_len_kv, num_heads, head_dim = 24, 40, 4, 32
    q = torch.randn(seq_len, num_heads, head_dim, device=dev)
    kv = torch.randn(seq_len_kv, head_dim, device=dev)
    weights = torch.randn(seq_len, num_heads, device=dev)
    ks = torch.zeros(seq_len, dtype=torch.int32, device=dev)
    ke = torch.arange(seq_len, dtype=torch.int32, device=dev) + (seq_len_kv - seq_len)
    ks[3], ke[4] = 30, 0            # an empty row and a reversed one score nothing
    q_fp8 = q.to(torch.float8_e4m3fn)
    kv_fp8 = _per_token_fp8(kv)

    logits = deep_gemm.fp8_mqa_logits(q_fp8, kv_fp8, weights, ks, ke, backend=backend)

    k = kv_fp8[0].double().cpu() * kv_fp8[1].double().cpu()[:, None]
    ref = _mqa_logits64(q_fp8.cpu(), k, weights.cpu(), ks.cpu(), ke.cpu())
    mag = _mqa_logits64(q_fp8.cpu().double().abs(), k.abs(), weights.cpu().abs(), ks.cpu(), ke.cpu())
    budget = _fp8_budget(logits, ref, mag)
    assert logits.shape == (seq_len, seq_len_kv) and logits.dtype == torch.float32
    assert torch.equal(logits.cpu() == float("-inf"), ref == float("-inf"))
    assert rel_err(logits.cpu(), ref) < budget

    # the compressed form: column j of row i is key ks[i] + j
    max_seqlen_k = int((ke - ks).max())
    packed = deep_gemm.fp8_mqa_logits(q_fp8, kv_fp8, weights, ks, ke, max_seqlen_k=max_seqlen_k,
                                      clean_logits=False, backend=backend)
    assert packed.shape == (seq_len, max_seqlen_k)
    unpacked = torch.full((seq_len, seq_len_kv), float("-inf"))
    for i in range(seq_len):
        n = max(int(ke[i]) - int(ks[i]), 0)
        unpacked[i, int(ks[i]):int(ks[i]) + n] = packed[i, :n].cpu()
    assert rel_err(unpacked, ref) < budget


def _deepgemm_kv_cache_cast_to_fp8(x):
    """[num_blocks, block_size, 1, d] -> DeepGEMM's uint8 [num_blocks, block_size, 1, d + 4]:
    per block the block_size * d key bytes, then block_size fp32 scales (as its tests build it)."""
    num_blocks, block_size, _, d = x.shape
    k8, sf = _per_token_fp8(x.reshape(-1, d))
    raw = torch.cat([k8.view(torch.uint8).view(num_blocks, block_size * d),
                     sf.view(torch.uint8).view(num_blocks, block_size * 4)], dim=1)
    return raw.view(num_blocks, block_size, 1, d + 4)


def _paged_setup(batch_size, next_n, heads, dim, context_lens, max_model_len, dev):
    blocks = [-(-int(n) // PAGE) for n in context_lens]
    num_blocks = sum(blocks) + 1
    block_table = torch.zeros(batch_size, max(blocks), dtype=torch.int32)
    pool, at = torch.randperm(num_blocks).to(torch.int32), 0
    for i, nb in enumerate(blocks):
        block_table[i, :nb] = pool[at:at + nb]
        at += nb
    q = torch.randn(batch_size, next_n, heads, dim)
    kv = torch.randn(num_blocks, PAGE, 1, dim)
    weights = torch.randn(batch_size * next_n, heads)
    kv_fp8 = _deepgemm_kv_cache_cast_to_fp8(kv)
    keys = kv_fp8.view(num_blocks, -1)
    k8 = keys[:, :PAGE * dim].contiguous().view(torch.float8_e4m3fn).double().view(num_blocks, PAGE, dim)
    sf = keys[:, PAGE * dim:].contiguous().view(torch.float32).double().view(num_blocks, PAGE)
    deq = k8 * sf[..., None]
    return (q.to(torch.float8_e4m3fn).to(dev), kv_fp8.to(dev), weights.to(dev), block_table.to(dev)), deq


def _paged_ref64(q8, deq, weights, seen, block_table, max_model_len):
    """[batch * next_n, max_model_len]: query (b, j) scores logical positions < seen[b, j]."""
    bsz, next_n = q8.shape[:2]
    out = torch.full((bsz * next_n, max_model_len), float("-inf"), dtype=torch.float64)
    for i in range(bsz):
        k = deq[block_table[i].long()].reshape(-1, deq.shape[-1])
        for j in range(next_n):
            n = min(int(seen[i, j]), max_model_len)
            s = torch.einsum("hd,nd->hn", q8[i, j].double(), k[:n])
            out[i * next_n + j, :n] = (s.relu() * weights[i * next_n + j].double()[:, None]).sum(0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("next_n,lens_2d", [(1, False), (2, False), (3, False), (2, True)])
def test_fp8_paged_mqa_logits_as_deepgemm_tests_call_it(backend, next_n, lens_2d):
    torch.manual_seed(4)
    dev = _dev(backend)
    batch_size, heads, index_dim, max_model_len = 3, 4, 32, 200
    context_lens = torch.tensor([70, 3, 130], dtype=torch.int32)
    (q_fp8, kv_cache_fp8, weights, block_tables), deq = _paged_setup(batch_size, next_n, heads, index_dim,
                                                                     context_lens, max_model_len, dev)
    if lens_2d:    # each query its own length, the last one the sequence's
        lens = ((context_lens[:, None] + 1) * torch.rand(batch_size, next_n)).int()
        lens[:, -1] = context_lens
        seen, context_lens = lens, lens
    else:
        seen = context_lens[:, None] - next_n + 1 + torch.arange(next_n)
    context_lens = context_lens.to(dev)

    schedule_metadata = deep_gemm.get_paged_mqa_logits_metadata(context_lens, PAGE, deep_gemm.get_num_sms())
    logits = deep_gemm.fp8_paged_mqa_logits(q_fp8, kv_cache_fp8, weights, context_lens, block_tables,
                                            schedule_metadata, max_model_len, clean_logits=True, backend=backend)

    ref = _paged_ref64(q_fp8.cpu(), deq, weights.cpu(), seen, block_tables.cpu(), max_model_len)
    mag = _paged_ref64(q_fp8.cpu().double().abs(), deq.abs(), weights.cpu().abs(), seen, block_tables.cpu(),
                       max_model_len)
    assert logits.shape == (batch_size * next_n, max_model_len) and logits.dtype == torch.float32
    assert schedule_metadata.shape == (deep_gemm.get_num_sms() + 1, 2)
    assert torch.equal(logits.cpu() == float("-inf"), ref == float("-inf"))
    assert rel_err(logits.cpu(), ref) < _fp8_budget(logits, ref, mag)


def test_deepgemm_errors_name_the_argument():
    (q8, kv_cache, w, bt), _ = _paged_setup(1, 1, 4, 32, torch.tensor([10]), 64, "cpu")
    cl = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_cache"):   # block_kv 32: flashdsa's pages hold 64 tokens
        deep_gemm.fp8_paged_mqa_logits(q8, kv_cache.view(-1, 32, 1, 36), w, cl, bt, None, 64)
    with pytest.raises(ValueError, match="context_lens"):
        deep_gemm.fp8_paged_mqa_logits(q8, kv_cache, w, cl.repeat(2), bt, None, 64)
    with pytest.raises(TypeError, match="kv"):
        deep_gemm.fp8_mqa_logits(q8[0], kv_cache, w, cl, cl)
