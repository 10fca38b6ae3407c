"""The house: imports flow one way, modules stay readable, facts have one home, the CLI answers
--help without torch, and the memory budget follows the device."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vqcli import AutoEncoder, AutoEncoderConfig
from vqcli.checkpoints.registry import EMBEDDED, embedded_config
from vqcli.cli import app
from vqcli.model.config import describe
from vqcli.speed import budget as budget_module
from vqcli.speed import tiling
from vqcli.speed.budget import default_budget
from vqcli.speed.context import compute_context

PACKAGE = Path(__file__).resolve().parents[1] / "vqcli"
MAX_LINES = 600
# Imports flow down this list (a module may import its own part and any part after it).
LAYERS = ["cli", "train", "pipeline", "checkpoints", "io", "speed", "model", "metrics", "errors"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every vqcli module ``name`` imports, anywhere in the file (function-local imports included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{root}.{base}" if base else root
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and target != "vqcli":
                found.add(target)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vqcli"


def test_no_import_cycle_and_no_oversized_module():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    too_long = {m: n for m, p in modules.items() if (n := p.read_text().count("\n")) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
    # Depth-first search for a cycle.
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(n):] + [m, n]) if n in trail else f"import cycle through {m} -> {n}")
            if n not in state:
                visit(n, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_imports_flow_down_the_parts():
    """cli -> train -> pipeline -> checkpoints -> io -> speed -> model -> errors: never back up."""
    modules = _modules()
    upward = []
    for m, p in modules.items():
        here = _part(m)
        if here not in LAYERS:
            continue
        for n in _imports(m, p, modules):
            there = _part(n)
            if there in LAYERS and LAYERS.index(there) < LAYERS.index(here):
                upward.append(f"{m} -> {n}")
    assert not upward, upward


def test_the_layout_check_fails_on_a_cycle(tmp_path):
    """The cycle finder itself: two modules importing each other inside functions are caught."""
    pkg = tmp_path / "vqcli"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from vqcli.a import y\n")
    (pkg / "a" / "y.py").write_text("def g():\n    from vqcli.a.x import f\n")
    modules = {}
    for path in pkg.rglob("*.py"):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    assert "vqcli.a.y" in _imports("vqcli.a.x", modules["vqcli.a.x"], modules)
    assert "vqcli.a.x" in _imports("vqcli.a.y", modules["vqcli.a.y"], modules)


def test_embedded_models_are_described_from_their_config():
    """`vqcli models` says what the shipped weights are, computed from the config in their file."""
    r = CliRunner().invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    listed = {m["name"]: m for m in json.loads(r.stdout)["embedded"]}
    assert set(listed) == set(EMBEDDED)
    for name, model in EMBEDDED.items():
        config = embedded_config(model)
        assert config is not None, f"{name} is not installed"
        assert listed[name]["description"] == f"vqcli's own {describe(config)}"
        assert f"f{config.downsampling}" in listed[name]["description"]
        assert f"z {config.z_channels}" in listed[name]["description"]


@pytest.mark.parametrize("args", [["--help"], ["encode", "--help"], ["decode", "--help"], ["train", "--help"]])
def test_help_answers_without_importing_torch(args):
    code = (
        "import sys\n"
        f"sys.argv = ['vqcli', *{args!r}]\n"
        "from vqcli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "NO TORCH"
    assert "Usage" in done.stdout


def test_the_budget_comes_from_the_cuda_device(monkeypatch):
    """On CUDA the budget is half of the device's free memory (with what PyTorch's cache holds
    unused), not a quarter of the host's; on the CPU it is a quarter of the host's."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2**20, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * 2**20)
    assert default_budget(torch.device("cuda:0")) == (6 + 3 - 1) * 2**20 // 2
    monkeypatch.setattr(budget_module, "available_memory", lambda: 64 * 2**30)
    assert default_budget(torch.device("cpu")) == 16 * 2**30
    assert default_budget() == 16 * 2**30


def test_a_small_device_budget_tiles_a_large_image(monkeypatch):
    """With a (simulated) CUDA device of little free memory, the budget it gives makes the model
    compute in bands, with the untiled result."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**20, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    small = default_budget(torch.device("cuda"))
    assert small == 2 * 2**20
    torch.manual_seed(0)
    model = AutoEncoder(AutoEncoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)).eval()
    x = torch.rand(1, 3, 96, 128) * 2 - 1
    with torch.inference_mode():
        whole = model.encode(x)
    banded = []
    original = tiling._run_banded

    def spy(*args, **kwargs):
        banded.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiling, "_run_banded", spy)
    with compute_context(torch.device("cpu"), torch.float32, model=model, budget=small):
        tiled = model.encode(x)
    assert banded, "the image was not tiled under the device's budget"
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-5)
