"""Reconstruction quality on RGB images in [0, 1]: PSNR, SSIM, the CIEDE2000 colour difference and
the mean bias of each channel.

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
    return psnr_from_mse(float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)), data_range)


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """The PSNR in dB of a mean squared error, for values spanning ``data_range``."""
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


# --- colour -------------------------------------------------------------------------------------
# sRGB (IEC 61966-2-1) to CIE XYZ, D65 white, and XYZ to CIELAB; the same constants as
# scikit-image's rgb2lab with its default illuminant (D65, 2 degree observer).
_SRGB_TO_XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (L in [0, 100]) of sRGB values in [0, 1], shape (..., 3)."""
    c = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    # The CIE's rounded constants (0.008856, 7.787), as scikit-image uses, not the exact (6/29)^3.
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def ciede2000_lab(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (kL = kC = kH = 1) between CIELAB arrays of shape (..., 3).

    Follows Sharma, Wu and Dalal (2005), "The CIEDE2000 color-difference formula: implementation
    notes", including their conventions for zero chroma and for the mean hue."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2.0
    g = 0.5 * (1.0 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.where(c1p == 0, 0.0, np.arctan2(b1, a1p) % (2 * np.pi))
    h2p = np.where(c2p == 0, 0.0, np.arctan2(b2, a2p) % (2 * np.pi))

    d_l = L2 - L1
    d_c = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > np.pi, dh - 2 * np.pi, np.where(dh < -np.pi, dh + 2 * np.pi, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    d_h = 2.0 * np.sqrt(c1p * c2p) * np.sin(dh / 2.0)

    l_bar = (L1 + L2) / 2.0
    cp_bar = (c1p + c2p) / 2.0
    h_sum = h1p + h2p
    h_bar = np.where(
        np.abs(h1p - h2p) <= np.pi, h_sum / 2.0, np.where(h_sum < 2 * np.pi, (h_sum + 2 * np.pi) / 2.0, (h_sum - 2 * np.pi) / 2.0)
    )
    h_bar = np.where(c1p * c2p == 0, h_sum, h_bar)
    t = (
        1.0
        - 0.17 * np.cos(h_bar - np.radians(30))
        + 0.24 * np.cos(2 * h_bar)
        + 0.32 * np.cos(3 * h_bar + np.radians(6))
        - 0.20 * np.cos(4 * h_bar - np.radians(63))
    )
    d_theta = np.radians(30) * np.exp(-(((np.degrees(h_bar) - 275.0) / 25.0) ** 2))
    r_c = 2.0 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    s_l = 1.0 + 0.015 * (l_bar - 50.0) ** 2 / np.sqrt(20.0 + (l_bar - 50.0) ** 2)
    s_c = 1.0 + 0.045 * cp_bar
    s_h = 1.0 + 0.015 * cp_bar * t
    r_t = -np.sin(2 * d_theta) * r_c
    return np.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {image.shape}")
    return image


def ciede2000(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean CIEDE2000 colour difference of two RGB images in [0, 1] (about 2.3: just noticeable)."""
    reference, test = _as_rgb(reference), _as_rgb(test)
    if reference.shape != test.shape:
        raise ValueError(f"images differ in shape: {reference.shape} vs {test.shape}")
    return float(ciede2000_lab(rgb_to_lab(reference), rgb_to_lab(test)).mean())


def channel_bias(reference: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    """Mean of ``test - reference`` per channel (R, G, B), in 8-bit levels, for images in [0, 1]:
    a reconstruction that shifts the colour of wide regions shows here; noise averages out."""
    reference, test = _as_rgb(reference), _as_rgb(test)
    if reference.shape != test.shape:
        raise ValueError(f"images differ in shape: {reference.shape} vs {test.shape}")
    diff = test.astype(np.float64) - reference.astype(np.float64)
    r, g, b = (255.0 * diff.reshape(-1, 3).mean(axis=0)).tolist()
    return r, g, b
