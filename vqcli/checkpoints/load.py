"""From a ``--model`` spec to a ready ``AutoEncoder``: an embedded model's name, or a weights file.

The embedded models ship inside the package (``vqcli/weights/NAME.safetensors``). The folder can be
pointed elsewhere with the environment variable ``VQCLI_WEIGHTS_DIR`` (tests, or a shared install).
Weights files go through ``vqcli.checkpoints.read.load_checkpoint`` (every format it knows).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vqcli.checkpoints.hub import parse_repo_id, resolve_repo
from vqcli.checkpoints.read import load_checkpoint
from vqcli.checkpoints.registry import EMBEDDED_MODELS, embedded_path, is_embedded
from vqcli.errors import UsageError
from vqcli.model.autoencoder import AutoEncoder
from vqcli.speed.context import prepare_model

log = logging.getLogger(__name__)


# identity (SHA-256 of the weights) by (resolved path, size, mtime_ns): hashing a large model
# takes a while, and a run that resolves the same file again (decode with several models) need not.
_identity_cache: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ModelRef:
    """Where a model came from, as recorded in latent files."""

    name: str  # the embedded model's name, or the weights file's name
    embedded: bool
    path: Path  # the file it was read from


def model_ref(spec: str, subfolder: str | None = None) -> ModelRef:
    """What ``spec`` names, without loading anything: an embedded model, a file or folder, or a
    repository id in the local Hugging Face cache (``UsageError`` when it is not there)."""
    if is_embedded(spec):
        return ModelRef(spec, True, embedded_path(spec))
    path = Path(spec).expanduser()
    if subfolder is not None or (not path.exists() and parse_repo_id(spec) is not None):
        return ModelRef(spec if subfolder is None else f"{spec}/{subfolder}", False, resolve_repo(spec, subfolder))
    return ModelRef(path.name, False, path)


def resolve_model(
    spec: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    preset: str | None = None,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
    subfolder: str | None = None,
    option: str = "--model",
) -> AutoEncoder:
    """Load the model ``spec`` names, ready for inference on ``device`` (eval mode).

    ``dtype`` is the compute precision: the weights stay as stored; reduced precision comes from
    autocast on the CPU and from a copy with cast weights on CUDA (see ``vqcli.speed.context``).
    ``preset``, ``scale_factor`` and ``shift_factor`` are passed to the checkpoint reader (they
    matter for foreign checkpoints; factors override the model's).
    Raises ``UsageError`` for a spec that names nothing (naming ``option``, the command-line option
    it came from), ``FileError`` for a file that cannot be read.
    """
    ref = model_ref(spec, subfolder)
    if ref.embedded:
        if not ref.path.is_file():
            raise UsageError(
                f"embedded model {spec!r} is not installed (expected {ref.path}); "
                "train it with scripts/train_default_models.sh or pass --model PATH"
            )
    elif not ref.path.exists():
        known = ", ".join(EMBEDDED_MODELS)
        raise UsageError(f"{option} {spec!r}: no such file, and not an embedded model ({known})")
    model = load_model_file(ref.path, preset=preset, scale_factor=scale_factor, shift_factor=shift_factor)
    if ref.embedded and model.config.name != spec:
        model.config = model.config.replace(name=spec)
    device = torch.device(device)
    return prepare_model(model, device, dtype or torch.float32)


def load_model_file(
    path: Path, *, preset: str | None = None, scale_factor: float | None = None, shift_factor: float | None = None
) -> AutoEncoder:
    """The model in a weights file or folder, on the CPU in eval mode, with float32 weights.

    Weights stored in half precision are converted (losslessly): vqcli computes with float32
    weights and gets reduced precision from autocast. The model's identity is that of these
    float32 weights, so latent files and ``vqcli info`` agree whatever the file stored.
    """
    model = load_checkpoint(path, preset=preset, scale_factor=scale_factor, shift_factor=shift_factor, dtype=torch.float32)
    model.eval()
    _cache_identity(model, path)
    return model




def _cache_identity(model: AutoEncoder, path: Path) -> None:
    if path.is_dir():
        return  # a folder's time stamp does not change when a file in it is replaced
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return
    if key in _identity_cache:
        model._identity = _identity_cache[key]  # noqa: SLF001 - the same weights, hashed before
    else:
        _identity_cache[key] = model.identity()


def with_factors(model: AutoEncoder, scale_factor: float | None, shift_factor: float | None) -> AutoEncoder:
    """``model`` with other latent scale and shift factors, sharing its weights.

    Returns ``model`` itself when nothing changes, else a shallow copy whose config differs (the
    parameters and the identity are shared: the factors are not part of the weights).
    """
    changes = {}
    if scale_factor is not None and scale_factor != model.config.scale_factor:
        changes["scale_factor"] = float(scale_factor)
    if shift_factor is not None and shift_factor != model.config.shift_factor:
        changes["shift_factor"] = float(shift_factor)
    if not changes:
        return model
    view = copy.copy(model)
    view.config = model.config.replace(**changes)
    return view
