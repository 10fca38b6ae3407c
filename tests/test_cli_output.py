"""What the command line shows: one --json shape for every command, --version, flags shown as
flags, help for every option, shell completion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig, __version__
from vqcli.checkpoints.native import save_native
from vqcli.cli import app

runner = CliRunner()
KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
TINY_TRAIN = ["--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--z-channels", "4", "--crop", "16",
              "--batch-size", "2", "--no-bf16", "--device", "cpu", "--steps", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("out")
    torch.manual_seed(0)
    save_native(AutoEncoder(KL), d / "kl.safetensors")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / "img" / "a.png")
    return {"dir": d, "model": d / "kl.safetensors", "images": d / "img"}


def test_every_json_object_has_command_and_ok(setup):
    d, model, images = setup["dir"], str(setup["model"]), str(setup["images"])
    runs = {
        "encode": ["encode", images, "-o", str(d / "lat"), "--model", model],
        "decode": ["decode", str(d / "lat"), "-o", str(d / "rec"), "--model", model],
        "roundtrip": ["roundtrip", images, "-o", str(d / "rt"), "--model", model],
        "features": ["features", str(setup["images"] / "a.png"), "-o", str(d / "feat"), "--model", model],
        "info": ["info", model],
        "stats": ["stats", str(d / "lat")],
        "models": ["models"],
        "convert": ["convert", model, "-o", str(d / "conv.safetensors")],
        "train": ["train", images, "-o", str(d / "trained.safetensors"), *TINY_TRAIN],
    }
    for command, args in runs.items():
        r = runner.invoke(app, [*args, "--json"])
        assert r.exit_code == 0, (command, r.output)
        obj = json.loads(r.stdout)
        assert obj["command"] == command and obj["ok"] is True, obj
        assert list(obj)[:2] == ["command", "ok"]
    # a run where a file failed: ok is false, and the exit code 1
    (d / "bad").mkdir()
    (d / "bad" / "x.png").write_bytes(b"junk")
    r = runner.invoke(app, ["encode", str(d / "bad"), "-o", str(d / "lat2"), "--model", model, "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False
    r = runner.invoke(app, ["info", str(d / "bad" / "x.png"), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"vqcli {__version__}"


def _commands():
    group = typer.main.get_command(app)
    return group, {name: cmd for name, cmd in group.commands.items()}


def test_flags_are_shown_as_flags_and_every_option_has_help():
    group, commands = _commands()
    for name, cmd in commands.items():
        r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0
        assert "<bool>" not in r.stdout, name
        ctx = click.Context(cmd, info_name=name, parent=click.Context(group, info_name="vqcli"))
        for param in cmd.get_params(ctx):
            assert getattr(param, "help", None), f"vqcli {name} {param.opts} has no help"
    # a flag's line names no value, and the flag takes none
    r = runner.invoke(app, ["encode", "--help"], env={"COLUMNS": "200"})
    (line,) = [x for x in r.stdout.splitlines() if re.search(r"--sample\s", x)]
    assert re.search(r"--sample\s+KL models", line), line


def test_shell_completion_is_offered():
    r = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout


def test_progress_lines_without_a_terminal(setup, tmp_path, monkeypatch):
    """stderr is not a terminal under CliRunner: --progress auto gives plain lines, one per tenth
    of the inputs (the 30 s clock set out of reach), and one per result when the clock is at 0;
    none for --progress none, nor before the run is PROGRESS_AFTER old."""
    from vqcli.cli import common

    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    model = str(setup["model"])
    monkeypatch.setattr(common, "PROGRESS_AFTER", 0.0)  # (lines start once a run is 30 s old)
    monkeypatch.setattr(common, "PROGRESS_SECONDS", float("inf"))
    r = runner.invoke(app, ["encode", str(folder), "-o", str(tmp_path / "a"), "--model", model])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("encode: ")]
    assert [x.split(",")[0] for x in lines] == [f"encode: {k}/10 ({10 * k}%)" for k in range(1, 11)]
    assert all("images/s" in x for x in lines)
    monkeypatch.setattr(common, "PROGRESS_SECONDS", 0.0)
    r = runner.invoke(app, ["decode", str(tmp_path / "a"), "-o", str(tmp_path / "b"), "--model", model])
    assert r.exit_code == 0, r.output
    assert len([x for x in r.stderr.splitlines() if x.startswith("decode: ")]) == 10
    r = runner.invoke(app, ["decode", str(tmp_path / "a"), "-o", str(tmp_path / "c"), "--model", model, "--progress", "none"])
    assert r.exit_code == 0 and "decode: " not in r.stderr
    monkeypatch.setattr(common, "PROGRESS_AFTER", 3600.0)  # a run younger than that: its summary only
    r = runner.invoke(app, ["decode", str(tmp_path / "a"), "-o", str(tmp_path / "d"), "--model", model])
    assert r.exit_code == 0 and "decode: " not in r.stderr
    r = runner.invoke(app, ["encode", str(folder), "-o", str(tmp_path / "x"), "--progress", "sometimes"])
    assert r.exit_code == 2 and "'sometimes': use auto, bar, lines, none" in r.stderr


def test_a_folder_where_nothing_matched_says_what_it_left_out(setup, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("notes.txt", "scan.xyz", "README"):
        (folder / name).write_text("not an image")
    model = str(setup["model"])
    r = runner.invoke(app, ["encode", str(folder), "-o", str(tmp_path / "out"), "--model", model])
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        f"{folder / 'README'}: left out: not named as an image or a tar shard (no extension)",
        f"{folder / 'notes.txt'}: left out: not named as an image or a tar shard (.txt)",
        f"{folder / 'scan.xyz'}: left out: not named as an image or a tar shard (.xyz)",
    ]
    assert "nothing to do: no input files found (3 files left out by name)" in r.stdout
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "notes.txt").write_text("not an image")
    r = runner.invoke(app, ["encode", str(tmp_path / "one"), "-o", str(tmp_path / "out"), "--model", model])
    assert r.exit_code == 1 and "nothing to do: no input files found (1 file left out by name)" in r.stdout
    r = runner.invoke(app, ["decode", str(folder), "-o", str(tmp_path / "rec"), "--model", model, "--json"])
    assert r.exit_code == 1
    obj = json.loads(r.stdout)
    assert obj["ok"] is False and obj["total"] == 0 and obj["left_out"] == 3
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["encode", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--model", model])
    assert r.exit_code == 0 and "nothing to do: no input files found\n" == r.stdout  # (an empty folder)
