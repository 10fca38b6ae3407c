"""Property-based fuzzing of the readers of untrusted files: safetensors headers, latent files, the
checkpoint readers (safetensors and ``torch.load(weights_only=True)``) and the image loader.

For any input, the reader returns a valid result or raises one of vqcli's own errors
(``VqcliError``): never another exception, never a hang (each example runs under an alarm), never
a large allocation (each test's peak memory growth is bounded). tests/test_latents.py already
mutates KL latent files; the cases here are the others. Examples are bounded so that the file
runs in well under a minute.

The examples are the same on every run (derandomized): a red CI is a reproducible finding, never a
chance draw. ``VQCLI_FUZZ_EXPLORE=1`` draws new examples on each run, to hunt for new failures (a
hunt found the TIFF page without dimensions that Pillow answers with TypeError).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image
from safetensors.torch import save_file

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.layouts import to_diffusers
from vqcli.checkpoints.native import save_native
from vqcli.checkpoints.read import load_checkpoint
from vqcli.errors import FileError, VqcliError
from vqcli.io.images import load_image
from vqcli.io.latents import make_meta, read_latent, write_latent
from vqcli.io.safetensors import read_safetensors

SMALL_KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=1)
SMALL_VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=2, n_embed=8)
MAX_PIXELS = 1 << 16
EXAMPLE_SECONDS = 30  # one example running longer than this is a hang
PEAK_GROWTH_MB = 256  # the most a whole test may add to the process's peak memory

FUZZ = settings(
    max_examples=120,
    deadline=None,  # (a time per example fails on a busy machine; time_limit catches hangs)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
    derandomize=os.environ.get("VQCLI_FUZZ_EXPLORE") != "1",
)


# --- guards ---------------------------------------------------------------------------------------


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = EXAMPLE_SECONDS):
    """Turn an example that runs too long into a failure (SIGALRM; pytest runs tests in the main thread)."""

    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


@pytest.fixture
def bounded_memory():
    """Reset the peak-RSS mark, run the test, and check the peak did not grow by much."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak-memory mark here (/proc/self/clear_refs)")
    start = _peak_kb()
    yield
    grown = (_peak_kb() - start) / 1024
    assert grown < PEAK_GROWTH_MB, f"peak memory grew by {grown:.0f} MB"


def only_own_errors(fn, *args, **kwargs):
    """``fn``'s result, or None when it raised a VqcliError; any other exception fails the test."""
    with time_limit():
        try:
            result = fn(*args, **kwargs)
        except VqcliError as e:
            assert "\n" not in str(e), str(e)
            _event(f"refused: {getattr(e, 'reason', str(e))[:40]}")
            return None
    _event("accepted")
    return result


