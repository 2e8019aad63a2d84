"""Search efficiency: ASHA + TPE against random search without early stopping, in training epochs.

On a proxy task with headroom — leafsnap20 real photos, a few species and photos per species,
MobileNetV2 trained from scratch at a small size, masks from the hand-drawn region labels — one
run makes, for every seed, two real searches with :mod:`mgfa_ray.search` over the same space
(lr, momentum, weight decay, the simplex [alpha, beta, gamma], delta, lam):

1. ``random`` — Optuna's ``RandomSampler`` with ``scheduler.early_stopping: false``: every trial
   trains ``max_epochs`` epochs (the baseline).
2. ``asha_tpe`` — multivariate TPE with ASHA (Optuna's ``SuccessiveHalvingPruner`` inside
   :class:`mgfa_ray.study.StudyScheduler`): trials stopped at the rungs grace_period x
   reduction_factor^k.

Both run through ``create_search`` / ``run_search`` exactly as a job does (Ray Tune, one CPU and one
torch thread per trial, ``max_concurrent`` trials at once). Afterwards every (trial, epoch) record
is read back with :func:`mgfa_ray.search.ray_trials` and ordered by the wall-clock moment its epoch
finished; counting epochs in that order gives, per method, the number of training epochs run until
the target accuracy was first reached. The target of a seed is the best accuracy random search
finds: the highest final ``eval_top1`` over random search's trials. See ``MEASURED`` for the exact
definitions. Issue target: ASHA + TPE needs at most 1/3 of random search's epochs (mean over seeds).

Examples::

    python benchmarks/search_efficiency.py --preset smoke        # < 1 min, a plumbing check
    python benchmarks/search_efficiency.py --preset cpu          # 2-core CPU, ~30 min
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import new_document

from mgfa_ray.config import DatasetConfig, MasksConfig, SearchConfig, TrainConfig, resolve_data_root
from mgfa_ray.storage import atomic_write_json
from mgfa_ray.manifest import build_manifest, manifest_hash, write_manifest
from mgfa_ray.masks import LabelBoxes, build_mask_set
from mgfa_ray.regions import index_labels
from mgfa_ray.search import create_search, ray_trials, read_record, run_search
from mgfa_ray.search_space import load_search_space
from mgfa_ray.trial import load_images

REPO = Path(__file__).resolve().parents[1]
REGION_CLASSES = ["vein", "contour"]
METHODS = ("random", "asha_tpe")
TARGET_RATIO = 1.0 / 3.0

# Every setting; a preset overrides some, explicit flags override both.
DEFAULTS: dict[str, Any] = {
    "classes": 20, "per_class": 12, "val_fraction": 0.34, "backbone": "mobilenet_v2", "resize": 64, "crop": 56,
    "mask_size": 32, "batch_size": 8, "lr_schedule": "cosine", "seeds": [0, 1, 2],
    "random_trials": 12, "asha_trials": 20, "max_epochs": 9, "grace_period": 1, "reduction_factor": 3,
    "max_concurrent": 2, "cpus_per_trial": 1, "tmp_dir": None, "keep": False,
    "lr": [1e-3, 1.0], "momentum": [0.5, 0.99], "weight_decay": [1e-6, 1e-2], "mask_loss": [1e-2, 1e2],
}
PRESETS: dict[str, dict[str, Any]] = {
    # Plumbing check in well under a minute: numbers mean nothing.
    "smoke": {"classes": 3, "per_class": 8, "val_fraction": 0.25, "resize": 40, "crop": 32, "seeds": [0],
              "random_trials": 2, "asha_trials": 2, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
    # The recorded run on a 2-core CPU: 20 species x 12 photos (165 train, 75 val), 56 px from scratch.
    "cpu": {},
}

MEASURED = {
    "task": (
        "leafsnap20 real photos, the first `classes` species x `per_class` photos, split by photo group into train "
        "and val (no test); masks rasterised from the hand-drawn YOLO region labels (empty for unlabelled photos); "
        "MGFA on `backbone` with random initial weights (weights=None), images resized to `resize` and cropped to "
        "`crop`; SGD with the sampled lr/momentum/weight decay and `lr_schedule` over max_epochs; trial seed = "
        "benchmark seed. eval_top1 = top-1 accuracy on the val split after each epoch."
    ),
    "methods": (
        "random: RandomSampler(seed), every trial runs max_epochs (early_stopping false), `random_trials` trials. "
        "asha_tpe: TPESampler(seed, multivariate) (its first 10 trials random) + Optuna SuccessiveHalvingPruner("
        "min_resource=grace_period, reduction_factor, min_early_stopping_rate=0) deciding after every epoch, "
        "`asha_trials` trials. Both via mgfa_ray.search.create_search + run_search: Ray Tune, cpus_per_trial CPUs "
        "and torch threads per trial, max_concurrent trials at once, a fresh worker process per trial, a "
        "checkpoint every epoch."
    ),
    "epoch_order": (
        "every (trial, epoch) record of ray_trials(search_dir).history, ordered by the wall-clock moment the epoch "
        "was reported: trial_start + time_total_s, where trial_start is pinned from Ray's integer-second "
        "`timestamp` and float `time_total_s` of all the trial's epochs (start lies in [max(timestamp - "
        "time_total_s), min(timestamp + 1 - time_total_s)]; the midpoint is used; the interval width is recorded). "
        "Cumulative epochs = position in that order (1-based)."
    ),
    "target_accuracy": (
        "per seed: the best accuracy random search finds = max over the random search's trials that ran "
        "max_epochs of their final-epoch eval_top1."
    ),
    "epochs_to_target": (
        "per method: the cumulative epoch count at the first (trial, epoch) record with eval_top1 >= target "
        "(any epoch of any trial: a checkpoint that good exists from then on). A method that never reaches it "
        "counts its total epochs and is flagged reached=false. Also recorded: epochs_to_target_completed = the "
        "same, counting only a trial's final epoch after max_epochs (a fully trained config that good was found)."
    ),
    "ratio": (
        "per seed: asha_tpe epochs_to_target / random epochs_to_target; mean_ratio = mean over seeds of that; "
        "ratio_of_means = mean asha_tpe epochs / mean random epochs. Target met: mean_ratio <= 1/3 and asha_tpe "
        "reached the target in every seed."
    ),
    "wall_seconds": (
        "run_search wall time per search (Ray Tune start-up, trial process start-up, data load, training, "
        "evaluation, checkpoints); wall_seconds_to_target = from the run_search call to the epoch that reached the "
        "target. The machine may be shared: see loadavg."
    ),
}


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line → resolved settings (defaults, then the preset, then explicit flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a set of defaults (smoke: < 1 min; cpu: the real run)")
    p.add_argument("--classes", type=int, help="leafsnap20 species (default 20)")
    p.add_argument("--per-class", type=int, help="photos per species (default 12 = 3 groups of 4)")
    p.add_argument("--val-fraction", type=float, help="fraction of each species' photo groups held out for val")
    p.add_argument("--backbone", help="TrainConfig backbone (default mobilenet_v2)")
    p.add_argument("--resize", type=int, help="image side before the crop (default 64)")
    p.add_argument("--crop", type=int, help="training crop / eval side (default 56)")
    p.add_argument("--mask-size", type=int, help="stored mask side (default 32)")
    p.add_argument("--batch-size", type=int, help="default 8 (20 steps an epoch: early epochs carry signal)")
    p.add_argument("--lr-schedule", choices=["step", "cosine"], help="default cosine over max_epochs")
    p.add_argument("--seeds", type=int, nargs="+", help="benchmark seeds (sampler and trial seed; default 0 1 2)")
    p.add_argument("--random-trials", type=int, help="trials of random search (default 12)")
    p.add_argument("--asha-trials", type=int, help="trials of ASHA + TPE (default 20)")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial never stopped (default 9)")
    p.add_argument("--grace-period", type=int, help="ASHA's first rung in epochs (default 1)")
    p.add_argument("--reduction-factor", type=int, help="ASHA's reduction factor (default 3: rungs 1, 3, 9)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default 2)")
    p.add_argument("--cpus-per-trial", type=int, help="CPUs and torch threads per trial (default 1)")
    p.add_argument("--data-root", help="directory holding leafsnap20/ (default $MGFA_DATA_ROOT or ../shared/data)")
    p.add_argument("--tmp-dir", help="parent of the run's temporary directory (default the system's)")
    p.add_argument("--keep", action="store_const", const=True, help="keep the temporary directory (searches, data) for inspection")
    p.add_argument("--out", type=Path, help="JSON result (default results/benchmarks/search_efficiency_cpu.json for "
                                            "--preset cpu, else outputs/bench/search_efficiency_<preset>.json)")
    args = vars(p.parse_args(argv))
    preset, data_root, out = (args.pop(k) for k in ("preset", "data_root", "out"))
    settings = {**DEFAULTS, **PRESETS.get(preset, {}), **{k: v for k, v in args.items() if v is not None}}
    if out is None:
        out = (REPO / "results" / "benchmarks" / "search_efficiency_cpu.json" if preset == "cpu"
               else REPO / "outputs" / "bench" / f"search_efficiency_{preset or 'custom'}.json")
    settings.update(preset=preset, data_root=str(resolve_data_root(data_root)), out=str(Path(out).resolve()))
    return settings


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[search_efficiency] {msg}", file=sys.stderr, flush=True)


def space_doc(s: dict[str, Any], *, early_stopping: bool) -> dict[str, Any]:
    """The search-space YAML document of one method (same parameters for both)."""
    def log_uniform(lo_hi: list[float]) -> dict[str, Any]:
        return {"type": "log_uniform", "low": float(lo_hi[0]), "high": float(lo_hi[1])}

    return {
        "scheduler": {"max_epochs": s["max_epochs"], "grace_period": s["grace_period"],
                      "reduction_factor": s["reduction_factor"], "early_stopping": early_stopping},
        "simplex": ["alpha", "beta", "gamma"],
        "parameters": {
            "lr": log_uniform(s["lr"]),
            "momentum": {"type": "uniform", "low": float(s["momentum"][0]), "high": float(s["momentum"][1])},
            "weight_decay": log_uniform(s["weight_decay"]),
            "delta": log_uniform(s["mask_loss"]),
            "lam": log_uniform(s["mask_loss"]),
        },
    }


def prepare_data(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """Manifest, label-based mask set and a filled decoded-image cache under ``work``."""
    root = Path(s["data_root"])
    ds = DatasetConfig(layout="class_folders", images="leafsnap20", max_classes=s["classes"],
                       max_per_class=s["per_class"], val_fraction=s["val_fraction"], test_fraction=0.0, seed=0)
    df = build_manifest(root / ds.images, ds)
    manifest = write_manifest(df, work / "manifest.parquet")
    labels = index_labels(root / "leafsnap20-regions" / "labels")
    source = LabelBoxes.create(labels, classes=REGION_CLASSES, unlabelled="empty")
    masks = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGION_CLASSES,
                           cfg=MasksConfig(resolution=s["mask_size"]), location=work / "masks", executor="local")
    # Decode once here, in the order run_trial asks for (train, then val), so trials read the cache.
    cache = work / "cache"
    cache.mkdir()
    load_images([*df.loc[df["split"] == "train", "path"], *df.loc[df["split"] == "val", "path"]],
                size=s["resize"], cache_dir=cache)
    return {"manifest": str(manifest), "masks": str(masks), "cache": str(cache),
            "info": {"species": int(df["label"].nunique()), "train_images": int((df["split"] == "train").sum()),
                     "val_images": int((df["split"] == "val").sum()),
                     "labelled_images": int(df["image_id"].isin(set(labels)).sum()),
                     "chance_top1": 1.0 / int(df["label"].nunique())}}


def epoch_events(search_dir: str, run_started: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (trial, epoch) record of a search in the order the epochs finished, and one summary per trial."""
    df = ray_trials(search_dir)
    events, trials = [], []
    for row in df.to_dict("records"):
        h = row["history"]
        if h is None or not len(h):
            trials.append({"trial": row["trial"], "optuna_trial": row["optuna_trial"], "ray_status": row["ray_status"],
                           "epochs_run": 0})
            continue
        lo = max(float(ts) - float(tt) for ts, tt in zip(h["timestamp"], h["time_total_s"], strict=True))
        hi = min(float(ts) + 1.0 - float(tt) for ts, tt in zip(h["timestamp"], h["time_total_s"], strict=True))
        start = (lo + hi) / 2 if hi >= lo else lo
        for rec in h.to_dict("records"):
            events.append({"trial": row["trial"], "epoch": int(rec["training_iteration"]),
                           "eval_top1": float(rec["eval_top1"]), "t": start + float(rec["time_total_s"]) - run_started})
        trials.append({
            "trial": row["trial"], "optuna_trial": row["optuna_trial"], "ray_status": row["ray_status"],
            "epochs_run": int(row["epochs_run"]), "final_eval_top1": float(h["eval_top1"].iloc[-1]),
            "best_eval_top1": float(h["eval_top1"].max()), "start_s": start - run_started,
            "start_uncertainty_s": max(0.0, hi - lo) if hi >= lo else None,
            "params": {k: v for k, v in row["config"].items()
                       if k in ("lr", "momentum", "weight_decay", "alpha", "beta", "gamma", "delta", "lam")},
        })
    events.sort(key=lambda e: (e["t"], e["trial"], e["epoch"]))
    for i, e in enumerate(events, 1):
        e["cumulative_epochs"] = i
    return events, trials


