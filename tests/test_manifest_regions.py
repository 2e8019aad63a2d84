"""Manifest layouts and splits; YOLO label parsing and its errors (file:line)."""

import pandas as pd
import pytest
from PIL import Image

from mgfa_ray.config import ConfigError, DatasetConfig
from mgfa_ray.data.manifest import COLUMNS, build_manifest, manifest_hash, read_manifest, write_manifest
from mgfa_ray.data.regions import LabelError, index_labels, parse_yolo_file, select_annotated


def test_leafsnap20_manifest_is_group_aware_and_deterministic(data_root, tmp_path):
    cfg = DatasetConfig(layout="class_folders", images="leafsnap20", val_fraction=0.2, test_fraction=0.2)
    df = build_manifest(data_root / "leafsnap20", cfg)
    assert list(df.columns) == COLUMNS and len(df) == 800 and df["label"].nunique() == 20
    assert df.groupby("group")["split"].nunique().max() == 1  # no group straddles two splits
    assert df["split"].value_counts().to_dict() == {"train": 480, "val": 160, "test": 160}
    again = build_manifest(data_root / "leafsnap20", cfg)
    pd.testing.assert_frame_equal(df, again)
    other = build_manifest(data_root / "leafsnap20", cfg.model_copy(update={"seed": 1}))
    assert manifest_hash(other) != manifest_hash(df)
    path = write_manifest(df, tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(read_manifest(path), df)


def test_ufg_layout_uses_paper_split(tmp_path):
    for name in ["3_1", "3_2", "10_1", "10_2", "10_3", "10_4"]:
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    df = build_manifest(tmp_path, DatasetConfig(layout="ufg", images=str(tmp_path)))
    assert dict(zip(df["image_id"], df["split"])) == {
        "3_1": "train", "3_2": "test", "10_1": "train", "10_2": "test", "10_3": "train", "10_4": "test"}
    assert dict(zip(df["image_id"], df["label"])) == {"3_1": 0, "3_2": 0, "10_1": 1, "10_2": 1, "10_3": 1, "10_4": 1}
    (tmp_path / "leaf.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="leaf.jpg: not a UFG image name"):
        build_manifest(tmp_path, DatasetConfig(layout="ufg", images=str(tmp_path)))


def test_unknown_class_subset_is_named(data_root):
    with pytest.raises(ConfigError, match="oak"):
        build_manifest(data_root / "leafsnap20", DatasetConfig(layout="class_folders", images="x", classes=["oak"]))


def test_real_labels_parse(data_root):
    labels = index_labels(data_root / "leafsnap20-regions" / "labels")
    assert len(labels) == 40 and "acer_campestre/ny1079-01-1" in labels
    boxes = [b for f in labels.values() for b in parse_yolo_file(f, num_classes=2)]
    assert {b.cls for b in boxes} == {0, 1}
    assert all(0 <= v <= 1 for b in boxes for v in (b.cx, b.cy, b.w, b.h))


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", "expected 5 fields"),
    ("x 0.5 0.5 0.2 0.2", "class id must be an integer"),
    ("0 0.5 0.5 0.2 wide", "coordinates must be numbers"),
    ("0 1.5 0.5 0.2 0.2", "cx=1.5 outside"),
    ("0 0.5 0.5 0.0 0.2", "zero-size box"),
    ("7 0.5 0.5 0.2 0.2", "unknown region class 7"),
])
def test_bad_label_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "a.txt"
    f.write_text("1 0.5 0.5 0.4 0.4\n" + line + "\n")
    with pytest.raises(LabelError, match=message) as err:
        parse_yolo_file(f, num_classes=2)
    assert str(err.value).startswith(f"{f}:2:")


def test_paper_cotton_labels_class_16_error_or_skip(data_root):
    f = data_root / "ufg-regions" / "cotton" / "47_6_test.txt"
    with pytest.raises(LabelError, match="47_6_test.txt:1: unknown region class 16"):
        parse_yolo_file(f, num_classes=1)
    with pytest.warns(UserWarning, match="47_6_test.txt:1"):
        assert parse_yolo_file(f, num_classes=1, unknown_class="skip") == []
    ids = index_labels(data_root / "ufg-regions" / "cotton")
    assert "47_6" in ids and len(ids) == 480


def test_empty_label_file_means_no_regions(tmp_path):
    (tmp_path / "e.txt").write_text("")
    assert parse_yolo_file(tmp_path / "e.txt", num_classes=2) == []


def test_paper_cap_on_annotated_images_draws_from_the_train_split(data_root):
    """The paper annotates 30 of the 480 Cotton80 images: a seeded draw of train images only."""
    labels = index_labels(data_root / "ufg-regions" / "cotton")
    ids = sorted(labels)
    manifest = pd.DataFrame({"image_id": ids, "split": ["train" if int(i.split("_")[1]) % 2 else "test" for i in ids]})
    chosen = select_annotated(labels, manifest, max_images=30, seed=0)
    train = set(manifest.loc[manifest["split"] == "train", "image_id"])
    assert len(chosen) == 30 and set(chosen) <= train and list(chosen) == sorted(chosen)
    assert select_annotated(labels, manifest, max_images=30, seed=0) == chosen  # seeded
    assert select_annotated(labels, manifest, max_images=30, seed=1) != chosen
    assert len(select_annotated(labels, manifest, max_images=None, seed=0)) == 480  # no cap: every labelled image
    with pytest.raises(LabelError, match="no train-split image"):
        select_annotated(labels, manifest.assign(split="test"), max_images=30, seed=0)
