"""Between image arrays and model tensors: value range, layout and padding to the downsampling factor.

Images are padded on the right and bottom up to a multiple of the model's downsampling factor by
mirroring (reflection without repeating the edge pixel), so the content near the border continues
naturally and is not smeared into stripes as edge replication does. Images too small to mirror
(a side shorter than the padding needs) fall back to edge replication for the remainder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def padded_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """The smallest (H, W) at least as large as the image and divisible by ``factor``."""
    return -(-height // factor) * factor, -(-width // factor) * factor


def pad_to_multiple(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad a (B, C, H, W) tensor on the right and bottom to a multiple of ``factor``."""
    target_h, target_w = padded_size(*x.shape[-2:], factor)
    while True:
        height, width = x.shape[-2:]
        need_h, need_w = target_h - height, target_w - width
        if need_h == 0 and need_w == 0:
            return x
        # Reflection adds at most size-1 pixels a pass: tiny images take a few passes.
        mirror_h, mirror_w = min(need_h, height - 1), min(need_w, width - 1)
        if mirror_h == 0 and mirror_w == 0:  # a 1-pixel side: nothing to mirror
            return F.pad(x, (0, need_w, 0, need_h), mode="replicate")
        x = F.pad(x, (0, mirror_w, 0, mirror_h), mode="reflect")


def to_model_input(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] to a (1, 3, H, W) float32 tensor in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))
    return (t.permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0).contiguous()


def from_model_output(x: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A (3, H', W') model output in about [-1, 1], cropped to (height, width), as (H, W, 3) float32 [0, 1]."""
    x = x[..., :height, :width].float().clamp(-1.0, 1.0)
    return ((x + 1.0) * 0.5).permute(1, 2, 0).cpu().numpy()
