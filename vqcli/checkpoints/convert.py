"""Writing checkpoints: vqcli's native file or a diffusers folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from vqcli.checkpoints.configs import DIFFUSERS_WEIGHTS
from vqcli.checkpoints.layouts import to_diffusers
from vqcli.checkpoints.native import save_native
from vqcli.checkpoints.read import load_checkpoint
from vqcli.errors import ConfigError, FileError, UsageError
from vqcli.io.atomic import as_os_error, current_umask, make_temp_dir
from vqcli.io.ownership import check_replaceable
from vqcli.model.autoencoder import AutoEncoder
from vqcli.model.config import AutoEncoderConfig, attention_levels

DIFFUSERS_VERSION_WRITTEN = "0.30.0"  # the oldest diffusers that reads every field we write


def diffusers_config(config: AutoEncoderConfig) -> dict[str, Any]:
    """The diffusers ``config.json`` of an equivalent ``AutoencoderKL`` / ``VQModel``.

    Raises ``ConfigError`` for what diffusers cannot express (``resamp_with_conv=False``; a KL
    model whose ``embed_dim`` differs from ``z_channels``; a VQ model without both quant convs).
    The full vqcli config rides along as ``_vqcli_config`` (diffusers ignores ``_`` entries), so
    converting back restores it exactly.
    """
    problems = []
    if not config.resamp_with_conv:
        problems.append("resamp_with_conv=False (diffusers' encoder always downsamples with a conv)")
    if config.kind == "kl" and config.embed_dim != config.z_channels:
        problems.append("a KL model with embed_dim != z_channels")
    if config.kind == "vq" and not (config.use_quant_conv and config.use_post_quant_conv):
        problems.append("a VQ model without quant_conv and post_quant_conv")
    if problems:
        raise ConfigError("diffusers cannot express " + "; ".join(problems))
    n = len(config.ch_mult)
    levels = attention_levels(config)
    out: dict[str, Any] = {
        "_class_name": "AutoencoderKL" if config.kind == "kl" else "VQModel",
        "_diffusers_version": DIFFUSERS_VERSION_WRITTEN,
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["AttnDownEncoderBlock2D" if i in levels else "DownEncoderBlock2D" for i in range(n)],
        "up_block_types": ["AttnUpDecoderBlock2D" if n - 1 - k in levels else "UpDecoderBlock2D" for k in range(n)],
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": 32,
        "sample_size": config.resolution,
        "scaling_factor": config.scale_factor,
        "mid_block_add_attention": config.mid_attention,
        "force_upcast": True,
    }
    if config.kind == "kl":
        out.update(
            shift_factor=config.shift_factor or None,
            latents_mean=None,
            latents_std=None,
            use_quant_conv=config.use_quant_conv,
            use_post_quant_conv=config.use_post_quant_conv,
        )
    else:
        out.update(
            num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim, norm_type="group", lookup_from_codebook=False
        )
    out["_vqcli_config"] = config.to_dict()
    return out


def save_diffusers(model: AutoEncoder, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``model`` as a diffusers folder (config.json + diffusion_pytorch_model.safetensors).

    Built under a temporary name beside ``folder`` and renamed into place. Replacing an existing
    folder needs ``overwrite`` and is refused when the folder holds anything but such a model,
    so a pipeline folder is never deleted by mistake.
    """
    from safetensors.torch import save_file

    final = Path(folder)
    _check_replaceable(final, overwrite)
    try:
        config = diffusers_config(model.config)
    except ConfigError as e:
        raise FileError(final, str(e)) from None
    tensors = to_diffusers({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        save_file(tensors, str(tmp / DIFFUSERS_WEIGHTS[0]), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in (DIFFUSERS_WEIGHTS[0], "config.json"):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _check_replaceable(final, overwrite)
        if final.exists():
            old = make_temp_dir(final.parent, old=True)
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = as_os_error(e, final) if isinstance(e, Exception) and not isinstance(e, OSError) else None
        if error is not None:  # safetensors' own error for a failed write (a full disk)
            raise error from e
        raise


def _check_replaceable(final: Path, overwrite: bool) -> None:
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise FileError(final, "already exists (pass --overwrite to replace it)")
    if not final.is_dir() or final.is_symlink():
        raise FileError(final, "exists and is not a folder; not replacing it with a diffusers folder")
    others = [p.name for p in final.iterdir() if p.name != "config.json" and not p.name.startswith("diffusion_pytorch_model")]
    if others:
        raise FileError(final, f"holds other files ({', '.join(sorted(others)[:4])}); not replacing it")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    preset: str | None = None,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> tuple[AutoEncoder, str]:
    """Read any supported checkpoint and write it as vqcli's ``.safetensors`` or a diffusers folder.

    ``to`` is ``"vqcli"`` or ``"diffusers"``; by default a destination ending in ``.safetensors``
    gets vqcli's format and anything else a diffusers folder. Returns the model and the format written.
    """
    target = Path(dst)
    to = to or ("vqcli" if target.suffix.lower() == ".safetensors" else "diffusers")
    if to not in ("vqcli", "diffusers"):
        raise UsageError(f"unknown target format {to!r} (use vqcli or diffusers)")
    if to == "vqcli":
        if target.is_dir():
            raise FileError(target, "is a folder; vqcli's format is one .safetensors file")
        check_replaceable(target, overwrite=overwrite)
    else:
        _check_replaceable(target, overwrite)
    model = load_checkpoint(src, preset=preset, scale_factor=scale_factor, shift_factor=shift_factor, dtype=dtype)
    if to == "vqcli":
        try:
            save_native(model, target, overwrite=overwrite)
        except FileExistsError:
            raise FileError(target, "already exists (pass --overwrite to replace it)") from None
        except OSError as e:
            raise FileError(target, e.strerror or str(e)) from None
    else:
        save_diffusers(model, target, overwrite=overwrite)
    return model, to
