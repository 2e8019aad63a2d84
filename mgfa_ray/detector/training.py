"""Stage 3 — the region detector (Pan et al., DICTA 2021, Sec. III-A).

A few images carry hand-drawn region boxes (YOLO txt or Pascal VOC xml, see :mod:`mgfa_ray.data.regions`).
An Ultralytics YOLO detector learns the region kinds (vein, contour) from them and later finds the regions in
every image (stage 4, :mod:`mgfa_ray.masks`). The paper trains YOLOv5 at 480 × 480 and reports
mAP@0.5 on the annotated images (Table I: 0.963 Cotton80, 0.995 SoyLocal).

:func:`train_detector` does, in order:

1. Select the manifest images that have a label file and parse every label file with
   :func:`mgfa_ray.data.regions.parse_label_file` (a bad line raises :class:`~mgfa_ray.data.regions.LabelError`
   naming ``file:line`` before Ultralytics sees anything).
2. Hold out a seeded fraction of them (``cfg.holdout_fraction``; at least one image held out, at
   least one left for training). The split is made over the manifest's ``group`` column, so near-
   duplicate photos of one leaf never straddle train and held-out (leafsnap20 groups hold four
   photos of one sheet; UFG groups are single images).
3. Build a YOLO dataset under ``out_dir/dataset`` — ``images/{train,val}/<safe name>`` symlinks to
   the real images, ``labels/{train,val}/<safe name>.txt`` holding the *cleaned* labels, and
   ``data.yaml`` — and train YOLO from ``cfg.model`` (a model YAML such as ``yolo11n.yaml``, built
   without weights, or a local ``.pt`` file). Ultralytics' run directory is ``out_dir/runs``.
   Training runs with ``val=False``: no epoch is selected on the held-out images, so the held-out
   mAP below is not biased by model selection (the published weights are the last epoch's).
4. Evaluate the published weights on the held-out images with ``model.val`` and write
   ``out_dir/weights.pt`` and then ``out_dir/metrics.json`` (both atomically; the metrics file is
   written last and marks the stage complete).

These are named steps, each a function (its docstring says "Step n (name)"): 1 *prepare* —
:func:`prepare_annotated` (1 above), ``_holdout_split`` (2) and, per split, ``_prepare_split`` (the
dataset of 3); 2 *fit* — ``_fit`` (the training of 3); 3 *evaluate* — ``_evaluate_split`` (4);
4 *publish* — ``_publish_weights``, then ``_publish_metrics`` (4). :func:`fit_and_evaluate` runs
steps 1-4 for one split. A rerun whose :func:`detector_key` and held-out split equal those recorded in
``metrics.json`` and whose ``weights.pt`` still has the recorded SHA-256 skips training and returns
the stored metrics.

Cross-validation (``cfg.cv_folds`` = k ≥ 2). Ten held-out photos cannot choose a recipe (one
photo moves the vein AP by 0.1), so with k ≥ 2 :func:`train_detector` instead measures by
:func:`cross_validate_detector`: the annotated photos are split into k folds over the ``group``
column (:func:`grouped_folds`, seeded by ``cfg.seed``), one model per fold trains on the other
folds (``out_dir/cv/fold-<i>/``, each resumable) and is scored on its fold; then the published
model is refit on *all* annotated photos (k + 1 trainings). ``metrics.json`` then has
``evaluation: "cv<k>"``, ``train_ids`` = every annotated photo, ``holdout_ids`` = [], and
``map50``/``map50_95``/``per_class[c]`` hold the cross-validated values pooled by
:func:`pool_folds` (per class: mean over folds; overall: mean over classes), with
``per_class[c]["map50_spread"]`` (mean, std, min, max over folds) and ``cv`` (k, folds with their
ids and per-fold metrics, train seconds); ``train_seconds`` is the refit's. With ``cv_folds`` 0
``evaluation`` is ``"holdout"``.

``metrics.json`` keys:

* ``detector_key`` — :func:`detector_key` of the training inputs (16 hex digits).
* ``evaluation`` — how the mAPs were measured: ``holdout`` (one held-out split), ``cv<k>``
  (k-fold cross-validation, see above) or ``none`` (nothing held out: a CV refit's own file).
* ``model``, ``imgsz``, ``epochs``, ``seed`` — training settings (``cfg.model`` as configured).
* ``region_classes`` — region class names; index = class id.
* ``train_ids``, ``holdout_ids`` — sorted image_ids of the training / held-out images;
  ``n_train``, ``n_holdout`` their counts.
* ``map50``, ``map50_95`` — box mAP@0.5 and mAP@0.5:0.95 on the held-out images, in [0, 1]: the
  mean over the region classes with at least one held-out instance (Ultralytics' convention);
  0.0 when no held-out image has any box.
* ``per_class`` — ``{class_name: {map50, map50_95, n_holdout_instances, n_train_instances}}`` for
  every region class. For a class without a held-out instance ``map50`` and ``map50_95`` are
  ``null`` and ``note`` says why: its AP is undefined, not 0 (Ultralytics leaves such a class out
  of ``ap_class_index``; its ``maps`` would report the overall mean instead). With held-out
  photos also ``mask_iou`` and ``prior_iou``: the mean IoU of the masks the detector's boxes at
  ``conf`` make, and of the position prior, with the hand-drawn masks (:mod:`mgfa_ray.detector.overlap`;
  with k-fold CV the mean over folds), and ``n_mask_images``.
* ``weights_sha256`` — SHA-256 of ``weights.pt``.
* ``train_seconds`` — wall-clock seconds of ``model.train``.
* ``ultralytics_version`` — the Ultralytics version that trained it; ``device`` — ``cpu`` or
  ``cuda``.
* ``created`` — ISO 8601 UTC time the file was written.

Offline operation. Importing this module changes nothing. Every function here that imports
Ultralytics first calls :func:`mgfa_ray.runtime.configure`, which sets, unless already set,
``YOLO_OFFLINE=1`` (no connectivity probe, telemetry or update check), ``YOLO_AUTOINSTALL=false``
(no ``pip install`` of missing extras) and ``YOLO_CONFIG_DIR`` to a per-user temporary directory
(Ultralytics' settings file and font cache stay out of the repository and out of
``~/.config``). Ultralytics reads these when it is first imported, so code that imports
``ultralytics`` itself calls ``configure()`` first (the ``mgfa-ray`` command line, the Ray trainable
and the mask actors do; an earlier import is logged as a warning). While Ultralytics trains,
evaluates, loads or predicts here (:func:`_private_settings`), its settings in that private
directory have telemetry (``sync``) and the logging integrations (Ray Tune, MLflow, ...) switched
off and ``runs_dir``/``weights_dir``/``datasets_dir`` pointing into it (Ultralytics' defaults
derive from the git root of its own install — this repository when the virtualenv lives inside
it); they are changed in memory only, never in the settings file, and restored afterwards.
Training and evaluation pass ``plots=False`` and absolute ``project=`` paths (a relative one
resolves under ``runs_dir``, or under pytest under ``site-packages/tests/tmp/runs``); training
passes ``amp=False`` (on a GPU the AMP check downloads ``yolo26n.pt`` into ``weights_dir``);
offline, Ultralytics' dataset-check font lookup is limited to local fonts (it would otherwise send
an HTTP request for ``Arial.ttf``). Nothing is written to the working directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mgfa_ray.config import ConfigError, DetectorConfig
from mgfa_ray.detector.backbone import build_pretrained, model_source, write_initial_checkpoint
from mgfa_ray.errors import InputError
from mgfa_ray.storage import atomic_write_bytes, atomic_write_json, atomic_write_yaml, safe_stem, sha256_file, sha256_json
from mgfa_ray.data.regions import Box, parse_label_file
from mgfa_ray.runtime import YOLO_ENV_DEFAULTS, configure

log = logging.getLogger(__name__)

#: Bump when the training recipe changes in a way that changes the weights for equal inputs.
RECIPE_VERSION = 1

METRICS = "metrics.json"
WEIGHTS = "weights.pt"

_OFF_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


def _truthy(value: str | None) -> bool:
    """Ultralytics' own reading of a boolean environment variable (``utils.env_bool``)."""
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on", "y", "t"}


