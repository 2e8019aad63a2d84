"""Mask stage: rasterisation, direct = Ray Data, resume after a kill, corrupt images, validation on
read, label files as the box source, an object-store location."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mgfa_ray.config import DetectorConfig, MasksConfig
from mgfa_ray.detector.training import train_detector
from mgfa_ray.detector.inference import weights_digest
from mgfa_ray.storage import sha256_file
from mgfa_ray.data.manifest import manifest_hash
from mgfa_ray.masks.sources import DetectorBoxes, LabelBoxes, MaskComputer
from mgfa_ray.masks import build_mask_set, mask_set_id, read_masks, read_metadata, read_rows, shard_name
from mgfa_ray.data.regions import rasterize
from mgfa_ray.train.model import gt_attention
from mgfa_ray.data.regions import Box, index_labels

REGIONS = ["vein", "contour"]


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


@pytest.fixture(scope="module")
def tiny_detector(data_root, tiny_manifest, tmp_path_factory):
    df, _ = tiny_manifest
    labels = {k: v for k, v in index_labels(data_root / "leafsnap20-regions" / "labels").items() if k in set(df["image_id"])}
    cfg = DetectorConfig(imgsz=64, epochs=1, batch=4, conf=0.001)
    out = tmp_path_factory.mktemp("detector")
    metrics = train_detector(manifest=df, label_files=labels, region_classes=REGIONS, cfg=cfg, out_dir=out)
    source = DetectorBoxes(weights=str(out / "weights.pt"), detector_key=metrics["detector_key"], imgsz=cfg.imgsz,
                           conf=cfg.conf, batch_size=5)
    return source


def shard_table(set_location) -> pd.DataFrame:
    return read_rows(set_location).set_index("image_id")


@pytest.mark.slow
def test_ray_data_masks_equal_direct_call_and_rerun_skips(ray_cluster, tiny_manifest, tiny_detector, tmp_path):
    df, _ = tiny_manifest
    cfg = MasksConfig(resolution=32, batch_size=5, num_actors=2, rows_per_shard=10)
    kwargs = dict(manifest=df, manifest_hash=manifest_hash(df), source=tiny_detector, region_classes=REGIONS,
                  cfg=cfg, location=tmp_path)
    set_dir = Path(build_mask_set(**kwargs))

    meta = read_metadata(set_dir)
    assert meta["rows"] == len(df) == 24
    assert meta["rows_per_shard"] == {shard_name(0): 10, shard_name(1): 10, shard_name(2): 4}
    assert meta["source"] == "detector" and meta["detector_key"] == tiny_detector.detector_key
    assert meta["region_classes"] == REGIONS and meta["mask_resolution"] == 32
    assert sorted(p.name for p in set_dir.iterdir()) == sorted([*meta["rows_per_shard"], "metadata.json", "plan.json"])

    # The pure core, called directly on the whole manifest one image per detector call, gives the
    # same rows: content depends neither on Ray nor on the detector batch (see test_detector too).
    one_by_one = DetectorBoxes(**{**tiny_detector.__dict__, "batch_size": 1})
    direct, corrupt = MaskComputer(one_by_one, num_classes=2, resolution=32)(df)
    assert corrupt == []
    direct = direct.set_index("image_id")
    shards = shard_table(set_dir)
    assert sorted(shards.index) == sorted(direct.index) == sorted(df["image_id"])
    assert sum(len(b) for b in direct["boxes"]) > 0  # the comparison is not between empty masks
    for image_id, row in direct.iterrows():
        assert shards.loc[image_id, "masks"] == row["masks"]
        np.testing.assert_allclose(np.array(list(shards.loc[image_id, "boxes"]), dtype=float).reshape(-1, 6),
                                   np.array(row["boxes"], dtype=float).reshape(-1, 6), atol=1e-5)
    # The summary is built from the shard footers and agrees with the rows.
    n_boxes = sum(len(b) for b in direct["boxes"])
    assert meta["summary"]["mean_boxes_per_image"] == pytest.approx(n_boxes / 24)
    vein = np.stack([np.frombuffer(m, np.uint8).reshape(2, 32, 32)[0] for m in direct["masks"]])
    assert meta["summary"]["per_class"]["vein"]["mean_coverage"] == pytest.approx(vein.mean())

    masks, _ = read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=REGIONS,
                          labels=df["label"].tolist())
    assert masks.shape == (24, 2, 32, 32) and set(np.unique(masks)) <= {0, 1}

    mtime = (set_dir / "metadata.json").stat().st_mtime_ns
    assert build_mask_set(**kwargs) == str(set_dir)  # rerun finds the finished set
    assert (set_dir / "metadata.json").stat().st_mtime_ns == mtime
    other = build_mask_set(**{**kwargs, "cfg": cfg.model_copy(update={"resolution": 16})})
    assert other != str(set_dir)  # another resolution is another set, never a mix
    # Another detector (another key) is another set too.
    assert build_mask_set(**{**kwargs, "source": DetectorBoxes(**{**tiny_detector.__dict__, "conf": 0.5}),
                             "executor": "local"}) not in (str(set_dir), other)


def test_no_detection_yields_empty_boxes_zero_masks_and_zero_ground_truth(tiny_manifest, tiny_detector, tmp_path):
    df, _ = tiny_manifest
    nothing = DetectorBoxes(**{**tiny_detector.__dict__, "conf": 1.0})  # no score reaches 1.0
    set_dir = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=nothing, region_classes=REGIONS,
                             cfg=MasksConfig(resolution=32), location=tmp_path, executor="local")
    rows = shard_table(set_dir)
    assert all(len(b) == 0 for b in rows["boxes"])
    masks, meta = read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=REGIONS)
    assert masks.sum() == 0
    assert meta["summary"]["images_without_box"] == 24
    assert meta["summary"]["per_class"]["vein"] == {"images_with_region": 0.0, "mean_coverage": 0.0}
    # The trial's ground truth for such a region is all zero, for both activations.
    for activation in ("softmax", "sigmoid"):
        gt = gt_attention(torch.from_numpy(masks[:2]).float(), grid=(4, 4), activation=activation)
        assert gt.shape == (2, 2, 4, 4) and torch.count_nonzero(gt) == 0


WORKER = """
import json, sys
import pandas as pd, ray
from mgfa_ray.config import MasksConfig
from mgfa_ray.data.manifest import manifest_hash
from mgfa_ray.masks import DetectorBoxes, build_mask_set
a = json.load(open(sys.argv[1]))
ray.init(address=a["address"], configure_logging=False)
df = pd.read_parquet(a["manifest"])
build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=DetectorBoxes(**a["source"]),
               region_classes=a["regions"], cfg=MasksConfig(**a["cfg"]), location=a["location"])
