"""The whole GPU check in one command (``make gpu-check``), prepared on a CPU machine beforehand.

A GPU machine is lent now and then, for minutes, with no package registry; this script is what
runs there. Two parts:

``--pack`` (here, with the data; ``make gpu-wheels`` calls it after ``benchmarks/gpu_wheels.py``)
    copies what the check reads into the git-ignored ``.gpu/`` beside the wheels: a subset of the
    leafsnap20 photos (``--species`` x ``--per-species``) with the hand-drawn region labels, and the
    main job's detector (``weights.pt``, its ``metrics.json`` and the job's ``job.yaml``), then
    prints the size of everything that travels (limit: 64 MiB a call).

default (there; ``make gpu-check``)
    one step after another, each in a subprocess with its own time limit, a failed step recorded
    and the next one run (about 8 minutes in all on one H200):

    1. ``install``: ``.gpu/wheels/*.whl`` into ``/tmp/mgfa-site`` (pip, no index, no dependencies)
       unless Ray, Optuna, Ultralytics and pydantic import already; every child gets
       ``PYTHONPATH=/tmp/mgfa-site:<repo>``;
    2. ``environment``: ``nvidia-smi`` and torch's view of the GPU;
    3. ``gpu_tests``: ``pytest -m gpu`` (bf16 / fp16 autocast, channels-last, resume, CUDA memory
       back to its level between reused trials) on the packed photos;
    4. ``train_step``: ``benchmarks/train_step.py --preset h100`` (ResNet-50, 448 px, bf16,
       channels-last) with the real-data epoch on the packed photos;
    5. ``mask_precompute``: ``benchmarks/mask_precompute.py --preset gpu`` with the packed detector
       (skipped without it or without Ultralytics);
    6. ``trial_overhead``: ``benchmarks/trial_overhead.py --preset gpu``: searches of 16 trials,
       4 sharing the GPU (``gpus_per_trial: 0.25``), fresh vs reused workers, on synthetic
       Cotton80-shaped data, with every reused trial's CUDA memory at its start.

    Written to ``--out`` (``$OUT`` on the device machine): ``gpu_check.json`` (every step's status,
    seconds and headline numbers, the issue's targets met or not), the benchmarks' own JSONs and
    ``gpu_check.log`` (every step's output) — six files, flat, as the device tool brings back.

Without CUDA the same steps run with CPU presets at toy sizes (``--cpu-fallback``, what CI runs):
the plumbing is checked, the numbers mean nothing; ``gpu_tests`` is skipped there (its tests need
CUDA, so pytest would only collect and skip them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpu"
SITE = Path("/tmp/mgfa-site")
CARRY_LIMIT_MIB = 64.0
NEEDED = ("ray", "optuna", "ultralytics", "pydantic")
# The targets on the GPU machine.
TARGET_IMAGES_PER_SECOND = 1000.0
TARGET_REAL_OVER_SYNTHETIC = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pack", action="store_true", help="here: copy photos, labels and detector into .gpu/")
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("MGFA_DATA_ROOT", REPO.parent / "shared" / "data")),
                   help="--pack: directory holding leafsnap20/ and leafsnap20-regions/")
    p.add_argument("--detector", type=Path, default=REPO / "outputs" / "leafsnap20" / "detector" / "weights.pt",
                   help="--pack: the main job's detector weights (metrics.json beside, job.yaml one level up)")
    p.add_argument("--species", type=int, default=20, help="--pack: species of leafsnap20 packed")
    p.add_argument("--per-species", type=int, default=16, help="--pack: photos per species (sorted names)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "outputs" / "gpu-check"),
                   help="where the check writes (default $OUT, else outputs/gpu-check)")
    p.add_argument("--cpu-fallback", action="store_true", help="toy CPU sizes (automatic without CUDA)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget of the whole check in seconds (default 540: the device tool's 600 s "
                        "limit less a margin); each step's limit is cut to what is left, a step with under 30 s "
                        "left is skipped, and gpu_check.json is rewritten after every step")
    p.add_argument("--steps", nargs="+", help="run only these steps (install environment gpu_tests train_step "
                                              "mask_precompute trial_overhead)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# --pack (on the CPU machine)


def pack(args: argparse.Namespace) -> int:
    """Copy the photo subset, the region labels and the detector into ``.gpu/``; report the carry size."""
    photos = args.data_root / "leafsnap20"
    if not photos.is_dir():
        print(f"error: {photos} does not exist; pass --data-root (the folder holding leafsnap20/)", file=sys.stderr)
        return 1
    data = PACK / "data"
    shutil.rmtree(data, ignore_errors=True)
    species = sorted(p for p in photos.iterdir() if p.is_dir())[: args.species]
    for folder in species:
        dest = data / "leafsnap20" / folder.name
        dest.mkdir(parents=True)
        for photo in sorted(f for f in folder.iterdir() if f.is_file())[: args.per_species]:
            shutil.copy2(photo, dest / photo.name)
    shutil.copytree(args.data_root / "leafsnap20-regions", data / "leafsnap20-regions")
    detector = PACK / "detector"
    shutil.rmtree(detector, ignore_errors=True)
    if args.detector.is_file() and (args.detector.parent / "metrics.json").is_file():
        (detector / "detector").mkdir(parents=True)
        shutil.copy2(args.detector, detector / "detector" / "weights.pt")
        shutil.copy2(args.detector.parent / "metrics.json", detector / "detector" / "metrics.json")
        job = args.detector.parent.parent / "job.yaml"
        if job.is_file():
            shutil.copy2(job, detector / "job.yaml")
    else:
        print(f"note: no detector at {args.detector} (run `make demo` first, or pass --detector): "
              "the check will skip mask_precompute", file=sys.stderr)
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((REPO / f.decode()).stat().st_size for f in tracked if f and (REPO / f.decode()).is_file())
    packed = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    total = (tree + packed) / 2**20
    print(f"working tree {tree / 2**20:.1f} MiB + .gpu/ {packed / 2**20:.1f} MiB = {total:.1f} MiB "
          f"(limit {CARRY_LIMIT_MIB:.0f} MiB a call)")
    if total > CARRY_LIMIT_MIB:
        print(f"error: {total:.1f} MiB would travel, over {CARRY_LIMIT_MIB:.0f} MiB; lower --per-species",
              file=sys.stderr)
        return 1
    print('on the GPU machine: `make gpu-check` with carry [".gpu"] (device tool: run(command="make gpu-check", '
          'carry=[".gpu"], timeout_s=600))')
    return 0


# ---------------------------------------------------------------------------------------------------
# The check (on the GPU machine)


class Check:
    """Runs the steps, logs their output to one file and collects their results."""

    def __init__(self, out: Path, cpu: bool, budget_s: float) -> None:
        self.out, self.cpu = out, cpu
        self.deadline = time.perf_counter() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu_check.log", "w")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
                    "MGFA_DATA_ROOT": str(self.data_root)}
        self.doc: dict[str, Any] = {"benchmark": "gpu_check", "cpu_fallback": cpu, "steps": {}}

    @property
    def data_root(self) -> Path:
        packed = PACK / "data"
        return packed if (packed / "leafsnap20").is_dir() else Path(
            os.environ.get("MGFA_DATA_ROOT", REPO.parent / "shared" / "data"))

    def say(self, msg: str) -> None:
        line = f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, step: str, cmd: list[str], *, timeout: float, result: Path | None = None) -> dict[str, Any]:
        """Run ``cmd`` (its output into the log), record status, seconds and its JSON ``result``."""
        timeout = min(timeout, self.deadline - time.perf_counter() - 10.0)
        if timeout < 30.0:
            self.skip(step, "no time left in --budget-s")
            return self.doc["steps"][step]
        self.say(f"{step}: {' '.join(cmd)} (limit {timeout:.0f} s)")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"failed (over {timeout:.0f} s)"
        rec: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "command": cmd}
        if result is not None and result.is_file():
            rec["result_file"] = result.name
        self.doc["steps"][step] = rec
        self.say(f"{step}: {status} in {rec['seconds']} s")
        self.save()
        return rec

    def save(self) -> None:
        """(Re)write ``gpu_check.json``: what a command killed at the device's limit still brings back."""
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def skip(self, step: str, why: str) -> None:
        self.doc["steps"][step] = {"status": f"skipped: {why}"}
        self.say(f"{step}: skipped: {why}")
        self.save()