def _ultralytics():
    """Import Ultralytics after :func:`mgfa_ray.runtime.configure` (offline); returns the module."""
    configure()
    import ultralytics
    from ultralytics.utils import USER_CONFIG_DIR

    if Path(USER_CONFIG_DIR).parent != Path(os.environ["YOLO_CONFIG_DIR"]).expanduser():
        log.warning(
            "ultralytics was imported before mgfa_ray.runtime.configure(); its settings live in %s "
            "(call configure() first to keep them in $YOLO_CONFIG_DIR)", USER_CONFIG_DIR
        )
    return ultralytics


_settings_lock = threading.Lock()
_settings_users = 0
_settings_saved: dict[str, Any] = {}


@contextlib.contextmanager
def _private_settings():
    """Within the block Ultralytics' settings have telemetry and the integrations off and its
    default directories in the private config dir (see the module doc, "Offline operation").

    Only the settings of the private ``YOLO_CONFIG_DIR`` that :func:`mgfa_ray.runtime.configure`
    sets are changed (a user's own ``$YOLO_CONFIG_DIR`` is left as it is), and only in memory:
    Ultralytics' ``SETTINGS.update`` would rewrite its settings file. Ultralytics reads them when
    a trainer starts (integration callbacks) and when it resolves files (``weights_dir``). Blocks
    may nest and overlap across threads: the first to enter changes the settings, the last to
    leave restores them.
    """
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    config_dir = Path(USER_CONFIG_DIR).parent
    if config_dir != Path(YOLO_ENV_DEFAULTS["YOLO_CONFIG_DIR"]):
        yield
        return
    global _settings_users
    with _settings_lock:
        if _settings_users == 0:
            # No telemetry, and no integration callbacks (the Ray Tune one warns outside a Tune
            # trial; the others would log to external services). Default directories point into
            # the private dir: Ultralytics derives them from the git root of its own install,
            # which is this repository when the virtualenv lives in it.
            wanted: dict[str, Any] = {k: False for k in _OFF_SETTINGS if k in SETTINGS}
            wanted.update({k: str(config_dir / k.removesuffix("_dir"))
                           for k in ("runs_dir", "weights_dir", "datasets_dir")})
            _settings_saved.clear()
            _settings_saved.update({k: SETTINGS[k] for k in wanted if k in SETTINGS})
            dict.update(SETTINGS, wanted)  # dict's own update: in memory, the file untouched
        _settings_users += 1
    try:
        yield
    finally:
        with _settings_lock:
            _settings_users -= 1
            if _settings_users == 0:
                dict.update(SETTINGS, _settings_saved)


