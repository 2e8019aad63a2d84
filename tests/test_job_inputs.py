"""Job inputs checked before any stage runs (weights files, resume), secrets kept out of every file
and message, and the stage gates that stop a job whose detector or masks are unusable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mgfa_ray.cli import main
from mgfa_ray.config import to_dict

REPO = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, **train) -> Path:
    """The main job file with ``train`` fields replaced and its output under ``tmp_path``."""
    job = yaml.safe_load((REPO / "jobs" / "leafsnap20.yaml").read_text())
    job["train"].update(train)
    job["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


def test_job_with_unreadable_weights_stops_before_any_stage(tmp_path, capsys):
    """Defect 5: random bytes as train.weights used to run the detector and masks, then fail every
    trial with torch's advice to load with weights_only=False, naming no file."""
    weights = _random_bytes(tmp_path / "backbone.pth")
    assert main(["run", str(_job(tmp_path, weights=str(weights)))]) == 2
    out = capsys.readouterr()
    error = out.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "train.weights" in error[0]
    assert str(weights) in error[0] and "weights_only=True" in error[0]
    assert "weights_only=False" not in out.err + out.out
    assert "=== mgfa-ray" not in out.out  # no stage started
    assert not (tmp_path / "out").exists()  # nothing written


def test_job_with_weights_of_another_backbone_names_the_mismatch(tmp_path, capsys, mobilenet_weights):
    assert main(["run", str(_job(tmp_path, backbone="resnet18", weights=str(mobilenet_weights)))]) == 2
    err = capsys.readouterr().err
    assert f"{mobilenet_weights} does not fit this backbone" in err and "backbone resnet18" in err


def test_train_with_unreadable_weights_is_one_error_line(tmp_path, capsys, tiny_train_config):
    weights = _random_bytes(tmp_path / "w.pth")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_train_config.model_copy(update={"weights": str(weights)}))))
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: weights: weights file {weights}: not a PyTorch state_dict")
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_train_resume_with_nothing_to_resume_is_an_error(tmp_path, capsys, tiny_train_config):
    """``--resume`` used to start over silently when the directory held no checkpoint."""
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_train_config)))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"nothing to resume in {run_dir}" in err and "without --resume" in err
    assert not (run_dir / "metrics.csv").exists()
