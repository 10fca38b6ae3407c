"""Every kind of image a user owns, read as RGB [0, 1]; writing; padding that does not smear the border.

Each image is generated here with known pixel values and compared against an oracle computed
with numpy from those values (compositing over white, the CMYK formula, rotations...).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.errors import FileError
from vqcli.io.images import load_image, save_image, written_by_vqcli
from vqcli.io.padding import pad_to_multiple
from vqcli.pipeline.encode import prepare_image
from vqcli.pipeline.results import Job

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
rng = np.random.default_rng(0)


def _rgb(h=5, w=7) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(path: Path, pixels: np.ndarray, bit_depth: int, colour_type: int) -> Path:
    """A PNG written by hand (Pillow cannot write 16-bit colour): rows of big-endian samples."""
    h, w = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\0" + pixels[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return rgb * a + (1.0 - a)


# --- modes --------------------------------------------------------------------------------------


def test_rgb_and_greyscale(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), a / np.float32(255))
    g = a[..., 0]
    Image.fromarray(g).save(tmp_path / "grey.png")
    out = load_image(tmp_path / "grey.png")
    assert out.shape == (5, 7, 3) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g / np.float32(255))


def test_one_bit(tmp_path):
    bits = rng.integers(0, 2, (6, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(load_image(tmp_path / "bits.png")[..., 1], bits.astype(np.float32))


def test_palette_with_and_without_transparency(tmp_path):
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 8), dtype=np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette.flatten().tolist())
    im.save(tmp_path / "pal.png")
    np.testing.assert_allclose(load_image(tmp_path / "pal.png"), palette[index] / 255.0, atol=1e-7)
    im.info["transparency"] = 3
    im.save(tmp_path / "pal.gif", transparency=3)
    expected = palette[index] / 255.0
    expected[index == 3] = 1.0  # the transparent colour becomes white
    np.testing.assert_allclose(load_image(tmp_path / "pal.gif"), expected, atol=1e-7)


def test_rgba_and_la_are_composited_over_white(tmp_path):
    rgba = np.concatenate([_rgb(), rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)], axis=2)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = _over_white(rgba[..., :3] / 255.0, rgba[..., 3] / 255.0)
    out = load_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_array_equal(out[0, 0], [1, 1, 1])  # fully transparent: white
    la = rgba[..., [0, 3]]
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    expected = _over_white(np.repeat(la[..., :1], 3, axis=2) / 255.0, la[..., 1] / 255.0)
    np.testing.assert_allclose(load_image(tmp_path / "la.png"), expected, atol=1e-6)


def test_cmyk(tmp_path):
    cmyk = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.frombytes("CMYK", (7, 5), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    c = cmyk.astype(np.float64)
    expected = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255.0  # the usual CMYK -> RGB formula
    assert np.abs(load_image(tmp_path / "cmyk.tif") * 255 - expected).max() <= 0.51
    # a CMYK JPEG (as print workflows write them) of a photograph: close to the photograph
    photo = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))[:64, :64]
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    assert np.abs(load_image(tmp_path / "cmyk.jpg") * 255 - photo).mean() < 3


def test_sixteen_bit_greyscale_keeps_its_precision(tmp_path):
    values = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    values[0, 0], values[0, 1] = 1, 65535  # 1 is not representable in 8 bits
    _png(tmp_path / "g16.png", values, 16, 0)
    out = load_image(tmp_path / "g16.png")
    np.testing.assert_allclose(out[..., 2], values / 65535.0, atol=1e-7)
    assert 0 < out[0, 0, 0] < 1 / 255


def test_sixteen_bit_colour(tmp_path):
    values = rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    _png(tmp_path / "rgb16.png", values, 16, 2)
    assert np.abs(load_image(tmp_path / "rgb16.png") - values / 65535.0).max() <= 1 / 255  # 8 bits kept
    rgba = rng.integers(0, 65536, (5, 7, 4)).astype(np.uint16)
    _png(tmp_path / "rgba16.png", rgba, 16, 6)
    expected = _over_white(rgba[..., :3] / 65535.0, rgba[..., 3] / 65535.0)
    assert np.abs(load_image(tmp_path / "rgba16.png") - expected).max() <= 1.5 / 255


def test_float_and_32_bit_integer_images(tmp_path):
    f = rng.random((5, 7)).astype(np.float32)
    f[0, 0], f[0, 1], f[0, 2] = 1.5, -0.5, np.nan
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    expected = np.clip(np.nan_to_num(f, nan=0.0), 0, 1)
    np.testing.assert_allclose(load_image(tmp_path / "f.tif")[..., 0], expected, atol=1e-7)
    i = rng.integers(0, 70000, (5, 7)).astype(np.int32)
    Image.fromarray(i, mode="I").save(tmp_path / "i.tif")
    np.testing.assert_allclose(load_image(tmp_path / "i.tif")[..., 1], np.clip(i / 65535.0, 0, 1), atol=1e-7)


@pytest.mark.parametrize(
    "orientation, turn",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),  # mirrored
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # shown turned 90 degrees clockwise
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    a = _rgb(4, 9)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "o.png"), turn(a) / np.float32(255))


def test_exif_orientation_in_a_jpeg(tmp_path):
    photo = np.asarray(Image.open(SAMPLES / "rocket.jpg").convert("RGB"))[:48, :80]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(tmp_path / "o.jpg", exif=exif, quality=98)
    out = load_image(tmp_path / "o.jpg")
    assert out.shape == (80, 48, 3)
    assert np.abs(out * 255 - np.rot90(photo, -1)).mean() < 3


@pytest.mark.parametrize("ext, kw", [(".gif", {}), (".png", {}), (".webp", {"lossless": True}), (".tif", {})])
def test_animated_images_give_their_first_frame(tmp_path, ext, kw):
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    frames = [Image.new("RGB", (6, 4), c) for c in colours]
    path = tmp_path / f"anim{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **kw)
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 3
    out = load_image(path)
    assert out.shape == (4, 6, 3)
    assert np.abs(out * 255 - np.array(colours[0])).max() <= 2


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (33, 17), (1, 40), (40, 1)])
def test_any_size(tmp_path, size):
    a = _rgb(*size)
    Image.fromarray(a).save(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png").shape == (*size, 3)


# --- broken files -------------------------------------------------------------------------------


def test_broken_files_are_file_errors_naming_the_file(tmp_path):
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    cases = {
        "empty.png": b"",
        "text.png": b"just some text",
        "truncated.png": data[: len(data) // 2],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.jpg").mkdir()
    reasons = {}
    for name in [*cases, "folder.jpg", "missing.png"]:
        with pytest.raises(FileError) as e:
            load_image(tmp_path / name)
        assert e.value.path == str(tmp_path / name) and str(e.value).startswith(f"{tmp_path / name}: ")
        reasons[name] = e.value.reason
    assert "not an image" in reasons["empty.png"] and "not an image" in reasons["text.png"]
    assert "cannot decode" in reasons["truncated.png"]
    assert reasons["folder.jpg"] == "is a folder, not an image"
    assert reasons["missing.png"] == "no such file"


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    Image.fromarray(_rgb(30, 40)).save(tmp_path / "x.png")
    with pytest.raises(FileError, match=r"40x30 = 1,200 pixels, over the limit of 1,000"):
        load_image(tmp_path / "x.png", max_pixels=1000)
    assert load_image(tmp_path / "x.png", max_pixels=1200).shape == (30, 40, 3)
    assert load_image(tmp_path / "x.png", max_pixels=None).shape == (30, 40, 3)


# --- writing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_save_image_marks_its_files(tmp_path, fmt, pil):
    a = _rgb(9, 11)
    save_image(a / 255.0, tmp_path / f"x.{fmt}", fmt=fmt)
    with Image.open(tmp_path / f"x.{fmt}") as im:
        assert im.format == pil and im.size == (11, 9)
    assert written_by_vqcli(tmp_path / f"x.{fmt}")
    if fmt == "png":
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), a)
    Image.fromarray(a).save(tmp_path / f"theirs.{fmt}")
    assert not written_by_vqcli(tmp_path / f"theirs.{fmt}")
    assert not written_by_vqcli(tmp_path / "nothing.png")
    with pytest.raises(FileExistsError):
        save_image(a, tmp_path / f"x.{fmt}", fmt=fmt)


# --- padding ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f4_model() -> AutoEncoder:
    return AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)).eval()


def _prepared(tmp_path: Path, pixels: np.ndarray, model) -> tuple[np.ndarray, dict]:
    Image.fromarray(pixels).save(tmp_path / "p.png")
    job = Job(tmp_path / "p.png", tmp_path, Path("p.png"), tmp_path / "out")
    item = prepare_image(job, model)
    x = ((item.data[0].permute(1, 2, 0).numpy() + 1) / 2 * 255).round()
    return x, item.info


def test_padding_mirrors_the_border_and_keeps_the_image(tmp_path, f4_model):
    a = _rgb(17, 33)
    x, info = _prepared(tmp_path, a, f4_model)
    assert x.shape == (20, 36, 3) and info == {"width": 33, "height": 17}
    np.testing.assert_array_equal(x[:17, :33], a)
    np.testing.assert_array_equal(x, np.pad(a, ((0, 3), (0, 3), (0, 0)), mode="reflect"))


@pytest.mark.parametrize("size, padded", [((1, 1), (8, 8)), ((1, 6), (4, 8)), ((2, 3), (8, 8)), ((5, 4), (8, 4))])
def test_tiny_images_are_padded_without_failing(tmp_path, f4_model, size, padded):
    a = _rgb(*size)
    x, _ = _prepared(tmp_path, a, f4_model)
    assert x.shape[:2] == padded
    np.testing.assert_array_equal(x[: size[0], : size[1]], a)
    if size[0] == 1:  # a 1-pixel side cannot be mirrored: its pixels are repeated
        np.testing.assert_array_equal(x[:, : size[1]], np.repeat(a, padded[0], axis=0))


def test_padding_does_not_smear_the_border(tmp_path, f4_model):
    """Edge replication turns the last column into flat stripes (zero gradient across the padding);
    mirroring continues the texture: the padded strip has the image's own gradient statistics."""
    photo = np.asarray(Image.open(SAMPLES / "camera.png").convert("RGB"))[100:229, 150:279]  # 129x129
    x, _ = _prepared(tmp_path, photo, f4_model)
    assert x.shape[:2] == (132, 132)
    grad_inside = np.abs(np.diff(x[:129, 126:129], axis=1)).mean()
    grad_padding = np.abs(np.diff(x[:129, 129:132], axis=1)).mean()
    replicate = np.pad(photo, ((0, 3), (0, 3), (0, 0)), mode="edge").astype(float)
    grad_replicate = np.abs(np.diff(replicate[:129, 129:132], axis=1)).mean()
    assert grad_replicate == 0
    assert 0.5 < grad_padding / grad_inside < 2


