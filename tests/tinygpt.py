"""A small GPT-style language model, its data and its loss, for the end-to-end transformer test.

Decoder-only: token and position embeddings, pre-LayerNorm blocks of causal self-attention
(``scaled_dot_product_attention``) and a GELU MLP, a final LayerNorm and an untied head. The data is a synthetic
language whose next token is a fixed function of the last two, plus noise, so a few hundred steps learn it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 16, context: int = 12, width: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def tokens(n: int = 256, vocab: int = 16, context: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)``: ``n`` sequences of ``context`` tokens and the same shifted by one (next-token targets)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(n, context + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, vocab, (n, 2), generator=g)
    for t in range(2, context + 1):
        rule = (3 * seq[:, t - 1] + seq[:, t - 2] + 1) % vocab
        noise = torch.randint(0, vocab, (n,), generator=g)
        seq[:, t] = torch.where(torch.rand(n, generator=g) < 0.1, noise, rule)
    return seq[:, :-1], seq[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over sequences and positions: logits ``(n, T, V)``, targets ``(n, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