@contextlib.contextmanager
def _offline_fonts():
    """Within the block, Ultralytics' dataset check looks up fonts locally only (offline mode).

    ``ultralytics.data.utils.check_det_dataset`` (run by ``train`` and ``val``) calls
    ``check_font("Arial.ttf")``, which, when the font is not in the config dir or matplotlib's font
    list, sends an HTTP HEAD request to github.com (3 s timeout) and downloads the font. Offline
    that request can only fail, or hang until the timeout where DNS resolves but traffic is
    dropped. Ultralytics' ``YOLO_OFFLINE`` does not cover this call.
    """
    import ultralytics.data.utils as data_utils

    if not _truthy(os.environ.get("YOLO_OFFLINE")):
        yield
        return
    original = data_utils.check_font

    def local_font_only(font: str = "Arial.ttf"):
        from matplotlib import font_manager
        from ultralytics.utils import USER_CONFIG_DIR

        file = Path(USER_CONFIG_DIR) / Path(font).name
        if file.exists():
            return file
        matches = [f.fname for f in font_manager.fontManager.ttflist if font in f.fname]
        return matches[0] if matches else None

    data_utils.check_font = local_font_only
    try:
        yield
    finally:
        data_utils.check_font = original


def _model_identity(model: str) -> Any:
    """``cfg.model`` or ``cfg.backbone_weights`` as key material: a file (or a shipped model YAML) is
    identified by name and content, not its path."""
    p = Path(model_source(model))
    if p.is_file():
        return {"name": p.name, "sha256": sha256_file(p)}
    return model


#: DetectorConfig fields that enter :func:`detector_key` only when they differ from their default (the
#: default reproduces the training these keys identified before the field existed).
_KEY_IF_SET = ("cv_folds", "mosaic", "scale", "degrees", "fliplr", "flipud", "backbone_weights")


