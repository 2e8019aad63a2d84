"""Config validation: unknown keys, bad values and a missing data root fail naming what and where."""

import shutil
from pathlib import Path

import pytest
import yaml

from mgfa_ray.cli import main
from mgfa_ray.config import ConfigError, JobConfig, TrainConfig, TrainParams, load_config, resolve_data_root, to_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_loads(job):
    cfg = load_config(JobConfig, job)
    assert load_config(JobConfig, job) == cfg  # deterministic, frozen


@pytest.mark.parametrize("path", sorted((REPO / "results").glob("*/best_config.yaml")), ids=lambda p: p.parent.name)
def test_published_best_configs_are_valid_train_configs(path):
    cfg = load_config(TrainConfig, path)
    assert abs(cfg.alpha + cfg.beta + cfg.gamma - 1.0) <= 1e-9


@pytest.mark.parametrize("path", sorted((REPO / "results").glob("*/job.yaml")), ids=lambda p: p.parent.name)
def test_published_job_configs_are_valid_job_files(path):
    load_config(JobConfig, path)


def test_unknown_key_names_file_and_field(tmp_path):
    doc = yaml.safe_load((REPO / "jobs" / "leafsnap20.yaml").read_text())
    doc["train"]["learning_rate"] = 0.1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    assert str(path) in str(err.value) and "train.learning_rate: unknown key" in str(err.value)


def test_simplex_and_ranges_are_checked():
    with pytest.raises(ValueError, match="alpha \\+ beta \\+ gamma must equal 1"):
        TrainParams(alpha=0.5, beta=0.5, gamma=0.2)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        TrainParams(alpha=1.2, beta=-0.2, gamma=0.0)
    with pytest.raises(ValueError, match="crop"):
        TrainParams(resize=64, crop=96)


def test_config_is_frozen_and_round_trips():
    p = TrainParams()
    with pytest.raises(Exception):
        p.lr = 1.0
    assert TrainParams(**to_dict(p)) == p


def test_missing_data_root_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MGFA_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"nowhere.*MGFA_DATA_ROOT"):
        resolve_data_root(None)


def test_cli_reports_bad_job_file_with_exit_2(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    shutil.copy(REPO / "jobs" / "leafsnap20.yaml", path)
    path.write_text(path.read_text().replace("imgsz: 320", "imgsz: 320\n  colour: red"))
    assert main(["run", str(path)]) == 2
    assert "detector.colour: unknown key" in capsys.readouterr().err
