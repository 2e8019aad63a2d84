"""k-fold cross-validation of the detector over photo groups (``detector.cv_folds`` >= 2): one model per
fold, the pooled per-class mAP@0.5 with its spread, then a refit on every annotated photo.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mgfa_ray.config import DetectorConfig
from mgfa_ray.detector.dataset import Annotated, grouped_folds, prepare_annotated
from mgfa_ray.detector.fit import fit_and_evaluate, publish_metrics, stored_metrics
from mgfa_ray.detector.key import detector_key
from mgfa_ray.storage import atomic_write_json

log = logging.getLogger(__name__)


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def pool_folds(folds: list[dict], region_classes: list[str]) -> dict:
    """Pool per-fold metrics: per class, the mean (and std, min, max) over the folds that hold an
    instance of the class; overall ``map50``/``map50_95`` = mean of the per-class means over the
    classes with a defined mean (Ultralytics' convention for one evaluation).

    Args:
        folds: Fold metrics, each with ``per_class[c]["map50"/"map50_95"]`` (``None`` = undefined).
        region_classes: Class names to pool.

    Returns:
        ``{"map50", "map50_95", "per_class": {c: {"map50", "map50_95", "map50_spread",
        "map50_95_spread", "n_folds", "n_holdout_instances"}}}``; spreads are dicts of mean, std
        (population), min, max over folds; values in [0, 1] or ``None``.
    """
    per_class = {}
    for c in region_classes:
        got = [f["per_class"][c] for f in folds if f["per_class"][c]["map50"] is not None]
        s50 = _spread([g["map50"] for g in got])
        s = _spread([g["map50_95"] for g in got])
        per_class[c] = {"map50": s50["mean"], "map50_95": s["mean"], "map50_spread": s50, "map50_95_spread": s,
                        "n_folds": len(got),
                        "n_holdout_instances": sum(f["per_class"][c]["n_holdout_instances"] for f in folds)}
        for field in ("mask_iou", "prior_iou"):  # mean over the folds that measured them
            values = [f["per_class"][c].get(field) for f in folds]
            values = [v for v in values if v is not None]
            per_class[c][field] = float(np.mean(values)) if values else None
    defined = [v for v in per_class.values() if v["map50"] is not None]
    return {
        "map50": float(np.mean([v["map50"] for v in defined])) if defined else 0.0,
        "map50_95": float(np.mean([v["map50_95"] for v in defined])) if defined else 0.0,
        "per_class": per_class,
    }


def cross_validate_detector(
    *,
    manifest: pd.DataFrame,
    label_files: dict[str, Path],
    region_classes: list[str],
    cfg: DetectorConfig,
    out_dir: Path,
    folds: int | None = None,
    only_folds: list[int] | None = None,
    unknown_class: Literal["error", "skip"] = "error",
    annotated: Annotated | None = None,
) -> dict:
    """Grouped k-fold cross-validation of the detector recipe ``cfg`` over all annotated photos.

    The annotated images are partitioned by :func:`grouped_folds` (over the manifest's ``group``
    column, seeded by ``cfg.seed``); fold ``i`` trains on the other folds with :func:`fit_and_evaluate`
    (weights, metrics, dataset and Ultralytics run under ``out_dir/fold-<i>``) and is evaluated on
    fold ``i``. A fold finished earlier with the same recipe and ids is skipped, so an interrupted
    run resumes. Pooled = :func:`pool_folds` (per class: mean over folds; overall: mean over classes).
    No Ray.

    Args:
        manifest, label_files, region_classes, unknown_class: As for :func:`train_detector`.
        cfg: Recipe; its ``cv_folds`` is the default ``k``.
        out_dir: Work directory; ``out_dir/cv.json`` receives the returned dict (atomically).
        folds: ``k``; default ``cfg.cv_folds``.
        only_folds: Run only these fold indices (a pilot); the others are reported as missing.
        annotated: Output of :func:`prepare_annotated` to reuse (else computed here).

    Returns:
        ``{"evaluation": "cv<k>", "k", "seed", "detector_key", "complete" (every fold ran),
        "pooling", "map50", "map50_95", "per_class" (:func:`pool_folds`, over the folds that ran),
        "folds": [{"fold", "holdout_ids", "n_train", "n_holdout", "map50", "map50_95", "per_class",
        "train_seconds"}], "train_seconds" (sum)}``.

    Raises:
        ConfigError: ``k`` < 2 or more than the annotated photo groups.
        ValueError: As :func:`prepare_annotated`.
        LabelError: A label file has a bad line.
    """
    k = cfg.cv_folds if folds is None else folds
    ann = annotated or prepare_annotated(manifest=manifest, label_files=label_files, region_classes=region_classes,
                                         cfg=cfg, unknown_class=unknown_class)
    parts = grouped_folds(ann.ids, ann.groups, k, cfg.seed)
    key = detector_key(cfg, region_classes=ann.region_classes, label_files=ann.label_files)
    out_dir = Path(out_dir).resolve()
    done = []
    for i, held in enumerate(parts):
        if only_folds is not None and i not in only_folds:
            continue
        train_ids = sorted(set(ann.ids) - set(held))
        m = fit_and_evaluate(ann, cfg, key=key, train_ids=train_ids, holdout_ids=held, out_dir=out_dir / f"fold-{i}")
        done.append({"fold": i, "holdout_ids": held, "n_train": len(train_ids), "n_holdout": len(held),
                     **{f: m[f] for f in ("map50", "map50_95", "per_class", "train_seconds")}})
    result = {
        "evaluation": f"cv{k}", "k": k, "seed": cfg.seed, "detector_key": key, "complete": len(done) == k,
        "pooling": "per class: mean over the folds holding an instance of the class; overall: mean over classes",
        **pool_folds(done, ann.region_classes),
        "folds": done,
        "train_seconds": round(sum(f["train_seconds"] for f in done), 3),
    }
    atomic_write_json(out_dir / "cv.json", result)
    return result


def train_cross_validated(ann: Annotated, cfg: DetectorConfig, *, key: str, out_dir: Path, manifest: pd.DataFrame,
                           label_files: dict[str, Path], region_classes: list[str]) -> dict:
    """:func:`train_detector` with ``cfg.cv_folds`` = k ≥ 2: evaluate by k-fold cross-validation
    (``out_dir/cv/fold-<i>``), refit on every annotated photo (``out_dir``), publish the refit's
    ``metrics.json`` with the cross-validated mAPs (:func:`_cv_metrics`). Skipped, returning the
    stored metrics, when ``out_dir`` already holds this refit with ``evaluation`` ``cv<k>``."""
    stored = stored_metrics(out_dir, key, ann.ids, [])
    if stored is not None and stored.get("evaluation") == f"cv{cfg.cv_folds}":
        log.info("detector %s already trained in %s; skipping", key, out_dir)
        return stored
    cv = cross_validate_detector(manifest=manifest, label_files=label_files, region_classes=region_classes,
                                 cfg=cfg, out_dir=out_dir / "cv", annotated=ann)
    refit = fit_and_evaluate(ann, cfg, key=key, train_ids=ann.ids, holdout_ids=[], out_dir=out_dir)
    return publish_metrics(out_dir, _cv_metrics(refit, cv, ann.region_classes))


def _cv_metrics(refit: dict, cv: dict, region_classes: list[str]) -> dict:
    """The refit's metrics with the cross-validated ``evaluation``, ``map50``, ``map50_95`` and
    per-class mAPs of ``cv`` (:func:`cross_validate_detector`), its ``cv`` summary and a new
    ``created`` time (module docstring)."""
    per_class = {c: {**refit["per_class"][c], **{f: cv["per_class"][c][f] for f in
                     ("map50", "map50_95", "map50_spread", "map50_95_spread", "n_holdout_instances", "mask_iou",
                      "prior_iou")}}
                 for c in region_classes}
    for entry in per_class.values():
        entry.pop("note", None)
        if entry["map50"] is None:
            entry["note"] = "no instance of this class in any fold: AP undefined"
    return {**refit, "evaluation": cv["evaluation"], "map50": cv["map50"], "map50_95": cv["map50_95"],
            "per_class": per_class, "cv": {f: cv[f] for f in ("k", "pooling", "folds", "train_seconds")},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
