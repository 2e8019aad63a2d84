"""Prepare the wheels a registry-less GPU machine needs to run ``mgfa_ray``, on a machine with PyPI access.

The GPU machine (nvidia-h200 in this workplace) is x86_64 Linux with CPython 3.12 and can reach no package
registry. Its image already holds torch 2.11, torchvision 0.26, numpy, pandas, pyarrow, scipy, matplotlib and
~190 other packages (``PREINSTALLED`` below). What it lacks -- Ray (Tune, Data), Optuna, Ultralytics, pydantic
and their own dependencies -- travels as wheels with the working tree, and everything that travels in one call
is capped at 64 MiB (repository ~3.5 MiB, photos ~8 MiB, detector 5.3 MiB), hence a wheel budget of 44 MiB.

Steps (one function each):

1. ``resolve``: pip resolves the dependency closure for cp312 / manylinux x86_64 (``--dry-run --report``).
   Packages preinstalled there with a known version (torch 2.11.0, torchvision 0.26.0, numpy 2.5.2, ...) are
   given to pip as empty stub wheels at that version, so pip neither downloads nor resolves them (torch's CUDA
   dependency tree is the GPU image's business, and its wheel is 530 MB). Metadata of the others comes from
   PEP 658 ``.metadata`` files where the index serves them (pypi.org does), else -- ``--use-feature=fast-deps``
   -- from HTTP range reads of the wheel's zip directory; without that flag pip downloads every wheel whole
   (ray 76 MiB, pyarrow 52 MiB, ...) just to read its METADATA.
2. ``select``: walk the resolved graph from the project's own requirements, never descending into a package
   the GPU machine has (PEP 503 names; except ``CARRY_ANYWAY``) or one in ``DROP`` (not needed by the project
   there; reasons below).
3. ``download``: ``pip download --no-deps --only-binary=:all:`` of the kept wheels at their resolved versions.
4. ``slim_wheel``: rewrite the Ray wheel without the members in ``RAY_STRIP`` (Java jar, dashboard web UI, ...),
   RECORD rewritten to match, every other member verified byte for byte, written atomically.
5. ``write_manifest``: ``<out>/manifest.json``; ``error:`` and exit code 1 when the wheels exceed the budget.
6. ``install_check``: pip installs the wheels for cp312 into a scratch ``--target`` and the key modules are
   looked for there.

``--check`` runs steps 1-2 only (plus sizes from HTTP HEAD and Ray's zip directory), downloads no wheel, and
prints the plan: what CI runs. Usage, from the repository root::

    python benchmarks/gpu_wheels.py --check              # plan only, ~10 s
    python benchmarks/gpu_wheels.py --out .gpu/wheels    # wheels + manifest.json
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pragma: no cover - pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

PYTHON_VERSION = "3.12"
PYTHON_TAG = "cp312"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The GPU machine's interpreter (Python 3.12.3, KINDS.md), for the environment markers of step 2.
MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_system": "Linux",
    "python_full_version": "3.12.3", "python_version": PYTHON_VERSION, "sys_platform": "linux",
}

# Packages in the GPU machine's image: /work/.library/device/KINDS.md, "Python packages already there",
# nvidia-h200 image 'cuda', as read on a machine running it on 2026-11-17. Copied here because the file is
# not on other machines.
PREINSTALLED = frozenset(canonicalize_name(n) for n in (
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc", "anyio",
    "attrs", "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle", "cmake",
    "colorama", "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-toolkit",
    "cupy-cuda13x", "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils", "execnet", "filelock",
    "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec", "gpytorch", "grpcio", "h11", "h5py",
    "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize", "hypothesis", "idna", "imageio", "iniconfig",
    "interface-meta", "jax", "jax-cuda13-pjrt", "jax-cuda13-plugin", "jaxlib", "jaxtyping", "jinja2", "joblib",
    "kiwisolver", "lazy-loader", "lightning", "lightning-utilities", "linear-operator", "lineax", "llvmlite",
    "lxml", "markdown", "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "meson", "ml-dtypes", "mpi4py",
    "mpmath", "msgpack", "multidict", "multipledispatch", "mypy-extensions", "nanobind", "narwhals", "networkx",
    "ninja", "numba", "numba-cuda", "numpy", "numpyro", "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc",
    "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver",
    "nvidia-cusparse", "nvidia-cusparselt-cu13", "nvidia-ml-py", "nvidia-nccl-cu13", "nvidia-nvjitlink",
    "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx", "onnx-ir", "onnxruntime", "onnxscript", "opencv-python-headless",
    "optax", "opt-einsum", "opt-einsum-fx", "optimistix", "orbax-checkpoint", "packaging", "pandas", "pathspec",
    "patsy", "peft", "pillow", "pip", "pluggy", "portalocker", "prometheus-client", "propcache", "protobuf",
    "psutil", "pyarrow", "pybind11", "py-cpuinfo", "pygments", "pyparsing", "pyproject-hooks", "pyre-extensions",
    "pytest", "pytest-benchmark", "pytest-cov", "pytest-mock", "pytest-timeout", "pytest-xdist", "python-dateutil",
    "pytorch-lightning", "pyyaml", "regex", "requests", "rich", "sacrebleu", "safetensors", "scikit-build-core",
    "scikit-image", "scikit-learn", "scipy", "seaborn", "sentencepiece", "sentence-transformers", "setuptools",
    "shellingham", "simplejson", "six", "sortedcontainers", "statsmodels", "sympy", "tabulate", "tensorboard",
    "tensorboard-data-server", "tensorstore", "threadpoolctl", "tifffile", "tiktoken", "timm", "tokenizers",
    "toolz", "torch", "torchaudio", "torchdiffeq", "torch-geometric", "torchmetrics", "torchvision", "tqdm",
    "transformers", "treescope", "triton", "typer", "typing-extensions", "typing-inspect", "urllib3", "uvloop",
    "wadler-lindig", "werkzeug", "wheel", "wrapt", "xarray", "xxhash", "yarl", "zipp",
))

# Versions of some of them: KINDS.md, nvidia-h200, "pip list, as a session saw it" (2026-11). Step 1 turns these
# into stub wheels so the resolution uses exactly these versions (e.g. torch 2.11.0, not the project's 2.15.0).
PREINSTALLED_VERSIONS = {
    "accelerate": "1.15.0", "botorch": "0.18.1", "cupy-cuda13x": "14.2.0", "gpytorch": "1.15.2",
    "huggingface-hub": "1.33.0", "jax": "0.11.2", "jax-cuda13-pjrt": "0.11.2", "jax-cuda13-plugin": "0.11.2",
    "jaxlib": "0.11.2", "jaxtyping": "0.3.11", "numpy": "2.5.2", "numpyro": "0.21.0", "onnx": "1.23.1",
    "onnx-ir": "1.0.0", "onnxruntime": "1.30.0", "onnxscript": "0.7.2", "pytorch-lightning": "2.6.6",
    "safetensors": "0.8.0", "sentence-transformers": "6.0.1", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torch-geometric": "2.8.0.post1", "torchaudio": "2.11.0",
    "torchdiffeq": "0.2.5", "torchmetrics": "1.9.0", "torchvision": "0.26.0", "transformers": "5.17.0",
    "triton": "3.6.0",
}
STUB_LABEL = "gpuimage"  # local version label of the stubs: 2.11.0+gpuimage

# Extras of the project's pins not wanted there.
DROP_EXTRAS = {"ray": {"default": "dashboard and Jobs API (aiohttp-cors, opencensus, opentelemetry, py-spy, ...); "
                                  "the GPU runs call ray.init(include_dashboard=False) and submit no jobs"}}

# Packages the project runs without on the GPU machine (canonical names). Checked against the versions pinned in
# pyproject.toml; re-check after an Ultralytics or Optuna upgrade.
DROP = {
    "opencv-python": "required by ultralytics, but the GPU image's opencv-python-headless provides the same cv2 "
                     "module; a second cv2 (70 MiB wheel) would only shadow it",
    "polars": "ultralytics imports it only inside functions: predict works without it (checked with `import "
              "polars` blocked: YOLO('yolo11n.yaml').predict ran); YOLO.train does NOT -- its final-epoch "
              "checkpoint (BaseTrainer.save_model -> read_results_csv) imports polars -- so train the detector on "
              "the CPU machines and carry its weights, as the GPU runs do; with polars-runtime-32 it is 52 MiB",
    "polars-runtime-32": "the compiled engine of polars (51 MiB wheel); see polars",
    "sqlalchemy": "Optuna's RDB storage only; mgfa_ray's default study storage is a JournalStorage file "
                  "(<search>/optuna.journal), and optuna, its TPESampler and ray.tune.search.optuna.OptunaSearch "
                  "import and run with sqlalchemy/alembic blocked (checked); search.study_storage must not be an "
                  "RDB URL there, nor storage_path an object store (that requires one)",
    "alembic": "Optuna's RDB schema migrations; see sqlalchemy",
    "mako": "alembic's templates; see sqlalchemy",
}

# Preinstalled packages carried all the same (they then shadow the image's copy on PYTHONPATH), and why.
CARRY_ANYWAY = {
    "typing-extensions": "pydantic 2.14 and pydantic-core need >=4.16.0 and the GPU image's version is not "
                         "recorded; 45 KB of pure Python, backward compatible, so shadowing the image's copy is safe",
}

# Members removed from the Ray wheel (prefixes of zip member names) and why. ray/rllib, ray/serve, ray/llm and the
# vendored aiohttp stack go too because the jar and web UI alone leave the wheels over budget (47.4 MiB with the
# Ray wheel at 42.3 MiB). Checked with a Ray 2.60.0 tree without all six: ray.init(include_dashboard=False), a Tune
# run with OptunaSearch, a Ray Data map_batches and a task with a runtime_env all ran, and the runtime-env agent
# logged no error.
RAY_STRIP = {
    "ray/jars/": "the Java worker jar (ray_dist.jar, 31 MiB compressed): used only by Java workers and "
                 "cross-language calls",
    "ray/dashboard/client/build/": "the dashboard's web UI (JS, CSS, source maps); ray.init(include_dashboard=False)",
    "ray/rllib/": "RLlib: never imported by ray.tune, ray.data, ray.train or mgfa_ray "
                  "(ray.tune.registry catches its ImportError)",
    "ray/serve/": "Ray Serve: imported only by the dashboard's serve module and ray.data.llm, neither used",
    "ray/llm/": "Ray LLM: imported only by ray.data.llm and Serve, neither used",
    "ray/_private/runtime_env/agent/thirdparty_files/": "aiohttp and the 9 packages it needs, vendored for the "
        "runtime-env agent (which puts them first on its sys.path); all 10 are in the GPU image (KINDS.md), so "
        "the agent imports those: the GPU image's aiohttp version was not read, the agent's use is aiohttp.web "
        "Application/Response/run_app/middleware",
}
RAY_NAME = "ray"

INSTALL_CHECK_PATHS = ("ray/_raylet.so", "ray/tune/__init__.py", "optuna/__init__.py", "ultralytics/__init__.py",
                       "pydantic/__init__.py")
GPU_INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
               "--target /tmp/mgfa-site {out}/*.whl && export PYTHONPATH=/tmp/mgfa-site:$PWD")


class Failure(Exception):
    """A step failed; main prints ``error: <message>`` and exits with 1."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / ".gpu" / "wheels", help="wheel folder (default .gpu/wheels)")
    p.add_argument("--check", action="store_true", help="resolve and print the plan only; download nothing")
    p.add_argument("--json", action="store_true", help="with --check: print the plan as JSON")
    p.add_argument("--budget-mib", type=float, default=44.0, help="limit on the wheels' total size (default 44)")
    p.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pip(*args: str, what: str) -> subprocess.CompletedProcess[str]:
    """Run this interpreter's pip; a non-zero exit becomes a Failure with pip's last lines."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        raise Failure(f"{what} failed (pip exit {proc.returncode}): {' | '.join(tail[-4:])}")
    return proc


def target_args() -> list[str]:
    """pip options selecting cp312 manylinux x86_64 binary wheels."""
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for plat in PLATFORMS:
        args += ["--platform", plat]
    return args


def read_pins(pyproject: Path) -> list[Requirement]:
    """The project's dependencies, each pinned with ``==``."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    for r in reqs:
        if not any(s.operator == "==" for s in r.specifier):
            raise Failure(f"{pyproject}: {r} is not pinned with ==")
    return reqs