def detector_key(cfg: DetectorConfig, *, region_classes: list[str], label_files: dict[str, Path]) -> str:
    """Identify a detector by everything its weights depend on.

    The key hashes: the training fields of ``cfg`` (``model``, ``imgsz``, ``epochs``, ``batch``,
    ``holdout_fraction``, ``seed``, and ``cv_folds`` and the augmentation fields ``mosaic``,
    ``scale``, ``degrees``, ``fliplr``, ``flipud``, ``backbone_weights`` when they differ from their defaults; ``conf`` is
    left out because it only filters predictions — the mask set id includes it), the region class names, the ``(image_id, sha256 of the label
    file's bytes)`` pairs and :data:`RECIPE_VERSION`. A ``cfg.model`` naming an existing file (or
    a YAML shipped in ``mgfa_ray/detector/models``) and ``cfg.backbone_weights`` enter as their
    file name and content hash. No absolute path enters, so two machines with the
    data under different roots get the same key. Image pixels are identified by image_id only.

    Args:
        cfg: Detector settings.
        region_classes: Region class names; index = class id.
        label_files: image_id → YOLO label file. :func:`train_detector` passes only the label files
            of manifest images (the ones it trains and evaluates on).

    Returns:
        The first 16 hex digits of a SHA-256.

    Raises:
        FileNotFoundError: A label file does not exist.
    """
    fields = cfg.model_dump(mode="json")
    fields.pop("conf", None)
    fields.pop("min_map50", None)  # a stage gate (mgfa_ray.pipeline), not a training input
    for name in _KEY_IF_SET:  # fields added later enter only when set, so older keys stay valid
        if fields.get(name) == DetectorConfig.model_fields[name].default:
            fields.pop(name)
    fields["model"] = _model_identity(cfg.model)
    if cfg.backbone_weights is not None:
        fields["backbone_weights"] = _model_identity(cfg.backbone_weights)
    return sha256_json({
        "recipe": RECIPE_VERSION,
        "cfg": fields,
        "region_classes": list(region_classes),
        "labels": sorted((str(i), sha256_file(p)) for i, p in label_files.items()),
    })[:16]


def _safe_name(image_id: str) -> str:
    """Flat, unique file stem for an image_id that may contain ``/`` or other characters."""
    return f"{safe_stem(image_id)[:80]}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def _holdout_split(ids: list[str], groups: dict[str, str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded group-wise split of ``ids`` into (train, holdout), both sorted and non-empty."""
    by_group: dict[str, list[str]] = {}
    for i in sorted(ids):
        by_group.setdefault(groups[i], []).append(i)
    if len(by_group) < 2:
        raise InputError(
            f"{len(ids)} annotated image(s) in {len(by_group)} photo group(s): need at least 2 groups "
            f"to hold out at least one image and train on at least one"
        )
    order = sorted(by_group)
    random.Random(seed).shuffle(order)
    target = max(1, round(fraction * len(ids)))
    holdout: list[str] = []
    for g in order[:-1]:  # the last group always trains
        if len(holdout) >= target:
            break
        holdout.extend(by_group[g])
    train = sorted(set(ids) - set(holdout))
    return train, sorted(holdout)


def _write_labels(path: Path, boxes: list[Box]) -> None:
    path.write_text("".join(f"{b.cls} {b.cx:.6f} {b.cy:.6f} {b.w:.6f} {b.h:.6f}\n" for b in boxes))


def _build_dataset(root: Path, *, splits: dict[str, list[str]], image_of: dict[str, Path],
                   boxes_of: dict[str, list[Box]], region_classes: list[str]) -> Path:
    """Write a fresh YOLO dataset under ``root`` and return its ``data.yaml``."""
    if root.exists():
        shutil.rmtree(root)
    for split, ids in splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in ids:
            src = image_of[i]
            name = _safe_name(i)
            os.symlink(src, root / "images" / split / f"{name}{src.suffix.lower()}")
            _write_labels(root / "labels" / split / f"{name}.txt", boxes_of[i])
    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "nc": len(region_classes),
        "names": {i: n for i, n in enumerate(region_classes)},
    }
    return atomic_write_yaml(root / "data.yaml", data)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stored_metrics(out_dir: Path, key: str, train_ids: list[str], holdout_ids: list[str]) -> dict | None:
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
    yolo = _ultralytics()
    with _private_settings(), _offline_fonts():
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


