"""benchmarks/gpu_check.py (make gpu-check): its CPU fallback runs every step it can at toy sizes and
writes the files the device tool brings back."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_cpu_fallback_runs_the_steps_and_writes_flat_results(tmp_path, data_root):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-fallback", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "MGFA_DATA_ROOT": str(data_root)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    steps = doc["steps"]
    assert doc["cpu_fallback"] is True
    assert steps["install"]["status"].startswith("skipped")  # this machine has the packages
    assert all(v for v in doc["imports"].values())
    assert steps["gpu_tests"]["status"].startswith("skipped: no CUDA")  # its tests would all skip here
    for name in ("train_step", "trial_overhead"):
        assert steps[name]["status"] == "passed", (name, steps[name])
    mask = steps["mask_precompute"]["status"]  # runs where make gpu-wheels packed a detector
    assert mask == "passed" or mask.startswith("skipped: no detector at"), mask
    head = doc["headline"]
    assert head["train_step_mobilenet_v2"]["mgfa_images_per_second"] > 0
    assert head["trial_overhead"]["by_setting"]["fresh"]["searches"] == 1
    assert head["trial_overhead"]["by_setting"]["reused"]["searches"] == 1
    assert "targets" not in head  # the GPU targets are not judged on toy CPU runs
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8  # flat: what the device tool returns
    assert "gpu_check.log" in files and "trial_overhead_cpu_fallback.json" in files


def test_import_probe_names_only_the_module_that_crashes_the_interpreter(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    (tmp_path / "crasher.py").write_text("import os\nos._exit(139)\n")  # ends the interpreter, as a segfault would
    (tmp_path / "broken.py").write_text("raise ImportError('no')\n")
    (tmp_path / "plain.py").write_text("")
    (tmp_path / "versioned.py").write_text("__version__ = '1.2'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    found = gpu_check._importable(("plain", "crasher", "broken", "versioned"), env)
    assert found == {"plain": True, "crasher": False, "broken": False, "versioned": "1.2"}
    assert gpu_check._importable(("plain", "broken", "versioned"), env) == {"plain": True, "broken": False,
                                                                             "versioned": "1.2"}
