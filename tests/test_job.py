"""The chained main job in smoke mode, started the way users start it (the console script)."""

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


@pytest.mark.slow
def test_main_job_smoke_end_to_end_then_train_best_config(tmp_path):
    out = tmp_path / "job"
    run = subprocess.run([BIN / "mgfa-ray", "run", "jobs/leafsnap20.yaml", "--smoke", "--output-dir", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    smoke = Path(str(out) + "-smoke")
    for stage in ("manifest", "detector", "masks", "search"):
        assert f"=== mgfa-ray: {stage} ===" in run.stdout  # progress is visible

    report = json.loads((smoke / "report.json").read_text())
    assert 0.0 <= report["detector"]["map50"] <= 1.0
    assert set(report["detector"]["per_class"]) == {"vein", "contour"}
    assert report["mask_set"]["rows"] == 24  # 3 classes x 8 photos, one row each
    trials = pd.read_csv(smoke / "export" / "trials.csv")
    assert len(trials) == 2 and (trials["state"] == "COMPLETE").all() and (trials["epochs_run"] == 1).all()

    # The CLI extends the finished search by exactly one trial and exports it again (to the job's export/).
    search_dir = smoke / "search" / "leafsnap20"
    more = subprocess.run([BIN / "mgfa-ray", "search", "resume", str(search_dir), "--more-trials", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    trials = pd.read_csv(smoke / "export" / "trials.csv")
    assert list(trials["run"]) == ["run-0", "run-0", "run-1"] and (trials["state"] == "COMPLETE").all()
    assert trials["optuna_trial"].tolist() == [0, 1, 2]

    best = smoke / "export" / "best_config.yaml"
    assert load_config(TrainConfig, best).epochs == 1
    # The export names the job's mask directory (its CURRENT set), not this machine's set id.
    assert load_config(TrainConfig, best).masks == str(smoke / "masks")
    assert resolve_mask_set(str(smoke / "masks")) == report["mask_set"]["path"]
    train = subprocess.run([BIN / "mgfa-ray", "train", "--config", str(best), "--output-dir", str(tmp_path / "train")],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    final = json.loads((tmp_path / "train" / "final.json").read_text())
    assert final["epoch"] == 1 and 0.0 <= final["eval_top1"] <= 1.0
    # The exported config is exactly what the best trial ran: on CPU the rerun repeats it bit for bit.
    summary = json.loads((smoke / "export" / "summary.json").read_text())
    epochs = pd.read_csv(smoke / "export" / "trial_epochs.csv")
    trial = epochs[epochs["trial"] == summary["best_trial"]].iloc[-1]
    assert final["train_loss"] == trial["train_loss"] and final["eval_top1"] == trial["eval_top1"]


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
