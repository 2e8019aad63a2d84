"""The command line per stage: ``detector train|eval``, ``masks build``, ``search start``, and
``--set KEY=VALUE`` overrides validated like the job file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from mgfa_ray import pipeline
from mgfa_ray.cli import load_job, main
from mgfa_ray.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "leafsnap20.yaml"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    return err


def test_set_overrides_any_field_by_dotted_key_with_yaml_values():
    job = load_job(JOB, ["detector.epochs=7", "search.num_samples=3", "dataset.classes=[acer_rubrum, ulmus_rubra]",
                         "regions.max_images=null", "search.warm_start.storage=old.journal",
                         "search.warm_start.study_name=old", "search.sampler=tpe", "train.lr=2e-3", "detector.epochs=9"])
    assert job.detector.epochs == 9  # the later override wins
    assert job.search.num_samples == 3 and job.dataset.classes == ["acer_rubrum", "ulmus_rubra"]
    assert job.regions.max_images is None and job.train.lr == 0.002
    assert (job.search.warm_start.storage, job.search.warm_start.study_name) == ("old.journal", "old")
    assert job.name == yaml.safe_load(JOB.read_text())["name"]  # the rest as in the file


@pytest.mark.parametrize("override, names", [
    ("detector.epochs=0", "detector.epochs: Input should be greater than or equal to 1"),
    ("detector.epoch=3", "detector.epoch: unknown key"),
    ("search.num_samples=[1, 2", "--set search.num_samples: the value '[1, 2' is not valid YAML"),
    ("name.first=x", "--set name.first: name is a value, not a section"),
    ("detector.epochs", "--set 'detector.epochs': expected KEY=VALUE"),
    ("detector..epochs=3", "expected KEY=VALUE with a dotted field path"),
])
def test_bad_override_is_one_error_naming_the_key(override, names, capsys):
    with pytest.raises(ConfigError, match=None) as err:
        load_job(JOB, [override])
    assert names in str(err.value)
    assert main(["detector", "eval", str(JOB), "--set", override]) == 2
    assert names in _error_line(capsys)


@pytest.mark.parametrize("argv, until", [
    (["run"], "search"), (["search", "start"], "search"), (["detector", "train"], "detector"),
    (["masks", "build"], "masks"),
])
def test_each_stage_command_runs_the_job_up_to_its_stage(argv, until, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "run_job", lambda job, *, smoke, until, accept_weak:
                        calls.append((job, smoke, until, accept_weak)) or {})
    assert main([*argv, str(JOB), "--smoke", "--output-dir", str(tmp_path), "--set", "detector.imgsz=96"]) == 0
    assert main([*argv, str(JOB), "--output-dir", str(tmp_path), "--accept-weak"]) == 0
    (job, smoke, stage, accept), (_, smoke2, _, accept2) = calls
    assert (stage, smoke, job.output_dir, job.detector.imgsz) == (until, True, str(tmp_path), 96)
    assert (accept, smoke2, accept2) == (False, False, True)  # --accept-weak reaches the stage gates


def test_detector_train_on_a_job_without_detector_says_so(tmp_path, capsys):
    rc = main(["detector", "train", str(JOB), "--output-dir", str(tmp_path), "--set", "regions.source=labels"])
    assert rc == 2 and "trains no detector" in _error_line(capsys)
    assert not any(tmp_path.iterdir())  # refused before any stage ran


def _metrics(detector: dict) -> dict:
    """A detector metrics.json (keys as mgfa_ray.detector.training writes them) trained with ``detector``'s settings."""
    return {"detector_key": "0123456789abcdef", **{k: detector[k] for k in ("model", "imgsz", "epochs", "seed")},
            "n_train": 30, "n_holdout": 10, "map50": 0.6105, "map50_95": 0.41,
            "per_class": {"vein": {"map50": 0.226, "map50_95": 0.1, "n_holdout_instances": 12},
                          "contour": {"map50": 0.995, "map50_95": 0.72, "n_holdout_instances": 10}}}