def _embedded_default() -> AutoEncoder | None:
    from vqcli.checkpoints.load import resolve_model
    from vqcli.checkpoints.registry import embedded_path

    if not embedded_path("default").is_file():
        return None
    return resolve_model("default", device="cpu")


@pytest.mark.slow
def test_mirror_padding_reconstructs_the_border_as_well_as_edge_replication_and_better_than_zeros():
    """With a trained model (the embedded 'default', f8): images 1 pixel past a multiple of 8 are padded
    by 7 pixels. Measured next to the right and bottom border, the reconstruction error with the
    mirror padding vqcli uses is far below zero padding's and within 10% of edge replication's (with
    the shipped model the two are within 4% of each other; mirroring is kept because it continues
    the texture instead of smearing the edge pixel into stripes, see the test above)."""
    model = _embedded_default()
    if model is None:
        pytest.skip("the embedded model 'default' is not installed (vqcli/weights/default.safetensors)")
    f = model.config.downsampling
    errors = {"mirror": [], "replicate": [], "zeros": []}
    for name in ("astronaut.png", "camera.png", "coffee.png", "rocket.jpg"):
        rgb = load_image(SAMPLES / name)[: 16 * f + 1, : 16 * f + 1]
        h, w = rgb.shape[:2]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None] * 2 - 1
        ph, pw = -(-h // f) * f - h, -(-w // f) * f - w
        for mode in errors:
            if mode == "mirror":
                padded = pad_to_multiple(x, f)
            else:
                padded = F.pad(x, (0, pw, 0, ph), mode="replicate" if mode == "replicate" else "constant")
            with torch.inference_mode():
                y = model.decode(model.encode(padded))[..., :h, :w].clamp(-1, 1)
            err = (y - x).pow(2)
            border = torch.cat([err[..., :, w - f :].flatten(), err[..., h - f :, : w - f].flatten()])
            errors[mode].append(float(border.mean()))
    mirror, replicate, zeros = (np.mean(errors[k]) for k in ("mirror", "replicate", "zeros"))
    assert mirror < 0.75 * zeros, errors
    assert mirror < 1.1 * replicate, errors
