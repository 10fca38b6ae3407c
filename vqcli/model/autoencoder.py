"""The autoencoder: encoder, quant_conv, regulariser, post_quant_conv, decoder.

This is the only place where ``quant_conv``, the regulariser and the latent scale and shift are
applied. Latents are "raw" (what the decoder's ``post_quant_conv`` expects) unless ``scaled=True``,
which gives diffusion-ready latents ``(z - shift_factor) * scale_factor``.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from vqcli.errors import ConfigError, FileError
from vqcli.model.blocks import full_precision
from vqcli.model.coders import Decoder, Encoder
from vqcli.model.config import AutoEncoderConfig
from vqcli.model.quantize import DiagonalGaussian, VectorQuantizer


class AutoEncoder(nn.Module):
    """A KL or VQ autoencoder of the ldm / taming family with original parameter names."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(**c.coder_kwargs(), double_z=c.double_z)
        self.decoder = Decoder(**c.coder_kwargs())
        moments = 2 if c.kind == "kl" else 1
        if c.use_quant_conv:
            self.quant_conv = nn.Conv2d(moments * c.z_channels, moments * c.embed_dim, 1)
        if c.kind == "vq":
            self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, beta=c.beta)
        if c.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self._identity: str | None = None

    # --- latent conventions -------------------------------------------------------------------
    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent to diffusion-ready latent."""
        return (z - self.config.shift_factor) * self.config.scale_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-ready latent to raw latent."""
        return z / self.config.scale_factor + self.config.shift_factor

    # --- encoding -------------------------------------------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output after quant_conv: (mean, logvar) for KL, pre-quantisation codes for VQ."""
        h = self.encoder(x)
        return full_precision(self.quant_conv, h) if self.config.use_quant_conv else h

    def encode(
        self,
        x: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        scaled: bool = False,
    ) -> torch.Tensor:
        """Image in [-1, 1] to latent: the Gaussian's mean (or a draw) for KL, the codes for VQ."""
        h = self.encode_moments(x)
        if self.config.kind == "kl":
            dist = DiagonalGaussian(h)
            z = dist.sample(generator) if sample else dist.mode()
        else:
            z = self.quantize(h).codes
        return self.scale(z) if scaled else z

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Image to integer codebook indices ``(B, H/f, W/f)`` (VQ models only)."""
        self._require_vq()
        return self.quantize(self.encode_moments(x)).indices

    # --- decoding -------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
        """Latent to image in (about) [-1, 1]."""
        if scaled:
            z = self.unscale(z)
        if self.config.use_post_quant_conv:
            z = full_precision(self.post_quant_conv, z)
        return self.decoder(z)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        self._require_vq()
        return self.decode(self.quantize.indices_to_codes(indices).to(self.quantize.embedding.weight.dtype))

    def forward(self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None):
        """Training pass: ``(reconstruction, regulariser loss, vq indices or None)``.

        The regulariser loss is the mean KL per latent value for KL models and the codebook plus
        commitment loss for VQ models.
        """
        h = self.encode_moments(x)
        if self.config.kind == "kl":
            dist = DiagonalGaussian(h)
            z = dist.sample(generator) if sample else dist.mode()
            loss = dist.kl().mean() / dist.mean[0].numel()
            indices = None
        else:
            q = self.quantize(h)
            z, loss, indices = q.codes, q.loss, q.indices
        return self.decode(z), loss, indices

    def _require_vq(self) -> None:
        if self.config.kind != "vq":
            raise ConfigError("codebook indices exist only for VQ models")

    # --- identity and files ---------------------------------------------------------------------
    def identity(self) -> str:
        """SHA-256 over the weights (names, dtypes, shapes and bytes, in sorted order).

        Independent of the file format the weights came from, so a converted file keeps its identity.
        """
        if self._identity is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.state_dict().items()):
                t = tensor.detach().cpu().contiguous()
                digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._identity = digest.hexdigest()
        return self._identity

    def invalidate_identity(self) -> None:
        """Call after changing the weights in place (training)."""
        self._identity = None


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load ``state`` into ``model`` with zero missing and zero unexpected keys and matching shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise FileError(source, "weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=False)
    if isinstance(model, AutoEncoder):
        model.invalidate_identity()  # new weights, new identity
