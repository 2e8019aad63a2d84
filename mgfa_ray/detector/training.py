"""Stage 3 — the region detector (Pan et al., DICTA 2021, Sec. III-A).

A few images carry hand-drawn region boxes (YOLO txt or Pascal VOC xml, see :mod:`mgfa_ray.data.regions`).
An Ultralytics YOLO detector learns the region classes (vein, contour) from them and later finds the regions in
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

These are named steps, each a function (its docstring says "Step n (name)"), one module each: 1
*prepare* — :mod:`mgfa_ray.detector.dataset` (``prepare_annotated``, 1 above; ``holdout_split``, 2)
and, per split, ``prepare_split`` (the dataset of 3); 2 *fit* — ``_fit`` (the training of 3); 3
*evaluate* — ``_evaluate_split`` (4); 4 *publish* — ``publish_weights``, then ``publish_metrics``
(4); steps 2-4 and ``fit_and_evaluate``, which runs steps 1-4 for one split, are in
:mod:`mgfa_ray.detector.fit`. A rerun whose :func:`detector_key` and held-out split equal those recorded in
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
evaluates, loads or predicts (:func:`mgfa_ray.compat.ultralytics_private_settings`), its settings in that private
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

import logging
from pathlib import Path
from typing import Literal

import pandas as pd

from mgfa_ray.config import DetectorConfig
from mgfa_ray.detector.backbone import build_pretrained
from mgfa_ray.detector.cross_validation import train_cross_validated
from mgfa_ray.detector.dataset import holdout_split, prepare_annotated
from mgfa_ray.detector.fit import fit_and_evaluate
from mgfa_ray.detector.key import detector_key
from mgfa_ray.detector.yolo import import_ultralytics

log = logging.getLogger(__name__)


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
        train_ids, holdout_ids = holdout_split(ann.ids, ann.groups, cfg.holdout_fraction, cfg.seed)
        return fit_and_evaluate(ann, cfg, key=key, train_ids=train_ids, holdout_ids=holdout_ids, out_dir=out_dir)
    return train_cross_validated(ann, cfg, key=key, out_dir=out_dir, manifest=manifest, label_files=label_files,
                                  region_classes=region_classes)


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
    import_ultralytics()
    build_pretrained(cfg.model, cfg.backbone_weights, nc=nc)


