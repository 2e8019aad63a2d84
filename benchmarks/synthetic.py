"""A synthetic dataset shaped like the paper's Cotton80 (80 classes x 3 training photos), for the
benchmarks that measure what surrounds a trial rather than what it learns (imported by the scripts
here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REGION_CLASSES = ["vein", "contour"]


def make_dataset(root: Path, *, classes: int = 80, train: int = 3, val: int = 3, side: int = 96,
                 mask_resolution: int = 32, seed: int = 0) -> tuple[Path, str]:
    """Write ``classes`` x (``train`` + ``val``) JPEG photos, a manifest and a mask set under ``root``.

    Each photo is ``side`` x ``side`` RGB noise around a colour of its class; each has one YOLO box
    per region class (``vein`` inside ``contour``), so the masks are not empty. The mask set is built
    by :func:`mgfa_ray.masks.build_mask_set` from those label files, without Ray.

    Returns:
        ``(manifest_path, mask_set_location)``.
    """
    from mgfa_ray.config import MasksConfig
    from mgfa_ray.data.manifest import manifest_hash, write_manifest
    from mgfa_ray.masks.sources import LabelBoxes
    from mgfa_ray.masks import build_mask_set

    rng = np.random.default_rng(seed)
    rows, labels = [], {}
    for c in range(classes):
        colour = rng.integers(40, 216, size=3)
        for i in range(train + val):
            image_id = f"class{c:02d}/{c}_{i}"
            path = root / "images" / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(colour + rng.normal(0, 40, size=(side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            label = root / "labels" / f"{image_id}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            cx, cy = rng.uniform(0.4, 0.6, size=2)
            label.write_text(f"0 {cx:.4f} {cy:.4f} 0.2 0.3\n1 0.5 0.5 0.8 0.8\n")
            labels[image_id] = label
            rows.append({"image_id": image_id, "path": str(path), "label": c, "class_name": f"class{c:02d}",
                         "group": image_id, "split": "train" if i < train else "val"})
    df = pd.DataFrame(rows)
    manifest = write_manifest(df, root / "manifest.parquet")
    source = LabelBoxes.create(labels, classes=REGION_CLASSES)
    masks = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGION_CLASSES,
                           cfg=MasksConfig(resolution=mask_resolution), location=root / "masks", executor="local")
    return manifest, str(masks)
