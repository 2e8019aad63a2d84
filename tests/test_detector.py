"""Stage 3 — region detector: tiny Ultralytics runs on real leafsnap20 photos and their region boxes.

Settings are tiny (64 px, 1 epoch, 6 annotated photos): the tests check contracts (files, keys,
split, skip on rerun, coordinates, label errors, a clean working directory), not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pydantic import ValidationError

from mgfa_ray.detector import fit as detector_fit
from mgfa_ray.config import ConfigError, DetectorConfig
from mgfa_ray.detector.cross_validation import cross_validate_detector
from mgfa_ray.detector.key import detector_key
from mgfa_ray.detector.training import train_detector
from mgfa_ray.detector.dataset import grouped_folds
from mgfa_ray.detector.inference import load_detector, predict_boxes
from mgfa_ray.storage import sha256_file
from mgfa_ray.data.regions import Box, LabelError

REGION_CLASSES = ["vein", "contour"]
SPECIES = ["acer_campestre", "betula_alleghaniensis", "ginkgo_biloba"]  # groups 01 and 03 each
CFG = DetectorConfig(imgsz=64, epochs=1, batch=4, holdout_fraction=0.25, seed=0)


def data_root() -> Path:
    return Path(os.environ.get("MGFA_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


DATA = data_root()
LABELS = DATA / "leafsnap20-regions" / "labels"
IMAGES = DATA / "leafsnap20"

pytestmark = pytest.mark.skipif(not LABELS.is_dir(), reason=f"real data not found under {DATA}")


def label_files(label_dir: Path = LABELS) -> dict[str, Path]:
    return {f"{sp}/{f.stem}": f for sp in SPECIES for f in sorted((label_dir / sp).glob("*.txt"))}


def manifest_for(image_ids: list[str]) -> pd.DataFrame:
    rows = []
    for label, image_id in enumerate(sorted(image_ids)):
        species, stem = image_id.split("/")
        rows.append((image_id, str(IMAGES / species / f"{stem}.jpg"), SPECIES.index(species), species,
                     f"{species}/{stem.rsplit('-', 1)[0]}", "train"))
    return pd.DataFrame(rows, columns=["image_id", "path", "label", "class_name", "group", "split"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run, started from an empty working directory."""
    labels = label_files()
    assert len(labels) == 6
    manifest = manifest_for(list(labels))
    cwd = tmp_path_factory.mktemp("cwd")
    out_dir = tmp_path_factory.mktemp("detector")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        metrics = train_detector(manifest=manifest, label_files=labels, region_classes=REGION_CLASSES,
                                 cfg=CFG, out_dir=out_dir)
        cwd_after = sorted(p.name for p in cwd.iterdir())
    return dict(labels=labels, manifest=manifest, out_dir=out_dir, metrics=metrics, cwd_after=cwd_after)


def test_train_writes_weights_and_metrics(trained):
    out_dir, metrics = trained["out_dir"], trained["metrics"]
    assert (out_dir / "weights.pt").is_file()
    assert json.loads((out_dir / "metrics.json").read_text()) == metrics
    assert metrics["detector_key"] == detector_key(CFG, region_classes=REGION_CLASSES, label_files=trained["labels"])
    assert metrics["region_classes"] == REGION_CLASSES
    assert (metrics["model"], metrics["imgsz"], metrics["epochs"], metrics["seed"]) == ("yolo11n.yaml", 64, 1, 0)
    assert set(metrics["per_class"]) == set(REGION_CLASSES)
    for entry in metrics["per_class"].values():
        # Every held-out photo has one vein and one contour box, so both APs are defined.
        assert entry["n_holdout_instances"] >= 1
        assert 0.0 <= entry["map50"] <= 1.0 and 0.0 <= entry["map50_95"] <= 1.0
    # Both classes are held out, so the overall mAP is the mean of the per-class APs.
    for key in ("map50", "map50_95"):
        assert metrics[key] == pytest.approx(np.mean([metrics["per_class"][c][key] for c in REGION_CLASSES]))
    train_ids, holdout_ids = metrics["train_ids"], metrics["holdout_ids"]
    assert train_ids == sorted(train_ids) and holdout_ids == sorted(holdout_ids)
    assert not set(train_ids) & set(holdout_ids)
    assert set(train_ids) | set(holdout_ids) == set(trained["labels"])
    assert (metrics["n_train"], metrics["n_holdout"]) == (4, 2)  # round(0.25 * 6) = 2 held out
    import ultralytics  # after mgfa_ray.detector.training, which sets Ultralytics' environment first

    assert metrics["ultralytics_version"] == ultralytics.__version__  # the version that trained it, not a pin
    # The YOLO dataset: flat safe names, symlinks to the real photos, cleaned labels beside them.
    images = sorted((out_dir / "dataset" / "images" / "val").iterdir())
    assert len(images) == 2 and all(p.is_symlink() and "/" not in p.name for p in images)
    assert {p.resolve() for p in images} == {(IMAGES / f"{i}.jpg").resolve() for i in holdout_ids}
    assert len(list((out_dir / "dataset" / "labels" / "train").glob("*.txt"))) == 4