"""


@pytest.mark.slow
def test_killed_precompute_resumes_to_exactly_one_row_per_image(ray_cluster, tiny_manifest, tiny_detector, tmp_path):
    """SIGKILL the driver while an actor waits on an image (a FIFO nobody writes), rerun, compare."""
    df, _ = tiny_manifest
    cfg = MasksConfig(resolution=32, batch_size=2, num_actors=1, rows_per_shard=4)  # 6 shards
    blocked = df.copy()
    fifo = tmp_path / "blocks-until-written.jpg"
    os.mkfifo(fifo)
    blocked.loc[13, "path"] = str(fifo)  # image 13 is in shard 3: shards 0-2 can finish, 3 cannot
    blocked.to_parquet(tmp_path / "manifest.parquet")
    location = tmp_path / "masks"
    args = {"address": ray_cluster.get_runtime_context().gcs_address, "manifest": str(tmp_path / "manifest.parquet"),
            "source": tiny_detector.__dict__, "regions": REGIONS, "cfg": cfg.model_dump(), "location": str(location)}
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "args.json")])
    try:
        deadline = time.monotonic() + 120
        while not list(location.glob("*/shard-*.parquet")):
            assert proc.poll() is None, "the precompute exited before it was killed"
            assert time.monotonic() < deadline, "no shard finished within 120 s"
            time.sleep(0.1)
        time.sleep(1.0)  # let other shards finish too
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # release an actor still blocked on the FIFO (Ray kills a dead driver's workers anyway)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    (set_dir,) = location.iterdir()
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in set_dir.glob("shard-*.parquet")}
    assert done and shard_name(3) not in done and not (set_dir / "metadata.json").exists()
    with pytest.raises(ValueError, match="not a complete mask set"):
        read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=REGIONS)

    # Rerun (same manifest identity, the image readable again): only the missing shards are computed.
    resumed = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=tiny_detector,
                             region_classes=REGIONS, cfg=cfg, location=location)
    assert resumed == str(set_dir)
    assert {n: (set_dir / n).stat().st_ino for n in done} == {n: v[0] for n, v in done.items()}
    assert {n: (set_dir / n).stat().st_mtime_ns for n in done} == {n: v[1] for n, v in done.items()}
    assert not [p for p in set_dir.iterdir() if p.name.startswith(".")]
    rows = read_rows(resumed)
    assert len(rows) == 24 and sorted(rows["image_id"]) == sorted(df["image_id"])
    reference = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=tiny_detector,
                               region_classes=REGIONS, cfg=cfg, location=tmp_path / "reference", executor="local")
    assert rows.set_index("image_id")["masks"].to_dict() == read_rows(reference).set_index("image_id")["masks"].to_dict()


def test_corrupt_image_error_or_record(tiny_manifest, tiny_detector, tmp_path):
    df, _ = tiny_manifest
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = df.copy()
    bad.loc[5, "path"] = str(broken)
    bad_id = bad.loc[5, "image_id"]
    cfg = MasksConfig(resolution=16, rows_per_shard=8)
    kwargs = dict(manifest=bad, manifest_hash=manifest_hash(bad), source=tiny_detector, region_classes=REGIONS,
                  location=tmp_path / "masks", executor="local")
    with pytest.raises(ValueError, match=r"1 image\(s\) cannot be decoded.*broken\.jpg"):
        build_mask_set(cfg=cfg, **kwargs)
    (partial,) = (tmp_path / "masks").iterdir()
    assert sorted(p.name for p in partial.glob("*.parquet")) == [shard_name(1), shard_name(2)]  # shard 0 has it

    recorded = build_mask_set(cfg=cfg.model_copy(update={"corrupt_images": "record"}), **kwargs)
    meta = read_metadata(recorded)
    assert meta["corrupt"] == [bad_id] and meta["summary"]["corrupt_images"] == 1 and meta["rows"] == 24
    row = shard_table(recorded).loc[bad_id]
    assert "broken.jpg" in row["error"] and len(row["boxes"]) == 0 and set(row["masks"]) == {0}
    with pytest.raises(ValueError, match=rf"recorded as corrupt, e.g. '{bad_id}'"):
        read_masks(recorded, image_ids=bad["image_id"].tolist(), region_classes=REGIONS)
    good = [i for i in bad["image_id"] if i != bad_id]
    assert read_masks(recorded, image_ids=good, region_classes=REGIONS)[0].shape == (23, 2, 16, 16)


@pytest.fixture()
def label_set(data_root, tiny_manifest, tmp_path):
    df, _ = tiny_manifest
    source = LabelBoxes.create(index_labels(data_root / "leafsnap20-regions" / "labels"), classes=REGIONS,
                               unlabelled="empty")
    location = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGIONS,
                              cfg=MasksConfig(resolution=16, rows_per_shard=10), location=tmp_path, executor="local")
    return df, Path(location)


def test_mismatched_mask_set_rejected_on_read(label_set):
    df, set_dir = label_set
    ids = df["image_id"].tolist()
    read_masks(set_dir, image_ids=ids, region_classes=REGIONS, labels=df["label"].tolist())  # fits
    with pytest.raises(ValueError, match=r"region classes \['vein', 'contour'\] do not match"):
        read_masks(set_dir, image_ids=ids, region_classes=["contour", "vein"])
    with pytest.raises(ValueError, match="no mask row for 1 image"):
        read_masks(set_dir, image_ids=[*ids, "acer_campestre/not-in-the-set"], region_classes=REGIONS)
    with pytest.raises(ValueError, match="belongs to another manifest"):
        read_masks(set_dir, image_ids=ids, region_classes=REGIONS, labels=[(v + 1) % 3 for v in df["label"]])

    # Rewritten shards, each with its true size written into metadata.json (so the size check
    # passes and the content checks speak).
    shard = set_dir / shard_name(0)

    def rewrite(table):
        pq.write_table(table, shard)
        meta = json.loads((set_dir / "metadata.json").read_text())
        meta["shard_bytes"][shard_name(0)] = shard.stat().st_size
        (set_dir / "metadata.json").write_text(json.dumps(meta))

    original = pq.read_table(shard)
    detector = original.column("detector").to_pylist()
    rewrite(original.set_column(5, "detector", pa.array(["another-detector", *detector[1:]])))
    with pytest.raises(ValueError, match="rows of box source 'another-detector'"):
        read_masks(set_dir, image_ids=ids, region_classes=REGIONS)
    masks = original.column("masks").to_pylist()
    rewrite(original.set_column(4, "masks", pa.array([b"\x00", *masks[1:]], pa.binary())))
    with pytest.raises(ValueError, match=r"has 1 bytes, expected 2x16x16"):
        read_masks(set_dir, image_ids=ids, region_classes=REGIONS)
    rewrite(original.slice(0, 9))  # a row lost
    with pytest.raises(ValueError, match=rf"shard {shard_name(0)} holds 9 rows, metadata.json records 10"):
        read_masks(set_dir, image_ids=ids, region_classes=REGIONS)
    rewrite(original)
    meta = json.loads((set_dir / "metadata.json").read_text())
    (set_dir / "metadata.json").write_text(json.dumps({**meta, "schema_version": 1}))
    with pytest.raises(ValueError, match="schema version 1"):
        read_masks(set_dir, image_ids=ids, region_classes=REGIONS)
    (set_dir / "metadata.json").unlink()
    with pytest.raises(ValueError, match="not a complete mask set"):
        read_masks(set_dir, image_ids=ids, region_classes=REGIONS)


def test_label_files_as_box_source(data_root, label_set, tmp_path):
    df, set_dir = label_set
    labels = index_labels(data_root / "leafsnap20-regions" / "labels")
    meta = read_metadata(set_dir)
    assert meta["source"] == "labels" and meta["detector_key"].startswith("labels-")
    rows = shard_table(set_dir)
    for image_id in df["image_id"]:
        boxes = np.array(list(rows.loc[image_id, "boxes"]), dtype=float).reshape(-1, 6)
        if image_id in labels:  # the hand-drawn boxes as they are, confidence 1
            lines = np.loadtxt(labels[image_id], ndmin=2)
            np.testing.assert_allclose(boxes[:, :5], lines)
            assert (boxes[:, 5] == 1.0).all()
        else:
            assert len(boxes) == 0
    assert 0 < meta["summary"]["images_without_box"] < 24
    # Without the "empty" policy an unlabelled image is an error naming it.
    strict = LabelBoxes.create(labels, classes=REGIONS)
    with pytest.raises(ValueError, match=r"have no label file, e\.g\."):
        build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=strict, region_classes=REGIONS,
                       cfg=MasksConfig(resolution=16), location=tmp_path / "strict", executor="local")
    assert not (tmp_path / "strict").exists()


def test_plan_survives_a_changed_shard_size(label_set, data_root, tmp_path):
    df, set_dir = label_set
    (set_dir / "metadata.json").unlink()
    (set_dir / shard_name(2)).unlink()
    source = LabelBoxes.create(index_labels(data_root / "leafsnap20-regions" / "labels"), classes=REGIONS,
                               unlabelled="empty")
    again = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGIONS,
                           cfg=MasksConfig(resolution=16, rows_per_shard=7), location=set_dir.parent, executor="local")
    assert again == str(set_dir)
    assert read_metadata(again)["rows_per_shard"] == {shard_name(0): 10, shard_name(1): 10, shard_name(2): 4}


def test_mask_set_on_object_store_equals_local(ray_cluster, s3_server, label_set, data_root):
    df, local = label_set
    source = LabelBoxes.create(index_labels(data_root / "leafsnap20-regions" / "labels"), classes=REGIONS,
                               unlabelled="empty")
    root = s3_server("masks-bucket", "runs/masks")
    remote = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGIONS,
                            cfg=MasksConfig(resolution=16, rows_per_shard=10, num_actors=2), location=root)
    assert remote.startswith("s3://masks-bucket/runs/masks/" + local.name + "?endpoint_override=")
    ids = df["image_id"].tolist()
    np.testing.assert_array_equal(read_masks(remote, image_ids=ids, region_classes=REGIONS)[0],
                                  read_masks(local, image_ids=ids, region_classes=REGIONS)[0])
    assert read_metadata(remote)["rows_per_shard"] == read_metadata(local)["rows_per_shard"]


def test_set_id_changes_with_every_input_of_the_masks_and_nothing_else():
    ident = {"detector": "k1", "weights_digest": "a" * 64, "imgsz": 320, "conf": 0.1}
    cfg = MasksConfig(resolution=64)
    base = mask_set_id(source_identity=ident, manifest_hash="m1", region_classes=REGIONS, cfg=cfg)
    assert len(base) == 16
    others = [
        mask_set_id(source_identity={**ident, "detector": "k2"}, manifest_hash="m1", region_classes=REGIONS, cfg=cfg),
        mask_set_id(source_identity={**ident, "weights_digest": "b" * 64}, manifest_hash="m1", region_classes=REGIONS,
                    cfg=cfg),
        mask_set_id(source_identity=ident, manifest_hash="m2", region_classes=REGIONS, cfg=cfg),
        mask_set_id(source_identity=ident, manifest_hash="m1", region_classes=REGIONS[::-1], cfg=cfg),
        mask_set_id(source_identity=ident, manifest_hash="m1", region_classes=REGIONS,
                    cfg=cfg.model_copy(update={"corrupt_images": "record"})),
    ]
    assert len({base, *others}) == 6
    # How the work is cut and run does not change the content, so not the id either.
    same = cfg.model_copy(update={"batch_size": 3, "rows_per_shard": 7, "num_actors": 5, "location": "s3://b/x"})
    assert mask_set_id(source_identity=ident, manifest_hash="m1", region_classes=REGIONS, cfg=same) == base


def test_detector_identity_follows_the_tensors_not_the_file_bytes(tiny_detector, tmp_path):
    """Ultralytics stores a save date beside the weights: a retraining that gives the same tensors
    must give the same mask set, another tensor another set."""
    ckpt = torch.load(tiny_detector.weights, map_location="cpu", weights_only=False)
    ckpt["date"] = "2000-01-01T00:00:00"
    resaved = tmp_path / "resaved.pt"
    torch.save(ckpt, resaved)
    assert sha256_file(resaved) != sha256_file(tiny_detector.weights)
    same = dataclasses.replace(tiny_detector, weights=str(resaved))
    assert same.identity() == tiny_detector.identity()
    model = ckpt.get("ema") or ckpt["model"]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    changed = tmp_path / "changed.pt"
    torch.save(ckpt, changed)
    assert dataclasses.replace(tiny_detector, weights=str(changed)).identity() != tiny_detector.identity()
    with pytest.raises(ValueError, match="not an Ultralytics checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "plain.pt")
        weights_digest(tmp_path / "plain.pt")


def test_a_job_mask_directory_reads_as_its_current_set(label_mask_set, tiny_manifest, tmp_path):
    """A config may name the job's mask directory: the set in its CURRENT file is read, so a
    published config works wherever the job ran, whatever set id the detector gave there."""
    import shutil

    from mgfa_ray.masks import read_masks, read_metadata, resolve_mask_set, write_current_set

    root = tmp_path / "masks"
    set_id = Path(label_mask_set).name
    shutil.copytree(label_mask_set, root / set_id)
    with pytest.raises(ValueError, match="not a complete mask set"):
        read_metadata(root)  # no CURRENT yet
    write_current_set(str(root), set_id)
    assert (root / "CURRENT").read_text() == f"{set_id}\n"
    assert resolve_mask_set(root) == str(root / set_id)
    assert resolve_mask_set(root / set_id) == str(root / set_id)  # a set names itself
    df, _ = tiny_manifest
    ids = df["image_id"].tolist()
    via_root, meta = read_masks(root, image_ids=ids, region_classes=["vein", "contour"])
    direct, _ = read_masks(label_mask_set, image_ids=ids, region_classes=["vein", "contour"])
    assert meta["set_id"] == set_id and np.array_equal(via_root, direct)