@dataclass(frozen=True)
class Annotated:
    """The annotated photos a detector trains and is evaluated on (output of :func:`prepare_annotated`).

    Attributes:
        ids: Sorted image_ids of manifest images with a label file.
        label_files: image_id → label file (only ``ids``).
        boxes_of: image_id → cleaned region boxes.
        groups: image_id → photo group (the manifest's ``group``; the image_id when absent).
        image_of: image_id → absolute image path (exists).
        region_classes: Region class names; index = class id.
    """

    ids: list[str]
    label_files: dict[str, Path]
    boxes_of: dict[str, list[Box]]
    groups: dict[str, str]
    image_of: dict[str, Path]
    region_classes: list[str]

    def count(self, ids: list[str]) -> dict[int, int]:
        """Region instances per class id in ``ids``."""
        out: dict[int, int] = {}
        for i in ids:
            for b in self.boxes_of[i]:
                out[b.cls] = out.get(b.cls, 0) + 1
        return out


def prepare_annotated(*, manifest: pd.DataFrame, label_files: dict[str, Path], region_classes: list[str],
                      cfg: DetectorConfig, unknown_class: Literal["error", "skip"] = "error") -> Annotated:
    """Step 1 (prepare): select the annotated manifest images and parse their label files.

    Raises:
        ValueError: ``region_classes`` is empty; no manifest image has a label file; an annotated
            image's file is missing; ``cfg.model`` names a ``.pt`` file that does not exist.
        LabelError: A label file has a bad line (message names ``file:line``).
    """
    if not region_classes:
        raise InputError("region_classes is empty; name at least one region class (e.g. ['vein', 'contour'])")
    ids = sorted(set(manifest["image_id"].astype(str)) & set(label_files))
    if not ids:
        raise InputError(
            f"no manifest image has a label file ({len(manifest)} manifest images, "
            f"{len(label_files)} label files); check that label ids match manifest image_ids "
            f"(e.g. manifest {manifest['image_id'].iloc[0] if len(manifest) else None!r}, "
            f"labels {next(iter(sorted(label_files)), None)!r})"
        )
    if str(cfg.model).endswith(".pt") and not Path(cfg.model).expanduser().is_file():
        raise InputError(
            f"detector model {cfg.model!r} is not a local file; offline, Ultralytics would try to "
            f"download it. Use a model YAML (e.g. 'yolo11n.yaml') or a path to an existing .pt file"
        )
    used = {i: Path(label_files[i]) for i in ids}
    boxes_of = {
        i: parse_label_file(p, classes=list(region_classes), unknown_class=unknown_class) for i, p in used.items()
    }
    rows = manifest.assign(image_id=manifest["image_id"].astype(str)).set_index("image_id")
    groups = {i: str(rows.at[i, "group"]) if "group" in rows.columns else i for i in ids}
    image_of = {i: Path(rows.at[i, "path"]).resolve() for i in ids}
    missing = [str(p) for p in image_of.values() if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} annotated image file(s) do not exist, e.g. {missing[:3]}")
    return Annotated(ids, used, boxes_of, groups, image_of, list(region_classes))


def grouped_folds(ids: list[str], groups: dict[str, str], k: int, seed: int) -> list[list[str]]:
    """Seeded grouped k-fold partition of ``ids``: each photo group falls in exactly one fold.

    Groups are shuffled (``random.Random(seed)`` over the sorted group names) and each goes, in
    that order, to the fold holding the fewest images so far (lowest index on ties), so fold sizes
    differ by at most the largest group's size.

    Args:
        ids: image_ids to partition.
        groups: image_id → group name.
        k: Number of folds, 2 ≤ k ≤ number of groups.
        seed: Shuffle seed.

    Returns:
        ``k`` non-empty, disjoint, sorted lists of image_ids whose union is ``ids``.

    Raises:
        ConfigError: ``k`` < 2 or more than the number of groups (a ``ValueError`` too).
    """
    by_group: dict[str, list[str]] = {}
    for i in sorted(ids):
        by_group.setdefault(groups[i], []).append(i)
    if not 2 <= k <= len(by_group):
        raise ConfigError(
            f"detector.cv_folds = {k}: cross-validation needs 2 ≤ k ≤ the number of annotated photo "
            f"groups ({len(by_group)} groups in {len(ids)} annotated images); lower cv_folds or annotate more photos"
        )
    order = sorted(by_group)
    random.Random(seed).shuffle(order)
    folds: list[list[str]] = [[] for _ in range(k)]
    for g in order:
        min(folds, key=len).extend(by_group[g])  # min returns the first of equal lengths
    return [sorted(f) for f in folds]


