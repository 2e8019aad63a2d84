"""Mask stage: rasterisation, and the same masks whether called directly or through Ray Data."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mgfa_ray.config import DetectorConfig, MasksConfig
from mgfa_ray.detector import train_detector
from mgfa_ray.manifest import manifest_hash
from mgfa_ray.masks import MaskPredictor, build_mask_set, read_masks, rasterize
from mgfa_ray.regions import Box, index_labels


def test_rasterize_union_per_class_and_thin_boxes_keep_a_pixel():
    boxes = [Box(0, 0.25, 0.25, 0.5, 0.5), Box(0, 0.75, 0.75, 0.5, 0.5), Box(1, 0.6, 0.5, 0.001, 1.0)]
    m = rasterize(boxes, num_classes=2, resolution=4)
    assert m.dtype == np.uint8 and m.shape == (2, 4, 4)
    assert m[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert m[1].sum(axis=1).tolist() == [1, 1, 1, 1]  # a 0.001-wide vein still covers one column
    assert m[1, :, 2].tolist() == [1, 1, 1, 1]


def test_rasterize_clips_and_rejects_unknown_class():
    m = rasterize([Box(0, 0.0, 0.0, 0.5, 0.5)], num_classes=1, resolution=4)
    assert m[0].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="class 2"):
        rasterize([Box(2, 0.5, 0.5, 0.1, 0.1)], num_classes=2, resolution=4)
    assert rasterize([], num_classes=2, resolution=4).sum() == 0  # no detection → empty mask


@pytest.fixture(scope="module")
def tiny_detector(data_root, tiny_manifest, tmp_path_factory):
    df, _ = tiny_manifest
    labels = {k: v for k, v in index_labels(data_root / "leafsnap20-regions" / "labels").items() if k in set(df["image_id"])}
    cfg = DetectorConfig(imgsz=64, epochs=1, batch=4, conf=0.001)
    out = tmp_path_factory.mktemp("detector")
    metrics = train_detector(manifest=df, label_files=labels, region_classes=["vein", "contour"], cfg=cfg, out_dir=out)
    return cfg, out / "weights.pt", metrics


def test_ray_data_masks_equal_direct_call_and_rerun_skips(ray_cluster, tiny_manifest, tiny_detector, tmp_path):
    df, _ = tiny_manifest
    cfg, weights, metrics = tiny_detector
    masks_cfg = MasksConfig(resolution=32, batch_size=5, num_actors=2, rows_per_shard=10)
    kwargs = dict(manifest=df, manifest_hash=manifest_hash(df), weights=weights, detector_key=metrics["detector_key"],
                  region_classes=["vein", "contour"], detector=cfg, cfg=masks_cfg, out_root=tmp_path)
    set_dir = build_mask_set(**kwargs)

    meta = json.loads((set_dir / "metadata.json").read_text())
    assert meta["rows"] == len(df) and sum(meta["rows_per_shard"].values()) == len(df)
    shard_rows = list(meta["rows_per_shard"].values())
    assert max(shard_rows) <= 10 and len(shard_rows) < 5  # 5 batches of <= 5 rows coalesced into shards of <= 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    shards = pd.concat([pq.read_table(s).to_pandas() for s in sorted(set_dir.glob("*.parquet"))]).set_index("image_id")
    direct = MaskPredictor(weights=str(weights), detector_key=metrics["detector_key"], imgsz=cfg.imgsz, conf=cfg.conf,
                           num_classes=2, resolution=32)(df).set_index("image_id")
    assert sorted(shards.index) == sorted(direct.index)
    assert sum(len(b) for b in direct["boxes"]) > 0  # the comparison is not between empty masks
    for image_id, row in direct.iterrows():
        assert shards.loc[image_id, "masks"] == row["masks"]
        np.testing.assert_allclose(np.array(list(shards.loc[image_id, "boxes"]), dtype=float).reshape(-1, 6),
                                   np.array(row["boxes"], dtype=float).reshape(-1, 6), rtol=1e-5, atol=1e-6)

    masks, _ = read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=["vein", "contour"])
    assert masks.shape == (len(df), 2, 32, 32) and set(np.unique(masks)) <= {0, 1}
    with pytest.raises(ValueError, match="region classes"):
        read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=["contour", "vein"])

    mtime = (set_dir / "metadata.json").stat().st_mtime_ns
    assert build_mask_set(**kwargs) == set_dir  # rerun finds the finished set
    assert (set_dir / "metadata.json").stat().st_mtime_ns == mtime
    other = build_mask_set(**{**kwargs, "cfg": masks_cfg.model_copy(update={"resolution": 16})})
    assert other != set_dir  # another resolution is another set, never a mix
