"""Latent regularisers: the diagonal Gaussian of KL models and the vector quantiser of VQ models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class DiagonalGaussian:
    """A diagonal Gaussian over latents, built from ``(mean, logvar)`` stacked on the channel axis.

    logvar is clamped to [-30, 20] as in the original ldm code.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over C, H, W: one value per batch item."""
        var = torch.exp(self.logvar)
        return 0.5 * torch.sum(self.mean.pow(2) + var - 1.0 - self.logvar, dim=(1, 2, 3))


@dataclass
class Quantized:
    """What the vector quantiser returns."""

    codes: torch.Tensor  # (B, C, H, W) codebook vectors (straight-through when training)
    indices: torch.Tensor  # (B, H, W) int64 codebook indices
    loss: torch.Tensor  # codebook + beta * commitment


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser, state-dict compatible with taming (``embedding.weight``).

    Distances are squared L2. The loss is ``||sg(z) - e||^2 + beta * ||z - sg(e)||^2`` and the
    gradient reaches the encoder straight through the quantisation.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        # Given its weight, nn.Embedding skips its own normal_ init, which is overwritten anyway and
        # on the meta device (checking a file's config before loading it) costs seconds of imports.
        self.embedding = nn.Embedding(n_embed, embed_dim, _weight=torch.empty(n_embed, embed_dim))
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of ``flat`` (N, embed_dim).

        Chunked so that the N x n_embed distance matrix never exists whole.
        """
        codebook = self.embedding.weight.to(flat.dtype)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], chunk):
            part = flat[start : start + chunk]
            out[start : start + chunk] = torch.cdist(part, codebook).argmin(dim=1)
        return out

    def forward(self, z: torch.Tensor) -> Quantized:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        indices = self.nearest(flat.detach().float())
        codes = self.embedding(indices).to(z.dtype).view(b, h, w, c).permute(0, 3, 1, 2)
        if self.training or torch.is_grad_enabled():
            loss = F.mse_loss(codes, z.detach()) + self.beta * F.mse_loss(z, codes.detach())
            if z.requires_grad:  # without a graph the detour only adds rounding to the codes
                codes = z + (codes - z).detach()
        else:
            loss = z.new_zeros(())
        return Quantized(codes.contiguous(), indices.view(b, h, w), loss)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Inverse of the index output: ``(B, H, W)`` indices to ``(B, embed_dim, H, W)`` codes."""
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"codebook indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_embed):
            raise ValueError(
                f"codebook indices must lie in [0, {self.n_embed}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        return self.embedding(indices.long()).permute(0, 3, 1, 2).contiguous()
