"""The chained main job in smoke mode, started the way users start it (the console script).

Its end-to-end run with the detector, then extended and its best config trained again, is
tests/test_cluster.py's (submitted to a two-node cluster); here: its errors, and its run with
hand-drawn boxes as masks on an object store."""

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mgfa_ray.config import TrainConfig, load_config
from mgfa_ray.masks import resolve_mask_set

REPO = Path(__file__).resolve().parents[1]
BIN = Path(__import__("sys").executable).parent


def test_missing_data_root_fails_clearly(tmp_path):
    run = subprocess.run([BIN / "mgfa-ray", "run", "jobs/leafsnap20.yaml", "--output-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "MGFA_DATA_ROOT": str(tmp_path / "absent")})
    assert run.returncode == 2
    assert "absent" in run.stderr and "MGFA_DATA_ROOT" in run.stderr


@pytest.mark.slow
def test_smoke_job_with_label_boxes_and_masks_on_object_store(tmp_path, s3_server):
    """regions.source: labels (no detector) and masks.location on an S3 API server; the trials and
    the exported config read the masks from there."""
    job = yaml.safe_load((REPO / "jobs" / "leafsnap20.yaml").read_text())
    job["regions"].update(source="labels", unlabelled="empty")
    job["masks"]["location"] = s3_server("jobs", "leafsnap20/masks")
    job["output_dir"] = str(tmp_path / "job")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    run = subprocess.run([BIN / "mgfa-ray", "run", str(tmp_path / "job.yaml"), "--smoke"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "=== mgfa-ray: detector ===" not in run.stdout
    smoke = tmp_path / "job-smoke"
    assert not (smoke / "detector").exists() and not (smoke / "masks").exists()
    report = json.loads((smoke / "report.json").read_text())
    assert report["detector"] is None
    assert report["mask_set"]["path"].startswith("s3://jobs/leafsnap20/masks/")
    assert report["mask_set"]["rows"] == 24 and report["mask_set"]["summary"]["images_without_box"] > 0
    best = load_config(TrainConfig, smoke / "export" / "best_config.yaml")
    assert best.masks == job["masks"]["location"]  # the job's mask directory: its CURRENT set
    assert resolve_mask_set(best.masks) == report["mask_set"]["path"]
    trials = pd.read_csv(smoke / "export" / "trials.csv")
    assert len(trials) == 2 and (trials["state"] == "COMPLETE").all()
