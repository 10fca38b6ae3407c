"""The native weights file: bit-exact round trip, atomic writes, clear errors for bad files, identity."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import vqcli.checkpoints.native
from vqcli import AutoEncoder, AutoEncoderConfig, FileError
from vqcli.checkpoints.native import (
    FORMAT,
    FORMAT_VERSION,
    load_native,
    read_native,
    save_native,
)
from vqcli.io.atomic import TMP_PREFIX
from vqcli.io.safetensors import read_safetensors
from vqcli.model.autoencoder import load_strict

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=4)


def make_model(kind="kl", seed=0, **changes) -> AutoEncoder:
    torch.manual_seed(seed)
    extra = dict(n_embed=16) if kind == "vq" else {}
    return AutoEncoder(AutoEncoderConfig(kind=kind, **extra, **{**TINY, **changes})).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A KL model with non-default config fields, and its native file (read-only for the tests)."""
    model = make_model(scale_factor=0.18215, shift_factor=0.1159, name="tiny-kl", embed_dim=3)
    path = tmp_path_factory.mktemp("native") / "tiny.safetensors"
    save_native(model, path)
    return model, path


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


# --- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_round_trip_is_bit_exact(tmp_path, kind):
    model = make_model(kind, seed=3)
    path = tmp_path / f"{kind}.safetensors"
    save_native(model, path)
    loaded = load_native(path)
    assert not loaded.training  # ready for inference, like the checkpoint readers' models
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.identity() == model.identity()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))
    assert leftovers(tmp_path) == []


def test_file_is_plain_safetensors_with_config_and_version_in_metadata(saved):
    model, path = saved
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
        conv = f.get_tensor("encoder.conv_in.weight")
    assert metadata["format"] == FORMAT == "vqcli.weights"
    assert metadata["format_version"] == str(FORMAT_VERSION)
    config = json.loads(metadata["config"])
    assert config["scale_factor"] == 0.18215 and config["shift_factor"] == 0.1159 and config["name"] == "tiny-kl"
    assert AutoEncoderConfig.from_dict(config) == model.config
    assert keys == set(model.state_dict())
    assert torch.equal(conv, model.encoder.conv_in.weight)


def test_read_native_returns_config_and_tensors(saved):
    model, path = saved
    config, state = read_native(path)
    assert config == model.config
    assert set(state) == set(model.state_dict())


# --- atomic saving ----------------------------------------------------------------------------------


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = make_model()

    def broken(f, tensors, metadata=None):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vqcli.checkpoints.native, "write_safetensors", broken)
    target = tmp_path / "out.safetensors"
    with pytest.raises(OSError, match="No space left"):
        save_native(model, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, saved):
    _, good = saved
    target = tmp_path / "model.safetensors"
    target.write_bytes(good.read_bytes())

    def broken(f, tensors, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(vqcli.checkpoints.native, "write_safetensors", broken)
    with pytest.raises(KeyboardInterrupt):
        save_native(make_model(seed=5), target)
    assert target.read_bytes() == good.read_bytes()
    assert leftovers(tmp_path) == []


def test_save_without_overwrite_refuses_an_existing_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        save_native(make_model(), target, overwrite=False)
    assert target.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []
    save_native(make_model(), target)  # overwriting is the default
    assert load_native(target).identity() == make_model().identity()


def test_save_creates_missing_folders_and_gives_usual_permissions(tmp_path):
    target = tmp_path / "a" / "b" / "model.safetensors"
    save_native(make_model(), target)
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert leftovers(target.parent) == []


# --- bad files ----------------------------------------------------------------------------------------


def raw_safetensors(header: dict | list | str, data: bytes = b"") -> bytes:
    head = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(head)) + head + data


def assert_file_error(path, *fragments):
    with pytest.raises(FileError) as info:
        load_native(path)
    error = info.value
    assert error.path == str(path)
    message = str(error)
    assert message.startswith(f"{path}: ") and "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in error.reason, error.reason
    return error.reason


def test_missing_file(tmp_path):
    assert_file_error(tmp_path / "nowhere.safetensors", "No such file")


def test_a_folder(tmp_path):
    assert_file_error(tmp_path, "directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_file_error(path, "not a safetensors file", "only 0 bytes")


@pytest.mark.parametrize("where", ["length", "header", "data", "last byte"])
def test_truncated_file(tmp_path, saved, where):
    _, good = saved
    data = good.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    cut = {"length": 5, "header": 8 + header_len // 2, "data": 8 + header_len + 1000, "last byte": len(data) - 1}
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: cut[where]])
    reason = assert_file_error(path)
    assert "safetensors" in reason or "truncated" in reason


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    assert_file_error(path, "not a safetensors file")


def test_header_claiming_a_huge_length(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}" + bytes(100))
    assert_file_error(path, f"header of {2**62} bytes does not fit in 110 bytes")


