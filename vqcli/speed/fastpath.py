"""Fast paths: layers rewritten for speed, swapped into a model explicitly, each equal to the
original up to float rounding (tests/test_fastpath.py holds them to it).

``PhaseUpsample``: the original ``Upsample`` (nearest-neighbour x2, then a 3x3 conv) with the conv
run at the input's resolution. On a nearest-upsampled map each of the four output phases (even/odd
row, even/odd column) sees only a 2x2 neighbourhood of input pixels, with the 3x3 kernel's taps
summed where they land on the same input pixel: 4/9 of the multiply-adds and no upsampled copy
of the input. Same parameters, same names: a swapped model's ``state_dict`` is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqcli.model.blocks import Upsample


class PhaseUpsample(Upsample):
    """``Upsample`` computed as four 2x2 phase convolutions at the input's resolution."""

    @classmethod
    def of(cls, layer: Upsample) -> PhaseUpsample:
        """The fast form of ``layer``, sharing its conv (the same parameters, not a copy)."""
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.with_conv = layer.with_conv
        if layer.with_conv:
            fast.conv = layer.conv
        return fast.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        n, _, h, w = x.shape
        c = self.conv.out_channels
        # One 2x2 conv makes all four phases (4c channels) on the input padded by one pixel; phase
        # (a, b) is its output shifted by (a, b).
        # (the taps summed in float32: with weights cast to bfloat16, a sum in bfloat16 would round
        # the kernels once more than the original's conv sees them)
        weight = self.conv.weight
        kernels = phase_kernels(weight.float()).to(weight.dtype)
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, self.conv.bias.repeat(4))
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


def use_fast_paths(model: nn.Module) -> nn.Module:
    """Swap ``model``'s layers for their fast forms, in place (the parameters are kept, shared)."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is Upsample:
                setattr(module, name, PhaseUpsample.of(child))
    return model
