"""Reconstruction quality: PSNR and SSIM on RGB images in [0, 1].

SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
population statistics, computed per channel and averaged over the pixels whose window lies fully
inside the image, then over channels (the same convention as scikit-image's
``structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Mean structural similarity of two (H, W, C) or (H, W) images."""
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float64))
    tst = torch.from_numpy(np.asarray(test, dtype=np.float64))
    if ref.shape != tst.shape:
        raise ValueError(f"images differ in shape: {tuple(ref.shape)} vs {tuple(tst.shape)}")
    if ref.ndim == 2:
        ref, tst = ref[..., None], tst[..., None]
    size = 2 * int(3.5 * sigma + 0.5) + 1  # 11 for sigma 1.5
    smallest = min(ref.shape[:2])
    size = min(size, smallest if smallest % 2 else smallest - 1)  # small images: the largest odd window that fits
    g = _gaussian_window(size, sigma)
    channels = ref.shape[2]
    kernel_h = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1)
    kernel_w = g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # valid-region separable Gaussian filter
        return F.conv2d(F.conv2d(t, kernel_h, groups=channels), kernel_w, groups=channels)

    x = ref.permute(2, 0, 1).unsqueeze(0)
    y = tst.permute(2, 0, 1).unsqueeze(0)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def error_map(reference: np.ndarray, test: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """Absolute difference amplified by ``gain`` (clipped to [0, 1]): where the reconstruction errs."""
    return np.clip(np.abs(reference.astype(np.float32) - test.astype(np.float32)) * gain, 0.0, 1.0)
