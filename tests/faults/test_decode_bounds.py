"""Decode's bounds against hostile latents (issue 17, finding 2): a pixel limit checked from the
latent's header before any work, and a stop within moments of SIGTERM/SIGINT wherever the time
goes (here: the middle attention of a large VQ latent, one product of minutes when run whole)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from vqcli.io.latents import make_meta, write_latent

from .conftest import ENV, load_model, run, start, wait_for

# Marks the first call of the attention product, then lets it run (the test signals the child there).
HOOK = '''
import os
_mark = os.environ.get("VQCLI_ATTN_MARK")
if _mark:
    import torch.nn.functional as F
    _real = F.scaled_dot_product_attention
    def _marked(*a, **k):
        if not os.path.exists(_mark):
            open(_mark, "w").close()
        return _real(*a, **k)
    F.scaled_dot_product_attention = _marked
'''


def vq_latent(path: Path, model_path: Path, side: int) -> Path:
    """A valid VQ latent of ``side`` x ``side`` indices for the model at ``model_path``."""
    model = load_model(model_path)
    f = model.config.downsampling
    meta = make_meta(model, source="big.png", width=side * f, height=side * f,
                     model_name=str(model_path), model_embedded=False, representation="indices")
    idx = torch.randint(0, model.config.n_embed, meta.latent_shape, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_latent(path, idx, meta)
    return path


def test_decode_refuses_a_latent_over_the_pixel_limit_from_its_header(tmp_path, models):
    src = tmp_path / "in"
    vq_latent(src / "big.png.safetensors", models["vq"], 64)  # decodes to 128x128 = 16384 pixels
    vq_latent(src / "small.png.safetensors", models["vq"], 8)  # 16x16 = 256
    r = run("decode", src, "-o", tmp_path / "out", "--model", models["vq"], "--max-pixels", "10000", "--device", "cpu")
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "big.png.safetensors" in ln]
    assert len(lines) == 1 and "16,384 pixels, over the limit of 10,000" in lines[0] and "--max-pixels" in lines[0]
    assert "Traceback" not in r.stderr
    assert (tmp_path / "out" / "small.png").is_file() and not (tmp_path / "out" / "big.png").exists()
    r = run("decode", src, "-o", tmp_path / "out2", "--model", models["vq"], "--max-pixels", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr  # 0: no limit
    assert (tmp_path / "out2" / "big.png").is_file()


@pytest.mark.slow
def test_decode_pixel_limit_defaults_to_encodes(tmp_path, models):
    """Without --max-pixels, decode refuses what encode would (Pillow's bomb limit, 89,478,485)."""
    from vqcli.io.images import DEFAULT_MAX_PIXELS

    side = 4800  # 9600x9600 decoded = 92,160,000 pixels, just over the default; the file is 46 MB
    path = vq_latent(tmp_path / "in" / "huge.png.safetensors", models["vq"], side)
    r = run("decode", path, "-o", tmp_path / "out", "--model", models["vq"], "--device", "cpu")
    assert r.returncode == 1, r.stderr
    assert f"over the limit of {DEFAULT_MAX_PIXELS:,}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "huge.png").exists()


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)]
)
def test_decode_stops_inside_the_middle_attention_on_a_signal(tmp_path, models, sig, code):
    """A 512x512 VQ latent: the tiny model's middle attention is one product of 512^4 x 64
    multiply-adds (minutes on any CPU core) when run whole, so a signal sent once it has begun is
    honoured only if the product runs in short steps. The child must end with the signal's code
    well before it could have finished the product, and leave no image."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    path = vq_latent(tmp_path / "in" / "big.png.safetensors", models["vq"], 512)
    mark = tmp_path / "attention-began"
    env = {"PYTHONPATH": f"{hook}:{ENV.get('PYTHONPATH', '')}", "VQCLI_ATTN_MARK": str(mark)}
    proc = start("decode", path, "-o", tmp_path / "out", "--model", models["vq"], "--device", "cpu", env=env)
    try:
        assert wait_for(mark.exists, proc, timeout=120), proc.communicate()[1]
        proc.send_signal(sig)
        # whole, the product alone takes minutes; in steps, the child ends at the next one
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "big.png").exists()