def plan_requirements(pins: list[Requirement]) -> tuple[list[str], list[dict[str, str]]]:
    """What to resolve: the pins not in the GPU image, minus unwanted extras; and the pins left to the image."""
    wanted, left = [], []
    for r in pins:
        name = canonicalize_name(r.name)
        if name in PREINSTALLED:
            there = PREINSTALLED_VERSIONS.get(name, "version not recorded")
            left.append({"name": name, "pinned": str(r.specifier), "gpu_image": there})
            continue
        extras = sorted(e for e in r.extras if e not in DROP_EXTRAS.get(name, {}))
        wanted.append(f"{r.name}{'[' + ','.join(extras) + ']' if extras else ''}{r.specifier}")
    return wanted, left


def make_stubs(folder: Path) -> Path:
    """Empty wheels NAME-VERSION+gpuimage for the preinstalled packages of known version, and constraints on them."""
    for name, version in PREINSTALLED_VERSIONS.items():
        ver = f"{version}+{STUB_LABEL}"
        dist = f"{name.replace('-', '_')}-{ver}"
        with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
            z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
            z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: gpu_wheels\n"
                                                  "Root-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{dist}.dist-info/RECORD", "".join(f"{dist}.dist-info/{f},,\n"
                                                           for f in ("METADATA", "WHEEL", "RECORD")))
    constraints = folder / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}+{STUB_LABEL}\n" for n, v in PREINSTALLED_VERSIONS.items()))
    return constraints