def test_detector_eval_prints_per_class_map50_of_the_trained_detector(tmp_path, capsys):
    assert main(["detector", "eval", str(JOB), "--output-dir", str(tmp_path)]) == 2
    err = _error_line(capsys)
    assert str(tmp_path / "detector" / "metrics.json") in err and "mgfa-ray detector train" in err

    (tmp_path / "detector").mkdir()
    detector = load_job(JOB).detector.model_dump()
    epochs = detector["epochs"]
    (tmp_path / "detector" / "metrics.json").write_text(json.dumps(_metrics(detector)))
    assert main(["detector", "eval", str(JOB), "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows["vein"][0] == "0.226" and rows["contour"][0] == "0.995" and rows["all"][0] == "0.611"
    assert "note:" not in out
    # Settings changed since it was trained: said, with the command that retrains it.
    assert main(["detector", "eval", str(JOB), "--output-dir", str(tmp_path), "--set", f"detector.epochs={epochs + 1}"]) == 0
    assert f"epochs {epochs!r} (job: {epochs + 1!r})" in capsys.readouterr().out
    assert main(["detector", "eval", str(JOB), "--output-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"]["vein"]["map50"] == 0.226


def test_dashboard_without_the_extra_names_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # as if not installed
    assert main(["search", "dashboard", str(tmp_path)]) == 2
    assert "optuna-dashboard is not installed" in (err := _error_line(capsys)) and "[dashboard]" in err


def test_masks_build_stops_after_the_mask_set(ray_cluster, data_root, tmp_path):
    """``masks build`` runs manifest and mask set (here from the label files) and no search."""
    out = tmp_path / "job"
    rc = main(["masks", "build", str(JOB), "--output-dir", str(out), "--set", f"data_root={data_root}",
               "--set", "regions.source=labels", "--set", "regions.unlabelled=empty",
               "--set", "dataset.max_classes=2", "--set", "dataset.max_per_class=4",
               "--set", "masks.num_actors=1", "--set", "masks.resolution=16"])
    assert rc == 0
    (meta,) = (out / "masks").glob("*/metadata.json")
    assert json.loads(meta.read_text())["rows"] == 8
    assert (out / "manifest.parquet").is_file()
    assert not (out / "search").exists() and not (out / "export").exists() and not (out / "report.json").exists()


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   ValueError("a bug's bad value")])
def test_an_unexpected_error_keeps_its_traceback(monkeypatch, capsys, error):
    """Only the project's own errors (UserError) become one ``error:`` line; others propagate."""
    from mgfa_ray import cli
    from mgfa_ray.errors import InputError, StageError

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_dispatch", fail)
    with pytest.raises(type(error), match=str(error).split(".")[0]):
        main(["detector", "eval", str(JOB)])
    assert "error:" not in capsys.readouterr().err
    for own, status in ((InputError("no such image id"), 2), (StageError("every trial failed"), 1)):
        monkeypatch.setattr(cli, "_dispatch", lambda args, own=own: (_ for _ in ()).throw(own))
        assert main(["detector", "eval", str(JOB)]) == status
        assert _error_line(capsys) == f"error: {own}"


def test_weak_messages_say_what_to_do_instead(tmp_path, capsys):
    """Issue 30, weak messages: a list item set alone, a job file given to ``train --config``, and
    a ufg job evaluating an absent validation split are each one line naming the remedy."""
    assert main(["run", str(JOB), "--set", "regions.classes[0]=leaf"]) == 2
    assert "give the whole list, e.g. --set 'regions.classes=[a, b]'" in _error_line(capsys)
    assert main(["train", "--config", str(JOB)]) == 2
    line = _error_line(capsys)
    assert "is a job file" in line and f"mgfa-ray run {JOB}" in line
    assert main(["run", str(REPO / "jobs" / "cotton80_paper.yaml"), "--set", "train.eval_split=val"]) == 2
    line = _error_line(capsys)
    assert "ufg has no validation split" in line and "set train.eval_split: test" in line