def _fit(ann: Annotated, cfg: DetectorConfig, *, train_ids: list[str], out_dir: Path, device: str) -> tuple[Path, Path, float]:
    """Step 2 (fit): train YOLO on ``train_ids``; returns (data.yaml, last-epoch weights, train seconds).

    The dataset's ``val`` split is the held-out images once :func:`_build_dataset` writes them;
    training never looks at it (``val=False``).
    """
    runs = out_dir / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    yolo = _ultralytics()
    model_src = model_source(cfg.model)
    if cfg.backbone_weights is not None:  # start from the YAML with its pretrained backbone loaded
        model_src = str(write_initial_checkpoint(cfg.model, cfg.backbone_weights, nc=len(ann.region_classes),
                                                 path=out_dir / "init.pt"))
    with _private_settings(), _offline_fonts():
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
    stored = _stored_metrics(out_dir, key, train_ids, holdout_ids)
    if stored is not None:
        log.info("detector %s already trained in %s; skipping", key, out_dir)
        return stored
    _prepare_split(ann, train_ids=train_ids, holdout_ids=holdout_ids, out_dir=out_dir)
    device = _device()
    log.info("training detector %s on %d images (%d held out), device %s", key, len(train_ids),
             len(holdout_ids), device)
    data_yaml, best, train_seconds = _fit(ann, cfg, train_ids=train_ids, out_dir=out_dir, device=device)
    weights = _publish_weights(best, out_dir)
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
        "ultralytics_version": _ultralytics().__version__,
        "device": device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return _publish_metrics(out_dir, metrics)


