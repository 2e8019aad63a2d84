"""Detector recipes measured by grouped k-fold cross-validation on leafsnap20-regions.

Every recipe is evaluated on the same folds (:func:`mgfa_ray.detector.dataset.grouped_folds` over the 40
annotated photos' groups, seed 0): fold ``i`` trains on the other folds' photos and is scored on
fold ``i`` (box mAP@0.5 and mAP@0.5:0.95 per region class, Ultralytics ``val``). A (recipe, fold)
cell is one :func:`mgfa_ray.detector.fit.fit_and_evaluate` run in ``--work/<recipe>/fold-<i>``; a
finished cell (its ``metrics.json`` with the recipe's detector_key, the fold's ids and intact
weights) is skipped, so a killed run resumes, and a pilot (``--folds 0``) is the first column of
the full table. After the cells it rewrites ``results/detector/cv.json`` and ``table.md`` from every
finished cell on disk.

Recipes start from ``jobs/leafsnap20.yaml``'s old detector block (yolo11n.yaml, imgsz 320, 150
epochs, batch 8, Ultralytics' default augmentation) and change what :data:`RECIPES` says.

    nice -n 10 python benchmarks/detector_cv.py --k 4 --folds 0 --recipes old,r480,flipud   # pilot
    nice -n 10 python benchmarks/detector_cv.py --k 4 --recipes old,r480                    # the rest
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, new_document  # noqa: E402

from mgfa_ray.config import DatasetConfig, DetectorConfig  # noqa: E402
from mgfa_ray.detector.fit import stored_metrics
from mgfa_ray.detector.cross_validation import cross_validate_detector, pool_folds
from mgfa_ray.detector.key import detector_key
from mgfa_ray.detector.dataset import prepare_annotated
from mgfa_ray.detector.dataset import grouped_folds
from mgfa_ray.storage import atomic_write_json, atomic_write_text  # noqa: E402
from mgfa_ray.data.manifest import build_manifest  # noqa: E402
from mgfa_ray.data.regions import index_labels, select_annotated  # noqa: E402

REGION_CLASSES = ["vein", "contour"]
#: jobs/leafsnap20.yaml's detector recipe before this benchmark (results/leafsnap20/detector_metrics.json).
OLD = DetectorConfig(model="yolo11n.yaml", imgsz=320, epochs=150, batch=8, holdout_fraction=0.25, conf=0.1, seed=0)
#: name → (changes to OLD, why).
RECIPES: dict[str, tuple[dict, str]] = {
    "old": ({}, "jobs/leafsnap20.yaml's recipe: yolo11n, imgsz 320, 150 epochs, default augmentation"),
    "r480": ({"imgsz": 480, "epochs": 100}, "the paper's 480 px, fewer epochs to stay near 1.5x the old cost"),
    "flipud": ({"flipud": 0.5}, "leaves lie in any orientation: vertical flips too"),
    "r480e150": ({"imgsz": 480, "epochs": 150}, "480 px at the old epoch count"),
    "e300": ({"epochs": 300}, "from-scratch training on 30 photos: twice the epochs"),
    "r480flip": ({"imgsz": 480, "epochs": 100, "flipud": 0.5}, "480 px and vertical flips"),
    "nomosaic": ({"mosaic": 0.0}, "no mosaic: whole leaves only"),
    "s320": ({"model": "yolo11s.yaml"}, "model scale s (about 3x the FLOPs of n)"),
    "flat": ({"mosaic": 0.0, "scale": 0.25, "flipud": 0.5},
             "no mosaic, gain ±25% (not ±50%), vertical flips: thin vein boxes stay thick enough, same cost"),
    "mnv2": ({"model": "yolo11n-mobilenetv2.yaml", "epochs": 100,
              "backbone_weights": str(REPO.parent / "shared" / "weights" / "mobilenet_v2-imagenet-features.pth")},
             "YOLO11n neck and head on ImageNet MobileNetV2 features (detector.backbone_weights), 100 epochs "
             "(an epoch costs about 1.3x the old one)"),
}


def recipe_cfg(name: str) -> DetectorConfig:
    return OLD.model_copy(update=RECIPES[name][0])


def load_data(data_root: Path):
    manifest = build_manifest(data_root / "leafsnap20", DatasetConfig(images="leafsnap20", layout="class_folders", val_fraction=0.2,
                                                                       test_fraction=0.2, seed=0))
    labels = select_annotated(index_labels(data_root / "leafsnap20-regions" / "labels"), manifest,
                              max_images=None, seed=0)
    return manifest, labels


def finished_cells(work: Path, name: str, ann, k: int) -> list[dict]:
    """The folds of recipe ``name`` finished on disk (same key, ids and weights), as fold dicts."""
    cfg = recipe_cfg(name)
    key = detector_key(cfg, region_classes=ann.region_classes, label_files=ann.label_files)
    out = []
    for i, held in enumerate(grouped_folds(ann.ids, ann.groups, k, cfg.seed)):
        train_ids = sorted(set(ann.ids) - set(held))
        m = stored_metrics((work / name / f"fold-{i}").resolve(), key, train_ids, held)
        if m is not None:
            out.append({"fold": i, "holdout_ids": held, "n_train": len(train_ids), "n_holdout": len(held),
                        **{f: m[f] for f in ("map50", "map50_95", "per_class", "train_seconds", "created")}})
    return out


def table(doc: dict) -> str:
    k = doc["settings"]["k"]
    created = sorted(f["created"] for r in doc["recipes"].values() for f in r["folds"])
    when = f"{created[0]} to {created[-1]}" if created else doc["created_utc"]
    lines = [f"# Detector recipes, grouped {k}-fold cross-validation on leafsnap20-regions (40 photos)", "",
             f"Cells finished {when} on {doc['machine']['cpu_model']} ({doc['machine']['cpus_usable']} "
             f"usable cores shared with other work, `nice -n 10`, CPU); table written by "
             f"`{doc['command'].split(' --note')[0]}` (notes below) "
             f"(every command that ran cells: cv.json `runs`). Same folds for every recipe "
             f"(seed {doc['settings']['seed']}, 10 photos held out per fold). mAP@0.5 per class: mean ± std over "
             f"the folds measured (min–max); overall = mean of the two classes. Fold 0: the pilot column, "
             f"measured for every recipe. Train s: wall-clock per fold, under varying load.", "",
             "| recipe | folds | mAP@0.5 | vein | contour | mAP@0.5:0.95 | fold 0 vein / contour | train s / fold | change |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["recipes"].items():
        if not r["folds"]:
            continue
        pc = r["per_class"]

        def cell(c):
            s = pc[c]["map50_spread"]
            return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.2f}–{s['max']:.2f})"

        f0 = [f for f in r["folds"] if f["fold"] == 0]
        f0 = (f"{f0[0]['per_class']['vein']['map50']:.3f} / {f0[0]['per_class']['contour']['map50']:.3f}"
              if f0 else "—")
        lines.append(f"| {name} | {len(r['folds'])}/{k} | {r['map50']:.3f} | {cell('vein')} | {cell('contour')} "
                     f"| {r['map50_95']:.3f} | {f0} | {r['train_seconds_mean']:.0f} | {r['why']} |")
    lines += ["", "Target: cross-validated mAP@0.5 ≥ 0.75 with vein ≥ 0.5. A recipe with fewer than "
              f"{k}/{k} folds was measured on those folds only (a pilot); compare it on the fold 0 column."]
    lines += [f"\n{n}" for n in doc.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4, help="folds (default 4)")
    ap.add_argument("--recipes", default="old", help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--folds", default=None, help="comma-separated fold indices to run (default all)")
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("MGFA_DATA_ROOT", REPO.parent / "shared" / "data")))
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "detector_cv")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "detector")
    ap.add_argument("--table-only", action="store_true", help="run nothing; rewrite cv.json/table.md from disk")
    ap.add_argument("--note", action="append", default=[], help="a line for cv.json `notes` and table.md (repeatable)")
    args = ap.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    only = None if args.folds is None else [int(f) for f in args.folds.split(",")]
    manifest, labels = load_data(args.data_root)
    ann = prepare_annotated(manifest=manifest, label_files=labels, region_classes=REGION_CLASSES, cfg=OLD)
    if not args.table_only:
        for fold in (only if only is not None else range(args.k)):  # fold-major: a pilot column first
            for name in names:
                r = cross_validate_detector(manifest=manifest, label_files=labels, region_classes=REGION_CLASSES,
                                            cfg=recipe_cfg(name), out_dir=args.work / name, folds=args.k,
                                            only_folds=[fold], annotated=ann)
                f = r["folds"][0]
                print(f"{name} fold {fold}: mAP@0.5 {f['map50']:.3f} "
                      f"{ {c: round(v['map50'], 3) for c, v in f['per_class'].items()} } {f['train_seconds']:.0f} s",
                      flush=True)
    previous = args.out / "cv.json"
    runs = json.loads(previous.read_text()).get("runs", []) if previous.is_file() else []
    doc = new_document("detector_cv", settings={
        "k": args.k, "seed": OLD.seed, "n_photos": len(ann.ids), "n_groups": len(set(ann.groups.values())),
        "folds": grouped_folds(ann.ids, ann.groups, args.k, OLD.seed), "base_recipe": OLD.model_dump(mode="json"),
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"), "nice": 10,
    }, measured={
        "map50": "box mAP@0.5 of the last-epoch weights on the held-out fold (Ultralytics val), per class",
        "pooled": "per class: mean over the folds measured; overall: mean over the 2 classes",
        "train_seconds": "wall-clock seconds of model.train for one fold (30 train photos), CPU",
    })
    doc["runs"] = runs + [{"created_utc": doc["created_utc"], "command": doc["command"],
                           "loadavg_start": doc["machine"]["loadavg_start"]}]
    doc["notes"] = args.note
    doc["recipes"] = {}
    for name in RECIPES:
        folds = finished_cells(args.work, name, ann, args.k)
        if not folds:
            continue
        secs = [f["train_seconds"] for f in folds]
        doc["recipes"][name] = {
            "why": RECIPES[name][1], "changes": RECIPES[name][0], "config": recipe_cfg(name).model_dump(mode="json"),
            "complete": len(folds) == args.k, **pool_folds(folds, REGION_CLASSES), "folds": folds,
            "train_seconds_mean": float(np.mean(secs)), "train_seconds_total": float(np.sum(secs)),
        }
    atomic_write_json(args.out / "cv.json", doc)
    atomic_write_text(args.out / "table.md", table(doc))
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
