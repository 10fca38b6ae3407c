"""Hostile latent files, all in one folder, through the installed ``vqcli decode``.

tests/test_latents.py checks ``read_latent`` on each corrupted field; this file checks what a user
sees when a folder holds many such files at once: exit code 1, exactly one one-line error per bad
file naming it and the reason, no traceback, every good file in the same run decoded, and
nothing written anywhere but the output folder, whatever paths a file's metadata names.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import save_native
from vqcli.errors import FileError
from vqcli.io.latents import make_meta, read_latent, write_latent
from vqcli.pipeline.decode import decode_array

from .conftest import run

KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


def tiny_model(seed: int) -> AutoEncoder:
    torch.manual_seed(seed)
    return AutoEncoder(KL).eval()


def raw_safetensors(header, data: bytes = b"") -> bytes:
    head = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(head)) + head + data


def write_good(path: Path, model: AutoEncoder, width: int, height: int, seed: int, **meta_kw) -> torch.Tensor:
    meta = make_meta(model, source=meta_kw.pop("source", path.name[: -len(".safetensors")]), width=width,
                     height=height, model_name="a.safetensors", model_embedded=False, representation="mean", **meta_kw)
    z = torch.randn(meta.latent_shape, generator=torch.Generator().manual_seed(seed))
    write_latent(path, z, meta)
    return z


def rewrite(path: Path, tensor=None, **metadata) -> None:
    """The latent file at ``path`` with another tensor and/or changed metadata fields."""
    with safe_open(str(path), "pt") as f:
        meta, latent = f.metadata(), f.get_tensor("latent")
    meta.update(metadata)
    save_file({"latent": latent if tensor is None else tensor}, str(path), metadata=meta)


def snapshot(root: Path, skip: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A folder of good and hostile latents, the model that made the good ones, and what each bad
    file must be refused for."""
    root = tmp_path_factory.mktemp("hostile-latents")
    a, b = tiny_model(0), tiny_model(1)
    save_native(a, root / "a.safetensors")
    d = root / "latents"
    d.mkdir()
    good = {
        "good1.png.safetensors": (33, 17, 1),
        "good2.png.safetensors": (8, 8, 2),
    }
    expected_z = {}
    for name, (w, h, seed) in good.items():
        expected_z[name] = (write_good(d / name, a, w, h, seed), w, h)
    # Valid latents whose metadata tries to steer where the output goes: decoded, but named after the
    # input file alone, inside the output folder.
    escape_rel = "../../../escaped-rel.png"
    escape_abs = str(root / "outside" / "escaped-abs.png")
    steer = {
        "steer-rel.png.safetensors": dict(source=escape_rel),
        "steer-abs.png.safetensors": dict(source=escape_abs),
    }
    for i, (name, kw) in enumerate(steer.items()):
        expected_z[name] = (write_good(d / name, a, 12, 10, 10 + i, **kw), 12, 10)
    rewrite(d / "steer-abs.png.safetensors", model="../../model.safetensors")

    bad: dict[str, str] = {}

    def add(name: str, content: bytes | None, reason: str) -> Path:
        if content is not None:
            (d / name).write_bytes(content)
        bad[name] = reason
        return d / name

    template = d / "good1.png.safetensors"
    data = template.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    add("zero-bytes.safetensors", b"", "only 0 bytes")
    add("truncated-length.safetensors", data[:5], "only 5 bytes")
    add("truncated-header.safetensors", data[: 8 + n // 2], "does not fit")
    add("truncated-data.safetensors", data[:-100], "lies outside the file")
    add("header-claims-a-terabyte.safetensors", struct.pack("<Q", 2**40) + data[8:],
        f"header of {2**40} bytes does not fit")
    add("header-not-json.safetensors", raw_safetensors("{nope", bytes(8)), "header is not valid JSON")
    add("header-deeply-nested.safetensors", raw_safetensors("[" * 100_000 + "]" * 100_000), "heap of brackets")  # refused before parsing
    add("header-huge-integer.safetensors", raw_safetensors('{"latent": ' + "9" * 5000 + "}"), "not valid JSON")
    add("header-not-object.safetensors", raw_safetensors([1, 2, 3], bytes(8)), "not a JSON object")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    add("offsets-overlap.safetensors", raw_safetensors({
        "__metadata__": meta,
        "latent": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "other": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }, bytes(12)), "tensors 'latent' and 'other' overlap")
    add("offsets-past-end.safetensors", raw_safetensors({
        "__metadata__": meta, "latent": {"dtype": "F32", "shape": [4, 9, 17], "data_offsets": [0, 2448]},
    }, bytes(100)), "tensor 'latent' lies outside the file")
    add("shape-claims-terabytes.safetensors", raw_safetensors({
        "__metadata__": meta, "latent": {"dtype": "F32", "shape": [4, 2**20, 2**20], "data_offsets": [0, 16]},
    }, bytes(16)), "claims shape [4, 1048576, 1048576] of F32")

    def variant(name: str, reason: str, tensor=None, **metadata) -> None:
        path = d / name
        path.write_bytes(data)
        rewrite(path, tensor, **metadata)
        add(name, None, reason)

    variant("wrong-dtype.safetensors", "latent tensor is float16 but its metadata says float32",
            torch.zeros(4, 9, 17, dtype=torch.float16))
    variant("wrong-rank.safetensors", "latent has shape (9, 17)", torch.zeros(9, 17))
    variant("wrong-channels.safetensors", "latent has shape (3, 9, 17)", torch.zeros(3, 9, 17))
    nan = torch.zeros(4, 9, 17)
    nan[1, 2, 3] = float("nan")
    variant("nan.safetensors", "1 NaN or infinite", nan)
    inf = torch.zeros(4, 9, 17)
    inf[0, :, 0] = float("inf")
    variant("inf.safetensors", "9 NaN or infinite", inf)
    variant("config-deeply-nested.safetensors", "bad model_config", model_config="[" * 100_000 + "]" * 100_000)
    variant("width-absurd.safetensors", "is not an integer in [1, 1048576]", width="99999999")
    variant("not-vqcli.safetensors", "not a vqcli latent file", format="something-else")
    # consistent in itself (3 channels, a config saying 3) but not what the model it names has (4)
    variant("channels-not-the-models.safetensors", "its model config says latent_channels=3, but the model with "
            "the same weights has 4", torch.zeros(3, 9, 17),
            model_config=json.dumps(KL.replace(z_channels=3, embed_dim=3).to_dict()))
    # a latent from another model (same architecture, other weights)
    write_good(d / "other-model.png.safetensors", b, 33, 17, 3)
    add("other-model.png.safetensors", None, "made by model")
    # ... whose metadata also holds control characters meant to break the one-line message
    write_good(d / "other-model-escapes.png.safetensors", b, 8, 8, 4)
    rewrite(d / "other-model-escapes.png.safetensors", model="evil\n\x1b[2Ja second line")
    add("other-model-escapes.png.safetensors", None, r"made by model 'evil\n\x1b[2Ja second line'")
    return {"root": root, "folder": d, "model": root / "a.safetensors", "bad": bad, "good": expected_z,
            "escapes": [escape_rel, escape_abs], "a": a}


@pytest.mark.slow
def test_decode_over_a_folder_of_hostile_latents(hostile, tmp_path):
    root, folder, bad = hostile["root"], hostile["folder"], hostile["bad"]
    out = root / "out"
    before = snapshot(root, out)
    done = run("decode", folder, "-o", out, "--model", hostile["model"], "--json")

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(bad), "\n".join(lines)
    for name, reason in bad.items():
        mine = [line for line in lines if line.startswith(f"{folder / name}: ")]
        assert len(mine) == 1, (name, lines)
        assert reason in mine[0], (name, mine[0])
    summary = json.loads(done.stdout)
    assert summary["failed"] == len(bad) and summary["done"] == len(hostile["good"])
    assert {f["path"] for f in summary["failures"]} == {str(folder / name) for name in bad}

    # every good file decoded, to exactly what the model gives for its latent
    expected_names = {name[: -len(".safetensors")] for name in hostile["good"]}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == expected_names
    for name, (z, w, h) in hostile["good"].items():
        image = np.asarray(Image.open(out / name[: -len(".safetensors")]).convert("RGB"))
        want = np.clip(np.rint(decode_array(hostile["a"], z, h, w) * 255), 0, 255).astype(np.uint8)
        assert image.shape == (h, w, 3)
        assert np.abs(image.astype(int) - want.astype(int)).max() <= 1, name

    # nothing written or changed outside the output folder, whatever the metadata said
    assert snapshot(root, out) == before
    for escape in hostile["escapes"]:
        target = Path(escape) if Path(escape).is_absolute() else (out / escape)
        assert not target.exists() and not target.resolve().exists()
    assert not (root / "outside").exists()


def test_metadata_never_names_the_output(hostile, tmp_path):
    """The library's view of the same files: ``source`` is kept as information only."""
    latent = read_latent(hostile["folder"] / "steer-rel.png.safetensors")
    assert latent.meta.source == hostile["escapes"][0]
    from vqcli.pipeline.jobs import latent_jobs

    jobs = list(latent_jobs([hostile["folder"]], tmp_path / "out", "png"))
    outputs = {Path(j.output) for j in jobs}
    assert all(tmp_path / "out" in o.parents for o in outputs)
    assert tmp_path / "out" / "steer-rel.png" in outputs and tmp_path / "out" / "steer-abs.png" in outputs


def test_a_bad_header_is_refused_before_the_tensor_is_read(hostile, tmp_path, monkeypatch):
    """A latent whose header does not fit its metadata costs no memory: its tensor is never read,
    whatever it claims to hold (here a real 32 MB tensor where the metadata implies 2 KB)."""
    path = tmp_path / "big.png.safetensors"
    path.write_bytes((hostile["folder"] / "good1.png.safetensors").read_bytes())
    rewrite(path, torch.zeros(4, 1024, 2048))
    import vqcli.io.latents as lat

    def must_not_read(*a, **k):
        raise AssertionError("the tensor was read")

    monkeypatch.setattr(lat, "read_safetensors", must_not_read)
    with pytest.raises(FileError, match=r"latent has shape \(4, 1024, 2048\), but its metadata implies \(4, 9, 17\)"):
        read_latent(path)
    rewrite(path, torch.zeros(4, 9, 17, dtype=torch.bfloat16))
    with pytest.raises(FileError, match="bfloat16 but its metadata says float32"):
        read_latent(path)
    # control: a good file does get to reading the tensor
    with pytest.raises(AssertionError, match="the tensor was read"):
        read_latent(hostile["folder"] / "good1.png.safetensors")