def step_install(c: Check) -> None:
    imports = _importable((*NEEDED, "mgfa_ray"), c.env)
    missing = [m for m in NEEDED if not imports[m]]
    wheels = sorted((PACK / "wheels").glob("*.whl"))
    if not missing:
        c.skip("install", f"{', '.join(NEEDED)} import already")
    elif not wheels:
        c.skip("install", f"{', '.join(missing)} missing and no wheels in .gpu/wheels (run `make gpu-wheels` here "
                          "and carry .gpu)")
    else:
        c.run("install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], timeout=180)
        imports = _importable((*NEEDED, "mgfa_ray"), c.env)
    c.doc["imports"] = imports


_PROBE = """import importlib, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        version = getattr(importlib.import_module(name), "__version__", None)
    except Exception:
        found[name] = False
    else:
        found[name] = str(version) if version else True
print(json.dumps(found))
"""


def _importable(modules: tuple[str, ...], env: dict[str, str]) -> dict[str, str | bool]:
    """Each module's version (or True) where a child Python imports it, else False: one child for
    all of them (a Python that imports Ray or Ultralytics costs 1-3 s), each import tried on its own.
    Where that child dies (an import that crashes the interpreter, a CUDA wheel for another driver),
    one child per module, so only the module that crashes reads False."""
    found = _probe(modules, env)
    if found is None:
        found = {m: (_probe((m,), env) or {}).get(m, False) for m in modules}
    return {m: found.get(m, False) for m in modules}


def _probe(modules: tuple[str, ...], env: dict[str, str]) -> dict[str, str | bool] | None:
    """``_PROBE`` in one child Python: its answer, or None where the child did not finish."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *modules], env=env, capture_output=True, text=True,
                          check=False)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def step_environment(c: Check) -> None:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                              "--format=csv,noheader"], capture_output=True, text=True, check=False)
        info["nvidia_smi"] = smi.stdout.strip()
    info["cpus"] = os.cpu_count()
    c.doc["environment"] = info
    c.say(f"environment: {json.dumps(info)}")


def step_gpu_tests(c: Check) -> None:
    if c.cpu:  # every test marked gpu needs CUDA: here pytest would only collect and skip them (the suite does)
        c.skip("gpu_tests", "no CUDA (every gpu-marked test needs it; the test suite collects them)")
        return
    # only the files holding gpu tests: collecting the others would import what the GPU check never runs
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in f.read_text())
    c.run("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
          timeout=180)


def step_train_step(c: Check) -> None:
    out = c.out / ("train_step_h100.json" if not c.cpu else "train_step_cpu_fallback.json")
    if c.cpu:
        args = ["--preset", "cpu", "--backbone", "mobilenet_v2", "--size", "64", "--steps", "1", "--repeats", "2",
                "--warmup", "1", "--real-epochs", "1", "--classes", "3", "--per-class", "8", "--batch-size", "4"]
    else:  # the packed photos, 20 species x 16: ~240 train photos, 3 full batches of 64 per epoch
        args = ["--preset", "h100", "--per-class", "16", "--val-fraction", "0.1", "--real-epochs", "8"]
    c.run("train_step", [sys.executable, "benchmarks/train_step.py", *args, "--data-root", str(c.data_root),
                         "--work-dir", str(REPO / "outputs" / "bench" / "gpu_check_train_step"), "--out", str(out)],
          timeout=240, result=out)


def step_mask_precompute(c: Check) -> None:
    weights = PACK / "detector" / "detector" / "weights.pt"
    if not weights.is_file():
        return c.skip("mask_precompute", f"no detector at {weights} (make gpu-wheels packs outputs/leafsnap20's)")
    if not c.doc.get("imports", {}).get("ultralytics"):
        return c.skip("mask_precompute", "Ultralytics does not import")
    out = c.out / ("mask_precompute_gpu.json" if not c.cpu else "mask_precompute_cpu_fallback.json")
    images = sum(1 for _ in (c.data_root / "leafsnap20").rglob("*.jpg"))
    args = (["--preset", "cpu", "--images", "12", "--repeats", "1", "--rows-per-shard", "6", "--workers", "1"]
            if c.cpu else ["--preset", "gpu", "--images", str(images), "--repeats", "2", "--rows-per-shard", "30"])
    c.run("mask_precompute", [sys.executable, "benchmarks/mask_precompute.py", *args, "--weights", str(weights),
                              "--data-root", str(c.data_root), "--out", str(out)], timeout=240, result=out)


def step_trial_overhead(c: Check) -> None:
    out = c.out / ("trial_overhead_gpu.json" if not c.cpu else "trial_overhead_cpu_fallback.json")
    args = ["--preset", "smoke", "--trials", "3"] if c.cpu else ["--preset", "gpu"]
    c.run("trial_overhead", [sys.executable, "benchmarks/trial_overhead.py", *args, "--out", str(out)],
          timeout=300, result=out)


STEPS = {"install": step_install, "environment": step_environment, "gpu_tests": step_gpu_tests,
         "train_step": step_train_step, "mask_precompute": step_mask_precompute,
         "trial_overhead": step_trial_overhead}


def headline(c: Check) -> dict[str, Any]:
    """The numbers the issue asks about, read from the steps' JSONs, with its targets (GPU only)."""
    def load(name: str) -> dict[str, Any] | None:
        path = c.out / name
        return json.loads(path.read_text()) if path.is_file() else None

    out: dict[str, Any] = {}
    suffix = "cpu_fallback" if c.cpu else None
    step = load(f"train_step_{suffix or 'h100'}.json")
    if step:
        for r in step["results"]:
            out[f"train_step_{r['backbone']}"] = {
                "mgfa_images_per_second": r["mgfa"]["images_per_second"],
                "backbone_only_images_per_second": r["backbone_only"]["images_per_second"],
                "real_epoch_over_synthetic": r["ratios"].get("real_epoch_over_synthetic_mgfa"),
                "precision": r.get("autocast_dtype"), "memory_format": r.get("memory_format")}
    masks = load(f"mask_precompute_{suffix or 'gpu'}.json")
    if masks:
        out["mask_precompute"] = {"ratios": masks.get("ratios"), "targets": masks.get("targets"),
                                  "masks_identical": masks.get("masks_identical")}
    overhead = load(f"trial_overhead_{suffix or 'gpu'}.json")
    if overhead:
        summary = overhead["summary"]
        reused = [t for s in overhead["searches"] if s["setting"] == "reused" for t in s["per_trial"]
                  if t["worker_trial"] > 1]
        allocated = [t["worker_cuda_allocated_mib"] for t in reused]
        out["trial_overhead"] = {**{k: summary.get(k) for k in ("by_setting", "trials_per_hour_reused_over_fresh")},
                                 "slots": [s["slots"] for s in overhead["searches"]],
                                 "reused_trials": len(reused),
                                 "cuda_allocated_mib_at_reused_trial_start": [min(allocated), max(allocated)]
                                 if allocated else None,
                                 "cuda_reserved_mib_at_reused_trial_start_max":
                                     max((t["worker_cuda_reserved_mib"] for t in reused), default=None)}
    if not c.cpu:
        out["targets"] = targets(out)
    return out


def targets(h: dict[str, Any]) -> dict[str, Any]:
    """The issue's GPU targets, each met (True / False) or not measured (None)."""
    step = h.get("train_step_resnet50") or {}
    ips, real = step.get("mgfa_images_per_second"), step.get("real_epoch_over_synthetic")
    masks = (h.get("mask_precompute") or {}).get("ratios") or {}
    pipeline = [v for k, v in masks.items() if k.startswith("pipeline_") and k.endswith("_over_plain_loop")
                and isinstance(v, float)]
    to = h.get("trial_overhead") or {}
    cuda = to.get("cuda_allocated_mib_at_reused_trial_start")
    return {
        "train_step_at_least_1000_images_per_second": None if ips is None else ips >= TARGET_IMAGES_PER_SECOND,
        "real_epoch_within_10_percent_of_synthetic": None if real is None else real >= TARGET_REAL_OVER_SYNTHETIC,
        "mask_precompute_pipeline_at_least_plain_loop": None if not pipeline else max(pipeline) >= 1.0,
        # the same level at every reused trial's start: nothing of the trial before is still allocated
        "cuda_memory_back_to_level_between_reused_trials": None if not cuda else cuda[1] - cuda[0] < 1.0,
        "reused_trial_reserved_mib_max": to.get("cuda_reserved_mib_at_reused_trial_start_max"),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip() or None
    except OSError:  # no git on the machine
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pack:
        return pack(args)
    import torch

    cpu = args.cpu_fallback or not torch.cuda.is_available()
    c = Check(args.out.resolve(), cpu, args.budget_s)
    started = time.perf_counter()
    c.doc["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    c.doc["git"] = _git_commit()
    c.say(f"{'CPU fallback (toy sizes)' if cpu else 'GPU check'}: data {c.data_root}, out {c.out}")
    for name, step in STEPS.items():
        if args.steps and name not in args.steps:
            continue
        step(c)
    c.doc["headline"] = headline(c)
    c.doc["total_seconds"] = round(time.perf_counter() - started, 1)
    c.save()
    failed = [k for k, v in c.doc["steps"].items() if v["status"].startswith("failed")]
    c.say(f"done in {c.doc['total_seconds']} s; headline {json.dumps(c.doc['headline'], default=str)}")
    c.say(f"failed steps: {failed}" if failed else "every step passed or was skipped (see gpu_check.json)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
