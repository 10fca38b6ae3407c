"""vqcli: encode images into autoencoder latents and reconstruct them.

The model is the 2D convolutional autoencoder of the latent-diffusion / taming / CogVideo family,
with the parameter names of the original checkpoints.
"""

from .autoencoder import AutoEncoder, AutoEncoderConfig
from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample
from .coders import Decoder, Encoder
from .errors import FileError, UsageError, VqcliError
from .quantize import DiagonalGaussian, VectorQuantizer

__version__ = "0.1.0"

__all__ = [
    "AttnBlock",
    "AutoEncoder",
    "AutoEncoderConfig",
    "Decoder",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "FileError",
    "ResnetBlock",
    "Upsample",
    "UsageError",
    "VectorQuantizer",
    "VqcliError",
]
