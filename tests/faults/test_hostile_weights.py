"""Hostile weights files: through the installed ``vqcli info`` (many files in one run) and as
``--model`` of ``vqcli encode`` (one file per run, in process).

Each is refused with one line naming the file and the reason: no traceback, no output written, no
allocation of what a file claims, and no code from a pickle ever run (a payload that would
create a marker file, which must not exist afterwards). tests/test_native.py and
tests/test_checkpoints.py check the readers' messages case by case; this is the user's view.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.convert import save_diffusers
from vqcli.checkpoints.native import FORMAT, FORMAT_VERSION, save_native
from vqcli.checkpoints.read import TRAIN_CHECKPOINT_FORMAT, load_checkpoint
from vqcli.cli import app
from vqcli.errors import FileError

from .conftest import run

KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


class BoobyTrap:
    """Unpickling this runs ``os.mkdir(marker)``: the marker's existence proves code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def raw_safetensors(header, data: bytes = b"") -> bytes:
    head = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(head)) + head + data


def native_metadata(config: dict | str) -> dict[str, str]:
    text = config if isinstance(config, str) else json.dumps(config)
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": text}


@pytest.fixture(scope="module")
def model() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder(KL).eval()


@pytest.fixture(scope="module")
def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def legacy_storage_claim(path: Path) -> None:
    """A legacy (non-zip) torch file whose pickle claims a storage of 2**31-1 floats (8 GB)."""
    n = 123457
    torch.save({"encoder.conv_in.weight": torch.zeros(n)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    needle = b"J" + struct.pack("<i", n)  # BININT n, in the storage's persistent id
    assert needle in data
    path.write_bytes(data.replace(needle, b"J" + struct.pack("<i", 2**31 - 1)))


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory, model, state):
    """Good and hostile weights files side by side, and what each bad one must be refused for."""
    root = tmp_path_factory.mktemp("hostile-weights")
    d = root / "weights"
    d.mkdir()
    marker = root / "pwned"
    save_native(model, d / "good.safetensors")
    good = (d / "good.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    bad: dict[str, str] = {}

    def add(name: str, content: bytes | None, reason: str) -> None:
        if content is not None:
            (d / name).write_bytes(content)
        bad[name] = reason

    add("zero-bytes.safetensors", b"", "only 0 bytes")
    add("truncated.safetensors", good[: len(good) // 2], "lies outside the file")
    add("header-claims-a-terabyte.safetensors", struct.pack("<Q", 2**40) + good[8:], "does not fit")
    add("header-not-json.safetensors", raw_safetensors("{nope", bytes(8)), "header is not valid JSON")
    add("header-deeply-nested.safetensors", raw_safetensors("[" * 100_000 + "]" * 100_000), "heap of brackets")  # refused before parsing
    add("header-huge-integer.safetensors", raw_safetensors('{"a": ' + "7" * 5000 + "}"), "not valid JSON")
    first, second = [k for k in header if k != "__metadata__"][:2]
    overlap = dict(header)
    overlap[second] = {**header[second], "data_offsets": [header[first]["data_offsets"][0], header[second]["data_offsets"][1] - 4]}
    overlap[second]["data_offsets"][1] = overlap[second]["data_offsets"][0] + (
        header[second]["data_offsets"][1] - header[second]["data_offsets"][0])
    add("offsets-overlap.safetensors", raw_safetensors(overlap, good[8 + n :]), "overlap")
    past = dict(header)
    past[first] = {**header[first], "data_offsets": [len(good), len(good) + 4 * 32 * 27]}
    add("offsets-past-end.safetensors", raw_safetensors(past, good[8 + n :]), "lies outside the file")
    shape = dict(header)
    shape[first] = {**header[first], "shape": [2**20, 2**20, 3, 3]}
    add("shape-claims-terabytes.safetensors", raw_safetensors(shape, good[8 + n :]), "claims shape [1048576, 1048576, 3, 3]")

    save_file(state, str(d / "config-asks-368TB.safetensors"), metadata=native_metadata({**KL.to_dict(), "ch": 32 * 100_000}))
    bad["config-asks-368TB.safetensors"] = "weights do not match the model"
    save_file(state, str(d / "config-3000-levels.safetensors"), metadata=native_metadata({**KL.to_dict(), "ch_mult": [1] * 3000}))
    bad["config-3000-levels.safetensors"] = "needs more tensors than the 124"
    save_file(state, str(d / "config-deeply-nested.safetensors"), metadata=native_metadata("[" * 100_000 + "]" * 100_000))
    bad["config-deeply-nested.safetensors"] = "bad model config"
    nan = dict(state, **{"decoder.conv_out.weight": state["decoder.conv_out.weight"].clone()})
    nan["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, str(d / "nan.safetensors"), metadata=native_metadata(KL.to_dict()))
    bad["nan.safetensors"] = "1 NaN or infinite value(s) in decoder.conv_out.weight"
    wrong_dtype = dict(state, **{"encoder.conv_in.weight": state["encoder.conv_in.weight"].to(torch.int32)})
    save_file(wrong_dtype, str(d / "int-weights.safetensors"), metadata=native_metadata(KL.to_dict()))
    bad["int-weights.safetensors"] = "not floating point, e.g. encoder.conv_in.weight (int32)"
    rank = dict(state, **{"decoder.conv_in.weight": torch.zeros(5)})
    save_file(rank, str(d / "wrong-rank.safetensors"), metadata=native_metadata(KL.to_dict()))
    bad["wrong-rank.safetensors"] = "wrong shape: decoder.conv_in.weight (5,)"

    # pickles
    torch.save({**state, "evil": BoobyTrap(marker)}, d / "runs-code.ckpt")
    bad["runs-code.ckpt"] = "refused: it references posix.mkdir"
    torch.save({"state_dict": state, "hyper_parameters": BoobyTrap(marker)}, d / "runs-code-legacy.pt",
               _use_new_zipfile_serialization=False)
    bad["runs-code-legacy.pt"] = "refused: it references posix.mkdir"
    (d / "runs-code-plain.pth").write_bytes(pickle.dumps({"x": BoobyTrap(marker)}, protocol=2))
    bad["runs-code-plain.pth"] = "refused"
    legacy_storage_claim(d / "storage-claims-8GB.pt")
    bad["storage-claims-8GB.pt"] = "not a readable PyTorch checkpoint"
    (d / "garbage.ckpt").write_bytes(b"this is not a checkpoint" * 10)
    bad["garbage.ckpt"] = "not a readable PyTorch checkpoint"
    (d / "pickle-garbage.ckpt").write_bytes(b"\x80\x04 this is not a checkpoint" * 10)
    bad["pickle-garbage.ckpt"] = "refused: it uses pickle instruction"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8), "fc.weight": torch.zeros(10, 8)},
               d / "resnet.pt")
    bad["resnet.pt"] = "not an autoencoder of the ldm / taming / diffusers family"
    torch.save({"format": TRAIN_CHECKPOINT_FORMAT, "config": "[" * 100_000, "ema": {}}, d / "train-deep-config.ckpt")
    bad["train-deep-config.ckpt"] = "damaged vqcli training checkpoint"

    # a diffusers folder whose config.json divides by zero
    save_diffusers(model, d / "diffusers-zero-width")
    cfg = json.loads((d / "diffusers-zero-width" / "config.json").read_text())
    cfg.pop("_vqcli_config")
    cfg["block_out_channels"] = [0, 64]
    (d / "diffusers-zero-width" / "config.json").write_text(json.dumps(cfg))
    bad["diffusers-zero-width"] = "not positive widths"
    return {"folder": d, "bad": bad, "marker": marker, "good": d / "good.safetensors"}


@pytest.mark.slow
def test_info_over_a_folder_of_hostile_weights(weights_folder, model):
    d, bad = weights_folder["folder"], weights_folder["bad"]
    files = sorted(d.iterdir())
    done = run("info", *files, "--json")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(bad), "\n".join(lines)
    for name, reason in bad.items():
        mine = [line for line in lines if line.startswith(f"{d / name}: ")]
        assert len(mine) == 1, (name, lines)
        assert reason in mine[0], (name, mine[0])
    described = json.loads(done.stdout)["files"]
    assert [f["file"] for f in described] == [str(weights_folder["good"])]
    assert described[0]["model"]["sha256"] == model.identity()
    assert not weights_folder["marker"].exists(), "a pickle ran code"


def test_the_booby_trap_is_real(weights_folder, tmp_path):
    """Control: the same payload does run code under plain unpickling."""
    marker = tmp_path / "fired"
    pickle.loads(pickle.dumps(BoobyTrap(marker)))  # noqa: S301 - data this test just made
    assert marker.exists()


# --- as --model ---------------------------------------------------------------------------------


def original_layout(tmp: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(tmp / name))
    return tmp / name


def _nan(state):
    s = dict(state, **{"encoder.conv_in.weight": state["encoder.conv_in.weight"].clone()})
    s["encoder.conv_in.weight"][1] = float("inf")
    return s


MODEL_CASES = {
    # original-layout files (no vqcli metadata): the architecture is inferred from shapes
    "inf-weights": (lambda tmp, st: original_layout(tmp, "inf.safetensors", _nan(st)), "NaN or infinite value(s) in encoder.conv_in.weight"),
    "int8-weights": (lambda tmp, st: original_layout(tmp, "i8.safetensors", dict(st, **{"decoder.norm_out.weight": st["decoder.norm_out.weight"].to(torch.int8)})),
                     "not floating point"),
    "1-D conv": (lambda tmp, st: original_layout(tmp, "r.safetensors", dict(st, **{"decoder.conv_in.weight": torch.zeros(7)})),
                 "decoder.conv_in.weight has shape (7,), not that of a 2-D convolution's weight"),
    "empty conv": (lambda tmp, st: original_layout(tmp, "e.safetensors", dict(st, **{"encoder.conv_in.weight": torch.zeros(0, 3, 3, 3)})),
                   "encoder.conv_in.weight has shape (0, 3, 3, 3)"),
    "another architecture": (lambda tmp, st: original_layout(tmp, "unet.safetensors", {"time_embed.0.weight": torch.zeros(4, 4), "input_blocks.0.0.weight": torch.zeros(4, 3, 3, 3)}),
                             "not an autoencoder of the ldm / taming / diffusers family"),
    "a latent file": (lambda tmp, st: _latent_as_model(tmp), "not an autoencoder"),
    "video autoencoder": (lambda tmp, st: original_layout(tmp, "v.safetensors", dict(st, **{"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3, 3)})),
                          "a 3-D convolution, but this family is 2-D"),
    "yaml that runs code": (lambda tmp, st: _with_yaml(tmp, st, "model: !!python/object/apply:os.mkdir ['{marker}']\n"), "not valid YAML"),
    "yaml alias bomb": (lambda tmp, st: _with_yaml(tmp, st, _ALIAS_BOMB), "does not match the weights"),
    "pickle that runs code": (lambda tmp, st: _torch_save(tmp, {**st, "x": BoobyTrap(tmp / "marker")}), "refused: it references posix.mkdir"),
}

_ALIAS_BOMB = "".join(f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh")).replace(
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]", "b: &b [x,x,x,x,x,x,x,x,x]"
) + "model: {params: {ddconfig: {ch: *h}}}\n"


def _latent_as_model(tmp: Path) -> Path:
    save_file({"latent": torch.zeros(4, 2, 2)}, str(tmp / "x.png.safetensors"), metadata={"format": "vqcli.latent"})
    return tmp / "x.png.safetensors"


def _with_yaml(tmp: Path, state, text: str) -> Path:
    path = original_layout(tmp, "w.safetensors", state)
    (tmp / "w.yaml").write_text(text.replace("{marker}", str(tmp / "marker")))
    return path


def _torch_save(tmp: Path, obj) -> Path:
    torch.save(obj, tmp / "m.ckpt")
    return tmp / "m.ckpt"


@pytest.mark.parametrize("case", list(MODEL_CASES), ids=list(MODEL_CASES))
def test_hostile_file_as_model_is_one_clear_error(case, state, tmp_path):
    make, reason = MODEL_CASES[case]
    weights = make(tmp_path, state)
    # the file at fault is named: the weights, or the YAML config found beside them
    culprit = weights.with_suffix(".yaml") if case.startswith("yaml") else weights
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(images / "a.png")
    result = CliRunner().invoke(app, ["encode", str(images), "-o", str(tmp_path / "out"), "--model", str(weights), "--quiet"])
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{culprit}: " in lines[0] and reason in lines[0], lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "marker").exists()


def test_yaml_alias_bomb_message_stays_short(state, tmp_path):
    """A YAML whose aliases expand to millions of entries: refused quickly, in a short message."""
    path = _with_yaml(tmp_path, state, _ALIAS_BOMB)
    with pytest.raises(FileError) as e:
        load_checkpoint(path)
    assert len(str(e.value)) < 500 and "ch [[" in e.value.reason


def test_a_name_that_looks_like_markup_is_printed_as_it_is(state, tmp_path):
    weights = original_layout(tmp_path, "w[bold].safetensors", {"weird[/x].weight": torch.zeros(1)})
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(images / "a.png")
    result = CliRunner().invoke(app, ["encode", str(images), "-o", str(tmp_path / "out"), "--model", str(weights)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "weird[/x]" in result.stderr and "w[bold].safetensors" in result.stderr
