"""The FP8 scores kernel of the lightning indexer (SPEC 1): logits, and the scoring pass
of the threshold top-k. DeepGEMM ``fp8_mqa_logits`` semantics:

    logits[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q8[t, h] . k8[s])     ks[t] <= s < ke[t]
                 = -inf                                                     elsewhere

One program takes ``BLOCK_Q`` query rows (all their H heads: M = BLOCK_Q * H_PAD dot
columns) and walks one split of the key axis in tiles of ``BLOCK_N`` keys. Each tile is
ONE tensor-core dot with the keys as the M side (DeepGEMM's orientation):

    acc = k8[BLOCK_N, D] @ q8^T[D, BLOCK_Q * H_PAD]          fp32  [BLOCK_N, BLOCK_Q * H_PAD]
    s   = sum_h w * ReLU(acc)  (reshape to [BLOCK_N, BLOCK_Q, H_PAD], reduce the heads)
    s  *= k_scale                                                   [BLOCK_N, BLOCK_Q]

With keys on the M side the head reduction runs along the dot's N axis, which an MMA
accumulator keeps inside one thread (plus a quad shuffle), not across warps. Key tiles
wholly outside the union of the block's ranges [min ks, max ke) are never computed
(causal prefill: half the work); the logits kernel writes -inf there instead.

Here: the block-size tables, :class:`Problem` (one ragged or paged scoring problem as
the kernels take it), the tile helpers the streaming top-k kernel shares
(:func:`load_rows`, :func:`load_keys`, :func:`tile_scores`, :func:`block_range`),
``indexer_scores_kernel`` with its three modes, and :func:`indexer_logits`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ...layout import PAGE_SIZE
from ..common import e4m3_to_f32, fp8_native, interpreted, last_dim_contiguous, num_sms, pdl_launch, pdl_prologue
from .selection import score_key

# Block sizes per GPU family ("sm90": sm_89 and newer, "sm80": older GPUs, "small": the
# interpreter and tiny tests), for the scores kernel and the streaming top-k kernel alike.
# BLOCK_N: keys a tile, the dot's M (64 = one wgmma M tile for a 4-warp warpgroup);
# QH = BLOCK_Q * H_PAD: the dot's N, query rows times padded heads a program (the top-k
# kernel takes at most MAX_TOPK_ROWS rows); num_warps; num_stages: software-pipelining
# depth of the key tiles (8 KB each at D = 128 in fp8); store_warps: num_warps of the
# scores kernel when it writes the scores (SCORES_STORE; 8 on sm90: two warpgroups, each
# the dot of half the query rows, so each keeps its head sums to itself), where the
# filter modes and the streaming top-k run faster at 4. The measurements behind them
# are in docs/benchmarks_indexer.md.
CONFIGS = {
    "sm90": dict(BLOCK_N=64, QH=256, num_warps=4, num_stages=3, store_warps=8),
    "sm80": dict(BLOCK_N=64, QH=128, num_warps=4, num_stages=3),
    "small": dict(BLOCK_N=16, QH=32, num_warps=4, num_stages=1),
}

# Query rows of one top-k program at most (before the N >= 16 floor of small H): each
# row's selection is unrolled, so 128 rows (H = 2 with QH = 256) would compile for minutes,
# and the [BLOCK_Q, CAP] buffer tile of a compaction stays in registers.
MAX_TOPK_ROWS = 4

# dot modes: how the q.k products are computed
DOT_FP8 = 0  # e4m3 x e4m3 tensor-core dot (sm_89 and newer; the interpreter)
DOT_FP16 = 1  # fp16 tiles, or e4m3 bytes (uint8) decoded to fp16 with integer operations (exact):
              # GPUs whose Triton has no e4m3 type (before sm_89)
DOT_FP32 = 2  # fp32 / bf16 inputs: fp32 dot in full precision (reference-grade, slow)


def _family(device: torch.device) -> str:
    if device.type != "cuda" or interpreted():
        return "small"
    return "sm90" if fp8_native(device) else "sm80"


def dot_mode(x: torch.Tensor) -> int:
    """Which dot a q8/k8 dtype and device get (see DOT_*; uint8: e4m3 bytes)."""
    if x.dtype == torch.float8_e4m3fn:
        return DOT_FP8 if fp8_native(x.device) else DOT_FP16
    return DOT_FP16 if x.dtype in (torch.float16, torch.uint8) else DOT_FP32


def as_bytes_without_e4m3(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """e4m3 tensors as their uint8 bytes where Triton has no e4m3 type (the kernels then
    decode them with integer operations), else unchanged."""
    return tuple(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn and dot_mode(x) == DOT_FP16 else x
                 for x in xs)


def default_config(device: torch.device, h: int, topk: bool = False, **override) -> dict:
    """Block sizes: BLOCK_Q query rows (of H_PAD heads) and BLOCK_N keys a program step,
    for the scores kernel or (``topk``) the streaming top-k kernel."""
    cfg = dict(CONFIGS[_family(device)])
    h_pad = max(triton.next_power_of_2(h), 1)
    qh = cfg.pop("QH")
    cfg["BLOCK_Q"] = max(1, qh // h_pad)
    if topk:  # the top-k kernel unrolls its selection over the rows: keep them few
        cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], MAX_TOPK_ROWS)
    cfg.update(override)
    cfg.setdefault("store_warps", cfg["num_warps"])
    if "num_warps" in override and "store_warps" not in override:
        cfg["store_warps"] = cfg["num_warps"]
    if cfg["BLOCK_Q"] * h_pad < 16:  # tl.dot needs N >= 16
        cfg["BLOCK_Q"] = 16 // h_pad
    return cfg


@triton.jit
def _fp16(x):
    """fp16 of a tile: e4m3 bytes (uint8) decoded with integer operations, else converted."""
    if x.dtype == tl.uint8:
        return e4m3_to_f32(x.to(tl.int32)).to(tl.float16)
    else:
        return x.to(tl.float16)


@triton.jit
def tile_scores(k8, kscale, qT, w, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
                DOT: tl.constexpr):
    """Weighted ReLU head sum of one key tile.

    k8 [BLOCK_N, D_PAD], qT [D_PAD, BLOCK_Q * H_PAD], w [BLOCK_Q * H_PAD] fp32 (0 on padded
    heads and rows), kscale [BLOCK_N] fp32. Returns [BLOCK_N, BLOCK_Q] fp32.

    The ReLU of the even dot columns is a max (ALU pipe), that of the odd ones x + |x|
    = 2 ReLU(x) (an add, FMA pipe) with the weight halved: the same products, rounded
    once in the same multiply-adds, with the epilogue's work shared between the two
    pipes (an MMA accumulator keeps each even column and the next in one thread)."""
    if DOT == 0:
        acc = tl.dot(k8, qT)
    elif DOT == 1:
        acc = tl.dot(_fp16(k8), _fp16(qT))
    else:
        acc = tl.dot(k8.to(tl.float32), qT.to(tl.float32), input_precision="ieee")
    QH: tl.constexpr = BLOCK_Q * H_PAD
    a, b = tl.split(tl.reshape(acc, [BLOCK_N, QH // 2, 2]))
    relu = tl.reshape(tl.join(tl.maximum(a, 0.0), b + tl.abs(b)), [BLOCK_N, QH])
    w_even, w_odd = tl.split(tl.reshape(w, [QH // 2, 2]))
    w = tl.reshape(tl.join(w_even, w_odd * 0.5), [QH])
    s = tl.sum(tl.reshape(relu * w[None, :], [BLOCK_N, BLOCK_Q, H_PAD]), axis=2)
    return s * kscale[:, None]


@triton.jit
def query_rows(pid_q, S, NEXT_N, BLOCK_Q: tl.constexpr, PAGED: tl.constexpr):
    """The program's query rows [BLOCK_Q] and their mask, as :func:`load_rows` numbers them."""
    j = tl.arange(0, BLOCK_Q)
    if PAGED:
        rows = pid_q * NEXT_N + j
        rmask = j < NEXT_N
    else:
        rows = pid_q * BLOCK_Q + j
        rmask = rows < S
    return rows, rmask


