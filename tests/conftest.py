"""Shared fixtures: real leafsnap20 photos at tiny settings (3 classes, 64 px)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mgfa_ray.config import DatasetConfig, TrainConfig
from mgfa_ray.manifest import build_manifest, write_manifest
from mgfa_ray.masks import mask_rows, write_mask_set
from mgfa_ray.regions import index_labels, parse_yolo_file

REPO = Path(__file__).resolve().parents[1]
REGION_CLASSES = ["vein", "contour"]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("MGFA_DATA_ROOT", REPO.parent / "shared" / "data"))
    assert (root / "leafsnap20").is_dir(), f"real data not found under {root}; set MGFA_DATA_ROOT"
    return root


@pytest.fixture(scope="session")
def mobilenet_weights(data_root) -> Path:
    return data_root.parent / "weights" / "mobilenet_v2-imagenet-features.pth"


@pytest.fixture(scope="session")
def tiny_manifest(data_root, tmp_path_factory):
    """3 species x 8 photos (8 groups each: 4 train, 2 val, 2 test per species)."""
    cfg = DatasetConfig(layout="class_folders", images="leafsnap20", max_classes=3, max_per_class=8,
                        val_fraction=0.25, test_fraction=0.25)
    df = build_manifest(data_root / "leafsnap20", cfg)
    path = write_manifest(df, tmp_path_factory.mktemp("manifest") / "manifest.parquet")
    return df, path


@pytest.fixture(scope="session")
def label_mask_set(data_root, tiny_manifest, tmp_path_factory):
    """A mask set whose boxes are the hand-drawn labels (empty for unlabelled photos)."""
    df, _ = tiny_manifest
    labels = index_labels(data_root / "leafsnap20-regions" / "labels")
    boxes = [parse_yolo_file(labels[i], num_classes=2) if i in labels else [] for i in df["image_id"]]
    rows = mask_rows(df, boxes, detector_key="labels", num_classes=2, resolution=32)
    meta = {"set_id": "labels32", "detector_key": "labels", "mask_resolution": 32, "region_classes": REGION_CLASSES}
    return write_mask_set(rows, out_root=tmp_path_factory.mktemp("masks"), metadata=meta)


@pytest.fixture()
def tiny_train_config(tiny_manifest, label_mask_set) -> TrainConfig:
    _, manifest_path = tiny_manifest
    return TrainConfig(
        manifest=str(manifest_path), masks=str(label_mask_set), backbone="mobilenet_v2", weights=None,
        resize=72, crop=64, epochs=2, batch_size=8, lr=0.01, momentum=0.9, lr_step=1, threads=2, device="cpu",
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the tests that need one (started the way users start it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
