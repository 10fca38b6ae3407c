"""Colour metrics (vqcli.metrics) against scikit-image, and benchmarks/quality.py's floors."""

from __future__ import annotations

import numpy as np
import pytest
from _scripts import load_script

from vqcli import metrics

color = pytest.importorskip("skimage.color")

# Sharma, Wu and Dalal (2005), test data: CIELAB pairs and their CIEDE2000.
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 3.1571, -77.2803), (50.0, 0.0, -82.7485), 2.8615),
    ((50.0, 2.8361, -74.0200), (50.0, 0.0, -82.7485), 3.4412),
    ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
]

KNOWN_COLOURS = np.array(
    [
        [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0],
        [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.8, 0.1, 0.1], [0.25, 0.25, 0.27], [0.3, 0.5, 0.9],
    ]
)


def test_lab_matches_skimage_on_known_and_random_colours():
    rng = np.random.default_rng(0)
    colours = np.concatenate([KNOWN_COLOURS, rng.random((500, 3))])[None]
    np.testing.assert_allclose(metrics.rgb_to_lab(colours), color.rgb2lab(colours), atol=1e-6)


def test_ciede2000_on_sharmas_pairs():
    lab1 = np.array([p[0] for p in SHARMA])
    lab2 = np.array([p[1] for p in SHARMA])
    np.testing.assert_allclose(metrics.ciede2000_lab(lab1, lab2), [p[2] for p in SHARMA], atol=1e-4)


def test_ciede2000_matches_skimage_on_every_pair_of_known_colours():
    a = np.repeat(KNOWN_COLOURS, len(KNOWN_COLOURS), axis=0)[None]
    b = np.tile(KNOWN_COLOURS, (len(KNOWN_COLOURS), 1))[None]
    ours = metrics.ciede2000_lab(metrics.rgb_to_lab(a), metrics.rgb_to_lab(b))
    theirs = color.deltaE_ciede2000(color.rgb2lab(a), color.rgb2lab(b))
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert ours.max() > 50  # far-apart colours are among them


def test_ciede2000_matches_skimage_on_random_images():
    rng = np.random.default_rng(1)
    reference = rng.random((48, 40, 3))
    test = np.clip(reference + rng.normal(0, 0.05, reference.shape), 0, 1)
    expected = color.deltaE_ciede2000(color.rgb2lab(reference), color.rgb2lab(test)).mean()
    assert metrics.ciede2000(reference, test) == pytest.approx(expected, rel=1e-9)
    assert metrics.ciede2000(reference, reference) == 0.0


@pytest.mark.parametrize(
    "base, shift",
    [((0.5, 0.5, 0.5), (10, 0, 0)), ((0.25, 0.25, 0.27), (0, -6, 4)), ((0.8, 0.1, 0.1), (-20, 12, 3)), ((0.3, 0.5, 0.9), (5, 5, 5))],
)
def test_pure_shift_of_a_flat_image(base, shift):
    """Every pixel moved by the same 8-bit levels: the bias is that shift, and the mean CIEDE2000
    is the difference of the two colours."""
    reference = np.broadcast_to(np.array(base), (16, 24, 3)).copy()
    test = reference + np.array(shift) / 255.0
    np.testing.assert_allclose(metrics.channel_bias(reference, test), shift, atol=1e-9)
    one = color.deltaE_ciede2000(color.rgb2lab(reference[:1, :1]), color.rgb2lab(test[:1, :1]))[0, 0]
    assert metrics.ciede2000(reference, test) == pytest.approx(one, rel=1e-9)
    assert one > 0.5  # a visible shift, not a vacuous zero


def test_bias_ignores_zero_mean_noise_and_grey_input():
    rng = np.random.default_rng(2)
    reference = rng.random((64, 64, 3)) * 0.5 + 0.25
    noise = rng.normal(0, 0.05, reference.shape)
    noise -= noise.mean(axis=(0, 1))
    assert max(abs(v) for v in metrics.channel_bias(reference, reference + noise)) < 1e-9
    grey = reference[..., 0]
    assert metrics.channel_bias(grey, grey + 2 / 255) == pytest.approx((2.0, 2.0, 2.0))
    with pytest.raises(ValueError):
        metrics.ciede2000(reference, reference[:10])


def _photo(size: int = 96) -> np.ndarray:
    from pathlib import Path

    from PIL import Image

    rgb = Image.open(Path(__file__).resolve().parents[1] / "sample_images" / "astronaut.png").convert("RGB")
    return np.asarray(rgb, dtype=np.float32)[100 : 100 + size, 150 : 150 + size + 32] / 255.0


def test_jpeg_floor_picks_the_quality_closest_to_the_bit_budget():
    quality = load_script("benchmarks/quality.py")
    rgb = _photo()
    decoded, chosen, bpp = quality.jpeg_floor(rgb, 0.625)
    image = quality.to_pil(rgb)
    pixels = image.width * image.height
    sizes = {q: len(quality.jpeg_bytes(image, q)) * 8 / pixels for q in range(1, 101)}
    best = min(sizes, key=lambda q: abs(sizes[q] - 0.625))
    assert abs(sizes[chosen] - 0.625) == abs(sizes[best] - 0.625)  # as close as any quality gets
    assert bpp == pytest.approx(sizes[chosen])
    assert decoded.shape == rgb.shape and 20 < metrics.psnr(rgb, decoded) < 40
    _, higher, bpp_high = quality.jpeg_floor(rgb, 2.0)  # more bits: a higher quality
    assert higher > chosen and bpp_high > bpp


def test_resize_floor_keeps_flat_areas_and_loses_detail():
    quality = load_script("benchmarks/quality.py")
    flat = np.broadcast_to(np.array([0.2, 0.6, 0.4], dtype=np.float32), (64, 80, 3)).copy()
    assert metrics.psnr(flat, quality.resize_floor(flat)) > 45
    rgb = _photo()
    out = quality.resize_floor(rgb)
    assert out.shape == rgb.shape and metrics.psnr(rgb, out) < 35
    assert max(abs(b) for b in metrics.channel_bias(rgb, out)) < 1.0  # resizing does not shift colours
