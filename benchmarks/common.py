"""What every benchmark records about where and on which code it ran (imported by the scripts here)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "ray", "ultralytics", "pyarrow", "optuna")


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, GPUs and package versions of this machine."""
    import torch

    cpu_model, mem_kib = platform.processor(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None, "platform": platform.platform(),
        "python": platform.python_version(), **{name: installed(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda, "gpu": None,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                       "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                       "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"}
    return info


def git_info() -> dict[str, Any]:
    """HEAD commit and the files changed against it (the measured code may be uncommitted)."""

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "mgfa_ray", "benchmarks")
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": status.splitlines() if status else ([] if status is not None else None)}


def new_document(benchmark: str, *, settings: dict[str, Any] | None, measured: dict[str, Any]) -> dict[str, Any]:
    """The head every benchmark JSON starts with: name, UTC creation time, the command line, the
    machine (with its 1/5/15-minute load averages at the start), the git commit, the settings (left
    out when None) and the ``measured`` definitions."""
    from datetime import datetime, timezone

    doc: dict[str, Any] = {
        "benchmark": benchmark, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(), "git": git_info(),
        **({} if settings is None else {"settings": settings}), "measured": measured,
    }
    doc["machine"]["loadavg_start"] = os.getloadavg()
    return doc