def test_header_that_is_not_json_or_not_an_object(tmp_path):
    path = tmp_path / "garbled.safetensors"
    path.write_bytes(raw_safetensors("{not json", bytes(8)))
    assert_file_error(path, "header is not valid JSON")
    path.write_bytes(raw_safetensors([1, 2, 3], bytes(8)))
    assert_file_error(path, "header is not a JSON object")
    path.write_bytes(raw_safetensors("[" * 100_000 + "]" * 100_000))
    assert_file_error(path, "header is a heap of brackets")  # (refused before it is parsed)


@pytest.mark.parametrize(
    "offsets",
    [[0, 64], [32, 16], [-4, 8], [0, "16"], [0], None],
)
def test_tensor_offsets_outside_the_data(tmp_path, offsets):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}
    path = tmp_path / "offsets.safetensors"
    path.write_bytes(raw_safetensors(header, bytes(16)))
    assert_file_error(path, "tensor 'w' lies outside the file")


def test_tensor_size_disagreeing_with_its_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}
    path = tmp_path / "shape.safetensors"
    path.write_bytes(raw_safetensors(header, bytes(16)))
    assert_file_error(path, "not a readable safetensors file")


def test_metadata_that_is_not_strings(tmp_path):
    header = {"__metadata__": {"format": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    path = tmp_path / "meta.safetensors"
    path.write_bytes(raw_safetensors(header, bytes(4)))
    assert_file_error(path, "metadata must map strings to strings")


def test_safetensors_file_without_vqcli_metadata(tmp_path, saved):
    model, _ = saved
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert_file_error(path, "not a vqcli weights file")
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    assert_file_error(path, "not a vqcli weights file")


def with_metadata(tmp_path, model, **metadata):
    path = tmp_path / "meta.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata={"format": FORMAT, **metadata})
    return path


def test_unsupported_format_version(tmp_path, saved):
    model, _ = saved
    path = with_metadata(tmp_path, model, format_version="99", config=json.dumps(model.config.to_dict()))
    assert_file_error(path, "format version 99 is not supported")


@pytest.mark.parametrize(
    "config",
    [None, "{broken", "[1, 2]", '{"ch": 32, "warp": 9}', '{"ch": 48}', '{"ch_mult": ["x"]}', '{"ch": 64.5}'],
)
def test_bad_config_in_metadata(tmp_path, saved, config):
    model, _ = saved
    extra = {} if config is None else {"config": config}
    path = with_metadata(tmp_path, model, format_version=str(FORMAT_VERSION), **extra)
    assert_file_error(path, "bad model config in metadata")


def test_weights_that_do_not_fit_their_config(tmp_path, saved):
    model, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.conv_out.bias"}
    path = tmp_path / "partial.safetensors"
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(model.config.to_dict())}
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    assert_file_error(path, "1 missing: decoder.conv_out.bias")
    # a config for another architecture with these weights: wrong shapes
    other = json.dumps(model.config.replace(z_channels=8, embed_dim=8).to_dict())
    safetensors.torch.save_file(dict(model.state_dict()), str(path), metadata={**metadata, "config": other})
    assert_file_error(path, "wrong shape")


def test_read_safetensors_gives_tensors_and_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.int16).view(2, 3), "b": torch.randn(4).to(torch.bfloat16)}
    safetensors.torch.save_file(tensors, str(path), metadata={"k": "v"})
    got, metadata = read_safetensors(path)
    assert metadata == {"k": "v"}
    assert set(got) == {"a", "b"}
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)


# --- identity -------------------------------------------------------------------------------------------


def test_identity_is_a_sha256_that_follows_the_weights(saved):
    model, _ = saved
    identity = model.identity()
    assert len(identity) == 64 and int(identity, 16) >= 0
    twin = make_model(scale_factor=0.18215, shift_factor=0.1159, name="tiny-kl", embed_dim=3)
    assert twin.identity() == identity  # same seed, same weights
    with torch.no_grad():
        twin.decoder.conv_out.bias[0] += 1e-6
    twin.invalidate_identity()
    assert twin.identity() != identity
    assert make_model(seed=1, embed_dim=3).identity() != identity


def test_identity_ignores_the_latent_factors_and_name(saved):
    model, _ = saved
    other = AutoEncoder(model.config.replace(scale_factor=1.0, shift_factor=0.0, name="renamed"))
    load_strict(other, model.state_dict(), "memory")
    assert other.identity() == model.identity()


def test_identity_is_independent_of_the_file_format(tmp_path, saved):
    model, native = saved
    pt = tmp_path / "weights.pt"
    torch.save(dict(reversed(list(model.state_dict().items()))), pt)  # other format, other key order
    from_pt = AutoEncoder(model.config)
    load_strict(from_pt, torch.load(pt, weights_only=True), pt)
    from_native = load_native(native)
    assert from_pt.identity() == from_native.identity() == model.identity()


def test_load_strict_refreshes_a_cached_identity(saved):
    model, _ = saved
    target = make_model(seed=7, embed_dim=3)
    stale = target.identity()
    load_strict(target, model.state_dict(), "memory")
    assert target.identity() == model.identity() != stale
