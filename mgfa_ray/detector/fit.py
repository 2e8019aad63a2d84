"""Steps 2-4 of the detector stage for one split: fit YOLO, evaluate the published weights on the
held-out photos (mAP@0.5 per region class, and the masks' overlap with the hand-drawn ones), publish
``weights.pt`` then ``metrics.json`` (see :mod:`mgfa_ray.detector.training` for the file's keys).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mgfa_ray.compat import ultralytics_offline_fonts, ultralytics_private_settings
from mgfa_ray.config import DetectorConfig
from mgfa_ray.detector.backbone import model_source, write_initial_checkpoint
from mgfa_ray.detector.dataset import Annotated, build_dataset
from mgfa_ray.detector.inference import load_detector, predict_boxes
from mgfa_ray.detector.yolo import default_device, import_ultralytics
from mgfa_ray.storage import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)


METRICS = "metrics.json"


WEIGHTS = "weights.pt"


def stored_metrics(out_dir: Path, key: str, train_ids: list[str], holdout_ids: list[str]) -> dict | None:
    """The metrics a finished run left in ``out_dir`` when they describe this training: the same
    :func:`~mgfa_ray.detector.key.detector_key`, the same train and held-out ids, and a ``weights.pt``
    whose SHA-256 is the recorded one; ``None`` otherwise (missing, unreadable or stale: train again)."""
    metrics_path, weights_path = out_dir / METRICS, out_dir / WEIGHTS
    if not (metrics_path.is_file() and weights_path.is_file()):
        return None
    try:
        stored = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (
        stored.get("detector_key") != key
        or stored.get("train_ids") != train_ids
        or stored.get("holdout_ids") != holdout_ids
        or stored.get("weights_sha256") != sha256_file(weights_path)
    ):
        return None
    return stored


def _evaluate(weights: Path, *, data_yaml: Path, cfg: DetectorConfig, device: str, project: Path,
              region_classes: list[str], n_holdout: dict[int, int], n_train: dict[int, int]) -> dict:
    """Held-out box mAP of ``weights``: overall and per region class."""
    yolo = import_ultralytics()
    with ultralytics_private_settings(), ultralytics_offline_fonts():
        model = yolo.YOLO(str(weights))
        m = model.val(data=str(data_yaml), split="val", imgsz=cfg.imgsz, batch=cfg.batch, device=device,
                      workers=0, plots=False, save_json=False, project=str(project), name="holdout",
                      exist_ok=True, verbose=False)
    ap50 = {int(c): float(v) for c, v in zip(m.box.ap_class_index, m.box.ap50)}
    ap = {int(c): float(v) for c, v in zip(m.box.ap_class_index, m.box.ap)}
    per_class = {}
    for c, name in enumerate(region_classes):
        entry: dict[str, Any] = {"n_holdout_instances": n_holdout.get(c, 0), "n_train_instances": n_train.get(c, 0)}
        if n_holdout.get(c, 0) > 0:
            entry.update(map50=ap50.get(c, 0.0), map50_95=ap.get(c, 0.0))
        else:
            entry.update(map50=None, map50_95=None, note="no held-out instance of this class: AP undefined")
        per_class[name] = entry
    return {"map50": float(m.box.map50), "map50_95": float(m.box.map), "per_class": per_class}


def _fit(ann: Annotated, cfg: DetectorConfig, *, train_ids: list[str], out_dir: Path, device: str) -> tuple[Path, Path, float]:
    """Step 2 (fit): train YOLO on ``train_ids``; returns (data.yaml, last-epoch weights, train seconds).

    The dataset's ``val`` split is the held-out images once :func:`build_dataset` writes them;
    training never looks at it (``val=False``).
    """
    runs = out_dir / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    yolo = import_ultralytics()
    model_src = model_source(cfg.model)
    if cfg.backbone_weights is not None:  # start from the YAML with its pretrained backbone loaded
        model_src = str(write_initial_checkpoint(cfg.model, cfg.backbone_weights, nc=len(ann.region_classes),
                                                 path=out_dir / "init.pt"))
    with ultralytics_private_settings(), ultralytics_offline_fonts():
        model = yolo.YOLO(model_src)
        t0 = time.perf_counter()
        try:
            model.train(
                data=str(out_dir / "dataset" / "data.yaml"), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch,
                seed=cfg.seed, deterministic=True, device=device, workers=0 if device == "cpu" else 4,
                project=str(runs), name="train", exist_ok=True, plots=False, amp=False, val=False,
                cache=False,  # measured: RAM cache gave no speed-up here and Ultralytics warns it is non-deterministic
                mosaic=cfg.mosaic, scale=cfg.scale, degrees=cfg.degrees, fliplr=cfg.fliplr, flipud=cfg.flipud,
            )
        except OSError as err:  # Ultralytics' own writes (weights per epoch) name no file: name its run
            if err.filename is None:
                err.filename = str(runs / "train")
            raise
    train_seconds = time.perf_counter() - t0
    best = Path(model.trainer.best)
    if not best.is_file():
        best = Path(model.trainer.last)
    return out_dir / "dataset" / "data.yaml", best, train_seconds


def prepare_split(ann: Annotated, *, train_ids: list[str], holdout_ids: list[str], out_dir: Path) -> None:
    """Step 1 (prepare) for one split: remove a stale ``metrics.json`` and write the YOLO dataset
    ``out_dir/dataset`` (train = ``train_ids``, val = ``holdout_ids``, or ``train_ids`` when
    nothing is held out)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A stale metrics file must not outlive the weights it describes if this run dies midway.
    (out_dir / METRICS).unlink(missing_ok=True)
    # With nothing held out the val split repeats the training images: Ultralytics' dataset check
    # wants one, and training never evaluates on it (val=False).
    build_dataset(out_dir / "dataset", splits={"train": train_ids, "val": holdout_ids or train_ids},
                   image_of=ann.image_of, boxes_of=ann.boxes_of, region_classes=ann.region_classes)


