"""The 2D ``Encoder`` and ``Decoder`` of the ldm / taming / CogVideo autoencoder family."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from vqcli.model.blocks import (
    AttnBlock,
    Downsample,
    Normalize,
    ResnetBlock,
    Upsample,
    full_precision,
    in_dtype_of,
    norm_swish,
)

Features = OrderedDict[str, torch.Tensor]


def _pass_through(name: str, t: torch.Tensor) -> torch.Tensor:
    return t


_NO_FEATURES = _pass_through


def _recorder(features: Features | None):
    """A function that stores a named map in ``features`` (when collecting) and passes it on."""
    if features is None:
        return _NO_FEATURES

    def keep(name: str, t: torch.Tensor) -> torch.Tensor:
        features[name] = t
        return t

    return keep


def _check_channels(name: str, value: int) -> None:
    if value % 32:
        raise ValueError(f"{name}={value} must be a multiple of 32 (GroupNorm uses 32 groups)")


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` to latent moments ``(B, 2*z_channels or z_channels, H/f, W/f)``.

    ``f = 2 ** (len(ch_mult) - 1)``. ``resolution`` is the nominal input size: attention is placed at
    every level whose nominal resolution (``resolution`` halved per level) is in ``attn_resolutions``;
    the network itself accepts any size divisible by ``f``. ``mid_attention=False`` leaves out the
    middle attention block (diffusers' ``mid_block_add_attention``, ldm's ``attn_type="none"`` for
    the middle). ``out_ch`` is accepted for symmetry with the decoder and unused.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        mid_attention: bool = True,
        **ignore_kwargs,
    ):
        super().__init__()
        for i, m in enumerate(ch_mult):
            _check_channels(f"ch*ch_mult[{i}]", ch * m)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        if mid_attention:
            self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def _run(self, x: torch.Tensor, features: Features | None) -> torch.Tensor:
        keep = _recorder(features)
        return self.run_low_res(self.run_high_res(x, keep), keep)

    def run_high_res(self, x: torch.Tensor, keep=_NO_FEATURES) -> torch.Tensor:
        """conv_in and the down levels: image to features at the latent resolution (tileable)."""
        h = keep("conv_in", self.conv_in(in_dtype_of(self.conv_in, x)))
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = keep(f"down{i_level}_block{i_block}", block(h))
                if len(down.attn) > 0:
                    h = keep(f"down{i_level}_attn{i_block}", down.attn[i_block](h))
            if i_level != self.num_resolutions - 1:
                h = keep(f"down{i_level}_downsample", down.downsample(h))
        return h

    def run_low_res(self, h: torch.Tensor, keep=_NO_FEATURES) -> torch.Tensor:
        """The middle (with its global attention, if any) and the output layers, at the latent resolution."""
        h = keep("mid_block_1", self.mid.block_1(h))
        if hasattr(self.mid, "attn_1"):
            h = keep("mid_attn_1", self.mid.attn_1(h))
        h = keep("mid_block_2", self.mid.block_2(h))
        if keep is _NO_FEATURES:
            h = norm_swish(self.norm_out, h)
        else:
            h = keep("norm_out", self.norm_out(h))
            h = keep("nonlinearity", torch.nn.functional.silu(h))
        return keep("conv_out", full_precision(self.conv_out, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)

    def forward_with_features_output(self, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
        """Return ``(output, features)``: every intermediate map, in execution order."""
        features: Features = OrderedDict()
        return self._run(x, features), features


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` to image ``(B, out_ch, h*f, w*f)``.

    Runs ``num_res_blocks + 1`` residual blocks per level, lowest resolution first. With
    ``give_pre_end`` it returns the features before ``norm_out``. ``mid_attention`` as in the
    encoder. ``in_channels`` is accepted and unused, as in the original.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        mid_attention: bool = True,
        **ignorekwargs,
    ):
        super().__init__()
        for i, m in enumerate(ch_mult):
            _check_channels(f"ch*ch_mult[{i}]", ch * m)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        if mid_attention:
            self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.append(up)
        # Stored lowest level first, so that indices match the encoder's (and the checkpoints').
        self.up = nn.ModuleList(reversed(ups))

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def _run(self, z: torch.Tensor, features: Features | None) -> torch.Tensor:
        keep = _recorder(features)
        return self.run_high_res(self.run_low_res(z, keep), keep)

    def run_low_res(self, z: torch.Tensor, keep=_NO_FEATURES) -> torch.Tensor:
        """conv_in and the middle (with its global attention, if any), at the latent resolution."""
        h = keep("conv_in", self.conv_in(in_dtype_of(self.conv_in, z)))
        h = keep("mid_block_1", self.mid.block_1(h))
        if hasattr(self.mid, "attn_1"):
            h = keep("mid_attn_1", self.mid.attn_1(h))
        return keep("mid_block_2", self.mid.block_2(h))

    def run_high_res(self, h: torch.Tensor, keep=_NO_FEATURES) -> torch.Tensor:
        """The up levels and the output layers: latent-resolution features to image (tileable)."""
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = keep(f"up{i_level}_block{i_block}", block(h))
                if len(up.attn) > 0:
                    h = keep(f"up{i_level}_attn{i_block}", up.attn[i_block](h))
            if i_level != 0:
                h = keep(f"up{i_level}_upsample", up.upsample(h))
        if self.give_pre_end:
            return h
        if keep is _NO_FEATURES:
            h = norm_swish(self.norm_out, h)
        else:
            h = keep("norm_out", self.norm_out(h))
            h = keep("nonlinearity", torch.nn.functional.silu(h))
        return keep("conv_out", full_precision(self.conv_out, h))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._run(z, None)

    def forward_with_features_output(self, z: torch.Tensor) -> tuple[torch.Tensor, Features]:
        """Return ``(output, features)``: every intermediate map, in execution order."""
        features: Features = OrderedDict()
        return self._run(z, features), features