def resolve(requirements: list[str], work: Path) -> dict[str, Any]:
    """Step 1: pip's resolution for cp312 manylinux x86_64 (metadata only); returns pip's installation report."""
    stubs = work / "stubs"
    stubs.mkdir()
    constraints = make_stubs(stubs)
    report = work / "report.json"
    pip("install", "--dry-run", "--quiet", "--ignore-installed", *target_args(), "--target", str(work / "target"),
        "--report", str(report), "--use-feature=fast-deps", "--find-links", str(stubs), "-c", str(constraints),
        *requirements, what=f"resolving {' '.join(requirements)} for {PYTHON_TAG}")
    return json.loads(report.read_text())


def select(report: dict[str, Any]) -> dict[str, Any]:
    """Step 2: the resolved packages to carry (walked from the requested ones), those dropped and why, and the
    preinstalled packages the carried ones rely on (with the specifiers they ask for)."""
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    keep: dict[str, Any] = {}
    relied: dict[str, dict[str, Any]] = {}
    dropped_by_rule: dict[str, list[str]] = {}
    todo = [(n, frozenset(i.get("requested_extras") or ())) for n, i in items.items() if i.get("requested")]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        keep[name] = items[name]
        for spec in items[name]["metadata"].get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in extras | {""}):
                continue
            dep = canonicalize_name(req.name)
            who = f"{req.specifier or 'any'} ({name})"
            if dep in PREINSTALLED and dep not in CARRY_ANYWAY:
                entry = relied.setdefault(dep, {"gpu_image": PREINSTALLED_VERSIONS.get(dep), "required": []})
                entry["required"].append(who)
            elif dep in DROP:
                dropped_by_rule.setdefault(dep, []).append(name)
            elif dep not in items:
                raise Failure(f"{name} needs {spec} for {PYTHON_TAG} but pip's resolution lacks it "
                              "(marker evaluated differently?)")
            else:
                todo.append((dep, frozenset(req.extras)))
    missing = sorted(set(CARRY_ANYWAY) - set(keep))
    if missing:
        raise Failure(f"CARRY_ANYWAY names {missing}, which no carried package needs: update the list")
    dropped = []
    for name, item in sorted(items.items()):
        if name in keep:
            continue
        if name in PREINSTALLED:
            reason = "in the GPU image"
        elif name in DROP:
            reason = DROP[name]
        else:
            reason = "needed only by packages in the GPU image or dropped here"
        dropped.append({"name": name, "version": item["metadata"]["version"], "reason": reason})
    return {"keep": {n: keep[n] for n in sorted(keep)}, "dropped": dropped,
            "relied_on": {n: relied[n] for n in sorted(relied)}}


