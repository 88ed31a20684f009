"""The model runner: one forward pass of the packed tokens of a step over the paged caches."""
from __future__ import annotations

import torch

from .attention import StepMetadata, paged_mla_attention
from .cache import PAGE_SIZE, PagedCaches


class ModelRunner:
    """Runs a :class:`flashdsa.model.DSAForCausalLM` layer by layer with the engine's
    paged attention in place of ``MLA.forward`` (same weights, same math)."""

    def __init__(self, model, caches: PagedCaches, backend: str = "auto"):
        self.model = model
        self.caches = caches
        self.backend = backend
        self.device = next(model.parameters()).device
        self.graphs = None  # engine.cuda_graph.DecodeGraphs when decode steps are captured

    def build_metadata(self, scheduled):
        """Token ids [T], the step metadata, the packed rows whose logits are sampled
        (the last token of every sequence whose chunk reaches its end) and the indices
        into ``scheduled`` of those sequences."""
        ids, positions, slots, token_seq, query_start, ctx, sample_rows, sample_seqs = [], [], [], [], [0], [], [], []
        width = max(len(seq.blocks) for seq, _ in scheduled)
        table = torch.zeros(len(scheduled), width, dtype=torch.int32)
        for b, (seq, n) in enumerate(scheduled):
            start = seq.num_computed
            pos = torch.arange(start, start + n)
            blocks = torch.tensor(seq.blocks, dtype=torch.int64)
            table[b, : len(seq.blocks)] = blocks.to(torch.int32)
            ids.append(torch.tensor(seq.token_slice(start, start + n), dtype=torch.int64))
            positions.append(pos)
            slots.append(blocks[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE)
            token_seq.append(torch.full((n,), b, dtype=torch.int64))
            query_start.append(query_start[-1] + n)
            ctx.append(start + n)
            if start + n == seq.num_tokens:
                sample_rows.append(query_start[-1] - 1)
                sample_seqs.append(b)
        dev = self.device
        meta = StepMetadata(
            positions=torch.cat(positions).to(dev), slots=torch.cat(slots).to(dev),
            token_seq=torch.cat(token_seq).to(dev), block_table=table.to(dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev), query_start=query_start,
            context_host=ctx)
        return torch.cat(ids).to(dev), meta, sample_rows, sample_seqs

    @torch.inference_mode()
    def forward(self, scheduled) -> tuple[torch.Tensor, list[int]]:
        """Write the caches of the scheduled tokens; return (logits [N, vocab] fp32 of the
        sampled rows, the indices into ``scheduled`` they belong to)."""
        if self.graphs is not None and self.graphs.can_run(scheduled):
            return self.graphs.run(scheduled)
        ids, meta, rows, which = self.build_metadata(scheduled)
        inner = self.model.model
        x = inner.embed_tokens(ids)
        for i, layer in enumerate(inner.layers):
            h = layer.input_layernorm(x)
            x = x + paged_mla_attention(layer.self_attn, h, meta, self.caches, i, self.backend)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if not rows:
            return x.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32), which
        h = inner.norm(x[torch.tensor(rows, device=x.device)])
        return self.model.lm_head(h).float(), which
