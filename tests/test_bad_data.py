"""Bad data a user can have: damaged mask sets (a deleted, truncated or swapped shard), unreadable
images, and label files that are subtly wrong. Each ends in one clear message, and a rerun of the
job repairs what it can. Label-file box source, no Ray, a handful of photos."""

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from mgfa_ray.cli import main
from mgfa_ray.config import ConfigError, DatasetConfig, MasksConfig, TrainConfig
from mgfa_ray.errors import UserError
from mgfa_ray.data.manifest import build_manifest, manifest_hash, write_manifest
from mgfa_ray.masks.sources import DetectorBoxes, LabelBoxes
from mgfa_ray.masks import build_mask_set, read_masks, read_metadata, read_rows, shard_name
from mgfa_ray.data.images import decode_rgb
from mgfa_ray.data.regions import Box, LabelError, index_labels, parse_label_file, select_annotated
from mgfa_ray.train.data import load_trial_data

REPO = Path(__file__).resolve().parents[1]
REGIONS = ["vein", "contour"]


@pytest.fixture()
def label_set(data_root, tiny_manifest, tmp_path):
    """A 24-image set of 3 shards from the hand-drawn labels, and a function that (re)builds it."""
    df, manifest_path = tiny_manifest
    source = LabelBoxes.create(index_labels(data_root / "leafsnap20-regions" / "labels"), classes=REGIONS,
                               unlabelled="empty")

    def build():
        return build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGIONS,
                              cfg=MasksConfig(resolution=8, rows_per_shard=10), location=tmp_path / "masks",
                              executor="local", manifest_path=str(manifest_path))

    return Path(build()), build, df


def masks_of(set_dir) -> dict:
    return read_rows(set_dir).set_index("image_id")["masks"].to_dict()


def test_deleted_shard_is_named_on_read_and_a_rerun_rebuilds_it(label_set, tmp_path, capsys):
    set_dir, build, df = label_set
    before = masks_of(set_dir)
    (set_dir / shard_name(1)).unlink()
    with pytest.raises(UserError, match=rf"mask set {set_dir}: shard {shard_name(1)} is missing.*rerun"):
        read_rows(set_dir)
    with pytest.raises(UserError, match=shard_name(1)):
        read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=REGIONS)
    assert main(["masks", "show", str(set_dir), "--output-dir", str(tmp_path / "fig")]) == 2  # `mgfa-ray masks show SET`
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and shard_name(1) in err
    assert Path(build()) == set_dir  # the job's rerun finds the damage and rebuilds the shard
    assert masks_of(set_dir) == before


def test_truncated_shard_is_named_on_read_and_a_rerun_rebuilds_it(label_set):
    set_dir, build, _ = label_set
    before = masks_of(set_dir)
    shard = set_dir / shard_name(2)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"mask set {set_dir}: shard {shard_name(2)} .*rerun"):
        read_rows(set_dir)
    build()
    assert masks_of(set_dir) == before


def test_a_shard_with_other_content_fails_its_checksum_and_a_rerun_rebuilds_it(label_set):
    set_dir, build, _ = label_set
    before = masks_of(set_dir)
    meta = read_metadata(set_dir)
    assert set(meta["shard_sha256"]) == set(meta["rows_per_shard"]) == set(meta["shard_bytes"])
    shutil.copyfile(set_dir / shard_name(1), set_dir / shard_name(0))  # readable, 10 rows, the wrong images
    build()
    assert masks_of(set_dir) == before and len(before) == 24


@pytest.mark.parametrize("field", ["shard_bytes", "shard_sha256"])
def test_a_set_without_its_shard_records_is_damaged_and_a_rerun_rebuilds_it(label_set, field):
    """Every set records each shard's size and SHA-256: a ``metadata.json`` without them is damaged
    (one message naming the set and the field, not a KeyError), and the job's rerun republishes it."""
    set_dir, build, df = label_set
    before = masks_of(set_dir)
    meta_path = set_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta[field]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"mask set {set_dir}: damaged \(metadata.json has no {field}\); rerun"):
        read_rows(set_dir)
    with pytest.raises(UserError, match=rf"damaged \(metadata.json has no {field}\)"):
        read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=REGIONS)
    assert Path(build()) == set_dir
    assert masks_of(set_dir) == before and field in read_metadata(set_dir)


# --- Unreadable images -------------------------------------------------------------------------


@pytest.fixture()
def photos(data_root, tmp_path):
    """Two classes of three real photos (one photo group each), plus an empty and a text '.jpg'."""
    root = tmp_path / "photos"
    for cls in ("acer_campestre", "acer_palmatum"):
        (root / cls).mkdir(parents=True)
        for src in sorted((data_root / "leafsnap20" / cls).glob("*.jpg"))[:3]:
            (root / cls / f"{src.stem.replace('-', '_')}.jpg").symlink_to(src)
    (root / "acer_campestre" / "empty.jpg").write_bytes(b"")
    (root / "acer_palmatum" / "notes.jpg").write_text("not a photo\n")
    return root


