"""Key layouts of autoencoder state dicts, and pure functions that rename between them.

Two layouts exist for the same network:

``original``
    The ldm / taming / sgm / CogVideo names, which are vqcli's own parameter names:
    ``encoder.down.{i}.block.{j}.nin_shortcut``, ``encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}``
    (attention projections are 1x1 convolutions, weights ``(c, c, 1, 1)``),
    ``encoder.down.{i}.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``,
    ``encoder.norm_out``, ``decoder.up.{i}...``, ``decoder.up.{i}.upsample.conv``.

``diffusers``
    The names of ``diffusers.AutoencoderKL`` / ``VQModel``:
    ``encoder.down_blocks.{i}.resnets.{j}.conv_shortcut``,
    ``encoder.down_blocks.{i}.attentions.{j}.{group_norm,to_q,to_k,to_v,to_out.0}`` (attention
    projections are ``Linear`` layers, weights ``(c, c)``; files written by diffusers before 0.15
    say ``query``/``key``/``value``/``proj_attn`` instead, which are accepted on input),
    ``encoder.down_blocks.{i}.downsamplers.0.conv``, ``encoder.mid_block.resnets.{0,1}``,
    ``encoder.mid_block.attentions.0``, ``encoder.conv_norm_out``. The decoder's
    ``up_blocks.{k}`` runs k-th, so it is the original ``up.{n-1-k}`` (the original indexes the
    decoder's levels by resolution, like the encoder's): the index is reversed.

``quant_conv``, ``post_quant_conv``, ``quantize.embedding.weight``, ``conv_in`` and ``conv_out``
have the same names in both.

Every function here is pure: it takes a mapping and returns a new dict, never touching the
tensors' data (a reshape of an attention weight is a view). Keys no rule knows pass through
unchanged, so that strict loading afterwards reports them instead of them vanishing silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

Layout = Literal["original", "diffusers"]
ORIGINAL: Layout = "original"
DIFFUSERS: Layout = "diffusers"
T = TypeVar("T")


# Prefixes under which full model checkpoints keep their autoencoder, tried in this order:
# ldm / sgm (Stable Diffusion 1.x/2.x/XL, SD3 single files) and diffusers-style bundles.
MODEL_PREFIXES = ("first_stage_model.", "vae.")


# Keys under these (relative to the autoencoder) are training-only state and always ignored:
# the LPIPS network and patch discriminator that ldm / taming checkpoints carry (``loss.``), and
# the flattened EMA shadow copy (``model_ema.``) that ldm / sgm training keeps beside the weights.
IGNORED_PREFIXES = ("loss.", "model_ema.")


# Top-level names of the autoencoder's own weights.
AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


# Attention projection names: original -> diffusers, and every diffusers spelling -> original.
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_TO_ORIGINAL = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # diffusers < 0.15
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


_PROJECTIONS_ORIGINAL = ("q", "k", "v", "proj_out")


@dataclass(frozen=True)
class Selection:
    """The autoencoder's part of a checkpoint's keys (see ``select_autoencoder``)."""

    prefix: str  # "" for a bare autoencoder, else the prefix that was stripped
    keys: dict[str, str]  # autoencoder key (prefix stripped) -> key in the file
    ignored: tuple[str, ...]  # keys in the file that are not the autoencoder's


def select_autoencoder(keys: Iterable[str]) -> Selection:
    """Which keys of a checkpoint belong to its autoencoder, and under which names.

    A full model checkpoint keeps its autoencoder under ``first_stage_model.`` (ldm, sgm) or
    ``vae.``; everything else there (UNet, text encoders, EMA copies, ...) is ignored. A bare
    autoencoder has its keys at the top level. In both cases keys starting with ``loss.`` (the
    LPIPS and discriminator weights saved by training) or ``model_ema.`` (an EMA shadow copy) are
    ignored too. Nothing else is dropped: unknown keys of a bare file stay, so that strict
    loading reports them.
    """
    keys = list(keys)
    prefix = next((p for p in MODEL_PREFIXES if any(k.startswith(p) for k in keys)), "")
    kept: dict[str, str] = {}
    ignored: list[str] = []
    for key in keys:
        if not key.startswith(prefix):
            ignored.append(key)
            continue
        inner = key[len(prefix) :]
        if inner.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        else:
            kept[inner] = key
    return Selection(prefix, kept, tuple(ignored))


def strip_prefixes(state: Mapping[str, T]) -> tuple[dict[str, T], tuple[str, ...]]:
    """``state`` reduced to the autoencoder's entries with prefixes removed, and the ignored keys."""
    sel = select_autoencoder(state)
    return {inner: state[key] for inner, key in sel.keys.items()}, sel.ignored


_DIFFUSERS_MARK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_ORIGINAL_MARK = re.compile(r"^(encoder|decoder)\.(down|up|mid|norm_out)\.")


def detect_layout(keys: Iterable[str]) -> Layout | None:
    """``"original"`` or ``"diffusers"`` by the names of the keys, ``None`` if neither is recognised.

    A mixture of both (which no tool writes) counts as neither.
    """
    diffusers = original = False
    for key in keys:
        diffusers = diffusers or bool(_DIFFUSERS_MARK.match(key))
        original = original or bool(_ORIGINAL_MARK.match(key))
    if diffusers == original:
        return None
    return DIFFUSERS if diffusers else ORIGINAL


