"""vqcli: encode images into autoencoder latents and reconstruct them.

The model is the 2D convolutional autoencoder of the latent-diffusion / taming / CogVideo family,
with the parameter names of the original checkpoints. The names below are imported when first
used, so that ``vqcli --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "AttnBlock": "vqcli.model.blocks",
    "AutoEncoder": "vqcli.model.autoencoder",
    "AutoEncoderConfig": "vqcli.model.config",
    "Decoder": "vqcli.model.coders",
    "DiagonalGaussian": "vqcli.model.quantize",
    "Downsample": "vqcli.model.blocks",
    "Encoder": "vqcli.model.coders",
    "FileError": "vqcli.errors",
    "Latent": "vqcli.io.latents",
    "Model": "vqcli.api",
    "ResnetBlock": "vqcli.model.blocks",
    "Upsample": "vqcli.model.blocks",
    "UsageError": "vqcli.errors",
    "VectorQuantizer": "vqcli.model.quantize",
    "VqcliError": "vqcli.errors",
    "load": "vqcli.api",
    "read_latent": "vqcli.api",
    "write_latent": "vqcli.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vqcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
