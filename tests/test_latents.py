"""The latent file: written, read back by plain safetensors and by vqcli, and refused when anything is off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import load_native
from vqcli.errors import FileError
from vqcli.io.latents import check_model, make_meta, read_latent, write_latent
from vqcli.pipeline.decode import ModelChooser

KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)


@pytest.fixture(scope="module")
def kl_model() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(KL).eval()


@pytest.fixture(scope="module")
def vq_model() -> AutoEncoder:
    torch.manual_seed(1)
    return AutoEncoder(VQ).eval()


def _kl_file(path: Path, model: AutoEncoder, width=33, height=17, **kw) -> tuple[torch.Tensor, dict]:
    meta = make_meta(model, source="dir/a.png", width=width, height=height, model_name="kl.safetensors",
                     model_embedded=False, representation="mean", **kw)
    z = torch.randn(meta.latent_shape)
    write_latent(path, z, meta)
    return z, meta.to_metadata()


def test_kl_round_trip_and_plain_safetensors(tmp_path, kl_model):
    z, _ = _kl_file(tmp_path / "a.safetensors", kl_model)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:  # any other program
        assert list(f.keys()) == ["latent"]
        meta = f.metadata()
        assert torch.equal(f.get_tensor("latent"), z)
    assert meta["format"] == "vqcli.latent" and meta["format_version"] == "1"
    assert (meta["width"], meta["height"], meta["padded_width"], meta["padded_height"]) == ("33", "17", "34", "18")
    assert meta["padding"] == "1,1" and meta["source"] == "dir/a.png" and meta["kind"] == "kl"
    assert meta["model_sha256"] == kl_model.identity() and meta["scaled"] == "false" and meta["dtype"] == "float32"
    assert json.loads(meta["model_config"]) == KL.to_dict()
    latent = read_latent(tmp_path / "a.safetensors")
    assert torch.equal(latent.tensor, z) and latent.meta.width == 33 and latent.meta.config == KL
    assert latent.meta.latent_shape == (4, 9, 17) and latent.meta.padding == (1, 1)


def test_every_seed_a_draw_can_have_reads_back(tmp_path, kl_model):
    """Seeds of --sample draws are 63-bit (derive_seed): the largest, 19 digits, reads back; one past it does not."""
    meta = make_meta(kl_model, source="a.png", width=8, height=8, model_name="kl.safetensors", model_embedded=False,
                     representation="sample", seed=2**63 - 1, frame=(2, 3), frame_duration_ms=40)
    write_latent(tmp_path / "a.safetensors", torch.zeros(meta.latent_shape), meta)
    back = read_latent(tmp_path / "a.safetensors").meta
    assert (back.seed, back.frame, back.frame_duration_ms) == (2**63 - 1, (2, 3), 40)
    _rewrite(tmp_path / "a.safetensors", extra={"seed": str(2**63)})
    with pytest.raises(FileError, match="seed='9223372036854775808' is not an integer"):
        read_latent(tmp_path / "a.safetensors")


WRITE_IN_A_CHILD = """
import sys, torch
from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.io.latents import make_meta, write_latent
torch.manual_seed(0)
model = AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4))
meta = make_meta(model, source="dir/a.png", width=33, height=17, model_name="kl.safetensors",
                 model_embedded=False, representation="mean")