@triton.jit
def load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
              stride_qs, stride_qh, stride_ws,
              D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, H_PAD: tl.constexpr,
              PAGED: tl.constexpr):
    """The program's query rows: qT [D_PAD, BLOCK_Q * H_PAD], w [BLOCK_Q * H_PAD],
    rows/rmask/ks/ke [BLOCK_Q].

    Ragged: rows pid_q * BLOCK_Q + j with ranges from ks/ke. Paged (one program = one
    sequence b of NEXT_N query tokens): rows b * NEXT_N + j, keys [0, ctx_b - NEXT_N + j + 1)
    (SPEC 4's causal rule for multi-token decode)."""
    j = tl.arange(0, BLOCK_Q)
    rows, rmask = query_rows(pid_q, S, NEXT_N, BLOCK_Q, PAGED)
    if PAGED:
        ctx = tl.load(ctx_ptr + pid_q)
        ks = tl.zeros([BLOCK_Q], dtype=tl.int32)
        ke = tl.where(rmask, tl.maximum(ctx - NEXT_N + j + 1, 0), 0)
    else:
        ks = tl.load(ks_ptr + rows, mask=rmask, other=0)
        ke = tl.load(ke_ptr + rows, mask=rmask, other=0)
    # column m of the dot = (row j, head h) = (m // H_PAD, m % H_PAD)
    m = tl.arange(0, BLOCK_Q * H_PAD)
    mrow = pid_q * (NEXT_N if PAGED else BLOCK_Q) + m // H_PAD
    mh = m % H_PAD
    mmask = ((m // H_PAD) < (NEXT_N if PAGED else BLOCK_Q)) & (mrow < S) & (mh < H)
    d = tl.arange(0, D_PAD)
    q_off = mrow.to(tl.int64)[:, None] * stride_qs + mh[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=mmask[:, None] & (d[None, :] < D), other=0.0)  # [M, D_PAD]
    qT = tl.trans(q)  # K-major B operand, as the fp8 wgmma wants it
    w = tl.load(w_ptr + mrow.to(tl.int64) * stride_ws + mh, mask=mmask, other=0.0).to(tl.float32)
    return qT, w, rows, rmask, ks, ke


@triton.jit
def load_keys(k_ptr, ksc_ptr, bt_ptr, offs, kmask, pid_q, stride_k, stride_bt,
              D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
              DOT: tl.constexpr):
    """A key tile k8 [BLOCK_N, D_PAD], its scales [BLOCK_N] and the index each key is
    reported by ([BLOCK_N] int32: the key row, or the physical slot when PAGED).

    Paged cache (SPEC 4): uint8 [num_blocks, PAGE * (D + 4)], each block holding its
    PAGE x D e4m3 key bytes, then PAGE fp32 scales; ``ksc_ptr`` is the same storage seen
    as fp32. Logical position p of sequence b lives in block block_table[b, p // PAGE]."""
    d = tl.arange(0, D_PAD)
    dmask = d < D
    if PAGED:
        blk = tl.load(bt_ptr + pid_q.to(tl.int64) * stride_bt + offs // PAGE, mask=kmask, other=0)
        kmask = kmask & (blk >= 0)
        blk = tl.maximum(blk, 0).to(tl.int64)
        t = offs % PAGE
        kb = tl.load(k_ptr + (blk * (PAGE * (D + 4)) + t * D)[:, None] + d[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0)
        if DOT == 0:
            k8 = kb.to(tl.float8e4nv, bitcast=True)
        else:  # no e4m3 type: the bytes, decoded in tile_scores
            k8 = kb
        kscale = tl.load(ksc_ptr + blk * (PAGE * (D + 4) // 4) + (PAGE * D // 4) + t, mask=kmask, other=0.0)
        kidx = (blk * PAGE + t).to(tl.int32)
    else:
        k8 = tl.load(k_ptr + offs.to(tl.int64)[:, None] * stride_k + d[None, :],
                     mask=kmask[:, None] & dmask[None, :], other=0.0)
        kscale = tl.load(ksc_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        kidx = offs
    return k8, kscale, kidx, kmask


@triton.jit
def block_range(ks, ke, rmask, n_start, n_end, BLOCK_N: tl.constexpr):
    """Tiles [lo, hi) of this split that meet some row's range (lo aligned to BLOCK_N);
    lo >= hi when none does."""
    live = rmask & (ke > ks)
    lo = tl.min(tl.where(live, ks, 2147483647))
    hi = tl.max(tl.where(live, ke, 0))
    lo = tl.maximum(lo, n_start)
    hi = tl.minimum(hi, n_end)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def program_split(split_len, S_kv, HEAVY_FIRST: tl.constexpr):
    """(pid_q, pid_s, n_start, n_end): the program's query block and its split
    [n_start, n_end) of the key axis (grid: query blocks, key splits of ``split_len``).
    HEAVY_FIRST (causal prefill): late rows have the longest ranges, start them first."""
    pid_q = tl.program_id(0)
    if HEAVY_FIRST:
        pid_q = tl.num_programs(0) - 1 - pid_q
    pid_s = tl.program_id(1)
    n_start = pid_s * split_len
    n_end = tl.minimum(n_start + split_len, S_kv)
    return pid_q, pid_s, n_start, n_end


@triton.jit
def row_length(r, ks_ptr, ke_ptr, NEXT_N, n_pos, PAGED: tl.constexpr):
    """Candidate keys of row r (SPEC 2 and 4): ke - ks (ragged), or the causal limit of
    token r % NEXT_N of sequence r // NEXT_N, at most n_pos (paged: ks_ptr holds the
    context lengths)."""
    if PAGED:
        ctx = tl.load(ks_ptr + r // NEXT_N)
        n = tl.minimum(tl.maximum(ctx - NEXT_N + 1 + r % NEXT_N, 0), n_pos)
    else:
        n = tl.maximum(tl.load(ke_ptr + r) - tl.load(ks_ptr + r), 0)
    return n


# What indexer_scores_kernel does with each tile of scores (MODE):
SCORES_STORE = 0    # write them: out [rows, n_pos] fp32, -inf outside each row's range
SCORES_SLOTS = 1    # keep those >= the row's threshold, in per-(row, split, tile column) slots
SCORES_ATOMIC = 2   # keep those >= the row's threshold, appended to a per-row buffer by atomics


@triton.jit
def indexer_scores_kernel(
    q_ptr, k_ptr, ksc_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, bt_ptr, out_ptr,
    thr_ptr, bkey_ptr, bidx_ptr, cnt_ptr,
    S, S_kv, H, NEXT_N, split_len, pos_stride, n_split, SC,
    stride_qs, stride_qh, stride_k, stride_ws, stride_bt, stride_os,
    D: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    DOT: tl.constexpr, PAGED: tl.constexpr, HEAVY_FIRST: tl.constexpr, MODE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Scores of the program's rows over one split of the key axis (grid: query blocks,
    key splits of ``split_len``, a multiple of BLOCK_N).

    The key axis is walked in units of ``pos_stride`` positions: unit u is key position
    u * pos_stride (1 = every key; SAMPLE_STRIDE for the threshold sample), and S_kv
    counts units. A row's range [ks, ke) becomes [cdiv(ks, st), cdiv(ke, st)) in units.

    MODE SCORES_STORE writes out [rows, S_kv] (-inf outside the ranges). The filter
    modes read thr [rows] (int32 score keys) and keep the scores whose key is >= thr:
    SCORES_SLOTS: a row's kept keys of tile column c (key % BLOCK_N) go to its slot
    (row, split, c) of SC entries, counted in registers (no atomics, no scan);
    cnt [rows * n_split * BLOCK_N] gets the counts (which may exceed SC: overflow).
    SCORES_ATOMIC: positions from an atomic counter per row (cnt [rows], zeroed by the
    caller), a buffer of SC entries per row. bkey/bidx hold (score key, index).
    PDL: see :func:`~flashdsa.ops.common.pdl_prologue`."""
    pdl_prologue(PDL)
    pid_q, pid_s, n_start, n_end = program_split(split_len, S_kv, HEAVY_FIRST)
    qT, w, rows, rmask, ks, ke = load_rows(q_ptr, w_ptr, ks_ptr, ke_ptr, ctx_ptr, pid_q, S, H, NEXT_N,
                                           stride_qs, stride_qh, stride_ws, D, D_PAD, BLOCK_Q, H_PAD, PAGED)
    ks = (ks + pos_stride - 1) // pos_stride
    ke = (ke + pos_stride - 1) // pos_stride
    lo, hi = block_range(ks, ke, rmask, n_start, n_end, BLOCK_N)
    if hi <= lo:
        lo = n_end
        hi = n_end
    out_row = out_ptr + rows.to(tl.int64) * stride_os  # [BLOCK_Q]
    col = tl.arange(0, BLOCK_N)
    if MODE != 0:
        thr = tl.load(thr_ptr + rows, mask=rmask, other=0)
        cnt = tl.zeros([BLOCK_N, BLOCK_Q], dtype=tl.int32)
        sbase = (rows.to(tl.int64) * n_split + pid_s) * BLOCK_N  # [BLOCK_Q] first slot of the row
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + col
        kmask = offs < hi  # hi <= n_end; past it a paged block table may hold garbage
        k8, kscale, kidx, kmask = load_keys(k_ptr, ksc_ptr, bt_ptr, offs * pos_stride, kmask, pid_q, stride_k,
                                            stride_bt, D, D_PAD, PAGE, PAGED, DOT)
        s = tile_scores(k8, kscale, qT, w, BLOCK_N, BLOCK_Q, H_PAD, DOT)  # [BLOCK_N, BLOCK_Q]
        inside = (offs[:, None] >= ks[None, :]) & (offs[:, None] < ke[None, :])
        if MODE == 0:
            s = tl.where(inside, s, float("-inf"))
            tl.store(out_row[None, :] + offs[:, None], s, mask=rmask[None, :] & (offs < n_end)[:, None])
        else:
            key = score_key(s)
            keep = inside & kmask[:, None] & rmask[None, :] & (key >= thr[None, :])
            kidx2 = tl.broadcast_to(kidx[:, None], [BLOCK_N, BLOCK_Q])
            if MODE == 1:
                ptr = (sbase[None, :] + col[:, None]) * SC + cnt
                ok = keep & (cnt < SC)
                cnt += keep.to(tl.int32)
            else:
                rows2 = tl.broadcast_to(rows[None, :], [BLOCK_N, BLOCK_Q])
                pos = tl.atomic_add(cnt_ptr + rows2, tl.full([BLOCK_N, BLOCK_Q], 1, tl.int32), mask=keep,
                                    sem="relaxed")
                ptr = rows2.to(tl.int64) * SC + pos
                ok = keep & (pos < SC)
            tl.store(bkey_ptr + ptr, key, mask=ok)
            tl.store(bidx_ptr + ptr, kidx2, mask=ok)
    if MODE == 0:
        # the rest of this split lies outside every row's range
        hi_t = tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, n_end)
        ninf = tl.full([BLOCK_Q, BLOCK_N], float("-inf"), tl.float32)
        for n0 in range(n_start, lo, BLOCK_N):
            offs = n0 + col
            tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < lo)[None, :])
        for n0 in range(hi_t, n_end, BLOCK_N):
            offs = n0 + col
            tl.store(out_row[:, None] + offs[None, :], ninf, mask=rmask[:, None] & (offs < n_end)[None, :])
    elif MODE == 1:
        tl.store(cnt_ptr + sbase[None, :] + col[:, None], cnt, mask=rmask[None, :])



def choose_split(n_qblocks: int, s_kv: int, block_n: int, device: torch.device, min_split: int,
                 n_split: int | None = None) -> tuple[int, int]:
    """(n_split, split_len): split the key axis only when query blocks alone leave the
    GPU under-filled (about 2 programs per SM), never below ``min_split`` keys a split."""
    if n_split is None:
        target = 2 * num_sms(device)
        n_split = max(1, min(triton.cdiv(target, max(n_qblocks, 1)), triton.cdiv(s_kv, min_split)))
    split_len = triton.cdiv(triton.cdiv(max(s_kv, 1), n_split), block_n) * block_n
    return triton.cdiv(max(s_kv, 1), split_len), split_len


@dataclass
class Problem:
    """One scoring problem, ragged or paged, as the kernels take it.

    q [rows, H, D] and w [rows, H] fp32: the query rows. Ragged: k = k8 [S_kv, D],
    ksc = k_scale [S_kv] fp32, ks/ke [rows] int32; a *unit* (what :meth:`slice` cuts and
    programs are launched over, BLOCK_Q rows a program) is a row. Paged: k = the uint8
    cache, ksc its fp32 view, ctx [B] int32, bt [B, max_blocks] int32; a unit is a
    sequence of next_n rows, one program each. ``n_pos``: key positions walked."""
    q: torch.Tensor
    k: torch.Tensor
    ksc: torch.Tensor
    w: torch.Tensor
    ks: torch.Tensor
    ke: torch.Tensor
    ctx: torch.Tensor
    bt: torch.Tensor
    n_pos: int
    next_n: int
    paged: bool
    cfg: dict
    topk_cfg: dict | None = None

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def units(self) -> int:
        return self.ctx.shape[0] if self.paged else self.rows

    def n_prog(self, cfg: dict | None = None) -> int:
        """Programs along the grid's first axis with the block sizes ``cfg`` (default: the
        scoring kernel's)."""
        return self.units if self.paged else triton.cdiv(self.rows, (cfg or self.cfg)["BLOCK_Q"])

    def dims(self) -> dict:
        """The kernels' width constexprs: D, D_PAD (fp8 MMAs need K >= 32; tiny test
        widths are 16), H_PAD."""
        h, d = self.q.shape[1], self.q.shape[2]
        return dict(D=d, D_PAD=max(triton.next_power_of_2(d), 32), H_PAD=triton.next_power_of_2(h))

    def slice(self, u0: int, u1: int) -> "Problem":
        """The sub-problem of units [u0, u1) (views, no copies)."""
        r0, r1 = u0 * self.next_n, u1 * self.next_n
        if self.paged:
            return replace(self, q=self.q[r0:r1], w=self.w[r0:r1], ks=self.ks[u0:u1], ke=self.ke[u0:u1],
                           ctx=self.ctx[u0:u1], bt=self.bt[u0:u1])
        return replace(self, q=self.q[r0:r1], w=self.w[r0:r1], ks=self.ks[r0:r1], ke=self.ke[r0:r1])



def ragged_problem(q8, k8, k_scale, weights, ks, ke, config: dict | None = None) -> Problem:
    """A ragged Problem (ctx and bt unused), with the default block sizes updated by
    ``config`` for both kernels."""
    q8, k8 = as_bytes_without_e4m3(last_dim_contiguous(q8), last_dim_contiguous(k8))
    h = q8.shape[1]
    cfg = default_config(q8.device, h, **(config or {}))
    topk_cfg = default_config(q8.device, h, topk=True, **(config or {}))
    return Problem(q8, k8, k_scale.float().contiguous(), weights.float().contiguous(), ks, ke, ks, ks,
                   k8.shape[0], 1, False, cfg, topk_cfg)


def scored_chunks(p: Problem, pos_stride: int, budget_bytes: int, min_split: int):
    """The scores of ``p`` (SCORES_STORE, every ``pos_stride``-th key position) a chunk of
    whole units at a time, at most ``budget_bytes`` of scores a chunk: yields (first row,
    the chunk's sub-problem, its scores [rows, cdiv(n_pos, pos_stride)] fp32). Each
    chunk's buffer is new, so a consumer launched on it may still run when the next
    chunk is scored."""
    n_cols = triton.cdiv(max(p.n_pos, 1), pos_stride)
    chunk = max(1, budget_bytes // (4 * n_cols * p.next_n))   # units a chunk
    for u0 in range(0, p.units, chunk):
        sub = p.slice(u0, min(u0 + chunk, p.units))
        out = torch.empty(sub.rows, n_cols, dtype=torch.float32, device=p.q.device)
        launch_scores(sub, SCORES_STORE, choose_split(sub.n_prog(), n_cols, sub.cfg["BLOCK_N"], p.q.device, min_split),
                      pos_stride, out=out)
        yield u0 * p.next_n, sub, out


def launch_scores(p: Problem, mode: int, split: tuple[int, int], pos_stride: int = 1, out=None,
                  thr=None, bkey=None, bidx=None, cnt=None, sc: int = 0) -> None:
    """Run indexer_scores_kernel on ``p`` (see its docstring for the modes and buffers);
    split = (n_split, split_len) in units of pos_stride positions."""
    n_split, split_len = split
    dummy = p.w
    indexer_scores_kernel[(p.n_prog(), n_split)](
        p.q, p.k, p.ksc, p.w, p.ks, p.ke, p.ctx, p.bt, dummy if out is None else out,
        dummy if thr is None else thr, dummy if bkey is None else bkey, dummy if bidx is None else bidx,
        dummy if cnt is None else cnt,
        p.rows, triton.cdiv(p.n_pos, pos_stride), p.q.shape[1], p.next_n, split_len, pos_stride, n_split, sc,
        p.q.stride(0), p.q.stride(1), 0 if p.paged else p.k.stride(0), p.w.stride(0),
        p.bt.stride(0) if p.paged else 0, 0 if out is None else out.stride(0), **p.dims(),
        BLOCK_Q=p.cfg["BLOCK_Q"], BLOCK_N=p.cfg["BLOCK_N"], PAGE=PAGE_SIZE, DOT=dot_mode(p.q), PAGED=p.paged,
        HEAVY_FIRST=not p.paged, MODE=mode, **pdl_launch(p.q.device),
        num_warps=p.cfg["store_warps"] if mode == SCORES_STORE else p.cfg["num_warps"], num_stages=p.cfg["num_stages"])


def indexer_logits(q8: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                   ks: torch.Tensor, ke: torch.Tensor, config: dict | None = None,
                   n_split: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Index scores [S, S_kv] fp32, -inf outside [ks, ke). Inputs as the public
    ``flashdsa.indexer_logits`` (assumed validated): q8 [S, H, D], k8 [S_kv, D] (e4m3, or
    fp16/fp32), k_scale [S_kv], weights [S, H] fp32, ks/ke [S] int32. ``config``
    overrides block sizes, ``n_split`` the key-axis split, ``out`` the result buffer."""
    s, s_kv = q8.shape[0], k8.shape[0]
    if out is None:
        out = torch.empty(s, s_kv, dtype=torch.float32, device=q8.device)
    if s == 0 or s_kv == 0:
        return out
    p = ragged_problem(q8, k8, k_scale, weights, ks, ke, config)
    bn = p.cfg["BLOCK_N"]
    launch_scores(p, SCORES_STORE, choose_split(p.n_prog(), s_kv, bn, q8.device, 4 * bn, n_split), out=out)
    return out

