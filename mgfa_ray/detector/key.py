"""The detector key: one hash of everything a detector's weights depend on (training fields, region
classes, label files, recipe version), so a rerun with equal inputs reuses the published weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mgfa_ray.config import DetectorConfig
from mgfa_ray.detector.backbone import model_source
from mgfa_ray.storage import sha256_file, sha256_json

#: Bump when the training recipe changes in a way that changes the weights for equal inputs.
RECIPE_VERSION = 1


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