def test_rerun_skips_and_changed_cfg_retrains(trained, tmp_path, monkeypatch):
    out_dir, metrics = trained["out_dir"], trained["metrics"]
    stamps = {f: (out_dir / f).stat().st_mtime_ns for f in ("weights.pt", "metrics.json")}
    with monkeypatch.context() as mp:
        def no_fit(*args, **kwargs):
            raise AssertionError("a finished detector was trained again")

        mp.setattr(detector_fit, "_fit", no_fit)  # a skip trains nothing
        again = train_detector(manifest=trained["manifest"], label_files=trained["labels"],
                               region_classes=REGION_CLASSES, cfg=CFG, out_dir=out_dir)
    assert again == metrics
    assert {f: (out_dir / f).stat().st_mtime_ns for f in stamps} == stamps

    # Another seed: another detector, retrained in place over the copied results.
    copy = tmp_path / "detector"
    shutil.copytree(out_dir, copy, symlinks=True)
    cfg = CFG.model_copy(update={"seed": 1})
    other = train_detector(manifest=trained["manifest"], label_files=trained["labels"],
                           region_classes=REGION_CLASSES, cfg=cfg, out_dir=copy)
    assert other["detector_key"] != metrics["detector_key"]
    assert other["seed"] == 1 and other["weights_sha256"] != metrics["weights_sha256"]
    assert json.loads((copy / "metrics.json").read_text())["detector_key"] == other["detector_key"]


def test_detector_key_identifies_training_inputs(tmp_path):
    labels = label_files()
    key = detector_key(CFG, region_classes=REGION_CLASSES, label_files=labels)
    assert len(key) == 16 and int(key, 16) >= 0
    # Path-free: the same label bytes elsewhere give the same key.
    moved = {}
    for image_id, f in labels.items():
        moved[image_id] = tmp_path / "elsewhere" / f"{image_id}.txt"
        moved[image_id].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, moved[image_id])
    assert detector_key(CFG, region_classes=REGION_CLASSES, label_files=moved) == key
    # conf only filters predictions: same detector.
    assert detector_key(CFG.model_copy(update={"conf": 0.5}), region_classes=REGION_CLASSES, label_files=labels) == key
    # Training settings, classes and label content change it.
    assert detector_key(CFG.model_copy(update={"epochs": 2}), region_classes=REGION_CLASSES, label_files=labels) != key
    assert detector_key(CFG, region_classes=["contour", "vein"], label_files=labels) != key
    first = next(iter(moved))
    moved[first].write_text(moved[first].read_text().replace("0.", "0.0", 1))
    assert detector_key(CFG, region_classes=REGION_CLASSES, label_files=moved) != key


