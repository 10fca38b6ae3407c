"""Shared helpers of the fault-injection tests: the installed command, tiny models, small images,
snapshots of output folders, and a fault hook for child processes.

The hook (``hook_env``) is a ``sitecustomize`` module put on the child's ``PYTHONPATH``: it wraps one
function of the ``os`` module (``os.fsync``, which every atomic write calls once on its finished
temporary file, or ``os.replace``) so that its Nth call writes a marker file and then sleeps. A
test waits for the marker and kills or interrupts the child there: a fault in the middle of a
write, every time, rather than by luck. Random kills at random moments come on top of that.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _scaleout import save_model
from PIL import Image

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.native import load_native
from vqcli.io.atomic import TMP_PREFIX

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_images"


def _installed() -> str:
    beside = Path(sys.executable).with_name("vqcli")  # the venv's script; a pyenv shim costs a shell
    return str(beside) if beside.is_file() else (shutil.which("vqcli") or "")


VQCLI = _installed()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
ENV.pop("VQCLI_DEBUG", None)

KL = AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
VQ = AutoEncoderConfig(kind="vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, n_embed=64)
# What `vqcli train` builds from these options: the same tiny KL architecture.
TRAIN_TINY = ["--kind", "kl", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--z-channels", "4",
              "--crop", "16", "--batch-size", "2", "--no-bf16", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process work on one thread, as the children get (OMP_NUM_THREADS=1): with two threads on a
    busy two-core machine, OpenMP's waiting threads burn thirty times the CPU of the work itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- models and images ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fault-models")
    return {"kl": save_model(d / "kl.safetensors", KL, 0), "vq": save_model(d / "vq.safetensors", VQ, 1)}


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A crop of a sample photograph, uint8 RGB."""
    rgb = np.asarray(Image.open(SAMPLES / "astronaut.png").convert("RGB"))
    y, x = (seed * 37) % (rgb.shape[0] - height), (seed * 53) % (rgb.shape[1] - width)
    return rgb[y : y + height, x : x + width].copy()


def write_image(path: Path, pixels: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kw)
    return path


def image_folder(folder: Path, n: int, size: int = 32, *, sub_every: int = 0) -> Path:
    """``n`` small photographs; with ``sub_every`` every so many go into a subfolder."""
    for i in range(n):
        sub = f"s{i // sub_every}" if sub_every else ""
        write_image(folder / sub / f"{i:03d}.png", photo(size, size, i))
    return folder


# --- running the command --------------------------------------------------------------------------


def run(*args, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    assert VQCLI, "the vqcli command is not installed"
    return subprocess.run(
        [VQCLI, *map(str, args)], capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout, **kw
    )


def start(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    """The command in the background, SIGINT at its default (as in a terminal: a background job of a
    non-interactive shell starts with SIGINT ignored, and Python then never sees Ctrl-C)."""
    assert VQCLI, "the vqcli command is not installed"
    return subprocess.Popen(
        [VQCLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, **(env or {})},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


HOOK = '''
import os, sys, time
_spec = os.environ.get("VQCLI_FAULT_AT")
if _spec:
    _name, _n = _spec.split(":")
    _real = getattr(os, _name)
    _calls = [0]
    def _hooked(*a, **k):
        _calls[0] += 1
        if _calls[0] == int(_n):
            with open(os.environ["VQCLI_FAULT_MARK"], "w") as f:
                f.write(repr(a))
            release = os.environ.get("VQCLI_FAULT_RELEASE")
            end = time.monotonic() + 120
            while time.monotonic() < end and not (release and os.path.exists(release)):
                time.sleep(0.01)
        return _real(*a, **k)
    setattr(os, _name, _hooked)
'''


@pytest.fixture(scope="session")
def hook_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fault-hook")
    (d / "sitecustomize.py").write_text(HOOK)
    return d


def hook_env(hook_dir: Path, mark: Path, at: str, release: Path | None = None) -> dict:
    """Environment that pauses the child at the ``at`` (``"fsync:2"``) call, after writing ``mark``,
    until ``release`` exists (or two minutes pass)."""
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "VQCLI_FAULT_AT": at, "VQCLI_FAULT_MARK": str(mark)}
    if release is not None:
        env["VQCLI_FAULT_RELEASE"] = str(release)
    return env


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 120, poll: float = 0.005) -> bool:
    """Poll ``condition()`` until true; False if the process ended or time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(condition())
        time.sleep(poll)
    return False


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate(timeout=60)  # reaped: its pid is gone, as after any real crash


def interrupt(proc: subprocess.Popen, timeout: float = 30) -> tuple[str, str, float]:
    """Ctrl-C; the output and the seconds the process took to end after it."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return out, err, time.monotonic() - sent


# --- checking outputs against the model -----------------------------------------------------------


def load_model(path: Path) -> AutoEncoder:
    return load_native(path).eval()


def model_input(rgb: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) image as the model takes it (sizes here are multiples of the factor)."""
    return torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1


def check_latents(out: Path, src: Path, model: AutoEncoder) -> int:
    """Every latent file in ``out`` is valid and holds the model's latent of its image; how many."""
    from vqcli.io.latents import read_latent

    files = finals(out, "*.png.safetensors")
    for f in files:
        latent = read_latent(f)  # the tool's full validation: header, sizes, metadata
        rgb = np.asarray(Image.open(src / f.relative_to(out).as_posix()[: -len(".safetensors")]).convert("RGB"))
        with torch.no_grad():
            expected = model.encode(model_input(rgb))[0]
        torch.testing.assert_close(latent.tensor.float(), expected, atol=1e-4, rtol=1e-4)
    return len(files)


# --- output folders -------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple]:
    """Each final file under ``folder``: (inode, mtime_ns, size, sha256). Temporaries left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(TMP_PREFIX) for part in p.relative_to(folder).parts):
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def finals(folder: Path, pattern: str) -> list[Path]:
    """Files under ``folder`` matching ``pattern`` under their final names (temporaries left out)."""
    return sorted(p for p in folder.rglob(pattern) if not p.name.startswith(TMP_PREFIX))


def temporaries(folder: Path) -> list[str]:
    """Every temporary file or folder anywhere under ``folder``."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"{TMP_PREFIX}*"))


def assert_untouched(before: dict, after: dict) -> None:
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"finished files changed or vanished: {changed}"
