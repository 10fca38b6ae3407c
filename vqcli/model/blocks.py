"""Building blocks of the ldm / taming / CogVideo 2D autoencoder.

Attribute names (``norm1``, ``conv1``, ``nin_shortcut``, ``q``, ``proj_out``, ...) are those of the
original checkpoints, so their state dicts load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
EPS = 1e-6


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as in every model of this family.

    With weights cast to bfloat16 or float16 it needs no guard: PyTorch's kernels (CPU and CUDA)
    gather the statistics and normalise in float32 and round only the result to the input's dtype
    (tests/test_cast_weights.py checks it). Autocast leaves GroupNorm alone: a bfloat16 map gives
    a bfloat16 result, its statistics still gathered in float32."""
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=EPS, affine=True)


def normalize(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; in training on the CPU, a bfloat16 channels-last map is normalised in float32.

    Training under bfloat16 autocast on a CPU with AMX keeps its maps channels-last: oneDNN's
    bfloat16 convolutions reorder NCHW maps to channels-last and back, forward and backward (a
    2x64x192x192 map, 3x3 convolution: 115 ms in NCHW, 49 ms channels-last, on a 2-core Xeon with
    AMX). But PyTorch's CPU backward of GroupNorm on a bfloat16 channels-last map is slow: 66 ms for
    its forward and backward there, 28 ms with the map cast to float32 first. Without autograd, or on
    other maps, this is ``norm(x)``."""
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.requires_grad
        and torch.is_grad_enabled()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        x = x.float()
    return norm(x)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x)."""
    return F.silu(x)


def norm_swish(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm followed by swish.

    Outside autograd the swish runs in place on the freshly normalised tensor, which saves one
    activation-sized allocation per call; the result is identical.
    """
    h = normalize(norm, x)
    if torch.compiler.is_compiling():  # (torch.compile fuses the two; it cannot trace the test below)
        return F.silu(h)
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        return F.silu(h, inplace=True)
    return F.silu(h)


def in_dtype_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype of ``layer``'s weight, where the two differ outside autocast.

    A model whose weights were cast to reduced precision keeps a few layers in float32
    (``vqcli.speed.context.KEEP_FLOAT32``), so a map crosses dtypes at their edges: a float32 image
    into a bfloat16 ``conv_in``, bfloat16 features into a float32 ``conv_out``. Under autocast
    the layer casts its inputs itself, and ``x`` is left alone."""
    dtype = layer.weight.dtype
    if x.dtype == dtype or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def full_precision(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in float32 even under reduced-precision autocast: for the output layers (the
    encoder's and decoder's conv_out, quant_conv, post_quant_conv), whose rounding would land
    directly in the latents or pixels. They are a small share of the work: the cost is small.
    Outside autocast the layer runs in its own weights' dtype (float32 in a cast copy too)."""
    if not torch.is_autocast_enabled(x.device.type):
        return layer(in_dtype_of(layer, x))
    with torch.autocast(device_type=x.device.type, enabled=False):
        return layer(x.float())


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 ``nin_shortcut`` when the channel count changes."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_swish(self.norm1, x))
        h = self.conv2(self.dropout(norm_swish(self.norm2, h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections.

    q is multiplied by c^-0.5 before the product (as in CogVideo; kinder to fp16 than scaling
    the logits). The product runs through ``scaled_dot_product_attention`` on contiguous
    ``(b, 1, h*w, c)`` tensors, which keeps PyTorch on its memory-efficient kernels: the
    (h*w)^2 attention matrix is never materialised.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention over the positions of ``norm(x)`` (``proj_out``'s input). Each projection
        is freed once it is in token layout, and the normalised map once all three are: at the
        product, the input, q, k, v and the output are alive (the SD decoder's middle block at
        4096 px works on 512 MB maps; written as one expression, 9 were)."""
        b, c, height, width = x.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, height * width).transpose(2, 3).contiguous()

        h = normalize(self.norm, x)
        q = tokens(self.q(h).mul_(c**-0.5))
        k = tokens(self.k(h))
        v = tokens(self.v(h))
        del h
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        del q, k, v
        return out.transpose(2, 3).reshape(b, c, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(self.attention(x))


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom, then a stride-2 3x3 conv; or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then an optional 3x3 conv (as the originals do).

    ``vqcli.speed.fastpath`` swaps in an equivalent form that runs the conv at the input's
    resolution; this block stays the original."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x
