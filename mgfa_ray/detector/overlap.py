"""Are a detector's masks useful? Their overlap with the hand-drawn masks, beside a fixed prior's.

The detector gate reads held-out mAP@0.5, which ranks boxes at every confidence; the mask stage
keeps only boxes at ``detector.conf`` or above, and a held-out mAP of 0.27–0.35 went with vein
masks from useless (IoU 0, no box above the threshold) to better than a fixed mask
(``results/benchmarks/detector_gate.json``). So the detector stage also measures the masks
themselves on its held-out photos: per region class, the IoU of the mask the mask stage would
build from the detector's boxes with the mask of the hand-drawn boxes, beside the IoU of the
**position prior** — one fixed mask, the training photos' hand-drawn masks averaged and cut at
0.5, which sees no image (the yardstick of :mod:`mgfa_ray.train.mask_fit`). Masks that do not beat it
are no better than drawing the same region on every photo. Pure: boxes in, numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mgfa_ray.data.regions import Box, rasterize

#: Side of the masks compared, in pixels (the masks' own ``masks.resolution`` is a later stage's).
RESOLUTION = 64


def mask_iou(found: np.ndarray, drawn: np.ndarray) -> float:
    """IoU of two binary masks of one class, (R, R) arrays of {0, 1}; 1.0 when both are empty."""
    union = np.logical_or(found, drawn).sum()
    return float(np.logical_and(found, drawn).sum() / union) if union else 1.0


def mask_overlap(*, found: Sequence[list[Box]], drawn: Sequence[list[Box]], train_drawn: Sequence[list[Box]],
                 num_classes: int, resolution: int = RESOLUTION) -> list[dict]:
    """Per region class, the detector masks' and the position prior's mean IoU with the
    hand-drawn masks of the held-out photos that hold that class.

    Args:
        found: Per held-out photo, the detector's boxes at the mask stage's confidence threshold.
        drawn: Per held-out photo (same order), its hand-drawn boxes.
        train_drawn: Per training photo, its hand-drawn boxes (the prior is built from these).
        num_classes: K, region classes (box ``cls`` in [0, K)).
        resolution: Mask side in pixels.

    Returns:
        K dicts ``{"mask_iou", "prior_iou", "n_mask_images"}``: mean IoUs in [0, 1] (a photo where
        the detector found nothing of the class scores 0) over the ``n_mask_images`` held-out
        photos holding the class; both ``None`` when none does. The prior of a class no
        training photo holds is empty.

    Raises:
        ValueError: ``found`` and ``drawn`` differ in length, or a box's class is outside [0, K).
    """
    if len(found) != len(drawn):
        raise ValueError(f"found has {len(found)} photos, drawn {len(drawn)}")
    def masks(photos: Sequence[list[Box]]) -> np.ndarray:  # (N, K, R, R) uint8, each photo rasterised once
        return np.stack([rasterize(b, num_classes=num_classes, resolution=resolution) for b in photos]) if photos \
            else np.zeros((0, num_classes, resolution, resolution), np.uint8)

    train, truths, founds = masks(train_drawn), masks(drawn), masks(found)
    out = []
    for k in range(num_classes):
        holding = train[:, k][train[:, k].reshape(len(train), -1).any(axis=1)]
        prior = holding.mean(axis=0) >= 0.5 if len(holding) else np.zeros((resolution, resolution), bool)
        ious, prior_ious = [], []
        for f, truth in zip(founds[:, k], truths[:, k]):
            if truth.any():
                ious.append(mask_iou(f, truth))
                prior_ious.append(mask_iou(prior, truth))
        out.append({"mask_iou": float(np.mean(ious)) if ious else None,
                    "prior_iou": float(np.mean(prior_ious)) if ious else None, "n_mask_images": len(ious)})
    return out
