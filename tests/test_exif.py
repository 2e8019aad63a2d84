"""Photos with an EXIF orientation (every phone photo has one): every stage sees the upright view
the boxes were drawn on — decoding, the mask figures of ``masks show`` and the trial's inputs —
and Ultralytics' own reader (detector training) agrees with ours."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mgfa_ray.config import DatasetConfig, MasksConfig
from mgfa_ray.data.manifest import build_manifest, manifest_hash, write_manifest
from mgfa_ray.masks.sources import LabelBoxes
from mgfa_ray.masks import build_mask_set, read_masks
from mgfa_ray.data.images import decode_rgb
from mgfa_ray.data.regions import index_labels

W, H = 96, 64  # upright size: landscape
BOX = (0.10, 0.15, 0.45, 0.60)  # the dark "leaf" in the upright view: x0, y0, x1, y1 (normalised)
# How a camera stores the upright picture for each orientation tag: the inverse of the turn
# that PIL.ImageOps.exif_transpose (and every viewer) applies to show it.
STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def _upright() -> np.ndarray:
    rgb = np.full((H, W, 3), 220, np.uint8)
    x0, y0, x1, y1 = BOX
    rgb[round(y0 * H) : round(y1 * H), round(x0 * W) : round(x1 * W)] = (30, 90, 30)
    return rgb


def _write_photos(root):
    """One photo per orientation 1-8 (stored turned, tagged), each with the same YOLO label."""
    for k, turn in STORED.items():
        img = Image.fromarray(_upright())
        stored = img if turn is None else img.transpose(turn)
        exif = Image.Exif()
        exif[0x0112] = k
        (root / "images" / "leaf").mkdir(parents=True, exist_ok=True)
        stored.save(root / "images" / "leaf" / f"o{k}-1.jpg", quality=95, exif=exif)
        (root / "labels" / "leaf").mkdir(parents=True, exist_ok=True)
        cx, cy, w, h = (BOX[0] + BOX[2]) / 2, (BOX[1] + BOX[3]) / 2, BOX[2] - BOX[0], BOX[3] - BOX[1]
        (root / "labels" / "leaf" / f"o{k}-1.txt").write_text(f"0 {cx} {cy} {w} {h}\n")


def _dark(rgb: np.ndarray) -> np.ndarray:
    return rgb.mean(-1) < 120


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoder_and_ultralytics_reader_show_the_upright_photo(tmp_path, orientation):
    from ultralytics.utils.patches import imread

    _write_photos(tmp_path)
    path = tmp_path / "images" / "leaf" / f"o{orientation}-1.jpg"
    assert Image.open(path).getexif().get(0x0112) == orientation
    rgb = decode_rgb(str(path))
    assert rgb.shape == (H, W, 3)
    assert (_dark(rgb) == _dark(_upright())).mean() > 0.98
    bgr = imread(str(path))  # what the detector trains on
    assert bgr.shape == (H, W, 3) and (_dark(bgr[..., ::-1]) == _dark(rgb)).mean() > 0.98


def test_masks_land_on_the_leaf_in_masks_show_and_in_the_trial_inputs(tmp_path, monkeypatch):
    import mgfa_ray.analysis.mask_view as mask_view
    from mgfa_ray.train.data import load_images

    _write_photos(tmp_path)
    df = build_manifest(tmp_path / "images", DatasetConfig(layout="class_folders", images="images",
                                                           val_fraction=0.0, test_fraction=0.0))
    manifest = write_manifest(df, tmp_path / "manifest.parquet")
    source = LabelBoxes.create(index_labels(tmp_path / "labels"), classes=["contour"])
    set_dir = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=["contour"],
                             cfg=MasksConfig(resolution=32), location=tmp_path / "masks", executor="local",
                             manifest_path=str(manifest))
    masks, _ = read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=["contour"])
    images = load_images(df["path"].tolist(), size=32).numpy().transpose(0, 2, 3, 1)  # the trial's inputs
    for image_id, image, mask in zip(df["image_id"], images, masks[:, 0]):
        assert _iou(_dark(image), mask > 0) > 0.7, image_id  # decoded without its orientation: 0.36 at most

    shown = {}
    real = mask_view.render_mask_png
    monkeypatch.setattr(mask_view, "render_mask_png",
                        lambda photo, boxes, masks, **kw: shown.setdefault(kw["title"], (photo, masks)) and real(
                            photo, boxes, masks, **kw))
    paths, _ = mask_view.render_mask_figures(set_dir, out_dir=tmp_path / "figures", count=8)
    assert len(paths) == 8 and len(shown) == 8
    for title, (photo, m) in shown.items():
        small = np.asarray(Image.fromarray(photo).resize((32, 32), Image.Resampling.BILINEAR))
        assert _iou(_dark(small), m[0] > 0) > 0.7, title