def study_states(search_dir: str) -> dict[str, int]:
    """Optuna states (COMPLETE / PRUNED / FAIL ...) of the search's trials."""
    from mgfa_ray.study import StudyRef, search_trials

    rec = read_record(search_dir)
    counts: dict[str, int] = {}
    for t in search_trials(StudyRef(rec.study.storage, rec.study.study_name).load()):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def run_method(name: str, method: str, seed: int, s: dict[str, Any], data: dict[str, Any], work: Path,
               spaces: dict[str, Path]) -> dict[str, Any]:
    """One search; its per-epoch records and per-trial summaries."""
    space_file = spaces[method]
    n = s["random_trials"] if method == "random" else s["asha_trials"]
    search = SearchConfig(space=str(space_file), num_samples=n, max_concurrent=s["max_concurrent"],
                          cpus_per_trial=s["cpus_per_trial"], seed=seed,
                          sampler="random" if method == "random" else "tpe", max_failures=0)
    base = TrainConfig(manifest=data["manifest"], masks=data["masks"], region_classes=REGION_CLASSES,
                       backbone=s["backbone"], weights=None, resize=s["resize"], train_crop=s["crop"],
                       batch_size=s["batch_size"], lr_schedule=s["lr_schedule"], device="cpu", precision="fp32",
                       seed=seed)
    search_dir = create_search(name=name, space=load_search_space(space_file, base=base), space_file=str(space_file),
                               search=search, base=base, storage_path=str(work / "searches"), cache_dir=data["cache"])
    load_start = os.getloadavg()
    t0 = time.time()
    run_search(search_dir)
    wall = time.time() - t0
    events, trials = epoch_events(search_dir, t0)
    return {"search": name, "num_trials": n, "wall_seconds": wall, "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "optuna_states": study_states(search_dir), "events": events,
            "trials": trials}


