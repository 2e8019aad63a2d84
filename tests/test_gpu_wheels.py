"""benchmarks/gpu_wheels.py: the GPU machine's wheel set resolves for cp312 (needs PyPI: fails without it) and the
Ray wheel is slimmed without touching the members it keeps."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_wheels.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_check_resolves_for_cp312():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", "--json"], check=False, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    gw = load_script()
    pins = {}
    for dep in gw.tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        pins[req.name.lower()] = next(s.version for s in req.specifier if s.operator == "==")
    for name in ("ray", "optuna", "ultralytics", "pydantic"):
        assert plan["keep"].get(name) == pins[name], (name, plan["keep"].get(name))
    for name in ("torch", "torchvision", "numpy", "pandas", "pyarrow", "opencv-python", "polars"):
        assert name not in plan["keep"], name
    dropped = {d["name"] for d in plan["dropped"]}
    assert {"torch", "torchvision", "numpy"} <= dropped
    sizes = plan["sizes"]
    assert None not in sizes.values(), sizes
    assert sum(sizes.values()) <= 44 * 2**20, f"estimated {sum(sizes.values()) / 2**20:.1f} MiB, over 44 MiB"


def test_slim_wheel_removes_members_and_record_rows(tmp_path):
    gw = load_script()
    members = {
        "ray/__init__.py": b"__version__ = '0'\n",
        "ray/jars/x.jar": b"PK-not-really-a-jar" * 100,
        "ray/dashboard/client/build/index.html": b"<html></html>",
        "ray/dashboard/__init__.py": b"",
        "ray/core/raylet": b"\x7fELF" + bytes(range(256)) * 50,
        "ray-0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ray\nVersion: 0\n",
    }
    record = "".join(f"{n},{gw.record_hash(d)},{len(d)}\n" for n, d in members.items()) + "ray-0.dist-info/RECORD,,\n"
    whl = tmp_path / "ray-0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 2, 3, 4, 6))
            info.external_attr = (0o755 if name == "ray/core/raylet" else 0o644) << 16
            z.writestr(info, data)
        z.writestr("ray-0.dist-info/RECORD", record)

    result = gw.slim_wheel(whl, {"ray/jars/": "jar", "ray/dashboard/client/build/": "web UI"})

    removed = {"ray/jars/x.jar", "ray/dashboard/client/build/index.html"}
    assert result["removed"]["ray/jars/"]["files"] == 1
    assert result["removed"]["ray/dashboard/client/build/"]["files"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [whl.name]  # same name, no temporary left behind
    with zipfile.ZipFile(whl) as z:
        assert z.namelist() == [n for n in [*members, "ray-0.dist-info/RECORD"] if n not in removed]
        for name, data in members.items():
            if name not in removed:
                assert z.read(name) == data, name
        assert z.getinfo("ray/core/raylet").external_attr >> 16 == 0o755
        assert z.getinfo("ray/__init__.py").date_time == (2020, 1, 2, 3, 4, 6)
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
        rows = [r for r in csv.reader(io.StringIO(z.read("ray-0.dist-info/RECORD").decode())) if r]
    assert [r[0] for r in rows] == [n for n in [*members, "ray-0.dist-info/RECORD"] if n not in removed]
    init = members["ray/__init__.py"]
    assert rows[0] == ["ray/__init__.py", gw.record_hash(init), str(len(init))]
