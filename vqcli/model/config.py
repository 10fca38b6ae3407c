"""The architecture of an autoencoder: one dataclass, its checks and what describes it."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from vqcli.errors import ConfigError


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


def attention_levels(config: AutoEncoderConfig) -> tuple[int, ...]:
    """Indices of the levels that have attention blocks (besides the middle one).

    Level i runs at the nominal resolution ``resolution / 2**i``, and has attention when that is in
    ``attn_resolutions``: the same test the Encoder and Decoder make.
    """
    return tuple(i for i in range(len(config.ch_mult)) if config.resolution // 2**i in config.attn_resolutions)


def architecture_key(config: AutoEncoderConfig) -> tuple:
    """What determines the network's weights (not the latent conventions, names or nominal sizes)."""
    return (
        config.kind,
        config.ch,
        config.ch_mult,
        config.num_res_blocks,
        attention_levels(config),
        config.z_channels,
        config.embed_dim,
        config.double_z,
        config.n_embed,
        config.use_quant_conv,
        config.use_post_quant_conv,
        config.in_channels,
        config.out_ch,
        config.resamp_with_conv,
        config.mid_attention,
    )


def describe(config: AutoEncoderConfig | None) -> str:
    """A one-line summary of an architecture, for messages and listings."""
    if config is None:
        return "any architecture"
    parts = [
        f"{config.kind.upper()} f{config.downsampling}",
        f"ch {config.ch} x ({','.join(map(str, config.ch_mult))})",
        f"{config.num_res_blocks} res block{'s' if config.num_res_blocks > 1 else ''}",
        f"z {config.z_channels}",
    ]
    if config.embed_dim != config.z_channels:
        parts.append(f"embed {config.embed_dim}")
    if config.kind == "vq":
        parts.append(f"{config.n_embed} codes")
    levels = attention_levels(config)
    if levels:
        parts.append(f"attention at levels {','.join(map(str, levels))}")
    if not (config.use_quant_conv or config.use_post_quant_conv):
        parts.append("no quant convs")
    elif not (config.use_quant_conv and config.use_post_quant_conv):
        parts.append("quant_conv" if config.use_quant_conv else "post_quant_conv only")
    return ", ".join(parts)