class _RangeFile:
    """Just enough of a read-only file over HTTP range requests for zipfile to read a zip's directory."""

    def __init__(self, url: str, size: int) -> None:
        self.url, self.size, self.pos = url, size, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            if r.status != 206:
                raise OSError(f"no range support at {self.url}")
            data = r.read()
        self.pos += len(data)
        return data


def estimate_sizes(keep: dict[str, Any]) -> dict[str, int | None]:
    """Bytes of each kept wheel (HTTP HEAD, or the file), Ray's less the members RAY_STRIP removes; None if unknown."""
    sizes: dict[str, int | None] = {}
    for name, item in keep.items():
        url = item["download_info"]["url"]
        try:
            source: str | _RangeFile
            if url.startswith("file:"):
                source = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
                size = os.path.getsize(source)
            else:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
                    size = int(r.headers["Content-Length"])
                source = _RangeFile(url, size)
            if name == RAY_NAME:
                with zipfile.ZipFile(source) as z:  # reads the central directory only
                    size -= sum(i.compress_size + 76 + 2 * len(i.filename) + len(i.extra) + len(i.comment)
                                for i in z.infolist() if i.filename.startswith(tuple(RAY_STRIP)))
            sizes[name] = size
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            sizes[name] = None
    return sizes


def download(keep: dict[str, Any], staging: Path) -> dict[str, Path]:
    """Step 3: the kept wheels at their resolved versions, checked against the index's sha256."""
    specs = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in keep.values()]
    pip("download", "--quiet", "--no-deps", "--progress-bar", "off", *target_args(), "-d", str(staging), *specs,
        what="pip download")
    files: dict[str, Path] = {}
    for whl in staging.glob("*.whl"):
        files[canonicalize_name(whl.name.split("-")[0])] = whl
    missing = sorted(set(keep) - set(files))
    if missing or len(files) != len(keep):
        raise Failure(f"pip download did not give one wheel per package: missing {missing}, got {sorted(files)}")
    for name, whl in files.items():
        want = keep[name]["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if want and sha256_file(whl) != want:
            raise Failure(f"{whl.name}: sha256 differs from the index's {want}")
    return files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_hash(data: bytes) -> str:
    """A wheel RECORD hash: sha256=<urlsafe base64, no padding>."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(path: Path, strip: dict[str, str]) -> dict[str, Any]:
    """Step 4: rewrite the wheel at ``path`` (same name) without the members under the ``strip`` prefixes.

    RECORD loses the removed entries; every other member keeps its bytes, name, order, date and permissions
    (re-deflated at level 9). Written to a temporary file then renamed over ``path``; verified before the rename.
    """
    prefixes = tuple(strip)
    removed = {p: {"reason": r, "files": 0, "bytes": 0, "compressed_bytes": 0} for p, r in strip.items()}
    digests: dict[str, str] = {}
    tmp = path.with_name(path.name + ".tmp")
    original = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        records = [n for n in src.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
        if len(records) != 1:
            raise Failure(f"{path.name}: expected one top-level *.dist-info/RECORD, found {records}")
        for info in src.infolist():
            hit = next((p for p in prefixes if info.filename.startswith(p)), None)
            if hit:
                stats = removed[hit]
                stats["files"] += 1
                stats["bytes"] += info.file_size
                stats["compressed_bytes"] += info.compress_size
                continue
            data = src.read(info)
            if info.filename == records[0]:
                rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and not r[0].startswith(prefixes)]
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows(rows)
                data = out.getvalue().encode()
            else:
                digests[info.filename] = record_hash(data)
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.external_attr, new.create_system, new.comment = info.external_attr, info.create_system, info.comment
            dst.writestr(new, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        expected_names = [n for n in src.namelist() if not n.startswith(prefixes)]
    try:
        verify_slim(tmp, expected_names, digests, records[0])
    except Failure:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    return {"original": original, "removed": removed, "members_kept": len(expected_names),
            "verified": "member list = original minus the removed; every other member byte-identical (sha256); "
                        "RECORD lists exactly the members, with matching hashes"}


def verify_slim(path: Path, expected_names: list[str], digests: dict[str, str], record: str) -> None:
    """The rewritten wheel holds exactly ``expected_names`` with the original contents, and RECORD agrees."""
    with zipfile.ZipFile(path) as z:
        if z.namelist() != expected_names:
            raise Failure(f"{path.name}: member list is not the original minus the removed members")
        rows = {row[0]: row[1] for row in csv.reader(io.StringIO(z.read(record).decode())) if row}
        if set(rows) != set(expected_names):
            extra, lacking = sorted(set(rows) - set(expected_names)), sorted(set(expected_names) - set(rows))
            raise Failure(f"{path.name}: RECORD and members differ: extra {extra[:3]}, lacking {lacking[:3]}")
        for name, digest in digests.items():
            got = record_hash(z.read(name))
            if got != digest:
                raise Failure(f"{path.name}: {name} changed while rewriting")
            if rows[name] and rows[name] != got:
                raise Failure(f"{path.name}: RECORD hash of {name} does not match its contents")


def install_check(out: Path, wheels: list[Path]) -> dict[str, Any]:
    """Step 6: install the wheels for cp312 into a scratch --target, and look for the key modules there."""
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-install-") as tmp:
        cmd = ["install", "-q", "--no-index", "--no-deps", "--no-compile", *target_args(), "--target", tmp,
               *map(str, wheels)]
        try:
            pip(*cmd, what="install check")
            error = None
        except Failure as e:
            error = str(e)
        missing = [p for p in INSTALL_CHECK_PATHS if not (Path(tmp) / p).is_file()]
    return {"passed": error is None and not missing, "error": error, "looked_for": list(INSTALL_CHECK_PATHS),
            "missing": missing, "command": f"pip {' '.join(cmd[:-len(wheels)])} {out}/*.whl"}


def write_manifest(out: Path, doc: dict[str, Any]) -> Path:
    """Step 5: <out>/manifest.json, written atomically."""
    path = out / "manifest.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def over_budget(wheels: list[dict[str, Any]], budget_mib: float) -> str | None:
    """The one-line error when the wheels exceed the budget, else None."""
    total = sum(w["bytes"] for w in wheels)
    if total <= budget_mib * MIB:
        return None
    top = sorted(wheels, key=lambda w: -w["bytes"])[:4]
    return (f"wheels total {total / MIB:.1f} MiB, over the {budget_mib:g} MiB budget; largest: "
            + ", ".join(f"{w['file']} {w['bytes'] / MIB:.1f} MiB" for w in top))


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def print_plan(plan: dict[str, Any], sizes: dict[str, int | None], budget_mib: float, seconds: float) -> None:
    keep = plan["keep"]
    print(f"resolved {len(keep) + len(plan['dropped'])} packages for {PYTHON_TAG} manylinux x86_64 in {seconds:.1f} s")
    print(f"carry ({len(keep)}):")
    for name, item in keep.items():
        size = sizes.get(name)
        note = " (after stripping)" if name == RAY_NAME else ""
        print(f"  {name:28} {item['metadata']['version']:16} {'?' if size is None else f'{size / MIB:6.2f}'} MiB{note}")
    print(f"dropped ({len(plan['dropped'])}):")
    for d in plan["dropped"]:
        print(f"  {d['name']:28} {d['version']:16} {d['reason'][:70]}")
    known = [s for s in sizes.values() if s is not None]
    total = sum(known) / MIB
    flag = "" if total <= budget_mib else "  -- OVER BUDGET"
    unknown = len(sizes) - len(known)
    print(f"estimated total {total:.1f} MiB{f' + {unknown} of unknown size' if unknown else ''} "
          f"(budget {budget_mib:g} MiB){flag}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    try:
        requirements, left_to_image = plan_requirements(read_pins(args.pyproject))
        with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as work:
            report = resolve(requirements, Path(work))
        resolved_s = time.monotonic() - started
        plan = select(report)
        if args.check:
            sizes = estimate_sizes(plan["keep"])
            if args.json:
                print(json.dumps({"requirements": requirements, "resolved_seconds": round(resolved_s, 1),
                                  "keep": {n: i["metadata"]["version"] for n, i in plan["keep"].items()},
                                  "sizes": sizes, "dropped": plan["dropped"], "relied_on": plan["relied_on"],
                                  "left_to_gpu_image": left_to_image}, indent=2))
            else:
                print_plan(plan, sizes, args.budget_mib, resolved_s)
                print(f"GPU machine: {GPU_INSTALL.format(out=shown(out))}")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        try:
            files = download(plan["keep"], staging)
            stripped = {files[RAY_NAME].name: slim_wheel(files[RAY_NAME], RAY_STRIP)} if RAY_NAME in files else {}
            for old in out.glob("*.whl"):
                old.unlink()
            for name, whl in files.items():
                os.replace(whl, out / whl.name)
                files[name] = out / whl.name
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        wheels = [{"name": n, "version": plan["keep"][n]["metadata"]["version"], "file": f.name,
                   "bytes": f.stat().st_size, "sha256": sha256_file(f)} for n, f in sorted(files.items())]
        total = sum(w["bytes"] for w in wheels)
        doc: dict[str, Any] = {
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "made_by": "benchmarks/gpu_wheels.py", "python_tag": PYTHON_TAG, "python_version": PYTHON_VERSION,
            "platforms": list(PLATFORMS), "requirements": requirements,
            "dropped_extras": DROP_EXTRAS, "left_to_gpu_image": left_to_image,
            "wheels": wheels, "stripped": stripped, "dropped": plan["dropped"],
            "preinstalled_relied_on": plan["relied_on"],
            "preinstalled_source": "/work/.library/device/KINDS.md, nvidia-h200, read 2026-11-17",
            "total_bytes": total, "total_mib": round(total / MIB, 2), "budget_mib": args.budget_mib,
            "within_budget": total <= args.budget_mib * MIB, "install_check": None,
            "gpu_install_command": GPU_INSTALL.format(out=shown(out)),
        }
        problem = over_budget(wheels, args.budget_mib)
        if problem is None:
            doc["install_check"] = install_check(out, sorted(files.values()))
        doc["seconds"] = round(time.monotonic() - started, 1)
        write_manifest(out, doc)
        if problem:
            raise Failure(problem)
        check = doc["install_check"]
        if not check["passed"]:
            raise Failure(f"install check: {check['error'] or 'missing ' + ', '.join(check['missing'])}")
        width = max(len(w["file"]) for w in wheels)
        for w in wheels:
            print(f"  {w['file']:{width}} {w['bytes'] / MIB:6.2f} MiB")
        print(f"{len(wheels)} wheels, {total / MIB:.1f} MiB of {args.budget_mib:g} MiB, install check passed, "
              f"{doc['seconds']:.0f} s; manifest: {shown(out / 'manifest.json')}")
        print(f"GPU machine: {doc['gpu_install_command']}")
        return 0
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