write_latent(sys.argv[1], torch.arange(4 * 9 * 17, dtype=torch.float32).reshape(meta.latent_shape) / 7, meta)
save_native(model, sys.argv[2])
"""


def test_the_same_latent_and_model_give_the_same_bytes_in_every_process(tmp_path):
    """safetensors' own writer orders the metadata by a hash seeded per process; vqcli's files are
    byte-identical for identical contents (so they can be compared, deduplicated and cached)."""
    import subprocess
    import sys

    from safetensors.torch import load

    files = []
    for i in range(3):
        lat, model = tmp_path / f"{i}.safetensors", tmp_path / f"m{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE_IN_A_CHILD, str(lat), str(model)], check=True)
        files.append((lat.read_bytes(), model.read_bytes()))
    assert all(f == files[0] for f in files[1:])
    latent_bytes, model_bytes = files[0]
    assert len(latent_bytes) % 8 == int.from_bytes(latent_bytes[:8], "little") % 8 == 0
    tensors = load(latent_bytes)  # the library reads what vqcli wrote
    assert torch.equal(tensors["latent"], torch.arange(4 * 9 * 17, dtype=torch.float32).reshape(4, 9, 17) / 7)
    torch.manual_seed(0)
    reference = AutoEncoder(KL).state_dict()
    loaded = load(model_bytes)
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert read_latent(tmp_path / "0.safetensors").meta.source == "dir/a.png"
    assert load_native(tmp_path / "m0.safetensors").config == KL


def test_vq_indices_are_int16_or_int32(tmp_path, vq_model):
    meta = make_meta(vq_model, source="a.png", width=8, height=6, model_name="vq", model_embedded=False,
                     representation="indices")
    idx = torch.randint(0, 64, meta.latent_shape)
    write_latent(tmp_path / "v.safetensors", idx, meta)
    latent = read_latent(tmp_path / "v.safetensors")
    assert latent.tensor.dtype == torch.int16 and torch.equal(latent.tensor.long(), idx)
    big = AutoEncoder(VQ.replace(n_embed=40000))
    meta = make_meta(big, source="a.png", width=8, height=6, model_name="big", model_embedded=False,
                     representation="indices")
    write_latent(tmp_path / "big.safetensors", torch.full(meta.latent_shape, 39999), meta)
    latent = read_latent(tmp_path / "big.safetensors")
    assert latent.tensor.dtype == torch.int32 and int(latent.tensor.max()) == 39999


def test_write_is_atomic_and_does_not_overwrite(tmp_path, kl_model):
    _kl_file(tmp_path / "a.safetensors", kl_model)
    before = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        _kl_file(tmp_path / "a.safetensors", kl_model)
    assert (tmp_path / "a.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# --- refusals -----------------------------------------------------------------------------------


def _rewrite(path: Path, tensor=None, extra: dict | None = None, drop: str | None = None, tensors=None) -> None:
    with safe_open(str(path), "pt") as f:
        meta, latent = f.metadata(), f.get_tensor("latent")
    meta.update(extra or {})
    if drop:
        del meta[drop]
    save_file(tensors or {"latent": latent if tensor is None else tensor}, str(path), metadata=meta)


CORRUPTIONS = [
    ("wrong shape", dict(tensor=torch.zeros(4, 9, 16)), "latent has shape (4, 9, 16)"),
    ("wrong channels", dict(tensor=torch.zeros(3, 9, 17)), "metadata implies (4, 9, 17)"),
    ("wrong rank", dict(tensor=torch.zeros(9, 17)), "latent has shape (9, 17)"),
    ("wrong dtype", dict(tensor=torch.zeros(4, 9, 17, dtype=torch.float16)), "is float16 but its metadata says float32"),
    ("nan", dict(tensor=torch.zeros(4, 9, 17).index_fill_(0, torch.tensor([1]), float("nan"))), "153 NaN or infinite"),
    ("inf", dict(tensor=torch.zeros(4, 9, 17).index_fill_(2, torch.tensor([0]), float("inf"))), "36 NaN or infinite"),
    ("two tensors", dict(tensors={"latent": torch.zeros(4, 9, 17), "x": torch.zeros(1)}), "holds a tensor named 'latent' and maybe latent_flipped"),
    ("renamed tensor", dict(tensors={"z": torch.zeros(4, 9, 17)}), "holds a tensor named 'latent'"),
    ("not vqcli", dict(extra={"format": "something"}), "not a vqcli latent file"),
    ("version", dict(extra={"format_version": "2"}), "format version '2' is not supported"),
    ("missing width", dict(drop="width"), "lacks 'width'"),
    ("bad width", dict(extra={"width": "33px"}), "width='33px' is not an integer"),
    ("negative height", dict(extra={"height": "-17"}), "height='-17' is not an integer"),
    ("huge width", dict(extra={"width": "999999999"}), "is not an integer in [1, 1048576]"),
    ("padding lies", dict(extra={"padded_width": "36"}), "pads it to 34x18"),
    ("size and padding disagree", dict(extra={"width": "40"}), "but the model's factor 2 pads it to 40x18"),
    ("bad sha", dict(extra={"model_sha256": "abc"}), "not a SHA-256"),
    ("bad config json", dict(extra={"model_config": "{nope"}), "bad model_config"),
    ("config not object", dict(extra={"model_config": "[1, 2]"}), "bad model_config"),
    ("deep config", dict(extra={"model_config": "[" * 100000 + "]" * 100000}), "bad model_config"),
    ("bad config", dict(extra={"model_config": json.dumps({**KL.to_dict(), "ch": 33})}), "bad model_config"),
    ("kind lies", dict(extra={"kind": "vq"}), "contradicts its model config"),
    ("representation", dict(extra={"representation": "indices"}), "representation 'indices' is not one of"),
    ("dtype name", dict(extra={"dtype": "float64"}), "latent dtype 'float64' is not one of"),
    ("scale nan", dict(extra={"scale_factor": "nan"}), "scale_factor='nan' is not a finite number"),
    ("scale zero", dict(extra={"scale_factor": "0"}), "scale_factor is 0"),
    ("scaled word", dict(extra={"scaled": "yes"}), "scaled='yes' is not true or false"),
    ("seed", dict(extra={"seed": "-1"}), "seed='-1' is not an integer"),
]


@pytest.mark.parametrize("case, change, message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_latents_are_refused(tmp_path, kl_model, case, change, message):
    path = tmp_path / "a.safetensors"
    _kl_file(path, kl_model)
    _rewrite(path, **change)
    with pytest.raises(FileError) as e:
        read_latent(path)
    assert e.value.path == str(path)
    assert message in e.value.reason, e.value.reason
    assert "\n" not in str(e.value)


def test_vq_index_range_and_type(tmp_path, vq_model):
    meta = make_meta(vq_model, source="a.png", width=8, height=6, model_name="vq", model_embedded=False,
                     representation="indices")
    path = tmp_path / "v.safetensors"
    write_latent(path, torch.zeros(meta.latent_shape, dtype=torch.long), meta)
    _rewrite(path, tensor=torch.full(meta.latent_shape, 64, dtype=torch.int16))
    with pytest.raises(FileError, match=r"indices range over \[64, 64\], outside \[0, 63\]"):
        read_latent(path)
    _rewrite(path, tensor=torch.full(meta.latent_shape, -1, dtype=torch.int16))
    with pytest.raises(FileError, match="outside"):
        read_latent(path)
    _rewrite(path, tensor=torch.zeros(meta.latent_shape))
    with pytest.raises(FileError, match="float32 but its metadata says int16"):
        read_latent(path)
    _rewrite(path, tensor=torch.zeros(meta.latent_shape, dtype=torch.int16), extra={"scaled": "true"})
    with pytest.raises(FileError, match="cannot be scaled"):
        read_latent(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage" * 10, b"\xff" * 8 + b"{}"])
def test_not_safetensors_at_all(tmp_path, content):
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(FileError, match="safetensors"):
        read_latent(tmp_path / "x.safetensors")


def test_folder_and_truncated_file(tmp_path, kl_model):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(FileError, match="is a folder"):
        read_latent(tmp_path / "d.safetensors")
    _kl_file(tmp_path / "a.safetensors", kl_model)
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[:-100])
    with pytest.raises(FileError, match="truncated|outside the file"):
        read_latent(tmp_path / "a.safetensors")


def test_a_latent_from_another_model_is_refused(tmp_path, kl_model):
    _kl_file(tmp_path / "a.safetensors", kl_model)
    meta = read_latent(tmp_path / "a.safetensors").meta
    check_model(tmp_path / "a.safetensors", meta, kl_model, "--model kl")  # its own model: fine
    torch.manual_seed(5)
    other = AutoEncoder(KL).eval()
    with pytest.raises(FileError) as e:
        check_model(tmp_path / "a.safetensors", meta, other, "--model other.safetensors")
    assert "made by model 'kl.safetensors'" in e.value.reason and "not by --model other.safetensors" in e.value.reason
    assert kl_model.identity()[:12] in e.value.reason and other.identity()[:12] in e.value.reason
    # and the chooser applies the same check
    with pytest.raises(FileError, match="made by model"):
        ModelChooser(other, "--model other")(tmp_path / "a.safetensors", meta)


def test_scaled_latents_are_decoded_with_the_files_factors(tmp_path, kl_model):
    meta = make_meta(kl_model, source="a.png", width=8, height=8, model_name="kl", model_embedded=False,
                     representation="mean", scaled=True)
    path = tmp_path / "s.safetensors"
    write_latent(path, torch.zeros(meta.latent_shape), meta)
    _rewrite(path, extra={"scale_factor": "0.5", "shift_factor": "0.25"})
    latent = read_latent(path)
    model = ModelChooser(kl_model, "--model kl")(path, latent.meta)
    assert (model.config.scale_factor, model.config.shift_factor) == (0.5, 0.25)
    assert kl_model.config.scale_factor == 1.0  # the shared model is left as it was
    assert model.identity() == kl_model.identity()
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z, scaled=True), kl_model.decode(z / 0.5 + 0.25))


# --- fuzz ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory, kl_model) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "a.safetensors"
    _kl_file(path, kl_model, width=6, height=5)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_raise_only_file_errors(tmp_path, valid_bytes, data):
    """Flipped, cut or inserted bytes anywhere: the reader returns a valid latent or a FileError."""
    raw = bytearray(valid_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 64))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        latent = read_latent(path)
    except FileError as e:
        assert e.path == str(path)
        return
    assert tuple(latent.tensor.shape) == latent.meta.latent_shape
    assert bool(torch.isfinite(latent.tensor).all())