def fit_and_evaluate(ann: Annotated, cfg: DetectorConfig, *, key: str, train_ids: list[str],
                     holdout_ids: list[str], out_dir: Path) -> dict:
    """Steps 1-4 for one split: prepare the dataset, fit on ``train_ids``, evaluate on
    ``holdout_ids``, publish.

    Writes ``out_dir/weights.pt`` and then ``out_dir/metrics.json`` (module docstring keys; with
    ``holdout_ids`` empty — a refit on all photos — ``map50``/``map50_95``/``per_class`` mAPs are
    ``null``). Skips the work and returns the stored metrics when ``out_dir`` already holds a
    finished run with this ``key``, these ids and intact weights.
    """
    out_dir = Path(out_dir).resolve()
    stored = stored_metrics(out_dir, key, train_ids, holdout_ids)
    if stored is not None:
        log.info("detector %s already trained in %s; skipping", key, out_dir)
        return stored
    prepare_split(ann, train_ids=train_ids, holdout_ids=holdout_ids, out_dir=out_dir)
    device = default_device()
    log.info("training detector %s on %d images (%d held out), device %s", key, len(train_ids),
             len(holdout_ids), device)
    data_yaml, best, train_seconds = _fit(ann, cfg, train_ids=train_ids, out_dir=out_dir, device=device)
    weights = publish_weights(best, out_dir)
    evaluation = _evaluate_split(ann, cfg, weights, data_yaml=data_yaml, train_ids=train_ids,
                                 holdout_ids=holdout_ids, device=device, out_dir=out_dir)
    _add_mask_overlap(evaluation, ann, cfg, weights, train_ids=train_ids, holdout_ids=holdout_ids, device=device)
    metrics = {
        "detector_key": key,
        "evaluation": "holdout" if holdout_ids else "none",
        "model": cfg.model,
        "backbone_weights": cfg.backbone_weights,
        "imgsz": cfg.imgsz,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "region_classes": list(ann.region_classes),
        "train_ids": train_ids,
        "holdout_ids": holdout_ids,
        "n_train": len(train_ids),
        "n_holdout": len(holdout_ids),
        **evaluation,
        "weights_sha256": sha256_file(weights),
        "train_seconds": round(train_seconds, 3),
        "ultralytics_version": import_ultralytics().__version__,
        "device": device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return publish_metrics(out_dir, metrics)


def _evaluate_split(ann: Annotated, cfg: DetectorConfig, weights: Path, *, data_yaml: Path, train_ids: list[str],
                    holdout_ids: list[str], device: str, out_dir: Path) -> dict:
    """Step 3 (evaluate): ``map50``, ``map50_95`` and ``per_class`` of ``weights`` on the held-out
    images (:func:`_evaluate`); with nothing held out every mAP is ``None`` (note "nothing held out")."""
    if holdout_ids:
        return _evaluate(weights, data_yaml=data_yaml, cfg=cfg, device=device, project=out_dir / "runs",
                         region_classes=ann.region_classes, n_holdout=ann.count(holdout_ids),
                         n_train=ann.count(train_ids))
    n_train = ann.count(train_ids)
    return {"map50": None, "map50_95": None, "per_class": {
        name: {"map50": None, "map50_95": None, "n_holdout_instances": 0, "n_train_instances": n_train.get(c, 0),
               "note": "nothing held out"} for c, name in enumerate(ann.region_classes)}}


def _add_mask_overlap(evaluation: dict, ann: Annotated, cfg: DetectorConfig, weights: Path, *,
                      train_ids: list[str], holdout_ids: list[str], device: str) -> None:
    """Step 3 (evaluate), second half: into each ``per_class`` entry of ``evaluation``, the held-out
    masks' ``mask_iou`` and the position prior's ``prior_iou`` (:mod:`mgfa_ray.detector.overlap`; the
    detector's boxes at ``cfg.conf``, as the mask stage takes them). Nothing when nothing is held out."""
    if not holdout_ids:
        return
    from mgfa_ray.data.images import decode_rgb
    from mgfa_ray.detector.overlap import mask_overlap

    model = load_detector(weights, device=device)
    found = predict_boxes(model, [decode_rgb(str(ann.image_of[i])) for i in holdout_ids], imgsz=cfg.imgsz,
                          conf=cfg.conf)
    overlap = mask_overlap(found=found, drawn=[ann.boxes_of[i] for i in holdout_ids],
                           train_drawn=[ann.boxes_of[i] for i in train_ids], num_classes=len(ann.region_classes))
    for name, entry in zip(ann.region_classes, overlap):
        evaluation["per_class"][name].update(entry)


def publish_weights(best: Path, out_dir: Path) -> Path:
    """Step 4 (publish), first half: copy the trained ``best`` weights to ``out_dir/weights.pt``
    (atomically: :func:`mgfa_ray.storage.atomic_write_bytes`); returns that path."""
    return atomic_write_bytes(out_dir / WEIGHTS, Path(best).read_bytes())


def publish_metrics(out_dir: Path, metrics: dict) -> dict:
    """Step 4 (publish), last: write ``out_dir/metrics.json`` atomically — the file that marks the
    stage complete — and return ``metrics``."""
    atomic_write_json(out_dir / METRICS, metrics)
    return metrics
