"""The autoencoder: encoder, quant_conv, regulariser, post_quant_conv, decoder.

This is the only place where ``quant_conv``, the regulariser and the latent scale and shift are
applied. Latents are "raw" (what the decoder's ``post_quant_conv`` expects) unless ``scaled=True``,
which gives diffusion-ready latents ``(z - shift_factor) * scale_factor``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .blocks import full_precision
from .coders import Decoder, Encoder
from .errors import ConfigError, FileError
from .fileio import atomic_path
from .quantize import DiagonalGaussian, VectorQuantizer

FORMAT = "vqcli.weights"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AutoEncoderConfig:
    """Everything needed to build an ``AutoEncoder``. Validated on construction."""

    kind: str = "kl"  # "kl": diagonal Gaussian latents; "vq": vector-quantised codes
    ch: int = 128  # base channel count; ch * each ch_mult must be a multiple of 32 (GroupNorm)
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per level; len-1 downsamplings
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder runs one more)
    attn_resolutions: tuple[int, ...] = ()  # nominal resolutions that get attention blocks
    z_channels: int = 4  # channels of the encoder output (halved mean/logvar when double_z)
    embed_dim: int | None = None  # latent channels after quant_conv; None means z_channels
    double_z: bool | None = None  # encoder outputs mean and logvar; None means kind == "kl"
    n_embed: int = 0  # codebook size (VQ only)
    beta: float = 0.25  # commitment weight of the VQ loss
    use_quant_conv: bool = True  # 1x1 conv between encoder and regulariser
    use_post_quant_conv: bool = True  # 1x1 conv between regulariser and decoder
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256  # nominal resolution, only used to place attention
    dropout: float = 0.0
    resamp_with_conv: bool = True  # learned down/upsampling convs (else avg-pool / nearest only)
    mid_attention: bool = True  # the attention block between the middle res blocks (mid.attn_1)
    scale_factor: float = 1.0  # diffusion latent = (z - shift_factor) * scale_factor
    shift_factor: float = 0.0
    name: str = ""  # free-form model name, recorded in latent files
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        wrong_types = _type_problems(self)
        if wrong_types:
            raise ConfigError("invalid autoencoder config: " + "; ".join(wrong_types))
        for k in _INT_FIELDS:
            set_(k, int(getattr(self, k)))
        set_("ch_mult", tuple(int(m) for m in self.ch_mult))
        set_("attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        set_("embed_dim", self.z_channels if self.embed_dim is None else int(self.embed_dim))
        if self.double_z is None:
            set_("double_z", self.kind == "kl")
        problems = []
        if self.kind not in ("kl", "vq"):
            problems.append(f"kind must be 'kl' or 'vq', not {self.kind!r}")
        if self.ch <= 0 or not self.ch_mult or min(self.ch_mult) <= 0:
            problems.append("ch and every ch_mult must be positive")
        for i, m in enumerate(self.ch_mult):
            if (self.ch * m) % 32:
                problems.append(
                    f"ch*ch_mult[{i}] = {self.ch}*{m} = {self.ch * m} is not a multiple of 32 (GroupNorm uses 32 groups)"
                )
        if self.num_res_blocks < 1:
            problems.append("num_res_blocks must be at least 1")
        if self.z_channels < 1 or self.embed_dim < 1:
            problems.append("z_channels and embed_dim must be at least 1")
        if self.kind == "kl" and not self.double_z:
            problems.append("a KL model needs double_z=True (mean and logvar)")
        if self.kind == "vq":
            if self.n_embed < 2:
                problems.append("a VQ model needs n_embed (codebook size) of at least 2")
            if self.double_z:
                problems.append("a VQ model has double_z=False")
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            problems.append("without quant_conv, embed_dim must equal z_channels")
        if not self.use_post_quant_conv and self.embed_dim != self.z_channels:
            problems.append("without post_quant_conv, embed_dim must equal z_channels")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must lie in [0, 1), not {self.dropout}")
        if self.scale_factor == 0:
            problems.append("scale_factor must not be 0")
        if problems:
            raise ConfigError("invalid autoencoder config: " + "; ".join(problems))

    @property
    def downsampling(self) -> int:
        """Spatial downsampling factor f: the latent is (H/f, W/f)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def coder_kwargs(self) -> dict:
        return dict(
            ch=self.ch,
            out_ch=self.out_ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions,
            dropout=self.dropout,
            resamp_with_conv=self.resamp_with_conv,
            in_channels=self.in_channels,
            resolution=self.resolution,
            z_channels=self.z_channels,
            mid_attention=self.mid_attention,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AutoEncoderConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of fields, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid config: {e}") from None

    def replace(self, **changes) -> "AutoEncoderConfig":
        return dataclasses.replace(self, **changes)


_INT_FIELDS = ("ch", "num_res_blocks", "z_channels", "n_embed", "in_channels", "out_ch", "resolution")
_REAL_FIELDS = ("beta", "dropout", "scale_factor", "shift_factor")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _type_problems(c: AutoEncoderConfig) -> list[str]:
    """Fields of the wrong type (as a config read from a file may have), before any arithmetic."""
    problems = [f"{k} must be an integer, not {getattr(c, k)!r}" for k in _INT_FIELDS if not _is_int(getattr(c, k))]
    if c.embed_dim is not None and not _is_int(c.embed_dim):
        problems.append(f"embed_dim must be an integer or None, not {c.embed_dim!r}")
    for k in ("ch_mult", "attn_resolutions"):
        v = getattr(c, k)
        if not isinstance(v, (list, tuple)) or not all(_is_int(m) for m in v):
            problems.append(f"{k} must be a list of integers, not {v!r}")
    for k in _REAL_FIELDS:
        v = getattr(c, k)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
            problems.append(f"{k} must be a finite number, not {v!r}")
    for k in ("use_quant_conv", "use_post_quant_conv", "mid_attention"):
        if not isinstance(getattr(c, k), bool):
            problems.append(f"{k} must be true or false, not {getattr(c, k)!r}")
    if c.double_z is not None and not isinstance(c.double_z, bool):
        problems.append(f"double_z must be true, false or None, not {c.double_z!r}")
    if not isinstance(c.kind, str) or not isinstance(c.name, str):
        problems.append("kind and name must be strings")
    return problems


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

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Write the native weights file atomically: safetensors with the config in its metadata."""
        from .native import write_safetensors

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
        }
        with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
            write_safetensors(f, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "AutoEncoder":
        """Load a native weights file written by ``save``, in eval mode (like the checkpoint readers)."""
        from .native import read_native

        config, state = read_native(Path(path))
        model = cls(config)
        load_strict(model, state, path)
        return model.to(device).eval()


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
