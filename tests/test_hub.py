"""``--model ORG/NAME[@REVISION]`` from a local Hugging Face cache the test builds (the documented
layout: ``models--ORG--NAME/refs/main`` and ``snapshots/COMMIT/``), with and without
huggingface_hub installed, and never a connection (every socket connect fails here)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from vqcli.checkpoints import hub
from vqcli.cli import app
from vqcli.errors import UsageError

from conftest import TINY_KL, build_diffusers, vqcli_twin

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
runner = CliRunner()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # our offline lookup must not depend on the user's setting


@pytest.fixture(scope="module")
def dmodel():
    return build_diffusers(TINY_KL, seed=3)


def _repo(cache: Path, repo_id: str, commit: str, folder: str, dmodel, branch: str = "main") -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    target = repo / "snapshots" / commit / folder
    dmodel.save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture
def cache(tmp_path, dmodel, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    _repo(cache, "acme/pipeline", COMMIT, "vae", dmodel)
    _repo(cache, "acme/pipeline", COMMIT, "other_vae", dmodel)
    _repo(cache, "acme/just-vae", OTHER, ".", dmodel)
    _repo(cache, "acme/just-vae", COMMIT, ".", dmodel, branch="v2")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


@pytest.fixture(params=["with huggingface_hub", "without huggingface_hub"])
def hub_installed(request, monkeypatch):
    if request.param == "without huggingface_hub":
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    else:
        pytest.importorskip("huggingface_hub")
    return request.param


def test_repository_ids_resolve_offline(cache, hub_installed):
    snap = cache / "models--acme--pipeline" / "snapshots" / COMMIT
    by_hub = hub._with_hub("acme/pipeline", None, cache)  # noqa: SLF001 - which path answered
    assert (by_hub is not None) == (hub_installed == "with huggingface_hub")
    if by_hub is not None:
        assert by_hub.resolve() == snap.resolve()
    assert hub.resolve_repo("acme/pipeline").resolve() == (snap / "vae").resolve()
    assert hub.resolve_repo("acme/pipeline", "other_vae").resolve() == (snap / "other_vae").resolve()
    just = cache / "models--acme--just-vae" / "snapshots"
    assert hub.resolve_repo("acme/just-vae").resolve() == (just / OTHER).resolve()
    assert hub.resolve_repo("acme/just-vae@v2").resolve() == (just / COMMIT).resolve()
    assert hub.resolve_repo(f"acme/just-vae@{COMMIT}").resolve() == (just / COMMIT).resolve()
    with pytest.raises(UsageError) as e:
        hub.resolve_repo("acme/missing")
    message = str(e.value)
    assert "\n" not in message and str(cache / "models--acme--missing") in message
    assert "hf download acme/missing" in message
    with pytest.raises(UsageError, match="no folder 'nope'"):
        hub.resolve_repo("acme/pipeline", "nope")


def test_cache_location_follows_the_environment(tmp_path):
    assert hub.cache_dir({"HF_HUB_CACHE": "/a/b", "HF_HOME": "/c"}) == Path("/a/b")
    assert hub.cache_dir({"HF_HOME": "/c"}) == Path("/c/hub")
    assert hub.cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"


def test_encode_with_a_cached_model(cache, hub_installed, dmodel, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins
    from PIL import Image

    Image.new("RGB", (16, 12), (200, 30, 90)).save(tmp_path / "a.png")
    r = runner.invoke(app, ["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "lat"), "--model", "acme/pipeline"])
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "lat" / "a.png.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "acme/pipeline"
    assert meta["model_sha256"] == vqcli_twin(dmodel, TINY_KL).identity()

    r = runner.invoke(app, ["encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "l2"), "--model", "acme/absent"])
    assert r.exit_code == 2
    assert "not in the local Hugging Face cache" in r.stderr and "hf download acme/absent" in r.stderr
    assert "Traceback" not in r.output