def _prepare_split(ann: Annotated, *, train_ids: list[str], holdout_ids: list[str], out_dir: Path) -> None:
    """Step 1 (prepare) for one split: remove a stale ``metrics.json`` and write the YOLO dataset
    ``out_dir/dataset`` (train = ``train_ids``, val = ``holdout_ids``, or ``train_ids`` when
    nothing is held out)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A stale metrics file must not outlive the weights it describes if this run dies midway.
    (out_dir / METRICS).unlink(missing_ok=True)
    # With nothing held out the val split repeats the training images: Ultralytics' dataset check
    # wants one, and training never evaluates on it (val=False).
    _build_dataset(out_dir / "dataset", splits={"train": train_ids, "val": holdout_ids or train_ids},
                   image_of=ann.image_of, boxes_of=ann.boxes_of, region_classes=ann.region_classes)


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
    from mgfa_ray.masks.sources import decode_rgb
    from mgfa_ray.detector.overlap import mask_overlap

    model = load_detector(weights, device=device)
    found = predict_boxes(model, [decode_rgb(str(ann.image_of[i])) for i in holdout_ids], imgsz=cfg.imgsz,
                          conf=cfg.conf)
    overlap = mask_overlap(found=found, drawn=[ann.boxes_of[i] for i in holdout_ids],
                           train_drawn=[ann.boxes_of[i] for i in train_ids], num_classes=len(ann.region_classes))
    for name, entry in zip(ann.region_classes, overlap):
        evaluation["per_class"][name].update(entry)


def _publish_weights(best: Path, out_dir: Path) -> Path:
    """Step 4 (publish), first half: copy the trained ``best`` weights to ``out_dir/weights.pt``
    (atomically: :func:`mgfa_ray.storage.atomic_write_bytes`); returns that path."""
    return atomic_write_bytes(out_dir / WEIGHTS, Path(best).read_bytes())


def _publish_metrics(out_dir: Path, metrics: dict) -> dict:
    """Step 4 (publish), last: write ``out_dir/metrics.json`` atomically — the file that marks the
    stage complete — and return ``metrics``."""
    atomic_write_json(out_dir / METRICS, metrics)
    return metrics


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


def train_detector(
    *,
    manifest: pd.DataFrame,
    label_files: dict[str, Path],
    region_classes: list[str],
    cfg: DetectorConfig,
    out_dir: Path,
    unknown_class: Literal["error", "skip"] = "error",
) -> dict:
    """Train the region detector on the annotated manifest images and measure its mAP.

    With ``cfg.cv_folds`` 0 the model trains on part of the photos and is evaluated on a held-out
    part; with k ≥ 2 it is measured by k-fold cross-validation and refit on all photos (module
    docstring). Pure: no Ray.

    Args:
        manifest: Manifest table (:mod:`mgfa_ray.data.manifest` columns; uses ``image_id``, ``path``
            and, when present, ``group``). Images without a label file are ignored.
        label_files: image_id → label file, YOLO txt or VOC xml (e.g. :func:`mgfa_ray.data.regions.index_labels`).
            Label files of images not in the manifest are ignored.
        region_classes: Region class names; a label line's class id ``i`` means
            ``region_classes[i]``.
        cfg: Detector settings (model, imgsz, epochs, batch, holdout_fraction, seed, cv_folds,
            augmentation).
        out_dir: Stage directory: ``weights.pt``, ``metrics.json``, ``dataset/`` and ``runs/``
            (Ultralytics' run directory) are written here; with k-fold also ``cv/`` (the folds).
        unknown_class: Policy for label lines whose class id is outside ``region_classes``:
            ``error`` raises, ``skip`` drops the line with a warning naming file:line.

    Returns:
        The metrics dict, as written to ``out_dir/metrics.json`` (keys in the module docstring).

    Raises:
        ValueError: ``region_classes`` is empty; no manifest image has a label file; the annotated
            images fall in fewer than 2 photo groups (nothing to hold out); an annotated image's
            file is missing; ``cfg.model`` names a ``.pt`` file that does not exist.
        ConfigError: ``cfg.cv_folds`` exceeds the annotated photo groups.
        LabelError: A label file has a bad line (message names ``file:line``).
    """
    out_dir = Path(out_dir).resolve()
    ann = prepare_annotated(manifest=manifest, label_files=label_files, region_classes=region_classes, cfg=cfg,
                            unknown_class=unknown_class)
    key = detector_key(cfg, region_classes=ann.region_classes, label_files=ann.label_files)
    if cfg.cv_folds == 0:
        train_ids, holdout_ids = _holdout_split(ann.ids, ann.groups, cfg.holdout_fraction, cfg.seed)
        return fit_and_evaluate(ann, cfg, key=key, train_ids=train_ids, holdout_ids=holdout_ids, out_dir=out_dir)
    return _train_cross_validated(ann, cfg, key=key, out_dir=out_dir, manifest=manifest, label_files=label_files,
                                  region_classes=region_classes)


def _train_cross_validated(ann: Annotated, cfg: DetectorConfig, *, key: str, out_dir: Path, manifest: pd.DataFrame,
                           label_files: dict[str, Path], region_classes: list[str]) -> dict:
    """:func:`train_detector` with ``cfg.cv_folds`` = k ≥ 2: evaluate by k-fold cross-validation
    (``out_dir/cv/fold-<i>``), refit on every annotated photo (``out_dir``), publish the refit's
    ``metrics.json`` with the cross-validated mAPs (:func:`_cv_metrics`). Skipped, returning the
    stored metrics, when ``out_dir`` already holds this refit with ``evaluation`` ``cv<k>``."""
    stored = _stored_metrics(out_dir, key, ann.ids, [])
    if stored is not None and stored.get("evaluation") == f"cv{cfg.cv_folds}":
        log.info("detector %s already trained in %s; skipping", key, out_dir)
        return stored
    cv = cross_validate_detector(manifest=manifest, label_files=label_files, region_classes=region_classes,
                                 cfg=cfg, out_dir=out_dir / "cv", annotated=ann)
    refit = fit_and_evaluate(ann, cfg, key=key, train_ids=ann.ids, holdout_ids=[], out_dir=out_dir)
    return _publish_metrics(out_dir, _cv_metrics(refit, cv, ann.region_classes))


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


def check_backbone_weights(cfg: DetectorConfig, *, nc: int) -> None:
    """Check ``cfg.backbone_weights`` before any stage runs: when set, ``cfg.model`` must be a model
    YAML with one ``TorchVision`` backbone that the file's ``state_dict`` fits
    (:func:`mgfa_ray.detector.backbone.build_pretrained`; builds the model once on CPU, about 0.3 s).

    Args:
        cfg: Detector settings.
        nc: Region classes.

    Raises:
        WeightsError: Naming ``detector.backbone_weights``, the file, what is wrong and what to do.
    """
    if cfg.backbone_weights is None:
        return
    _ultralytics()
    build_pretrained(cfg.model, cfg.backbone_weights, nc=nc)


def weights_digest(weights: str | Path) -> str:
    """SHA-256 of the network an Ultralytics checkpoint predicts with: the EMA model if saved, else
    the model (as Ultralytics loads it), each state_dict tensor's name, dtype, shape and bytes.

    Unlike the file's hash it ignores what Ultralytics stores beside the weights (date, optimizer,
    training arguments), so two trainings that give the same tensors get the same digest.

    Raises:
        ValueError: ``weights`` is not an Ultralytics checkpoint with a model.
    """
    import torch

    _ultralytics()  # the checkpoint pickles Ultralytics classes
    ckpt = torch.load(Path(weights), map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if model is None:
        raise InputError(f"{weights} is not an Ultralytics checkpoint (no 'ema' or 'model' entry)")
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_detector(weights: Path, *, device: str = "cpu"):
    """Load trained detector weights for :func:`predict_boxes`.

    Args:
        weights: ``weights.pt`` written by :func:`train_detector` (any Ultralytics detection ``.pt``).
        device: ``cpu`` or ``cuda`` (``cuda`` falls back to ``cpu`` with a warning when CUDA is
            not available). Every prediction of the returned model runs there.

    Returns:
        An ``ultralytics.YOLO`` model.

    Raises:
        ValueError: ``weights`` is not an existing file, or ``device`` is not ``cpu``/``cuda``.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise InputError(f"detector weights {weights} do not exist; run the detector stage first")
    if device not in {"cpu", "cuda"}:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and _device() != "cuda":
        log.warning("CUDA requested for the detector but not available; using CPU")
        device = "cpu"
    yolo = _ultralytics()
    with _private_settings():
        model = yolo.YOLO(str(weights.resolve()), task="detect")
    model.to(device)
    # Sticky predict arguments: device, and an absolute (never created) save directory so that
    # Ultralytics does not resolve a relative ``runs/`` path.
    model.overrides.update(device=device, project=str(Path(tempfile.gettempdir()) / "mgfa-ray-predict"),
                           save=False, verbose=False)
    return model