def reach(events: list[dict[str, Any]], target: float, max_epochs: int) -> dict[str, Any]:
    """Epochs (and seconds) until the first record at or above ``target``; see MEASURED."""
    total = len(events)
    hit = next((e for e in events if e["eval_top1"] >= target), None)
    done = next((e for e in events if e["epoch"] == max_epochs and e["eval_top1"] >= target), None)
    return {
        "reached": hit is not None,
        "epochs_to_target": hit["cumulative_epochs"] if hit else total,
        "wall_seconds_to_target": hit["t"] if hit else None,
        "hit": {k: hit[k] for k in ("trial", "epoch", "eval_top1")} if hit else None,
        "reached_completed": done is not None,
        "epochs_to_target_completed": done["cumulative_epochs"] if done else total,
    }


def summarise(run: dict[str, Any], target: float, s: dict[str, Any]) -> dict[str, Any]:
    """Per-method numbers of one seed."""
    trials, events = run["trials"], run["events"]
    finals = [t["final_eval_top1"] for t in trials if t.get("epochs_run") == s["max_epochs"]]
    epochs_run = [t.get("epochs_run", 0) for t in trials]
    hist: dict[str, int] = {}
    for e in sorted(epochs_run):
        hist[str(e)] = hist.get(str(e), 0) + 1
    return {
        "num_trials": run["num_trials"], "total_epochs": len(events),
        "trials_run_to_max_epochs": sum(e == s["max_epochs"] for e in epochs_run),
        "trials_stopped_early": sum(0 < e < s["max_epochs"] for e in epochs_run),
        "trials_without_epochs": sum(e == 0 for e in epochs_run),
        "trials_by_epochs_run": hist, "optuna_states": run["optuna_states"],
        "best_final_eval_top1": max(finals) if finals else None,
        "best_any_epoch_eval_top1": max((e["eval_top1"] for e in events), default=None),
        **reach(events, target, s["max_epochs"]),
        "wall_seconds": run["wall_seconds"], "loadavg_start": run["loadavg_start"], "loadavg_end": run["loadavg_end"],
        "max_start_uncertainty_s": max((t["start_uncertainty_s"] or 0.0 for t in trials if "start_s" in t),
                                       default=None),
    }


