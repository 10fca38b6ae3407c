"""benchmarks/gpu_check.sh works the first time on a GPU: its dry run (everything tiny, on the CPU)
gives every part, a failing part stops none of the others, and the machine is described from
/proc/cpuinfo (benchmarks/machine.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import machine  # noqa: E402

SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse avx2 avx512f_not_really
"""


def test_cpuinfo_finds_the_model_and_the_bfloat16_units():
    intel = machine.cpuinfo(SAPPHIRE)
    assert intel["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert intel["cpu_flags"]["amx_bf16"] and intel["cpu_flags"]["avx512_bf16"]
    amd = machine.cpuinfo(EPYC)
    assert amd["cpu_model"] == "AMD EPYC 7B13"
    assert amd["cpu_flags"] == {"amx_bf16": False, "amx_tile": False, "avx512_bf16": False, "avx512f": False, "avx2": True}


def test_summary_names_cpu_units_and_gpu():
    m = machine.describe()
    m.update(cpu_model="AMD EPYC 7B13", amx_bf16=False, avx512_bf16=False,
             gpus=[{"name": "NVIDIA H200", "memory_gb": 139.8, "capability": "9.0"}])
    line = machine.summary(m)
    assert "AMD EPYC 7B13" in line and "AMX bf16: no" in line and "AVX512-BF16: no" in line
    assert "NVIDIA H200 (139.8 GB)" in line
    assert json.loads(json.dumps(m)) == m  # what --json carries


def test_only_files_that_mark_tests_for_cuda_are_collected():
    files = gpu_check.cuda_test_files()
    assert "tests/test_cuda.py" in files
    assert "tests/test_precision.py" not in files


def test_a_failing_part_stops_none_of_the_others(tmp_path, monkeypatch):
    def fake_part(name, limit, env, driver_args, deadline):
        if name == "parity":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"ok": True, "headline": f"{name} fine"}

    monkeypatch.setattr(gpu_check, "_in_process_of_its_own", fake_part)
    monkeypatch.setattr(gpu_check, "run_tests", lambda p, limit, env: {"ok": False, "error": "2 failed"})
    monkeypatch.setattr(gpu_check, "run_torchrun", lambda p, limit, env, a: {"ok": True, "headline": "torchrun fine"})
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert rc == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == list(gpu_check.PARTS)
    assert "illegal memory access" in report["parts"]["parity"]["error"]
    assert [name for name, r in report["parts"].items() if r["ok"]] == ["torchrun", "decode_4096", "speed"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| parity | FAILED |" in md and "| tests | FAILED |" in md and "| speed | ok |" in md


def test_a_part_stopped_at_its_limit_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    script = tmp_path / "slow_part.py"
    script.write_text(
        "import json, sys, time\n"
        "out = sys.argv[sys.argv.index('--result') + 1]\n"
        "open(out, 'w').write(json.dumps({'ok': False, 'partial': True, 'rows': [{'op': 'decode'}]}))\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(gpu_check, "__file__", str(script))
    result = gpu_check._in_process_of_its_own("speed", 3, dict(os.environ), [], 0)
    assert result["ok"] is False and result["rows"] == [{"op": "decode"}]
    assert "time limit" in result["error"]


@pytest.mark.slow
def test_dry_run_on_the_cpu_gives_every_part(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    r = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--minutes", "10"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and report["machine"]["cpu_model"]
    assert {name: part["ok"] for name, part in report["parts"].items()} == {name: True for name in gpu_check.PARTS}
    parts = report["parts"]
    assert parts["tests"]["files"] == gpu_check.cuda_test_files()
    assert parts["torchrun"]["nccl_probe"]["ok"] and parts["torchrun"]["latents_written"] == 2
    assert [row["dtype"] for row in parts["decode_4096"]["rows"]] == ["bfloat16", "float32"]
    assert parts["decode_4096"]["rows"][1]["rel_diff_vs_untiled"] < 1e-4
    speed = parts["speed"]["rows"]
    assert {(r["op"], r["dtype"], r["impl"]) for r in speed} == {
        (op, d, impl) for op in ("encode", "decode") for d in ("float32", "bfloat16", "float16")
        for impl in ("diffusers", "vqcli", "vqcli NHWC" if d == "float32" else "vqcli NCHW")}
    assert all(r["ms"] > 0 and r["finite"] for r in speed)
    assert max(r["rel_diff_vs_diffusers_fp32"] for r in speed if r["dtype"] == "float32") < 1e-4
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    for name in gpu_check.PARTS:
        assert f"| {name} | ok |" in md
    assert md in r.stdout  # printed at the end too
