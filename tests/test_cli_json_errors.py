"""``--json`` on fatal errors (issue 17, finding 15): one JSON object on stdout with ``command``,
``ok: false`` and ``error``, and the exit code; the message also on stderr, as without --json."""

from __future__ import annotations

import json

import pytest
from _scaleout import photo, save_model
from PIL import Image
from typer.testing import CliRunner

from vqcli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("json-errors")
    Image.fromarray(photo(16, 16)).save(root / "a.png")
    (root / "bad.jsonl").write_text("this is not json\n")
    (root / "notamodel.safetensors").write_bytes(b"\x00" * 40)
    save_model(root / "m.safetensors")
    return root


def cases(root):
    img, bad_model = root / "a.png", root / "notamodel.safetensors"
    return {
        "missing option": (["encode", img, "--json"], 2, "encode", "--output"),
        "bad option value": (["decode", root, "-o", root / "o", "--batch-size", "0", "--json"], 2, "decode", "--batch-size"),
        "bad value checked by the command": (["decode", root, "-o", root / "o", "--format", "bmp", "--json"], 2, "decode", "bmp"),
        "unknown option": (["roundtrip", img, "-o", root / "o", "--nope", "--json"], 2, "roundtrip", "--nope"),
        "model that fails to load": (["encode", img, "-o", root / "o", "--model", bad_model, "--json"], 1, "encode", "notamodel"),
        "model missing": (["roundtrip", img, "-o", root / "o", "--model", root / "none.safetensors", "--json"], None, "roundtrip", "none.safetensors"),
        "bad manifest": (["encode", "--from-manifest", root / "bad.jsonl", "-o", root / "o", "--model", root / "m.safetensors", "--json"], None, "encode", "bad.jsonl"),
        "features, no image": (["features", root / "none.png", "--json"], 2, "features", "none.png"),
        "convert, bad source": (["convert", bad_model, "-o", root / "c.safetensors", "--json"], 1, "convert", "notamodel"),
        "train, bad option": (["train", root, "-o", root / "t.safetensors", "--ch-mult", "x,y", "--json"], 2, "train", "x,y"),
    }


@pytest.mark.parametrize("case", list(cases(__import__("pathlib").Path("."))))
def test_fatal_errors_give_one_json_object(files, case):
    args, code, command, named = cases(files)[case]
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code != 0 and (code is None or r.exit_code == code), (r.exit_code, r.stdout, r.stderr)
    obj = json.loads(r.stdout)  # exactly one JSON document: nothing else on stdout
    assert obj["command"] == command and obj["ok"] is False, obj
    assert named in obj["error"] and "\n" not in obj["error"].strip(), obj
    assert obj["exit_code"] == r.exit_code
    assert r.stderr.strip(), "the message goes to stderr too"
    assert "Traceback" not in r.stderr


def test_without_json_stdout_stays_empty_on_errors(files):
    r = runner.invoke(app, ["encode", str(files / "a.png")])
    assert r.exit_code == 2 and r.stdout == ""