def run(s: dict[str, Any]) -> dict[str, Any]:
    """Every search of the settings ``s``; the JSON document."""
    import ray

    started = time.perf_counter()
    doc = new_document("search_efficiency", settings=s, measured=MEASURED)
    work = Path(tempfile.mkdtemp(prefix="mgfa-search-bench-", dir=s["tmp_dir"]))
    try:
        log(f"work directory {work}")
        data = prepare_data(s, work)
        doc["data"] = data["info"]
        spaces = {}
        for method, early in (("random", False), ("asha_tpe", True)):
            spaces[method] = work / f"space-{method}.yaml"
            spaces[method].write_text(yaml.safe_dump(space_doc(s, early_stopping=early), sort_keys=False))
        doc["spaces"] = {m: yaml.safe_load(p.read_text()) for m, p in spaces.items()}
        log(f"{data['info']['species']} species, {data['info']['train_images']} train / "
            f"{data['info']['val_images']} val photos; {s['backbone']} from scratch at {s['crop']} px")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
        seeds = []
        for seed in s["seeds"]:
            runs = {}
            for method in METHODS:
                log(f"seed {seed}: {method} search ({s['random_trials' if method == 'random' else 'asha_trials']} "
                    f"trials)")
                runs[method] = run_method(f"{method}-s{seed}", method, seed, s, data, work, spaces)
                log(f"seed {seed}: {method} done in {runs[method]['wall_seconds']:.0f} s, "
                    f"{len(runs[method]['events'])} epochs")
            finals = [t["final_eval_top1"] for t in runs["random"]["trials"] if t.get("epochs_run") == s["max_epochs"]]
            if not finals:
                raise RuntimeError(f"seed {seed}: no random-search trial ran {s['max_epochs']} epochs")
            target = max(finals)
            per = {m: summarise(runs[m], target, s) for m in METHODS}
            r, a = per["random"], per["asha_tpe"]
            entry = {
                "seed": seed, "target_eval_top1": target, **per,
                "ratio": a["epochs_to_target"] / r["epochs_to_target"],
                "ratio_completed": a["epochs_to_target_completed"] / r["epochs_to_target_completed"],
                "total_epochs_ratio": a["total_epochs"] / r["total_epochs"],
                "trials": {m: runs[m]["trials"] for m in METHODS},
                "epochs": {m: [{k: e[k] for k in ("cumulative_epochs", "trial", "epoch", "eval_top1", "t")}
                               for e in runs[m]["events"]] for m in METHODS},
            }
            log(f"seed {seed}: target {target:.3f}; epochs to target random {r['epochs_to_target']} / "
                f"{r['total_epochs']}, asha_tpe {a['epochs_to_target']} / {a['total_epochs']} "
                f"(reached {a['reached']}); ratio {entry['ratio']:.3f}")
            seeds.append(entry)
        ray.shutdown()
    finally:
        if s["keep"]:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    def mean(key: str, method: str | None = None) -> float:
        return statistics.mean(e[method][key] if method else e[key] for e in seeds)

    summary = {
        "seeds": [e["seed"] for e in seeds],
        "mean_target_eval_top1": mean("target_eval_top1"),
        **{f"mean_{k}_{m}": mean(k, m) for m in METHODS
           for k in ("epochs_to_target", "epochs_to_target_completed", "total_epochs", "wall_seconds")},
        "asha_tpe_reached_every_seed": all(e["asha_tpe"]["reached"] for e in seeds),
        "asha_tpe_reached_completed_every_seed": all(e["asha_tpe"]["reached_completed"] for e in seeds),
        "mean_ratio": mean("ratio"),
        "ratio_of_means": mean("epochs_to_target", "asha_tpe") / mean("epochs_to_target", "random"),
        "mean_ratio_completed": mean("ratio_completed"),
        "mean_total_epochs_ratio": mean("total_epochs_ratio"),
        "per_seed_ratio": [e["ratio"] for e in seeds],
    }
    summary["target"] = {
        "rule": "ASHA + TPE needs <= 1/3 of random search's epochs to reach the best accuracy random search finds "
                "(mean over seeds of the per-seed ratio), reaching it in every seed",
        "max_ratio": TARGET_RATIO,
        "met": summary["mean_ratio"] <= TARGET_RATIO and summary["asha_tpe_reached_every_seed"],
        "met_completed": summary["mean_ratio_completed"] <= TARGET_RATIO
        and summary["asha_tpe_reached_completed_every_seed"],
    }
    doc["summary"] = summary
    doc["per_seed"] = seeds
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["total_seconds"] = time.perf_counter() - started
    log(f"mean ratio {summary['mean_ratio']:.3f} (per seed "
        + ", ".join(f"{x:.3f}" for x in summary["per_seed_ratio"])
        + f"), target <= {TARGET_RATIO:.3f} met: {summary['target']['met']}")
    return doc


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the searches, write the JSON atomically."""
    settings = parse_args(argv)
    doc = run(settings)
    atomic_write_json(settings["out"], doc)
    log(f"wrote {settings['out']} ({doc['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
