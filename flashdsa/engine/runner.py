"""The model runner: one forward pass of the packed tokens of a step over the paged caches."""
from __future__ import annotations

import torch

from .attention import StepMetadata, run_layers
from .cache import PAGE_SIZE, HostBlockTable, PagedCaches
from .sampler import token_logprobs

PROMPT_ROWS = 512   # prompt rows whose logits are held at once when a prompt is scored


class ModelRunner:
    """Runs a :class:`flashdsa.model.DSAForCausalLM` layer by layer with the engine's
    paged attention in place of ``MLA.forward`` (same weights, same math)."""

    def __init__(self, model, caches: PagedCaches, backend: str = "auto"):
        self.model = model
        self.caches = caches
        self.backend = backend
        self.device = next(model.parameters()).device
        self.graphs = None  # engine.cuda_graph.DecodeGraphs when decode steps are captured
        self._table: HostBlockTable | None = None   # see _host_table

    def build_metadata(self, scheduled):
        """Token ids [T], the step metadata, the packed rows whose logits are sampled
        (the last token of every sequence whose chunk reaches its end) and the indices
        into ``scheduled`` of those sequences. Sequences with one new token (decodes) are
        handled as host integers, chunks as tensors; the block table rows are kept
        across steps (:class:`HostBlockTable`)."""
        width = max(len(seq.blocks) for seq, _ in scheduled)
        table = self._host_table(len(scheduled), width)
        ids, positions, slots = [], [], []       # tensors, in scheduled order
        run_ids, run_pos, run_slots = [], [], []  # host ints of consecutive one-token sequences
        counts, query_start, ctx, sample_rows, sample_seqs = [], [0], [], [], []

        def flush():
            if run_ids:
                ids.append(torch.tensor(run_ids, dtype=torch.int64))
                positions.append(torch.tensor(run_pos, dtype=torch.int64))
                slots.append(torch.tensor(run_slots, dtype=torch.int64))
                run_ids.clear()
                run_pos.clear()
                run_slots.clear()

        for b, (seq, n) in enumerate(scheduled):
            start = seq.num_computed
            blocks = seq.blocks
            table.set_row(b, blocks)
            if n == 1:
                run_ids.append(seq.token_slice(start, start + 1)[0])
                run_pos.append(start)
                run_slots.append(seq.slot(start))
            else:
                flush()
                pos = torch.arange(start, start + n)
                first = start // PAGE_SIZE
                blk = torch.tensor(blocks[first:(start + n - 1) // PAGE_SIZE + 1], dtype=torch.int64)
                ids.append(torch.tensor(seq.token_slice(start, start + n), dtype=torch.int64))
                positions.append(pos)
                slots.append(blk[pos // PAGE_SIZE - first] * PAGE_SIZE + pos % PAGE_SIZE)
            counts.append(n)
            query_start.append(query_start[-1] + n)
            ctx.append(start + n)
            if start + n == seq.num_tokens:
                sample_rows.append(query_start[-1] - 1)
                sample_seqs.append(b)
        flush()
        dev = self.device
        token_seq = torch.repeat_interleave(torch.arange(len(scheduled)), torch.tensor(counts))
        meta = StepMetadata(
            positions=torch.cat(positions).to(dev), slots=torch.cat(slots).to(dev), token_seq=token_seq.to(dev),
            block_table=table.table[:len(scheduled), :width].to(dev, copy=True),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev), query_start=query_start,
            context_host=ctx)
        return torch.cat(ids).to(dev), meta, sample_rows, sample_seqs

    def _score_prompts(self, x: torch.Tensor, scheduled, meta) -> None:
        """Append to ``seq.prompt_logprobs`` of the scheduled sequences that ask for them the
        :class:`TokenLogprob` of each prompt token whose previous position is among this
        step's rows and not scored yet (a preempted sequence recomputes rows it scored).
        The rows' logits are made PROMPT_ROWS at a time."""
        for b, (seq, n) in enumerate(scheduled):
            scored = seq.prompt_logprobs
            if scored is None or len(scored) >= len(seq.prompt_ids):
                continue
            start = meta.context_host[b] - n                          # position of the sequence's first row
            p0, p1 = max(start, len(scored) - 1), min(start + n, len(seq.prompt_ids) - 1)
            t0 = meta.query_start[b] - start
            for q0 in range(p0, p1, PROMPT_ROWS):
                q1 = min(q0 + PROMPT_ROWS, p1)
                logits = self.model.lm_head(self.model.model.norm(x[t0 + q0:t0 + q1]))
                scored += token_logprobs(logits, seq.prompt_ids[q0 + 1:q1 + 1],
                                         [seq.params.prompt_logprobs] * (q1 - q0))

    def _host_table(self, rows: int, width: int) -> HostBlockTable:
        """The eager steps' host block table, grown (and rewritten) when a step needs more
        rows or blocks than it has."""
        t = self._table
        if t is None or t.table.shape[0] < rows or t.table.shape[1] < width:
            shape = (max(rows, 2 * t.table.shape[0]) if t else rows, max(width, 2 * t.table.shape[1]) if t else width)
            t = self._table = HostBlockTable(torch.zeros(shape, dtype=torch.int32), 0)
        return t

    @torch.inference_mode()
    def forward(self, scheduled) -> tuple[torch.Tensor, list[int]]:
        """Write the caches of the scheduled tokens; return (logits [N, vocab] fp32 of the
        sampled rows, the indices into ``scheduled`` they belong to)."""
        if self.graphs is not None and self.graphs.can_run(scheduled):
            return self.graphs.run(scheduled)
        ids, meta, rows, which = self.build_metadata(scheduled)
        x = run_layers(self.model, ids, meta, self.caches, self.backend)
        self._score_prompts(x, scheduled, meta)
        if not rows:
            return x.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32), which
        h = self.model.model.norm(x[torch.tensor(rows, device=x.device)])
        return self.model.lm_head(h).float(), which
