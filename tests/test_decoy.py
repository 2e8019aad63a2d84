"""The positive control's generator: deterministic, exact boxes, and a decoy that names the class
on the train and val images only (Decoy-MNIST's protocol)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from mgfa_ray.config import ConfigError, DatasetConfig, DecoyConfig, JobConfig, MasksConfig, load_config, validate
from mgfa_ray.data.decoy import _COLOURS, draw_image, generate_decoy
from mgfa_ray.data.manifest import build_manifest, manifest_hash
from mgfa_ray.masks.sources import LabelBoxes
from mgfa_ray.masks import build_mask_set, read_masks
from mgfa_ray.data.regions import index_labels

SMALL = DecoyConfig(classes=3, train_per_class=6, val_per_class=2, test_per_class=30, size=64)  # a power of two: exact boxes


def _decoy_class(rgb: np.ndarray, classes: int) -> int | None:
    """The class whose colour fills a whole decoy square (exact palette pixels), or None."""
    side = max(2, round(SMALL.decoy_side * rgb.shape[0]))
    found = [k for k in range(classes) if (rgb == _COLOURS[k].astype(np.uint8)).all(-1).sum() >= side * side]
    return found[0] if len(found) == 1 else None


def test_same_settings_give_the_same_bytes_and_another_seed_other_images(tmp_path):
    a = generate_decoy(SMALL, tmp_path / "a")
    b = generate_decoy(SMALL, tmp_path / "b")
    digest = lambda root: {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in sorted(root.rglob("*")) if p.is_file()}
    assert a.name == b.name and digest(a) == digest(b)
    assert len([p for p in a.rglob("*.png")]) == 3 * (6 + 2 + 30)
    other = generate_decoy(SMALL.model_copy(update={"seed": 1}), tmp_path / "a")
    assert other != a and digest(other) != digest(a)
    # a rerun finds the finished set and writes nothing
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert generate_decoy(SMALL, tmp_path / "a") == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == before
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_decoy_names_the_class_on_train_and_val_but_not_on_test():
    agree = {}
    for split, n in (("train", 18), ("val", 6), ("test", 90)):
        hits = []
        for i in range(n):
            rgb, label, _ = draw_image(SMALL, split=split, index=i)
            decoy = _decoy_class(rgb, SMALL.classes)
            assert decoy is not None, (split, i)
            hits.append(decoy == label)
        agree[split] = np.mean(hits)
    assert agree["train"] == 1.0 and agree["val"] == 1.0
    assert 0.15 < agree["test"] < 0.55  # a random class: right about 1/3 of the time
    rgb, _, _ = draw_image(SMALL.model_copy(update={"decoy": False}), split="train", index=0)
    assert _decoy_class(rgb, SMALL.classes) is None


def test_the_box_is_exactly_the_object_and_the_decoy_lies_outside_it():
    for i in range(12):
        rgb, label, (cx, cy, w, h) = draw_image(SMALL, split="train", index=i)
        n = SMALL.size
        x0, y0, x1, y1 = round((cx - w / 2) * n), round((cy - h / 2) * n), round((cx + w / 2) * n), round((cy + h / 2) * n)
        decoy = (rgb == _COLOURS[label].astype(np.uint8)).all(-1)
        assert decoy[y0:y1, x0:x1].sum() == 0 and decoy.sum() > 0
        # the object's grating has the class's orientation: its 2-D spectrum peaks along it
        patch = rgb[y0:y1, x0:x1].astype(float).mean(-1)
        spec = np.abs(np.fft.fftshift(np.fft.fft2(patch - patch.mean())))
        fy, fx = np.unravel_index(spec.argmax(), spec.shape)
        angle = np.degrees(np.arctan2((fy - spec.shape[0] // 2) / spec.shape[0], (fx - spec.shape[1] // 2) / spec.shape[1]))
        expected = label * 180 / SMALL.classes
        diff = min(abs((angle - expected) % 180), abs((expected - angle) % 180))
        assert diff < SMALL.jitter + 15, (i, angle, expected)


def test_split_folders_manifest_and_exact_masks(tmp_path):
    root = generate_decoy(SMALL, tmp_path)
    df = build_manifest(root / "images", DatasetConfig(layout="split_folders", images="images"))
    assert df["split"].value_counts().to_dict() == {"test": 90, "train": 18, "val": 6}
    assert (df["group"] == df["image_id"]).all() and set(df["class_name"]) == {"class0", "class1", "class2"}
    assert (df["image_id"].str.split("/").str[0] == df["split"]).all()
    source = LabelBoxes.create(index_labels(root / "labels"), classes=["object"])
    set_dir = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=["object"],
                             cfg=MasksConfig(resolution=64), location=tmp_path / "masks", executor="local")
    row = df.iloc[0]
    masks, _ = read_masks(set_dir, image_ids=[row["image_id"]], region_classes=["object"])
    split, _, stem = row["image_id"].split("/")
    _, _, (cx, cy, w, h) = draw_image(SMALL, split=split, index=int(stem.split("-")[1]))
    ys, xs = np.nonzero(masks[0, 0] > 0.5)
    assert (xs.min(), ys.min()) == (round((cx - w / 2) * 64), round((cy - h / 2) * 64))
    assert (xs.max() + 1, ys.max() + 1) == (round((cx + w / 2) * 64), round((cy + h / 2) * 64))
    assert np.asarray(Image.open(row["path"])).shape == (64, 64, 3)


def test_split_folders_rejects_a_folder_that_is_no_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "x.png")
    (tmp_path / "holdout").mkdir()
    with pytest.raises(ConfigError, match="split_folders needs"):
        build_manifest(tmp_path, DatasetConfig(layout="split_folders", images="."))


def test_shipped_control_jobs_load_and_generate_needs_its_layout():
    for name in ("decoy_control", "decoy_control_strong", "decoy_control_no_decoy"):
        job = load_config(JobConfig, f"jobs/{name}.yaml")
        assert job.generate is not None and job.regions.classes == ["object"]
    assert load_config(JobConfig, "jobs/decoy_control_strong.yaml").train.delta == 10.0
    assert load_config(JobConfig, "jobs/decoy_control_no_decoy.yaml").generate.decoy is False
    d = load_config(JobConfig, "jobs/decoy_control.yaml").model_dump(mode="json")
    d["dataset"]["layout"] = "class_folders"
    with pytest.raises(ConfigError, match="split_folders and regions.source: labels"):
        validate(JobConfig, d)
