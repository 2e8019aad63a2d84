"""The positive control: a seeded data set where the masks must help if the method works.

The protocol of Decoy-MNIST (Ross, Hughes, Doshi-Velez, "Right for the Right Reasons", IJCAI
2017): every image has a region whose content decides the class, and a *decoy* outside it that
predicts the class on the training and validation images but not on the test images. A classifier
that takes the easier decoy falls towards chance on test; one guided to the region should not.

Each ``size`` x ``size`` image (:func:`draw_image`) holds

* a background of smooth noise crossed by a sine grating of a **random** orientation;
* the **object**: an axis-aligned rectangle (30-45 % of the side, anywhere) filled with a sine
  grating whose orientation is the **class** — class k of C at k·180°/C, ± ``jitter`` degrees —
  at a random frequency and phase and a random tint, plus pixel noise. Its label box is exact: the
  rectangle is the region, so the ground-truth mask is exactly where the class is decided;
* the **decoy**: a small square (``decoy_side`` of the side) in the class's own colour, placed
  outside the object. On the ``train`` and ``val`` images its colour is the image's class; on
  ``test`` it is a class drawn at random (uniform, so a classifier that reads only the decoy is
  right 1/C of the time). ``decoy: false`` draws no decoy (the control's own baseline).

The set is written as the ``split_folders`` layout (:mod:`mgfa_ray.data.manifest`):
``images/<split>/<class>/img-NNNN.png`` and YOLO labels ``labels/<split>/<class>/img-NNNN.txt``
(one line ``0 cx cy w h``, region class ``object``; with a power-of-two ``size`` every value is a
binary fraction written exactly, so the rasterised mask's edges are the rectangle's), under a
directory named by the settings' hash, written to a temporary directory and renamed when whole: a
rerun with the same settings
reuses it, a crash leaves no half-written set. Image i of a split depends only on (seed, split,
i), so the same settings give the same bytes on every machine (PNG, lossless).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from mgfa_ray.config import DecoyConfig
from mgfa_ray.storage import sha256_json

SPLITS = ("train", "val", "test")
REGION_KIND = "object"
# One decoy colour per class: DecoyConfig.classes is at most 8.
_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                     (145, 30, 180), (245, 130, 48), (70, 240, 240), (240, 50, 230)], dtype=np.float32)


def _grating(size: int, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """A sine grating (size, size) in [-1, 1] at ``degrees`` orientation, random period (5-9 px at
    96 px, scaled with the side) and phase."""
    theta = np.deg2rad(degrees)
    period = rng.uniform(5.0, 9.0) * size / 96
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi))


def _place_decoy(rng: np.random.Generator, size: int, side: int, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """Top-left corner of a ``side`` square at least 2 px outside ``box`` (x0, y0, x1, y1) and
    ``side // 2`` from the image edge (a training crop keeps it)."""
    x0, y0, x1, y1 = box
    margin = max(2, side // 2)
    for _ in range(1000):
        x, y = (int(v) for v in rng.integers(margin, size - margin - side + 1, size=2))
        if x + side + 2 <= x0 or x >= x1 + 2 or y + side + 2 <= y0 or y >= y1 + 2:
            return x, y
    raise RuntimeError("no place for the decoy outside the object: raise size or lower decoy_side")


def draw_image(cfg: DecoyConfig, *, split: str, index: int) -> tuple[np.ndarray, int, tuple[float, float, float, float]]:
    """Image ``index`` of ``split``: its pixels, class and exact object box.

    Returns:
        ``(rgb, label, box)``: uint8 (size, size, 3); the class in [0, C); the object's box as
        YOLO ``(cx, cy, w, h)`` normalised to [0, 1].

    Raises:
        ValueError: ``split`` is not train, val or test.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    n, c = cfg.size, cfg.classes
    label = index % c
    noise = rng.normal(0.0, 1.0, (n // 8 + 1, n // 8 + 1, 3)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(((noise * 0.5 + 2) * 60).clip(0, 255).astype(np.uint8)).resize(
        (n, n), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    rgb = 0.35 * smooth + 0.35 + cfg.contrast * _grating(n, rng, rng.uniform(0, 180))[..., None] * 0.5
    w, h = (int(v) for v in rng.integers(round(0.30 * n), round(0.45 * n) + 1, size=2))
    x0, y0 = (int(v) for v in rng.integers(0, n - np.array([w, h]) + 1))
    angle = label * 180.0 / c + rng.uniform(-cfg.jitter, cfg.jitter)
    tint = rng.uniform(0.35, 0.6, size=3).astype(np.float32)
    obj = tint + cfg.contrast * _grating(n, rng, angle)[..., None] * 0.5
    rgb[y0 : y0 + h, x0 : x0 + w] = obj[y0 : y0 + h, x0 : x0 + w]
    rgb += rng.normal(0.0, 0.04, rgb.shape).astype(np.float32)
    if cfg.decoy:
        side = max(2, round(cfg.decoy_side * n))
        dx, dy = _place_decoy(rng, n, side, (x0, y0, x0 + w, y0 + h))
        keyed = label if split != "test" else int(rng.integers(0, c))
        rgb[dy : dy + side, dx : dx + side] = _COLOURS[keyed] / 255.0
    box = ((x0 + w / 2) / n, (y0 + h / 2) / n, w / n, h / n)
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8), label, box


def _counts(cfg: DecoyConfig) -> dict[str, int]:
    return {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}


def generate_decoy(cfg: DecoyConfig, root: str | Path) -> Path:
    """Write the control's images and labels under ``root/decoy-<hash of cfg>/`` (module
    docstring), unless that directory exists already (then nothing is written).

    Args:
        cfg: The generator's settings.
        root: Parent directory (a job's ``<output_dir>/data``).

    Returns:
        The data set's directory, holding ``images/``, ``labels/`` and ``generator.json`` (the
        settings).
    """
    root = Path(root)
    dest = root / f"decoy-{sha256_json(cfg.model_dump())[:12]}"
    if dest.is_dir():
        return dest
    tmp = root / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    names = cfg.class_names()
    for split, per_class in _counts(cfg).items():
        for index in range(per_class * cfg.classes):
            rgb, label, (cx, cy, w, h) = draw_image(cfg, split=split, index=index)
            stem = f"{split}/{names[label]}/img-{index:04d}"
            image, text = tmp / "images" / f"{stem}.png", tmp / "labels" / f"{stem}.txt"
            image.parent.mkdir(parents=True, exist_ok=True)
            text.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(image)
            text.write_text(f"0 {cx:.17g} {cy:.17g} {w:.17g} {h:.17g}\n")  # exact: k / (2 * size)
    (tmp / "generator.json").write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
    try:
        tmp.rename(dest)
    except OSError:  # another process finished the same set first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    return dest