def test_unreadable_images_stop_the_job_at_the_manifest_with_one_line(photos, tmp_path, monkeypatch, capsys):
    job = yaml.safe_load((REPO / "jobs" / "leafsnap20.yaml").read_text())
    job.update(data_root=str(photos.parent), output_dir=str(tmp_path / "out"))
    job["dataset"].update(images=photos.name, val_fraction=0.0, test_fraction=0.0)
    job["train"]["weights"] = None
    job["search"]["space"] = str(REPO / "search_spaces" / "leafsnap20.yaml")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    monkeypatch.delenv("MGFA_DATA_ROOT", raising=False)
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    out = capsys.readouterr()
    assert "=== mgfa-ray: detector" not in out.out  # stopped before the detector
    assert out.err.count("\n") == 1 and out.err.startswith("error: 2 image(s) cannot be read")
    for name, why in (("empty.jpg", "empty file"), ("notes.jpg", "not a JPEG, PNG or BMP image")):
        assert f"{name}: {why}" in out.err
    assert "masks.corrupt_images: record" in out.err and "Remove or replace" in out.err


class _FakeDetector:
    """Stands in for the YOLO detector: one contour box per decoded image."""

    @staticmethod
    def install(monkeypatch):
        import mgfa_ray.detector.inference as det

        monkeypatch.setattr(det, "load_detector", lambda weights, device: object())
        monkeypatch.setattr(det, "predict_boxes", lambda model, images, imgsz, conf: [
            [Box(1, 0.5, 0.5, 0.5, 0.5, 0.9)] for _ in images])
        monkeypatch.setattr(det, "weights_digest", lambda weights: "fake")


@pytest.mark.parametrize("content", [b"", b"not a photo\n", b"\xff\xd8\xff\xe0 a cut jpeg"])
def test_any_decode_failure_is_a_corrupt_image(tmp_path, content, monkeypatch):
    _FakeDetector.install(monkeypatch)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot decode image {bad}: "):
        decode_rgb(str(bad))
    monkeypatch.setattr("mgfa_ray.data.images.Image.open", lambda *a, **k: (_ for _ in ()).throw(ModuleNotFoundError("x")))
    good = next((REPO.parent / "shared" / "data" / "leafsnap20").glob("*/*.jpg"))
    with pytest.raises(ValueError, match="ModuleNotFoundError"):  # a plugin lookup failing on a good file
        decode_rgb(str(good))


def test_mask_stage_names_undecodable_images_and_leaves_no_empty_set(tiny_manifest, tmp_path, monkeypatch):
    _FakeDetector.install(monkeypatch)
    df, _ = tiny_manifest
    bad = df.copy()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a photo")
    bad.loc[3, "path"], bad.loc[17, "path"] = str(tmp_path / "empty.jpg"), str(tmp_path / "notes.jpg")
    source = DetectorBoxes(weights="w.pt", detector_key="fake", imgsz=64, conf=0.1, batch_size=8)
    kwargs = dict(manifest=bad, manifest_hash=manifest_hash(bad), source=source, region_classes=REGIONS,
                  location=tmp_path / "masks", executor="local")
    with pytest.raises(UserError, match=r"2 image\(s\) cannot be decoded: .*empty\.jpg: empty file.*notes\.jpg"
                                        r".*Remove or replace them, or set masks.corrupt_images: record") as err:
        build_mask_set(cfg=MasksConfig(resolution=8, rows_per_shard=24), **kwargs)
    assert "rerun computes the rest" not in str(err.value)
    assert list((tmp_path / "masks").iterdir()) == []  # no set folder holding only plan.json

    recorded = build_mask_set(cfg=MasksConfig(resolution=8, rows_per_shard=24, corrupt_images="record"), **kwargs)
    meta = read_metadata(recorded)
    assert sorted(meta["corrupt"]) == sorted(bad.loc[[3, 17], "image_id"]) and meta["rows"] == 24
    rows = read_rows(recorded).set_index("image_id")
    assert "empty file" in rows.loc[bad.loc[3, "image_id"], "error"] and rows["error"].notna().sum() == 2
    # With the label files as the box source the photos are checked (header) and recorded alike.
    source = LabelBoxes.create({}, classes=REGIONS, unlabelled="empty")
    with pytest.raises(UserError, match=r"2 image\(s\) cannot be decoded: .*empty\.jpg: empty file"):
        build_mask_set(**{**kwargs, "source": source}, cfg=MasksConfig(resolution=8, rows_per_shard=24))
    labels_set = build_mask_set(**{**kwargs, "source": source},
                                cfg=MasksConfig(resolution=8, rows_per_shard=24, corrupt_images="record"))
    assert read_metadata(labels_set)["corrupt"] == meta["corrupt"]

    # The trials leave the recorded images out (they would fail on read otherwise).
    manifest_path = tmp_path / "manifest.parquet"
    write_manifest(bad, manifest_path)
    cfg = TrainConfig(manifest=str(manifest_path), masks=recorded, backbone="mobilenet_v2", weights=None, resize=16,
                      train_crop=16, epochs=1, batch_size=8, lr=0.01, momentum=0.9, lr_step=1, threads=1, device="cpu")
    with pytest.warns(UserWarning, match="2 image\\(s\\) recorded as corrupt are left out"):
        data, _ = load_trial_data(cfg, device=torch.device("cpu"))
    assert sum(len(labels) for _, _, labels in data.values()) == 22


