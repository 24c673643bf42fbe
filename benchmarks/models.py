"""Models shared by the benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class TinyGPT(nn.Module):
    """GPT-like decoder: token + position embeddings, pre-norm ``nn.TransformerEncoderLayer`` blocks (ReLU MLP,
    causal mask), final LayerNorm and an untied unembedding. The default (6 layers, d=256, 8 heads, vocab 10k,
    context 128) has ~10M parameters."""

    def __init__(self, vocab: int = 10_000, d: int = 256, heads: int = 8, layers: int = 6, ctx: int = 128,
                 d_mlp: int | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, d_mlp or 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
