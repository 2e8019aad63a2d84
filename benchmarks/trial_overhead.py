"""Trial overhead: what surrounds a short trial, with fresh worker processes vs reused ones.

The paper's datasets are tiny (Cotton80: 80 classes x 3 training photos), so a trial of one or two
epochs is short and what surrounds it — a new worker process, imports, building the model, reading
weights, decoding the photos — can cost more than the training. One run makes, alternately, real
searches (:func:`mgfa_ray.search.driver.create_search` + :func:`mgfa_ray.search.driver.run_search`, the real
trainable :func:`mgfa_ray.search.driver.tune_trainable`, Optuna's random sampler with one seed so both
settings run the same configs, no early stopping) on a synthetic Cotton80-shaped dataset
(``benchmarks/synthetic.py``), with

* ``fresh``: ``search.reuse_workers: false`` — a new worker process per trial (the setting before
  worker reuse), and
* ``reused``: ``search.reuse_workers: true`` — a finished trial's worker runs the next trial,
  keeping the decoded data and the weights file (:mod:`mgfa_ray.train.worker`).

Each search runs in a subprocess of its own with its own local Ray cluster. Then one long search
with reused workers (``--memory-trials``) tracks the driver's and each worker's memory across
trials. Every number is in the JSON, with the definitions under ``measured``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, new_document  # noqa: E402

MEASURED = {
    "fit_seconds": "wall time of run_search (Ray Tune's Tuner built and fitted), the cluster already up",
    "work_seconds": "per trial: the sum of its epochs' epoch_seconds (training loop + evaluation), as run_trial reports",
    "slots": "trials that can run at once: min(max_concurrent, cluster CPUs / cpus_per_trial, GPUs / gpus_per_trial)",
    "overhead_per_trial_seconds": "(slots x fit_seconds - sum of work_seconds) / trials: slot time not spent training "
                                  "or evaluating, i.e. scheduling, worker start, imports, data, model, checkpoints",
    "setup_seconds": "per trial, inside the trainable: its start to its first epoch (config, data, model, weights)",
    "outside_trainable_per_trial_seconds": "(slots x fit_seconds - sum over trials of (last report - trainable start)) "
                                           "/ trials: slot time outside any trainable (process start, Ray's "
                                           "scheduling, result and checkpoint handling after the last report)",
    "trials_per_hour": "trials / fit_seconds x 3600",
    "first_trial_start_latency_seconds": "run_search called to the first trainable's start",
    "driver_rss_mib": "the driver process's resident memory, sampled every 0.5 s during the fit",
    "worker_rss_mib": "resident memory of a trial's worker process as the trial starts (worker_rss_mb)",
    "worker_cuda_mib_at_trial_start": "torch's CUDA allocated / reserved memory as a trial starts; 0 in a reused "
                                      "worker means the trial before left nothing on the GPU",
}

PRESETS: dict[str, dict[str, Any]] = {
    # 2-core CPU machine: 2 x (32 fresh + 32 reused) trials, then 128 reused: ~15 min
    "cpu": {"trials": 32, "repeats": 2, "memory_trials": 128, "max_concurrent": 2, "cpus_per_trial": 1.0,
            "gpus_per_trial": 0.0},
    # plumbing check (tests/test_benchmarks_load.py): 3 classes, 3 + 3 trials
    "smoke": {"trials": 3, "repeats": 1, "memory_trials": 0, "classes": 3, "max_concurrent": 2,
              "cpus_per_trial": 1.0, "gpus_per_trial": 0.0},
    # one GPU, 16 cores (make gpu-check): 4 trials share the GPU, ResNet-50 at 224 px
    "gpu": {"trials": 16, "repeats": 1, "memory_trials": 0, "max_concurrent": 4, "cpus_per_trial": 3.0,
            "gpus_per_trial": 0.25, "backbone": "resnet50", "resize": 256, "crop": 224, "batch_size": 32,
            "weights": None, "device": "cuda", "side": 320},
}
DEFAULTS: dict[str, Any] = {
    "classes": 80, "train_per_class": 3, "val_per_class": 3, "side": 96, "backbone": "mobilenet_v2",
    "weights": str(REPO.parent / "shared" / "weights" / "mobilenet_v2-imagenet-features.pth"),
    "resize": 40, "crop": 32, "batch_size": 32, "epochs": 2, "device": "cpu", "settings": ["fresh", "reused"],
    "ray_cpus": None, "ray_gpus": None, "tmp_dir": None, "keep": False,
}


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """The resolved settings: defaults, then the preset, then the flags given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="a set of defaults (default cpu)")
    p.add_argument("--trials", type=int, help="trials per compared search (cpu: 32)")
    p.add_argument("--repeats", type=int, help="rounds of the compared settings, order reversed every round (cpu: 2)")
    p.add_argument("--memory-trials", type=int, help="trials of the final reused-worker memory search; 0 skips it")
    p.add_argument("--settings", nargs="+", choices=["fresh", "reused"], help="settings compared (default both)")
    p.add_argument("--max-concurrent", type=int)
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float)
    p.add_argument("--ray-cpus", type=float, help="CPUs of the local cluster (default: this machine's)")
    p.add_argument("--ray-gpus", type=float, help="GPUs of the local cluster (default: those present)")
    p.add_argument("--classes", type=int)
    p.add_argument("--train-per-class", type=int)
    p.add_argument("--val-per-class", type=int)
    p.add_argument("--side", type=int, help="side of the synthetic photos in pixels")
    p.add_argument("--backbone")
    p.add_argument("--weights", help="local state_dict file; 'none' for random initialisation")
    p.add_argument("--resize", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--epochs", type=int, help="epochs of every trial (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--tmp-dir", help="parent of the run's temporary directory")
    p.add_argument("--keep", action="store_const", const=True, help="keep the temporary directory")
    p.add_argument("--out", type=Path, help="JSON result (default results/benchmarks/trial_overhead_<preset>.json "
                                            "for cpu, else outputs/bench/)")
    p.add_argument("--one-search", nargs=3, metavar=("SETTINGS_JSON", "SETTING", "RESULT_JSON"), help=argparse.SUPPRESS)
    args = vars(p.parse_args(argv))
    preset, out, one = args.pop("preset"), args.pop("out"), args.pop("one_search")
    s = {**DEFAULTS, **PRESETS[preset], **{k: v for k, v in args.items() if v is not None}}
    if isinstance(s["weights"], str) and (s["weights"].lower() == "none" or not Path(s["weights"]).is_file()):
        s["weights"] = None  # random initialisation: the weights file is not on this machine
    if out is None:
        out = (REPO / "results" / "benchmarks" / "trial_overhead_cpu.json" if preset == "cpu"
               else REPO / "outputs" / "bench" / f"trial_overhead_{preset}.json")
    s.update(preset=preset, out=str(Path(out).resolve()), _one_search=one)
    return s


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[trial_overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class RssSampler:
    """Samples this process's resident memory (MiB) every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.5) -> None:
        import psutil

        self.proc, self.period, self.samples = psutil.Process(), period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.proc.memory_info().rss / 2**20))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_search(s: dict[str, Any], setting: str, trials: int, work: Path) -> dict[str, Any]:
    """Start a local cluster, run one search of ``trials`` trials with ``setting``, measure it."""
    import ray
    import yaml

    from mgfa_ray.config import SearchConfig, TrainConfig
    from mgfa_ray.search.driver import create_search, ray_trials, run_search
    from mgfa_ray.search.space import load_search_space

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=s["ray_cpus"], num_gpus=s["ray_gpus"], include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    resources = ray.cluster_resources()
    base = TrainConfig(manifest=s["manifest"], masks=s["masks"], backbone=s["backbone"], weights=s["weights"],
                       resize=s["resize"], train_crop=s["crop"], epochs=s["epochs"], batch_size=s["batch_size"],
                       eval_split="val", device=s["device"], lr_schedule="cosine")
    space_file = work / f"space-{setting}-{trials}.yaml"
    space_file.write_text(yaml.safe_dump({
        "scheduler": {"max_epochs": s["epochs"], "early_stopping": False},
        "simplex": ["alpha", "beta", "gamma"],
        "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1},
                       "momentum": {"type": "uniform", "low": 0.5, "high": 0.99}}}))
    search = SearchConfig(space=str(space_file), num_samples=trials, max_concurrent=s["max_concurrent"],
                          cpus_per_trial=s["cpus_per_trial"], gpus_per_trial=s["gpus_per_trial"], seed=0,
                          sampler="random", reuse_workers=setting == "reused")
    search_dir = create_search(name=f"{setting}-{trials}", space=load_search_space(space_file, base=base),
                               space_file=str(space_file), search=search, base=base,
                               storage_path=str(work / f"searches-{setting}-{time.time_ns()}"),
                               cache_dir=str(work / "image-cache"))
    with RssSampler() as driver:
        t0 = time.time()
        run_search(search_dir)
        t1 = time.time()
    rows = ray_trials(search_dir).to_dict("records")
    ray.shutdown()
    return summarise_search(s, setting, resources, t0, t1, rows, driver.samples)


def summarise_search(s: dict[str, Any], setting: str, resources: dict[str, float], t0: float, t1: float,
                     rows: list[dict[str, Any]], driver: list[tuple[float, float]]) -> dict[str, Any]:
    """The measured numbers of one search (see MEASURED)."""
    slots = min(s["max_concurrent"], int(resources.get("CPU", 0) // s["cpus_per_trial"]),
                *([int(resources.get("GPU", 0) // s["gpus_per_trial"])] if s["gpus_per_trial"] else []))
    trials = []
    for r in rows:
        h = r["history"]
        trials.append({
            "trial": r["trial"], "status": r["ray_status"], "epochs": r["epochs_run"],
            "work_seconds": float(h["epoch_seconds"].sum()), "setup_seconds": float(h["setup_seconds"].iloc[0]),
            "started_at": float(h["trial_started_at"].iloc[0]), "last_report_at": float(h["reported_at"].iloc[-1]),
            "worker_pid": int(h["worker_pid"].iloc[0]), "worker_trial": int(h["worker_trial"].iloc[0]),
            "worker_rss_mib": float(h["worker_rss_mb"].iloc[0]),
            "worker_cuda_allocated_mib": float(h["worker_cuda_allocated_mb"].iloc[0]),
            "worker_cuda_reserved_mib": float(h["worker_cuda_reserved_mb"].iloc[0]),
            "eval_top1": float(h["eval_top1"].iloc[-1]),
        })
    n, fit = len(trials), t1 - t0
    work = sum(t["work_seconds"] for t in trials)
    spans = sum(t["last_report_at"] - t["started_at"] for t in trials)
    reused = [t for t in trials if t["worker_trial"] > 1]
    return {
        "setting": setting, "trials": n, "terminated": sum(t["status"] == "TERMINATED" for t in trials),
        "slots": slots, "fit_seconds": fit, "trials_per_hour": n / fit * 3600,
        "overhead_per_trial_seconds": (slots * fit - work) / n,
        "outside_trainable_per_trial_seconds": (slots * fit - spans) / n,
        "setup_seconds": _stats([t["setup_seconds"] for t in trials]),
        "work_seconds": _stats([t["work_seconds"] for t in trials]),
        "first_trial_start_latency_seconds": min(t["started_at"] for t in trials) - t0,
        "worker_processes": len({t["worker_pid"] for t in trials}),
        "reused_trials": len(reused),
        "reused_trials_cuda_allocated_mib_max": max((t["worker_cuda_allocated_mib"] for t in reused), default=None),
        "reused_trials_cuda_reserved_mib_max": max((t["worker_cuda_reserved_mib"] for t in reused), default=None),
        "driver_rss_mib": _quarters([v for _, v in driver]),
        "worker_memory": worker_memory(trials),
        "loadavg_end": os.getloadavg(),
        "per_trial": trials,
    }


def worker_memory(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Per worker process: resident memory as its trials start, and its growth per trial after the
    first two (the first trials fill the kept data and weights) by least squares."""
    out = {}
    for pid in sorted({t["worker_pid"] for t in trials}):
        mine = sorted((t["worker_trial"], t["worker_rss_mib"]) for t in trials if t["worker_pid"] == pid)
        later = [(k, v) for k, v in mine if k > 2]
        slope = statistics.linear_regression(*zip(*later)).slope if len(later) >= 3 else None
        out[str(pid)] = {"trials": len(mine), "rss_mib_first": mine[0][1], "rss_mib_last": mine[-1][1],
                         "rss_mib_max": max(v for _, v in mine), "growth_mib_per_trial_after_2": slope}
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def _quarters(values: list[float]) -> dict[str, Any]:
    """Max of each quarter of the samples, and the whole run's first, last and peak."""
    if not values:
        return {}
    q = max(1, len(values) // 4)
    return {"first": values[0], "last": values[-1], "peak": max(values),
            "quarter_max": [max(values[i * q:(i + 1) * q] or values[-1:]) for i in range(4)]}


def child_main(s: dict[str, Any]) -> None:
    """``--one-search SETTINGS SETTING RESULT``: one search in this fresh process, result as JSON."""
    from mgfa_ray.storage import atomic_write_json

    settings_json, setting, result_json = s["_one_search"]
    settings = json.loads(Path(settings_json).read_text())
    trials = settings["memory_trials"] if setting == "reused-memory" else settings["trials"]
    res = one_search(settings, setting.removesuffix("-memory"), trials, Path(settings["work"]))
    atomic_write_json(result_json, res)


def run(s: dict[str, Any]) -> dict[str, Any]:
    """The dataset, every search (each in a fresh subprocess), and the JSON document."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic import make_dataset

    started = time.perf_counter()
    doc = new_document("trial_overhead", settings={k: v for k, v in s.items() if not k.startswith("_")},
                       measured=MEASURED)
    work = Path(tempfile.mkdtemp(prefix="mgfa-trial-overhead-", dir=s["tmp_dir"]))
    try:
        s["manifest"], s["masks"] = (str(x) for x in make_dataset(
            work / "data", classes=s["classes"], train=s["train_per_class"], val=s["val_per_class"], side=s["side"]))
        s["work"] = str(work)
        settings_file = work / "settings.json"
        settings_file.write_text(json.dumps({k: v for k, v in s.items() if not k.startswith("_")}))
        order = []
        for rep in range(s["repeats"]):
            order += s["settings"] if rep % 2 == 0 else list(reversed(s["settings"]))
        if s["memory_trials"]:
            order.append("reused-memory")
        searches = []
        for i, setting in enumerate(order):
            result, log_file = work / f"result-{i}.json", work / f"search-{i}-{setting}.log"
            log(f"search {i + 1}/{len(order)}: {setting} (log {log_file})")
            with open(log_file, "w") as f:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one-search",
                                       str(settings_file), setting, str(result)],
                                      stdout=f, stderr=subprocess.STDOUT, cwd=REPO, check=False)
            if proc.returncode != 0 or not result.exists():
                raise RuntimeError(f"search {setting} failed (exit {proc.returncode}):\n{log_file.read_text()[-4000:]}")
            res = {**json.loads(result.read_text()), "order": i, "role": "memory" if setting.endswith("memory") else
                   "compared"}
            searches.append(res)
            log(f"  {res['trials']} trials in {res['fit_seconds']:.1f} s: overhead {res['overhead_per_trial_seconds']:.2f}"
                f" s/trial, {res['trials_per_hour']:.0f} trials/h, {res['worker_processes']} worker processes")
    finally:
        if not s["keep"]:
            shutil.rmtree(work, ignore_errors=True)
    doc["searches"] = searches
    doc["summary"] = summarise(s, searches)
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["total_seconds"] = time.perf_counter() - started
    return doc


def summarise(s: dict[str, Any], searches: list[dict[str, Any]]) -> dict[str, Any]:
    """Means per setting over the compared searches, the ratios, and the targets of the issue."""
    by = {}
    for setting in s["settings"]:
        mine = [r for r in searches if r["setting"] == setting and r["role"] == "compared"]
        by[setting] = {"searches": len(mine),
                       "overhead_per_trial_seconds": statistics.fmean(r["overhead_per_trial_seconds"] for r in mine),
                       "outside_trainable_per_trial_seconds":
                           statistics.fmean(r["outside_trainable_per_trial_seconds"] for r in mine),
                       "setup_seconds_mean": statistics.fmean(r["setup_seconds"]["mean"] for r in mine),
                       "work_seconds_mean": statistics.fmean(r["work_seconds"]["mean"] for r in mine),
                       "trials_per_hour": statistics.fmean(r["trials_per_hour"] for r in mine),
                       "per_search_trials_per_hour": [r["trials_per_hour"] for r in mine]}
    out: dict[str, Any] = {"by_setting": by}
    if {"fresh", "reused"} <= set(by):
        out["trials_per_hour_reused_over_fresh"] = by["reused"]["trials_per_hour"] / by["fresh"]["trials_per_hour"]
        out["overhead_fresh_over_reused"] = (by["fresh"]["overhead_per_trial_seconds"]
                                             / by["reused"]["overhead_per_trial_seconds"])
    memory = [r for r in searches if r["role"] == "memory"]
    if memory:
        m = memory[0]
        slopes = [w["growth_mib_per_trial_after_2"] for w in m["worker_memory"].values()
                  if w["growth_mib_per_trial_after_2"] is not None]
        quarters = m["driver_rss_mib"].get("quarter_max") or [None] * 4
        out["memory_search"] = {
            "trials": m["trials"], "reused_trials": m["reused_trials"], "worker_processes": m["worker_processes"],
            "driver_rss_mib": m["driver_rss_mib"],
            # the driver's peak in the last quarter of the samples over that in the second, per trial in between
            "driver_growth_mib_per_trial_second_half": (quarters[3] - quarters[1]) / (m["trials"] / 2)
            if quarters[1] is not None else None,
            "worker_growth_mib_per_trial_max": max(slopes) if slopes else None,
            "overhead_per_trial_seconds": m["overhead_per_trial_seconds"]}
    reused = by.get("reused", {})
    mem = out.get("memory_search", {})
    out["targets"] = {
        "overhead_below_1s": reused.get("overhead_per_trial_seconds", float("inf")) < 1.0,
        "trials_per_hour_at_least_2x": out.get("trials_per_hour_reused_over_fresh", 0) >= 2.0,
        # growth below 1 MiB per trial in each worker (least squares after its first 2 trials) and
        # below 0.5 MiB per trial in the driver over the second half of the long search
        "no_worker_memory_growth": None if mem.get("worker_growth_mib_per_trial_max") is None
        else mem["worker_growth_mib_per_trial_max"] < 1.0,
        "no_driver_memory_growth": None if mem.get("driver_growth_mib_per_trial_second_half") is None
        else mem["driver_growth_mib_per_trial_second_half"] < 0.5,
    }
    return out


def main(argv: list[str] | None = None) -> None:
    s = parse_args(argv)
    if s["_one_search"]:
        child_main(s)
        return
    from mgfa_ray.storage import atomic_write_json

    doc = run(s)
    atomic_write_json(s["out"], doc)
    log(f"wrote {s['out']}: {json.dumps(doc['summary'], default=str)[:800]}")


if __name__ == "__main__":
    main()