def predict_boxes(model, images: list[np.ndarray], *, imgsz: int, conf: float) -> list[list[Box]]:
    """Detect region boxes in a batch of images with one model call.

    Args:
        model: Detector from :func:`load_detector`.
        images: RGB images, each an (H, W, 3) uint8 array; sizes may differ.
        imgsz: Inference input size in pixels (letterboxed; use the training ``imgsz``).
        conf: Confidence threshold in [0, 1].

    Returns:
        Per image, its boxes (``regions.Box``), the same whatever the other images of the batch:
        ``cx``, ``cy``, ``w``, ``h`` normalised to [0, 1]
        by that image's width / height, ``cls`` the predicted class index in [0, nc), ``conf`` the
        score in [0, 1]. Boxes are sorted by descending confidence (Ultralytics' NMS order).

    Raises:
        ValueError: An image is not an (H, W, 3) uint8 array, or ``conf`` is outside [0, 1].
    """
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf}")
    if not images:
        return []
    bgr = []
    for n, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(f"images[{n}]: expected an (H, W, 3) uint8 RGB array, got shape {im.shape} {im.dtype}")
        bgr.append(np.ascontiguousarray(im[:, :, ::-1]))  # Ultralytics treats numpy arrays as BGR
    # rect=False: every image is letterboxed to the full imgsz square, as in training. With
    # Ultralytics' default (rect=True) a batch of same-shaped images is padded only to a multiple of
    # the stride while a mixed batch is padded to the square, so boxes depended on batch company.
    with _private_settings():
        results = model.predict(bgr, imgsz=imgsz, conf=conf, rect=False, verbose=False, save=False)
    out = []
    for r in results:
        xywhn = r.boxes.xywhn.cpu().numpy().astype(float)
        cls = r.boxes.cls.cpu().numpy().astype(int)
        score = r.boxes.conf.cpu().numpy().astype(float)
        out.append([
            Box(int(c), float(cx), float(cy), float(w), float(h), conf=float(s))
            for c, (cx, cy, w, h), s in zip(cls, np.clip(xywhn, 0.0, 1.0), score)
        ])
    return out
