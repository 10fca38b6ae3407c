"""The architecture of a checkpoint from its tensors' names and shapes."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from vqcli.errors import ConfigError, FileError
from vqcli.io.safetensors import short_name
from vqcli.model.config import AutoEncoderConfig

_NOMINAL_RESOLUTION = 256


def infer_config(state: Mapping[str, torch.Tensor], *, source: str | os.PathLike) -> AutoEncoderConfig:
    """The architecture of an original-layout state dict, from tensor shapes alone.

    Attention placement is known per level; it is expressed as ``attn_resolutions`` for a nominal
    ``resolution`` (256, or more for very deep models), which a config file may later replace.
    """

    def need(key: str, ndim: int = 4) -> torch.Tensor:
        """The tensor ``key``: a 2-D convolution's (out, in, kh, kw) weight, or ``ndim`` non-empty sizes."""
        if key not in state:
            raise FileError(source, f"not an autoencoder of this family: {key} is missing ({_key_summary(state)})")
        t = state[key]
        if t.ndim != ndim or 0 in t.shape:
            what = "a 2-D convolution's weight" if ndim == 4 else f"a {ndim}-D tensor"
            raise FileError(source, f"{key} has shape {tuple(t.shape)}, not that of {what}")
        return t

    conv_in = state.get("encoder.conv_in.weight")
    if conv_in is not None and conv_in.ndim == 5:
        raise FileError(
            source,
            f"encoder.conv_in.weight has shape {tuple(conv_in.shape)}: a 3-D convolution, "
            "but this family is 2-D (a video autoencoder?)",
        )
    conv_in = need("encoder.conv_in.weight")
    ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    levels = sorted(_indices(state, r"^encoder\.down\.(\d+)\.block\.0\.conv1\.weight$"))
    if not levels or levels != list(range(len(levels))):
        raise FileError(source, f"not an autoencoder of this family: encoder levels {levels} ({_key_summary(state)})")
    ch_mult = []
    for i in levels:
        width = int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0])
        if width % ch:
            raise FileError(source, f"encoder level {i} has {width} channels, not a multiple of conv_in's {ch}")
        ch_mult.append(width // ch)
    num_res_blocks = len(_indices(state, r"^encoder\.down\.0\.block\.(\d+)\.conv1\.weight$"))
    enc_attn = sorted(_indices(state, r"^encoder\.down\.(\d+)\.attn\."))
    dec_attn = sorted(_indices(state, r"^decoder\.up\.(\d+)\.attn\."))
    if enc_attn != dec_attn:
        raise FileError(
            source,
            f"attention sits at encoder levels {enc_attn} but decoder levels {dec_attn}; "
            "this family places it at the same levels in both",
        )
    mid_attn = [c for c in ("encoder", "decoder") if any(k.startswith(f"{c}.mid.attn_1.") for k in state)]
    if len(mid_attn) == 1:
        raise FileError(
            source,
            f"only the {mid_attn[0]} has a middle attention block (mid.attn_1); this family has it in both or neither",
        )
    z_channels = int(need("decoder.conv_in.weight").shape[1])
    enc_out = int(need("encoder.conv_out.weight").shape[0])
    out_ch = int(need("decoder.conv_out.weight").shape[0])
    if enc_out not in (z_channels, 2 * z_channels):
        raise FileError(
            source, f"the encoder puts out {enc_out} channels but the decoder takes {z_channels}: not one autoencoder"
        )
    quantizer = [k for k in state if k.startswith("quantize.")]
    kind = "vq" if "quantize.embedding.weight" in state else "kl"
    if quantizer and kind == "kl":
        raise FileError(
            source,
            f"its quantizer ({', '.join(sorted(quantizer)[:4])}) is not the taming VectorQuantizer "
            "(quantize.embedding.weight); Gumbel and other quantizers are not supported",
        )
    moments = 2 if kind == "kl" else 1
    use_quant_conv = "quant_conv.weight" in state
    use_post_quant_conv = "post_quant_conv.weight" in state
    if kind == "vq":
        need("quantize.embedding.weight", ndim=2)
    if use_quant_conv:
        embed_dim = int(need("quant_conv.weight").shape[0]) // moments
    elif use_post_quant_conv:
        embed_dim = int(need("post_quant_conv.weight").shape[1])
    elif kind == "vq":
        embed_dim = int(state["quantize.embedding.weight"].shape[1])
    else:
        embed_dim = z_channels
    resolution = max(_NOMINAL_RESOLUTION, 2 ** (len(levels) - 1))
    try:
        return AutoEncoderConfig(
            kind=kind,
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(resolution // 2**i for i in enc_attn),
            z_channels=z_channels,
            embed_dim=embed_dim,
            double_z=enc_out == 2 * z_channels,
            n_embed=int(state["quantize.embedding.weight"].shape[0]) if kind == "vq" else 0,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            in_channels=in_channels,
            out_ch=out_ch,
            resolution=resolution,
            resamp_with_conv=len(levels) == 1 or "encoder.down.0.downsample.conv.weight" in state,
            mid_attention=bool(mid_attn),
        )
    except ConfigError as e:
        raise FileError(source, f"the weights' shapes describe no valid autoencoder: {e}") from None


def _indices(state: Mapping[str, Any], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in state if (m := rx.match(k))}


def _key_summary(keys: Mapping[str, Any] | list[str], shown: int = 6) -> str:
    """What a file holds, grouped by the first two name components: ``encoder.layers (17 keys), ...``."""
    groups = Counter(".".join(str(k).split(".")[:2]) for k in keys)
    if not groups:
        return "it holds no tensors"
    parts = [f"{_plain(name)} ({n} key{'s' if n > 1 else ''})" for name, n in sorted(groups.items())[:shown]]
    more = f", and {len(groups) - shown} more groups" if len(groups) > shown else ""
    return "it holds " + ", ".join(parts) + more


def _plain(name: str) -> str:
    """A name from a file as it is when it is plain text, else quoted and escaped (one line, short)."""
    return name if name.isprintable() and len(name) <= 80 else short_name(name)