def _num_levels(keys: Iterable[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


_O_BLOCK = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(.+)$")
_O_ATTN = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(.+)$")
_O_RESAMPLE = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(.+)$")
_O_MID_BLOCK = re.compile(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$")
_O_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)$")
_O_NORM_OUT = re.compile(r"^(encoder|decoder)\.norm_out\.(.+)$")


def _resnet_to_diffusers(rest: str) -> str:
    return "conv_shortcut" + rest[len("nin_shortcut") :] if rest.startswith("nin_shortcut.") else rest


def _resnet_to_original(rest: str) -> str:
    return "nin_shortcut" + rest[len("conv_shortcut") :] if rest.startswith("conv_shortcut.") else rest


def key_to_diffusers(key: str, num_levels: int) -> str:
    """One original-layout key in the diffusers layout (``num_levels`` = ``len(ch_mult)``)."""

    def block_name(side: str, level: int) -> str:
        if side == "down":
            return f"down_blocks.{level}"
        return f"up_blocks.{num_levels - 1 - level}"

    if m := _O_BLOCK.match(key):
        coder, side, level, j, rest = m.groups()
        return f"{coder}.{block_name(side, int(level))}.resnets.{j}.{_resnet_to_diffusers(rest)}"
    if m := _O_ATTN.match(key):
        coder, side, level, j, proj, param = m.groups()
        return f"{coder}.{block_name(side, int(level))}.attentions.{j}.{_ATTN_TO_DIFFUSERS[proj]}.{param}"
    if m := _O_RESAMPLE.match(key):
        coder, side, level, kind, param = m.groups()
        samplers = "downsamplers" if kind == "downsample" else "upsamplers"
        return f"{coder}.{block_name(side, int(level))}.{samplers}.0.conv.{param}"
    if m := _O_MID_BLOCK.match(key):
        coder, n, rest = m.groups()
        return f"{coder}.mid_block.resnets.{int(n) - 1}.{_resnet_to_diffusers(rest)}"
    if m := _O_MID_ATTN.match(key):
        coder, proj, param = m.groups()
        return f"{coder}.mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[proj]}.{param}"
    if m := _O_NORM_OUT.match(key):
        coder, param = m.groups()
        return f"{coder}.conv_norm_out.{param}"
    return key


_ATTN_NAMES = "|".join(re.escape(n) for n in _ATTN_TO_ORIGINAL)
_D_BLOCK = re.compile(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_D_ATTN = re.compile(rf"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.({_ATTN_NAMES})\.([^.]+)$")
_D_RESAMPLE = re.compile(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)$")
_D_MID_BLOCK = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$")
_D_MID_ATTN = re.compile(rf"^(encoder|decoder)\.mid_block\.attentions\.0\.({_ATTN_NAMES})\.([^.]+)$")
_D_NORM_OUT = re.compile(r"^(encoder|decoder)\.conv_norm_out\.(.+)$")


def key_to_original(key: str, num_levels: int) -> str:
    """One diffusers-layout key in the original layout (``num_levels`` = number of decoder up blocks)."""

    def level_name(side: str, index: int) -> str:
        if side == "down":
            return f"down.{index}"
        return f"up.{num_levels - 1 - index}"

    if m := _D_BLOCK.match(key):
        coder, side, index, j, rest = m.groups()
        return f"{coder}.{level_name(side, int(index))}.block.{j}.{_resnet_to_original(rest)}"
    if m := _D_ATTN.match(key):
        coder, side, index, j, proj, param = m.groups()
        return f"{coder}.{level_name(side, int(index))}.attn.{j}.{_ATTN_TO_ORIGINAL[proj]}.{param}"
    if m := _D_RESAMPLE.match(key):
        coder, side, index, samplers, param = m.groups()
        kind = "downsample" if samplers == "downsamplers" else "upsample"
        return f"{coder}.{level_name(side, int(index))}.{kind}.conv.{param}"
    if m := _D_MID_BLOCK.match(key):
        coder, n, rest = m.groups()
        return f"{coder}.mid.block_{int(n) + 1}.{_resnet_to_original(rest)}"
    if m := _D_MID_ATTN.match(key):
        coder, proj, param = m.groups()
        return f"{coder}.mid.attn_1.{_ATTN_TO_ORIGINAL[proj]}.{param}"
    if m := _D_NORM_OUT.match(key):
        coder, param = m.groups()
        return f"{coder}.norm_out.{param}"
    return key


_O_PROJECTION_WEIGHT = re.compile(
    r"^(encoder|decoder)\.((down|up)\.\d+\.attn\.\d+|mid\.attn_1)\.(q|k|v|proj_out)\.weight$"
)


def is_attention_projection(key: str) -> bool:
    """True for the weight of an original-layout attention q/k/v/proj_out 1x1 convolution."""
    return bool(_O_PROJECTION_WEIGHT.match(key))


def _as_conv(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def _as_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 and t.shape[2:] == (1, 1) else t


def to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout state dict in the diffusers layout (attention weights as ``(c, c)``)."""
    levels = _num_levels(state, r"^decoder\.up\.(\d+)\.")  # only the decoder's indices are reversed
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = key_to_diffusers(key, levels)
        out[new] = _as_linear(tensor) if is_attention_projection(key) else tensor
    return out


def to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout state dict in the original layout (attention weights as ``(c, c, 1, 1)``).

    Keys already in the original layout are kept, so this also normalises original-layout files
    whose attention projections were saved as ``(c, c)`` matrices by some converters.
    """
    levels = _num_levels(state, r"^decoder\.up_blocks\.(\d+)\.")  # only the decoder's indices are reversed
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = key_to_original(key, levels)
        if new in out:
            raise ValueError(f"two keys map to {new!r} (the file mixes layouts)")
        out[new] = _as_conv(tensor) if is_attention_projection(new) else tensor
    return out
