"""A pretrained detector backbone (``detector.backbone_weights``): the ImageNet MobileNetV2 weights
reach the YOLO that trains, bad files stop the job before any stage, and the key tells them apart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from mgfa_ray.cli import main
from mgfa_ray.config import DetectorConfig
from mgfa_ray.detector.key import detector_key
from mgfa_ray.detector.training import train_detector
from mgfa_ray.detector.backbone import MODELS_DIR, build_pretrained, model_source
from mgfa_ray.weights import WeightsError

from test_detector import REGION_CLASSES, label_files, manifest_for

REPO = Path(__file__).resolve().parents[1]
MNV2 = "yolo11n-mobilenetv2.yaml"


def _first_conv(model) -> torch.Tensor:
    """The backbone's first convolution (torchvision's ``features.0.0``) inside the YOLO."""
    return model.model[0].m[0][0].weight


def test_build_pretrained_copies_every_backbone_tensor(mobilenet_weights):
    state = torch.load(mobilenet_weights, weights_only=True)
    net = build_pretrained(MNV2, mobilenet_weights, nc=2)
    got = net.model[0].m.state_dict()
    # features.0 .. features.17 are kept; features.18 (the 1280-channel conv) is truncated by the YAML.
    kept = {k: v for k, v in state.items() if int(k.split(".")[1]) <= 17}
    assert len(got) == len(kept) > 300
    for key, value in kept.items():
        assert torch.equal(got[key.split(".", 1)[1]], value), key


@pytest.mark.parametrize("bad", ["random bytes", "another model", "missing"])
def test_bad_backbone_weights_are_one_weights_error_naming_the_file(tmp_path, bad):
    path = tmp_path / "backbone.pth"
    if bad == "random bytes":
        path.write_bytes(os.urandom(2048))
    elif bad == "another model":
        import torchvision

        torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_pretrained(MNV2, path, nc=2)
    msg = str(err.value)
    assert "detector.backbone_weights" in msg and str(path) in msg and "\n" not in msg
    assert {"random bytes": "weights_only=True", "another model": "does not fit",
            "missing": "does not exist"}[bad] in msg


def test_backbone_weights_need_a_yaml_with_a_torchvision_layer(mobilenet_weights):
    import ultralytics

    with pytest.raises(WeightsError, match="detector.model to be a model YAML file with a TorchVision"):
        build_pretrained("yolo11n.yaml", mobilenet_weights, nc=2)  # a name Ultralytics resolves, not a file
    plain = Path(ultralytics.__file__).parent / "cfg" / "models" / "11" / "yolo11.yaml"
    with pytest.raises(WeightsError, match="exactly one TorchVision layer"):
        build_pretrained(str(plain), mobilenet_weights, nc=2)


def test_model_source_finds_shipped_yamls_by_name_only(tmp_path):
    assert model_source(MNV2) == str(MODELS_DIR / MNV2)
    assert model_source("yolo11n.yaml") == "yolo11n.yaml"  # Ultralytics' own
    assert model_source(f"sub/{MNV2}") == f"sub/{MNV2}"  # a path that does not exist is not redirected


def test_detector_key_identifies_backbone_weights_by_content(tmp_path, mobilenet_weights):
    labels = label_files()
    base = DetectorConfig(model=MNV2, imgsz=64, epochs=1, batch=4)
    copy = tmp_path / mobilenet_weights.name  # the same file elsewhere: the key holds no directory
    copy.write_bytes(mobilenet_weights.read_bytes())
    other = tmp_path / "other.pth"
    state = torch.load(mobilenet_weights, weights_only=True)
    state["features.0.0.weight"] = state["features.0.0.weight"] * 2
    torch.save(state, other)
    key = lambda **u: detector_key(base.model_copy(update=u), region_classes=REGION_CLASSES, label_files=labels)
    assert key(backbone_weights=str(mobilenet_weights)) == key(backbone_weights=str(copy))  # path-free
    assert key(backbone_weights=str(mobilenet_weights)) != key(backbone_weights=str(other))
    assert key(backbone_weights=str(mobilenet_weights)) != key()
    assert key() == detector_key(base, region_classes=REGION_CLASSES, label_files=labels)


def test_training_starts_from_the_pretrained_backbone(tmp_path, mobilenet_weights, monkeypatch):
    """The YOLO Ultralytics trains is the one with the ImageNet backbone: its initial checkpoint
    holds the file's tensors, and Ultralytics transfers them into the model it builds to train."""
    import ultralytics

    seen = {}

    class SpyYOLO(ultralytics.YOLO):  # Ultralytics' public callback: the model it built, before any step
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback("on_pretrain_routine_end",
                              lambda trainer: seen.setdefault("first_conv", _first_conv(trainer.model).detach().clone()))

    monkeypatch.setattr(ultralytics, "YOLO", SpyYOLO)
    labels = label_files()
    cfg = DetectorConfig(model=MNV2, backbone_weights=str(mobilenet_weights), imgsz=64, epochs=1, batch=4,
                         holdout_fraction=0.25)
    metrics = train_detector(manifest=manifest_for(list(labels)), label_files=labels,
                             region_classes=REGION_CLASSES, cfg=cfg, out_dir=tmp_path / "det")
    expected = torch.load(mobilenet_weights, weights_only=True)["features.0.0.weight"]
    assert torch.equal(seen["first_conv"], expected)
    assert metrics["backbone_weights"] == str(mobilenet_weights)
    assert (tmp_path / "det" / "init.pt").is_file() and (tmp_path / "det" / "weights.pt").is_file()


def test_job_with_bad_backbone_weights_stops_before_any_stage(tmp_path, capsys):
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(os.urandom(2048))
    job = yaml.safe_load((REPO / "jobs" / "leafsnap20.yaml").read_text())
    job["detector"].update(model=MNV2, backbone_weights=str(weights))
    job["output_dir"] = str(tmp_path / "out")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    out = capsys.readouterr()
    error = out.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "detector.backbone_weights" in error[0]
    assert str(weights) in error[0] and "=== mgfa-ray" not in out.out
    assert not (tmp_path / "out").exists()