def _event(text: str) -> None:
    """What happened to an example (shown by pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(text)


# --- mutations ----------------------------------------------------------------------------------


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few bytes flipped, cut, inserted or overwritten with boundary values."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "boundary", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "boundary":
            value = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"]))
            data[pos : pos + 4] = value
        else:
            del data[pos:]
    return bytes(data)


# --- safetensors headers ------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "Q99", "", 7]
sizes = st.one_of(st.integers(0, 8), st.integers(-3, 2**64), st.sampled_from([2**20, 2**31, 2**40, 2**63]))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8), st.floats(allow_nan=False))
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(DTYPES),
        "shape": st.one_of(st.lists(sizes, max_size=5), json_scalar),
        "data_offsets": st.one_of(st.lists(sizes, min_size=0, max_size=3), st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list), json_scalar),
    },
)
metadata = st.one_of(st.none(), st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=20), json_scalar), max_size=4))


@st.composite
def hostile_json(draw) -> str:
    """JSON text Python's parser dislikes: nesting deeper than its recursion limit, integers of
    more digits than it converts, invalid UTF-8 escapes, an unclosed object."""
    depth = draw(st.integers(1, 100_000))
    digits = draw(st.text(alphabet="0123456789", min_size=1, max_size=6000).filter(lambda t: t[0] != "0"))
    return draw(st.sampled_from([
        "[" * depth + "]" * depth,
        '{"a": ' + "[" * depth + "]" * depth + "}",
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + digits + "]}}",
        '{"__metadata__": {"k": ' + digits + "}}",
        '{"a": "\\ud800"}',
        '{"a": ',
    ]))


@st.composite
def safetensors_files(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # sometimes no JSON at all, or a lying length
        body = draw(st.binary(max_size=200))
        length = draw(st.one_of(st.just(len(body)), st.integers(0, 2**64 - 1)))
        return struct.pack("<Q", length) + body
    if kind == 1:
        text = draw(hostile_json()).encode()
        return struct.pack("<Q", len(text)) + text + draw(st.binary(max_size=16))
    header = draw(st.dictionaries(st.text(min_size=1, max_size=10), entry, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(metadata)
    text = json.dumps(header).encode()
    data = draw(st.binary(max_size=128))
    return struct.pack("<Q", len(text)) + text + data


@FUZZ
@given(raw=safetensors_files())
def test_random_safetensors_headers(raw, tmp_path, bounded_memory):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    result = only_own_errors(read_safetensors, path)
    if result is None:
        return
    tensors, meta = result
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert set(tensors) == set(header) - {"__metadata__"}
    for name, t in tensors.items():
        assert list(t.shape) == header[name]["shape"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


# --- latent files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    kl = AutoEncoder(SMALL_KL).eval()
    vq = AutoEncoder(SMALL_VQ).eval()
    # Once per process, building a VQ model on the meta device (as the checkpoint readers do) takes
    # seconds: torch imports its Python decompositions for the codebook's normal_ init. Pay it here,
    # not inside a timed example.
    with torch.device("meta"):
        AutoEncoder(SMALL_VQ)
    return kl, vq


@pytest.fixture(scope="module")
def latent_files(tmp_path_factory, small_models):
    kl, vq = small_models
    d = tmp_path_factory.mktemp("fuzz-latents")
    kl_meta = make_meta(kl, source="a.png", width=5, height=3, model_name="kl", model_embedded=False, representation="mean")
    write_latent(d / "kl.safetensors", torch.randn(kl_meta.latent_shape), kl_meta)
    vq_meta = make_meta(vq, source="b.png", width=6, height=4, model_name="vq", model_embedded=False, representation="indices")
    write_latent(d / "vq.safetensors", torch.randint(0, 8, vq_meta.latent_shape), vq_meta)
    return {"kl": (d / "kl.safetensors").read_bytes(), "vq": (d / "vq.safetensors").read_bytes(),
            "kl_meta": kl_meta.to_metadata(), "vq_meta": vq_meta.to_metadata()}


def _valid(latent) -> None:
    assert tuple(latent.tensor.shape) == latent.meta.latent_shape
    if latent.meta.kind == "vq":
        assert int(latent.tensor.min()) >= 0 and int(latent.tensor.max()) < latent.meta.config.n_embed
    else:
        assert bool(torch.isfinite(latent.tensor).all())


@FUZZ
@given(data=st.data())
def test_mutated_vq_latents(data, latent_files, tmp_path, bounded_memory):
    path = tmp_path / "m.safetensors"
    path.write_bytes(data.draw(mutated(latent_files["vq"])))
    latent = only_own_errors(read_latent, path)
    if latent is not None:
        _valid(latent)


# Values for each metadata field: the valid one, plausible mistakes, and hostile ones.
HOSTILE_TEXT = ["", "0", "-1", "nan", "inf", "1e308", "9" * 30, "true", "[" * 5000, "../../x", "/etc/passwd", "\x00\n\x1b[2J"]


@FUZZ
@given(data=st.data())
def test_latents_with_random_metadata_and_tensor(data, latent_files, tmp_path, bounded_memory):
    kind = data.draw(st.sampled_from(["kl", "vq"]))
    meta = dict(latent_files[f"{kind}_meta"])
    for key in data.draw(st.lists(st.sampled_from(sorted(meta) + ["seed", "extra"]), max_size=4, unique=True)):
        choice = data.draw(st.sampled_from(["drop", "hostile", "other"]))
        if choice == "drop":
            meta.pop(key, None)
        elif choice == "hostile":
            meta[key] = data.draw(st.sampled_from(HOSTILE_TEXT))
        else:
            meta[key] = latent_files["vq_meta" if kind == "kl" else "kl_meta"].get(key, "1")
    shape = data.draw(st.lists(st.integers(0, 9), max_size=4))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]))
    if dtype.is_floating_point:
        values = torch.tensor(data.draw(st.lists(st.floats(width=16), min_size=1, max_size=4)), dtype=torch.float32)
    else:
        values = torch.tensor(data.draw(st.lists(st.integers(-40000, 40000), min_size=1, max_size=4)))
    tensor = values.repeat(int(np.prod(shape)) // values.numel() + 1)[: int(np.prod(shape))].reshape(shape).to(dtype)
    path = tmp_path / "r.safetensors"
    save_file({data.draw(st.sampled_from(["latent", "latent", "z"])): tensor}, str(path), metadata=meta)
    latent = only_own_errors(read_latent, path)
    if latent is not None:
        _valid(latent)


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory, small_models):
    kl, vq = small_models
    d = tmp_path_factory.mktemp("fuzz-checkpoints")
    save_native(kl, d / "native.safetensors")
    state = {k: v.detach().clone().contiguous() for k, v in vq.state_dict().items()}
    torch.save(state, d / "zip.ckpt")
    torch.save({"state_dict": state, "epoch": 3}, d / "legacy.ckpt", _use_new_zipfile_serialization=False)
    files = {name: (d / name).read_bytes() for name in ("native.safetensors", "zip.ckpt", "legacy.ckpt")}
    kl_state = {k: v.detach() for k, v in kl.state_dict().items()}
    layouts = {"kl": kl_state, "vq": state, "kl-diffusers": to_diffusers(kl_state), "vq-diffusers": to_diffusers(state)}
    shapes = {name: {k: tuple(v.shape) for k, v in layout.items()} for name, layout in layouts.items()}
    return files | {"shapes": shapes, "keys": sorted({k for layout in shapes.values() for k in layout})}


def _capped(shape: list[int], limit: int = 1 << 16) -> list[int]:
    """The shape with its largest sizes halved until it holds at most ``limit`` elements (the test's
    own tensors stay small; what is measured is the reader's memory)."""
    shape = list(shape)
    while int(np.prod(shape)) > limit:
        i = int(np.argmax(shape))
        shape[i] //= 2
    return shape


def _valid_model(model) -> None:
    assert isinstance(model, AutoEncoder)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@FUZZ
@given(data=st.data())
def test_mutated_checkpoints(data, checkpoint_files, tmp_path, bounded_memory):
    """Native safetensors, torch zip and legacy pickles, mutated (the pickles go through
    ``torch.load(weights_only=True)``)."""
    name = data.draw(st.sampled_from(["native.safetensors", "zip.ckpt", "legacy.ckpt"]))
    path = tmp_path / name
    path.write_bytes(data.draw(mutated(checkpoint_files[name])))
    model = only_own_errors(load_checkpoint, path)
    if model is not None:
        _valid_model(model)


@FUZZ
@given(data=st.data())
def test_checkpoints_of_random_shapes_and_dtypes(data, checkpoint_files, tmp_path, bounded_memory):
    """A real model's tensors (original or diffusers layout, KL or VQ) with a few of them given
    random shapes, ranks or dtypes, dropped, or added: the architecture inference, the layout
    conversion and the strict loading meet odd combinations of otherwise plausible weights."""
    layout = data.draw(st.sampled_from(sorted(checkpoint_files["shapes"])))
    state = {k: torch.full(shape, 0.01) for k, shape in checkpoint_files["shapes"][layout].items()}
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["reshape", "dtype", "drop", "add", "nan"]))
        key = data.draw(st.sampled_from(sorted(state) if op != "add" else checkpoint_files["keys"]))
        if op == "drop":
            state.pop(key, None)
        elif op == "dtype":
            state[key] = state[key].to(data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.bool])))
        elif op == "nan":
            if state[key].is_floating_point() and state[key].numel():
                state[key] = state[key].clone()
                state[key].view(-1)[0] = float("nan")
        else:
            state[key] = torch.zeros(_capped(data.draw(st.lists(st.integers(0, 70), max_size=5))))
    path = tmp_path / data.draw(st.sampled_from(["w.safetensors", "w.ckpt"]))
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = only_own_errors(load_checkpoint, path)
    if model is not None:
        _valid_model(model)


