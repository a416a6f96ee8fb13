"""The risk models' networks: a dense profile branch fused with an LSTM or a transformer over the week.

Every layer has per-record gradients in Opacus (Linear, LayerNorm, LSTM -> DPLSTM through
`prepare_module`); attention is written out over Linear layers for that reason.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def dense(inputs: int, hidden: int, layers: int = 2) -> nn.Sequential:
    """`layers` Linear + ReLU of width `hidden`."""
    parts: list[nn.Module] = []
    for i in range(layers):
        parts += [nn.Linear(inputs if i == 0 else hidden, hidden), nn.ReLU()]
    return nn.Sequential(*parts)


class HybridLSTMNet(nn.Module):
    """Dense branch on the profile, (bi)LSTM branch on the week (mean and last output), fused."""

    def __init__(
        self,
        profile_dim: int,
        n_channels: int,
        n_classes: int,
        *,
        hidden: int,
        lstm_hidden: int,
        use_week: bool,
    ):
        super().__init__()
        self.profile = dense(profile_dim, hidden)
        self.week = (
            nn.LSTM(n_channels, lstm_hidden, batch_first=True, bidirectional=True) if use_week else None
        )
        fused = hidden + (4 * lstm_hidden if use_week else 0)
        self.head = nn.Sequential(nn.Linear(fused, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, profile: torch.Tensor, week: torch.Tensor | None = None) -> torch.Tensor:
        parts = [self.profile(profile)]
        if self.week is not None:
            if week is None:
                raise ValueError("this network reads the week, but none was given")
            outputs, _ = self.week(week)
            parts += [outputs.mean(dim=1), outputs[:, -1]]
        return self.head(torch.cat(parts, dim=1))


def sinusoidal_positions(length: int, width: int, device: torch.device) -> torch.Tensor:
    """(length, width) fixed positional encoding (Vaswani et al.): any sequence length, no weights."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(
        torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / width)
    )
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table


class SelfAttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention and feed-forward, each with a residual connection."""

    def __init__(self, width: int, heads: int, feedforward: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"model width {width} is not a multiple of {heads} heads")
        self.heads = heads
        self.norm_attention, self.norm_feedforward = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.feedforward = nn.Sequential(
            nn.Linear(width, feedforward), nn.ReLU(), nn.Linear(feedforward, width)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        q, k, v = self.qkv(self.norm_attention(tokens)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        tokens = tokens + self.dropout(self.out(mixed))
        return tokens + self.dropout(self.feedforward(self.norm_feedforward(tokens)))


class RiskTransformerNet(nn.Module):
    """A profile token and one token per day (channels projected, positions encoded), a small
    encoder, and a classification head on the profile token's output."""

    def __init__(
        self,
        profile_dim: int,
        n_channels: int,
        n_classes: int,
        *,
        width: int,
        heads: int,
        layers: int,
        feedforward: int,
        dropout: float,
        use_week: bool,
    ):
        super().__init__()
        self.profile = nn.Linear(profile_dim, width)
        self.day = nn.Linear(n_channels, width) if use_week else None
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(width, heads, feedforward, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, profile: torch.Tensor, week: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.profile(profile)[:, None, :]
        if self.day is not None:
            if week is None:
                raise ValueError("this network reads the week, but none was given")
            days = self.day(week) + sinusoidal_positions(week.shape[1], tokens.shape[-1], week.device)
            tokens = torch.cat([tokens, days], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))