# --- Label files and splits: weak messages mended ----------------------------------------------


def test_a_byte_order_mark_at_the_start_of_a_label_file_is_accepted(tmp_path):
    label = tmp_path / "a.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n1 0.4 0.4 0.1 0.1\n", encoding="utf-8-sig")  # as Windows Notepad saves
    assert parse_label_file(label, classes=REGIONS) == [Box(0, 0.5, 0.5, 0.2, 0.2), Box(1, 0.4, 0.4, 0.1, 0.1)]


def voc(width: int, height: int) -> str:
    return (f"<annotation><size><width>{width}</width><height>{height}</height></size><object><name>vein</name>"
            f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object></annotation>")


def test_a_voc_size_that_disagrees_with_the_photo_is_named(data_root, tmp_path):
    photo = sorted((data_root / "leafsnap20" / "acer_campestre").glob("*.jpg"))[0]
    with Image.open(photo) as im:
        w, h = im.size
    manifest = pd.DataFrame({"image_id": ["a/p"], "path": [str(photo)], "split": ["train"]})
    label = tmp_path / "a" / "p.xml"
    label.parent.mkdir()
    label.write_text(voc(w, h))
    assert select_annotated({"a/p": label}, manifest, max_images=None, seed=0) == {"a/p": label}  # agrees
    label.write_text(voc(w + 37, h))  # another aspect ratio: the normalised boxes would be wrong
    with pytest.raises(LabelError, match=rf"{label}:1: <size> {w + 37}x{h} does not match the photo {photo} "
                                         rf"\({w}x{h} pixels\)"):
        select_annotated({"a/p": label}, manifest, max_images=None, seed=0)
    label.write_text(voc(2 * w, 2 * h))  # the photo rescaled after annotation: boxes still right, say so
    with pytest.warns(UserWarning, match=rf"{label}:1: <size> {2 * w}x{2 * h} differs from the photo .*\({w}x{h}"):
        select_annotated({"a/p": label}, manifest, max_images=None, seed=0)
    source = LabelBoxes.create({"a/p": label}, classes=REGIONS)  # the label files as the box source: checked too
    label.write_text(voc(w, h + 50))
    with pytest.raises(LabelError, match="does not match the photo"):
        build_mask_set(manifest=manifest.assign(label=0), manifest_hash="m", source=source, region_classes=REGIONS,
                       cfg=MasksConfig(resolution=8), location=tmp_path / "masks", executor="local")


def test_a_class_with_one_photo_group_is_named_and_an_empty_split_is_an_error(photos):
    for f in ("acer_campestre/empty.jpg", "acer_palmatum/notes.jpg"):
        (photos / f).unlink()
    for f in sorted((photos / "acer_palmatum").iterdir())[1:]:
        f.unlink()  # acer_palmatum keeps one photo
    cfg = DatasetConfig(layout="class_folders", images="photos", val_fraction=0.34, test_fraction=0.34)
    with pytest.warns(UserWarning, match=r"class 'acer_palmatum': 1 photo group\(s\).*no val or test photos"):
        df = build_manifest(photos, cfg)
    assert df.groupby("class_name")["split"].apply(set).to_dict() == {
        "acer_campestre": {"train", "val", "test"}, "acer_palmatum": {"train"}}
    for f in sorted((photos / "acer_campestre").iterdir())[1:]:
        f.unlink()
    with pytest.raises(ConfigError, match=r"split 'val' would be empty.*acer_campestre.*acer_palmatum"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_manifest(photos, cfg)


def test_labels_in_a_flat_folder_say_where_they_were_looked_for_and_the_layout(data_root, tiny_manifest, tmp_path):
    df, _ = tiny_manifest
    flat = tmp_path / "labels"
    flat.mkdir()
    for image_id, f in list(index_labels(data_root / "leafsnap20-regions" / "labels").items())[:3]:
        (flat / Path(f).name).write_bytes(Path(f).read_bytes())
    labels = index_labels(flat)
    with pytest.raises(LabelError, match=rf"none of the 3 label files under {flat} .*<class>/<stem>.*"
                                         r"flat folder.*subfolder named after its class"):
        select_annotated(labels, df, max_images=None, seed=0)
    source = LabelBoxes.create(labels, classes=REGIONS, unlabelled="empty")  # not silently all-empty masks
    with pytest.raises(LabelError, match=rf"none of the 3 label files under {flat}"):
        build_mask_set(manifest=df, manifest_hash="m", source=source, region_classes=REGIONS,
                       cfg=MasksConfig(resolution=8), location=tmp_path / "masks", executor="local")
