"""CUDA graphs for decode steps.

A decode step launches hundreds of small kernels per token; replaying a captured graph
removes their launch cost. A graph needs fixed shapes and no host synchronization, so
the captured step (``decode_body``) differs from the eager one only in how it selects:
the paged indexer top-k runs for every row (over at most ``max_blocks * 64`` positions),
also for rows whose context is within top-k, which select all of it (the eager step on
the kernels does the same). Batches are padded up to a captured size (1, 2, 4, 8, 16,
32, ...); padding rows decode position 0 of a scratch block that no sequence owns.

"Where possible": only decode-only steps, only on a GPU with the Triton kernels, and,
in models with MoE layers, only where their experts run as grouped GEMMs (the engine
stacks them: :meth:`flashdsa.model.MoE.stack_experts`; bf16 weights on sm_90 or sm_100),
since the per-expert forward reads the expert counts on the host. When capture fails,
the engine warns and stays eager.
"""
from __future__ import annotations

import warnings

import torch

from .attention import StepMetadata, run_layers
from .cache import PAGE_SIZE, HostBlockTable


def graphs_supported(model, device: torch.device, backend: str) -> str | None:
    """None when decode steps of ``model`` can be captured, else the reason why not."""
    from ..model import MoE
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if backend == "reference":
        return "CUDA graphs need the Triton kernels (backend 'auto' or 'triton')"
    for layer in model.model.layers:
        why = layer.mlp.grouped_unsupported() if isinstance(layer.mlp, MoE) else None
        if why is not None:
            return f"the MoE layers read their expert counts on the host (no grouped GEMM: {why})"
    return None


class DecodeGraphs:
    """Captured decode steps for batch sizes up to ``max_batch``.

    Args:
        runner: the engine's ModelRunner (model, caches).
        max_batch: largest decode batch (max_num_seqs).
        max_blocks: block-table width of the captured steps (max_model_len / 64).
        scratch_block: a physical block no sequence owns; padding rows write there.
    """

    def __init__(self, runner, max_batch: int, max_blocks: int, scratch_block: int):
        self.runner = runner
        self.max_blocks = max_blocks
        self.scratch_block = scratch_block
        self.sizes = []
        b = 1
        while b < max_batch:
            self.sizes.append(b)
            b *= 2
        self.sizes.append(max_batch)
        dev = runner.device
        n = max_batch
        # the static inputs in two buffers, each filled on the host (pinned on a GPU) and
        # sent in one copy a step: int64 rows ids, positions, slots; int32 context_lens
        # [n], then the block table [n, max_blocks]
        pin = dev.type == "cuda"
        self._h64 = torch.zeros(3, n, dtype=torch.int64, pin_memory=pin)
        self._h32 = torch.empty(n * (max_blocks + 1), dtype=torch.int32, pin_memory=pin)
        self._i64 = torch.empty_like(self._h64, device=dev)
        self._i32 = torch.empty_like(self._h32, device=dev)
        self.ids, self.positions, self.slots = self._i64
        self.context_lens = self._i32[:n]
        self.block_table = self._i32[n:].view(n, max_blocks)
        self.token_seq = torch.arange(n, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.disabled: str | None = None
        self._table = HostBlockTable(self._h32[n:].view(n, max_blocks), scratch_block)
        self._sent = torch.cuda.Event() if pin else None   # the last step's copies (host buffers in use)
        self._reset_padding()

    def _meta(self, b: int) -> StepMetadata:
        return StepMetadata(positions=self.positions[:b], slots=self.slots[:b], token_seq=self.token_seq[:b],
                            block_table=self.block_table[:b], context_lens=self.context_lens[:b],
                            query_start=list(range(b + 1)), context_host=[1] * b)

    def decode_body(self, b: int) -> torch.Tensor:
        """The captured computation: logits [b, vocab] fp32 of the static inputs."""
        model, caches, backend = self.runner.model, self.runner.caches, self.runner.backend
        x = run_layers(model, self.ids[:b], self._meta(b), caches, backend, static=True)
        return model.lm_head(model.model.norm(x)).float()

    def _reset_padding(self) -> None:
        """Every row a padding row (position 0 of the scratch block), on the host and the device."""
        n = self._h64.shape[1]
        self._h64[0:2].zero_()
        self._h64[2].fill_(self.scratch_block * PAGE_SIZE)
        self._h32[:n].fill_(1)
        self._table.reset()
        self._i64.copy_(self._h64)
        self._i32.copy_(self._h32)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size (largest first, so smaller ones reuse its memory pool)."""
        self._reset_padding()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for b in self.sizes:          # warm-up: compiles the Triton kernels
                    self.decode_body(b)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            for b in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.decode_body(b)
                self.pool = graph.pool()
                self.graphs[b] = (graph, out)
            torch.cuda.synchronize()
        except Exception as e:  # stay correct: fall back to eager decode
            self.graphs.clear()
            self.disabled = f"{type(e).__name__}: {e}"
            warnings.warn(f"flashdsa engine: CUDA graph capture failed, decoding eagerly ({self.disabled})")

    def can_run(self, scheduled) -> bool:
        if not self.graphs or len(scheduled) > self.sizes[-1]:
            return False
        return all(n == 1 and seq.num_computed == seq.num_tokens - 1 and len(seq.blocks) <= self.max_blocks
                   for seq, n in scheduled)

    @torch.inference_mode()
    def run(self, scheduled) -> tuple[torch.Tensor, list[int]]:
        """Replay the graph of the smallest captured size >= len(scheduled) (without a
        captured graph, e.g. in CPU tests, the same body runs eagerly)."""
        b = len(scheduled)
        size = next(s for s in self.sizes if s >= b)
        if self._sent is not None:
            self._sent.synchronize()   # the last step's copies have read the host buffers
        ids, pos, slots, ctx = [], [], [], []
        for i, (seq, _) in enumerate(scheduled):
            p = seq.num_computed
            ids.append(seq.token_slice(p, p + 1)[0])
            pos.append(p)
            slots.append(seq.slot(p))
            ctx.append(p + 1)
            self._table.set_row(i, seq.blocks)
        for i in range(b, size):
            self._table.set_row(i, None)
        pad = size - b
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.scratch_block * PAGE_SIZE] * pad
        ctx += [1] * pad
        n = self._h64.shape[1]
        self._h64[:, :size] = torch.tensor([ids, pos, slots], dtype=torch.int64)
        self._h32[:size] = torch.tensor(ctx, dtype=torch.int32)
        self._i64.copy_(self._h64, non_blocking=True)
        used = n + size * self.max_blocks            # context_lens and the table's first size rows
        self._i32[:used].copy_(self._h32[:used], non_blocking=True)
        if self._sent is not None:
            self._sent.record()
        if size in self.graphs:
            graph, out = self.graphs[size]
            graph.replay()
        else:
            out = self.decode_body(size)
        return out[:b].clone(), list(range(b))
