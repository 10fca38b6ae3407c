"""``--model ORG/NAME[@REVISION]``: a model in the local Hugging Face cache, found offline.

The cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (as
huggingface_hub has it). When huggingface_hub is installed its own offline lookup is used
(``snapshot_download(local_files_only=True)``, which never opens a connection); without it the
documented layout is read: ``models--ORG--NAME/refs/REVISION`` holds a commit hash and
``models--ORG--NAME/snapshots/COMMIT/`` the files. In the snapshot, ``--subfolder`` chooses the
folder; by default a pipeline repository's ``vae/`` folder, else the repository itself.

Nothing here downloads anything: a repository that is not in the cache is a ``UsageError`` that
says where it looked and how to fetch it on a machine with network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from vqcli.errors import UsageError

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO = re.compile(rf"({_NAME})/({_NAME})(?:@([A-Za-z0-9._/-]{{1,255}}))?")


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    """``("ORG/NAME", revision or None)`` when ``spec`` has the form of a repository id."""
    m = _REPO.fullmatch(spec)
    if not m or ".." in spec:
        return None
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The local Hugging Face hub cache."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def resolve_repo(spec: str, subfolder: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The folder (or file) of the model ``spec`` names in the local cache, or ``UsageError``."""
    parsed = parse_repo_id(spec)
    if parsed is None:
        raise UsageError(f"--model {spec!r} is not a Hugging Face repository id (ORG/NAME[@REVISION])")
    repo_id, revision = parsed
    cache = cache_dir(env)
    snapshot = _with_hub(repo_id, revision, cache)
    if snapshot is None:
        snapshot = _from_layout(repo_id, revision, cache)
    if snapshot is None:
        where = cache / ("models--" + repo_id.replace("/", "--"))
        at = f" at revision {revision!r}" if revision else ""
        raise UsageError(
            f"--model {spec!r}: {repo_id}{at} is not in the local Hugging Face cache (looked in {where}); "
            f"fetch it on a machine with network: hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        )
    if subfolder:
        folder = snapshot / subfolder
        if ".." in Path(subfolder).parts or not folder.exists():
            raise UsageError(f"--model {spec!r}: no folder {subfolder!r} in its snapshot {snapshot}")
        return folder
    return snapshot / "vae" if (snapshot / "vae").is_dir() else snapshot


def _with_hub(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """huggingface_hub's own offline lookup (None when it is not installed or finds nothing)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        found = snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError and kin): say so below
        return None
    return Path(found)


def _from_layout(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The documented cache layout, read by hand."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = None
    if ".." not in Path(revision).parts and ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
    elif re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    if not commit or not re.fullmatch(r"[0-9a-f]{7,64}", commit):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None
