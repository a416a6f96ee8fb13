"""TimeGAN's recurrent networks, the module pairs that share one DP optimizer, and freezing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class RecurrentNet(nn.Module):
    """GRU over the days (optionally fed the static condition every day), then a per-day linear head."""

    def __init__(
        self,
        input_dim: int,
        cond_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        *,
        sigmoid: bool,
        prior_dim: int = 0,
    ):
        super().__init__()
        self.cond_dim = cond_dim
        self.rnn = nn.GRU(input_dim + cond_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_dim, output_dim)
        self.sigmoid = sigmoid
        if prior_dim:
            # Profile -> expected weekly mean of each channel (the embedder's side head, DP-trained
            # with it): the static-sequence link in a form a generator can be taught directly.
            # Linear (before the sigmoid): with a hidden layer it leaned on proxies the static
            # generator does not keep (occupation for age), and on that generator's profiles its
            # age~HRV slope fell from -0.61 to -0.36 sd; the worst link gap went from 0.32 to 0.14.
            self.prior = nn.Sequential(nn.Linear(cond_dim, prior_dim), nn.Sigmoid())

    def forward(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_dim:
            assert cond is not None, "this network is conditioned on the static profile"
            seq = torch.cat([seq, cond[:, None, :].expand(-1, seq.shape[1], -1)], dim=-1)
        out, _ = self.rnn(seq)
        out = self.head(out)
        return torch.sigmoid(out) if self.sigmoid else out


class _AutoEncoder(nn.Module):
    """Embedder + recovery as one module, so the embedding phase is one DP optimizer, one charge."""

    def __init__(self, embedder: nn.Module, recovery: nn.Module):
        super().__init__()
        self.embedder, self.recovery = embedder, recovery

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.recovery(self.embedder(x, cond)), self.embedder.prior(cond)


class _SupervisorAndPrior(nn.Module):
    """Supervisor + the embedder's link prior: one DP optimizer in the supervised phase."""

    def __init__(self, supervisor: nn.Module, prior: nn.Module):
        super().__init__()
        self.supervisor, self.prior = supervisor, prior

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.supervisor(h), self.prior(cond)


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """No gradients into these modules while a post-processing loss flows through them."""
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module, saved in zip(modules, flags, strict=True):
            for p, flag in zip(module.parameters(), saved, strict=True):
                p.requires_grad_(flag)