def test_predict_boxes_on_real_images(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [IMAGES / f"{i}.jpg" for i in sorted(trained["labels"])[:2]]
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    rgb[1] = np.asarray(Image.fromarray(rgb[1]).resize((300, 410)))  # sizes may differ
    model = load_detector(trained["out_dir"] / "weights.pt")
    detections = predict_boxes(model, rgb, imgsz=CFG.imgsz, conf=0.001)
    assert len(detections) == 2
    assert any(detections), "a 1-epoch model still scores some boxes above 0.001"
    for boxes in detections:
        for b in boxes:
            assert isinstance(b, Box)
            assert b.cls in (0, 1)
            assert all(0.0 <= v <= 1.0 for v in (b.cx, b.cy, b.w, b.h, b.conf))
            assert b.conf >= 0.001
    # RGB arrays are handed to Ultralytics in its BGR convention: same boxes as from the file.
    from_file = model.predict(str(paths[0]), imgsz=CFG.imgsz, conf=0.001, rect=False, verbose=False)[0].boxes
    ours = np.array([[b.cx, b.cy, b.w, b.h] for b in detections[0]]).reshape(-1, 4)
    assert len(ours) == len(from_file)
    np.testing.assert_allclose(ours, from_file.xywhn.numpy().clip(0, 1), atol=1e-4)
    # An image's boxes do not depend on its batch: a wide photo alone (Ultralytics' default would pad
    # it to 64 x 32) and beside a photo of another shape (padded to the 64 x 64 square).
    wide = np.asarray(Image.fromarray(rgb[0]).resize((400, 200)))
    alone = predict_boxes(model, [wide], imgsz=CFG.imgsz, conf=0.001)[0]
    mixed = predict_boxes(model, [wide, rgb[1]], imgsz=CFG.imgsz, conf=0.001)[0]
    assert len(alone) == len(mixed) > 0
    np.testing.assert_allclose([[b.cx, b.cy, b.w, b.h, b.conf] for b in alone],
                               [[b.cx, b.cy, b.w, b.h, b.conf] for b in mixed], atol=1e-5)
    assert predict_boxes(model, [], imgsz=CFG.imgsz, conf=0.1) == []
    with pytest.raises(ValueError, match="uint8"):
        predict_boxes(model, [rgb[0].astype(np.float32)], imgsz=CFG.imgsz, conf=0.1)
    assert list(tmp_path.iterdir()) == []


def test_malformed_label_names_file_and_line(tmp_path):
    labels = {}
    for image_id, f in label_files().items():
        labels[image_id] = tmp_path / "labels" / f"{image_id}.txt"
        labels[image_id].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, labels[image_id])
    bad = labels["betula_alleghaniensis/wb1394-03-1"]
    bad.write_text("0 0.5 0.5 0.2 0.1\n1 0.5 0.5 0.2\n")
    with pytest.raises(LabelError, match=rf"{bad}:2: expected 5 fields"):
        train_detector(manifest=manifest_for(list(labels)), label_files=labels, region_classes=REGION_CLASSES,
                       cfg=CFG, out_dir=tmp_path / "out")
    bad.write_text("2 0.5 0.5 0.2 0.1\n")  # class 2 outside vein/contour
    with pytest.raises(LabelError, match=rf"{bad}:1: unknown region class 2"):
        train_detector(manifest=manifest_for(list(labels)), label_files=labels, region_classes=REGION_CLASSES,
                       cfg=CFG, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Policy "skip": the unknown line is dropped with a warning naming file:line; Ultralytics gets
    # the cleaned file.
    bad.write_text("0 0.5 0.5 0.2 0.1\n2 0.5 0.5 0.2 0.1\n")
    with pytest.warns(UserWarning, match=rf"{bad}:2: unknown region class 2"):
        metrics = train_detector(manifest=manifest_for(list(labels)), label_files=labels,
                                 region_classes=REGION_CLASSES, cfg=CFG, out_dir=tmp_path / "out",
                                 unknown_class="skip")
    split = "train" if "betula_alleghaniensis/wb1394-03-1" in metrics["train_ids"] else "val"
    (cleaned,) = (tmp_path / "out" / "dataset" / "labels" / split).glob("betula_alleghaniensis_wb1394-03-1-*.txt")
    assert cleaned.read_text().splitlines() == ["0 0.500000 0.500000 0.200000 0.100000"]


def test_too_few_annotated_images(tmp_path):
    labels = label_files()
    manifest = manifest_for(list(labels))
    with pytest.raises(ValueError, match="no manifest image has a label file"):
        train_detector(manifest=manifest, label_files={"other/x": LABELS / "none.txt"},
                       region_classes=REGION_CLASSES, cfg=CFG, out_dir=tmp_path)
    one = {"acer_campestre/ny1079-01-1": labels["acer_campestre/ny1079-01-1"]}
    with pytest.raises(ValueError, match="need at least 2 groups"):
        train_detector(manifest=manifest, label_files=one, region_classes=REGION_CLASSES, cfg=CFG, out_dir=tmp_path)
    missing_pt = CFG.model_copy(update={"model": "yolo11n.pt"})
    with pytest.raises(ValueError, match="not a local file"):
        train_detector(manifest=manifest, label_files=labels, region_classes=REGION_CLASSES, cfg=missing_pt,
                       out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_nothing_written_to_cwd(trained):
    assert trained["cwd_after"] == []


# --- k-fold cross-validation (detector.cv_folds) ---------------------------------------------------

CV_CFG = CFG.model_copy(update={"cv_folds": 2})


def test_grouped_folds_partition_by_group():
    ids = [f"img{i:02d}" for i in range(11)]
    groups = {i: f"g{int(i[3:]) // 3}" for i in ids}  # groups of 3, 3, 3, 2
    folds = grouped_folds(ids, groups, 3, seed=0)
    assert len(folds) == 3 and all(f == sorted(f) and f for f in folds)
    assert sorted(i for f in folds for i in f) == ids  # every image exactly once
    fold_groups = [{groups[i] for i in f} for f in folds]
    assert all(not (a & b) for n, a in enumerate(fold_groups) for b in fold_groups[n + 1:])  # disjoint by group
    assert grouped_folds(ids, groups, 3, seed=0) == folds
    assert any(grouped_folds(ids, groups, 3, seed=s) != folds for s in range(1, 5))
    with pytest.raises(ConfigError, match=r"cv_folds = 5.*4 groups"):
        grouped_folds(ids, groups, 5, seed=0)
    with pytest.raises(ValidationError, match="cv_folds must be 0"):
        DetectorConfig(cv_folds=1)


def test_detector_key_includes_cv_and_augmentation_fields():
    labels = label_files()
    key = detector_key(CFG, region_classes=REGION_CLASSES, label_files=labels)
    for change in ({"cv_folds": 2}, {"mosaic": 0.0}, {"scale": 0.3}, {"degrees": 10.0}, {"fliplr": 0.0},
                   {"flipud": 0.5}):
        assert detector_key(CFG.model_copy(update=change), region_classes=REGION_CLASSES, label_files=labels) != key
    # Defaults stay out of the key: detectors trained before these fields existed keep their key.
    assert key == detector_key(DetectorConfig(**{k: v for k, v in CFG.model_dump().items()
                                                 if k in ("model", "imgsz", "epochs", "batch", "holdout_fraction",
                                                          "conf", "seed")}),
                               region_classes=REGION_CLASSES, label_files=labels)


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    """train_detector with cv_folds=2 on the 6 photos: 2 fold trainings + 1 refit (1 epoch, 64 px)."""
    labels = label_files()
    manifest = manifest_for(list(labels))
    out_dir = tmp_path_factory.mktemp("cv-detector")
    metrics = train_detector(manifest=manifest, label_files=labels, region_classes=REGION_CLASSES, cfg=CV_CFG,
                             out_dir=out_dir)
    return dict(labels=labels, manifest=manifest, out_dir=out_dir, metrics=metrics)


def test_cross_validation_folds_cover_every_image_once(cross_validated):
    out_dir, labels, manifest = cross_validated["out_dir"], cross_validated["labels"], cross_validated["manifest"]
    cv = json.loads((out_dir / "cv" / "cv.json").read_text())
    assert (cv["evaluation"], cv["k"], cv["complete"]) == ("cv2", 2, True)
    group = dict(zip(manifest["image_id"], manifest["group"]))
    held = [f["holdout_ids"] for f in cv["folds"]]
    assert sorted(i for h in held for i in h) == sorted(labels)
    assert not {group[i] for i in held[0]} & {group[i] for i in held[1]}
    for n, fold in enumerate(cv["folds"]):
        fm = json.loads((out_dir / "cv" / f"fold-{n}" / "metrics.json").read_text())
        assert fm["holdout_ids"] == fold["holdout_ids"] and not set(fm["train_ids"]) & set(fm["holdout_ids"])
        assert set(fm["train_ids"]) | set(fm["holdout_ids"]) == set(labels)
        assert fm["evaluation"] == "holdout" and set(fold["per_class"]) == set(REGION_CLASSES)
    # Pooled per class = mean over the folds; overall = mean over the classes.
    for c in REGION_CLASSES:
        per_fold = [f["per_class"][c]["map50"] for f in cv["folds"]]
        assert cv["per_class"][c]["map50"] == pytest.approx(np.mean(per_fold))
        assert cv["per_class"][c]["map50_spread"]["min"] == pytest.approx(min(per_fold))
        assert cv["per_class"][c]["n_holdout_instances"] == 6  # one box of each class per photo
    assert cv["map50"] == pytest.approx(np.mean([cv["per_class"][c]["map50"] for c in REGION_CLASSES]))


def test_cv_refit_on_all_publishes_cv_metrics(cross_validated):
    out_dir, metrics, labels = cross_validated["out_dir"], cross_validated["metrics"], cross_validated["labels"]
    cv = json.loads((out_dir / "cv" / "cv.json").read_text())
    assert json.loads((out_dir / "metrics.json").read_text()) == metrics
    assert metrics["evaluation"] == "cv2"
    assert metrics["train_ids"] == sorted(labels) and metrics["holdout_ids"] == [] and metrics["n_train"] == 6
    assert metrics["weights_sha256"] == sha256_file(out_dir / "weights.pt")
    assert metrics["detector_key"] == detector_key(CV_CFG, region_classes=REGION_CLASSES, label_files=labels)
    # The stage gate reads per_class[c]["map50"]: the cross-validated value, not the refit's.
    assert metrics["map50"] == cv["map50"]
    assert {c: metrics["per_class"][c]["map50"] for c in REGION_CLASSES} == \
        {c: cv["per_class"][c]["map50"] for c in REGION_CLASSES}
    assert [f["holdout_ids"] for f in metrics["cv"]["folds"]] == [f["holdout_ids"] for f in cv["folds"]]
    # The refit trained on all six photos.
    assert len(list((out_dir / "dataset" / "labels" / "train").glob("*.txt"))) == 6
    # A rerun skips every training; the weights stay.
    stamps = {p: p.stat().st_mtime_ns for p in [out_dir / "weights.pt", out_dir / "metrics.json",
                                                 *(out_dir / "cv").glob("fold-*/weights.pt")]}
    again = train_detector(manifest=cross_validated["manifest"], label_files=labels, region_classes=REGION_CLASSES,
                           cfg=CV_CFG, out_dir=out_dir)
    assert again == metrics and {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_cross_validate_detector_resumes_from_finished_folds(cross_validated, tmp_path):
    """Finished fold cells on disk are reused: a pilot of fold 0 over a finished fold 0 trains nothing."""
    src = cross_validated["out_dir"] / "cv"
    work = tmp_path / "cv"
    shutil.copytree(src, work, symlinks=True)
    shutil.rmtree(work / "fold-1")
    before = (work / "fold-0" / "weights.pt").stat().st_mtime_ns
    cv = cross_validate_detector(manifest=cross_validated["manifest"], label_files=cross_validated["labels"],
                                 region_classes=REGION_CLASSES, cfg=CV_CFG, out_dir=work, only_folds=[0])
    assert (cv["complete"], [f["fold"] for f in cv["folds"]]) == (False, [0])
    assert (work / "fold-0" / "weights.pt").stat().st_mtime_ns == before and not (work / "fold-1").exists()
    assert set(cv["per_class"]) == set(REGION_CLASSES) and set(cv["folds"][0]["per_class"]) == set(REGION_CLASSES)