# --- images ---------------------------------------------------------------------------------------


def _encoded(fmt: str, **kw) -> bytes:
    px = (np.random.default_rng(1).random((20, 28, 3)) * 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(px).save(b, format=fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def image_files():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    return {
        "png": _encoded("PNG"), "jpg": _encoded("JPEG", exif=exif), "jpg-progressive": _encoded("JPEG", progressive=True),
        "webp": _encoded("WEBP"), "webp-lossless": _encoded("WEBP", lossless=True), "bmp": _encoded("BMP"),
        "dib": _encoded("DIB"), "gif": _encoded("GIF"), "tif": _encoded("TIFF"), "tif-packbits": _encoded("TIFF", compression="packbits"),
        "ppm": _encoded("PPM"), "tga": _encoded("TGA"), "tga-rle": _encoded("TGA", compression="tga_rle"),
        "ico": _encoded("ICO"), "qoi": _encoded("QOI"),
    }


def _valid_image(rgb) -> None:
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.float32
    assert rgb.shape[0] * rgb.shape[1] <= MAX_PIXELS
    assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_mutated_images(data, image_files, tmp_path, bounded_memory):
    name = data.draw(st.sampled_from(sorted(image_files)))
    path = tmp_path / f"m.{name.split('-')[0]}"
    path.write_bytes(data.draw(mutated(image_files[name])))
    rgb = only_own_errors(load_image, path, max_pixels=MAX_PIXELS)
    if rgb is not None:
        _valid_image(rgb)


@FUZZ
@given(data=st.data())
def test_random_bytes_behind_image_signatures(data, tmp_path, bounded_memory):
    signature = data.draw(st.sampled_from([
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8", b"BM", b"GIF89a",
        b"II*\x00", b"MM\x00*", b"P6\n", b"\x00\x00\x01\x00", b"qoif", b"",
    ]))
    path = tmp_path / "r.img"
    path.write_bytes(signature + data.draw(st.binary(max_size=300)))
    rgb = only_own_errors(load_image, path, max_pixels=MAX_PIXELS)
    if rgb is not None:
        _valid_image(rgb)


def test_the_guards_work(tmp_path):
    """The harness itself: a hang is caught, a foreign exception is not swallowed."""
    import time

    with pytest.raises(Hang):
        with time_limit(0.2):
            time.sleep(5)
    with pytest.raises(ZeroDivisionError):
        only_own_errors(lambda: 1 / 0)
    assert only_own_errors(lambda: (_ for _ in ()).throw(FileError(tmp_path, "x"))) is None
