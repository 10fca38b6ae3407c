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
    """GroupNorm with 32 groups and eps 1e-6, as in every model of this family."""
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=EPS, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x)."""
    return F.silu(x)


def norm_swish(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm followed by swish.

    Outside autograd the swish runs in place on the freshly normalised tensor, which saves one
    activation-sized allocation per call; the result is identical.
    """
    h = norm(x)
    if torch.compiler.is_compiling():  # (torch.compile fuses the two; it cannot trace the test below)
        return F.silu(h)
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        return F.silu(h, inplace=True)
    return F.silu(h)


def full_precision(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in float32 even under reduced-precision autocast: for the output layers (the
    encoder's and decoder's conv_out, quant_conv, post_quant_conv), whose rounding would land
    directly in the latents or pixels. They are a small share of the work: the cost is small."""
    if not torch.is_autocast_enabled(x.device.type):
        return layer(x)
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

        h = self.norm(x)
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
    """Double the resolution: nearest-neighbour, then an optional 3x3 conv.

    The conv runs at the input's resolution: on a nearest-upsampled map, each of the four output
    phases (even/odd row, even/odd column) sees only a 2x2 neighbourhood of input pixels, with the
    3x3 kernel's taps summed where they land on the same input pixel. Same result up to float
    rounding, 4/9 of the multiply-adds and no upsampled copy of the input.
    """

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        n, _, h, w = x.shape
        c = self.conv.out_channels
        # One 2x2 conv makes all four phases (4c channels) on the input padded by one pixel; phase
        # (a, b) is its output shifted by (a, b).
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), phase_kernels(self.conv.weight), self.conv.bias.repeat(4))
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        out = torch.empty(
            n, c, 2 * h, 2 * w, dtype=y.dtype, device=y.device,
            memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        )
        for a in (0, 1):
            for b in (0, 1):
                k = 2 * a + b
                out[:, :, a::2, b::2] = y[:, k * c : (k + 1) * c, a : a + h, b : b + w]
        return out


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The four 2x2 kernels (stacked as 4 x out channels, order (0,0), (0,1), (1,0), (1,1)) that a
    3x3 kernel amounts to on a nearest-upsampled map. An even output row sees input rows (i-1, i)
    through kernel rows (0, 1+2); an odd one rows (i, i+1) through (0+1, 2); columns alike."""
    def halves(k: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0, t1, t2 = k.unbind(dim)
        return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)

    rows = halves(weight, 2)
    return torch.cat([col for r in rows for col in halves(r, 3)], 0)
