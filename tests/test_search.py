"""The search through real Ray Tune + Optuna on tiny real data, and its export."""

from pathlib import Path

import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from mgfa_ray.config import ConfigError, SearchConfig, TrainConfig, load_config
from mgfa_ray.search.export import export_search
from mgfa_ray.search.driver import create_search, ray_trials, read_record, run_search
from mgfa_ray.search.space import load_search_space
from mgfa_ray.search.study import StudyRef, best_trial, search_trials
from mgfa_ray.train.checkpoint import load_checkpoint
from mgfa_ray.train.trial import run_trial


def _space(tmp_path, doc):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_search_space(path), str(path)


def _search(tmp_path, doc, cfg, **search_kw):
    space, space_file = _space(tmp_path, doc)
    search = SearchConfig(space=space_file, cpus_per_trial=1, **search_kw)
    return create_search(name="s", space=space, space_file=space_file, search=search, base=cfg,
                         storage_path=str(tmp_path / "searches"))


def test_trial_through_ray_equals_direct_call(ray_cluster, tiny_train_config, tmp_path, capsys):
    cfg = tiny_train_config.model_copy(update={"epochs": 1, "threads": 1})
    direct = run_trial(cfg)
    search_dir = _search(tmp_path, {"scheduler": {"max_epochs": 1}, "parameters": {"lr": 0.01}}, cfg, num_samples=1)
    run_search(search_dir)
    (row,) = ray_trials(search_dir).to_dict("records")
    assert row["ray_status"] == "TERMINATED" and row["checkpoint"] is not None
    assert row["history"]["train_loss"].iloc[0] == direct[0]["train_loss"]
    assert row["history"]["eval_top1"].iloc[0] == direct[0]["eval_top1"]
    _check_unfinished_search_is_not_exported_as_a_result(search_dir, tmp_path, capsys)


def _check_unfinished_search_is_not_exported_as_a_result(search_dir: str, tmp_path: Path, capsys) -> None:
    """Issue 30, defects 5 and 6: a trial left RUNNING in the study (a killed driver, or a journal
    whose last record was torn) or trials not yet started made an export that presented the best
    so far as the search's result, and replaced a correct best_config.yaml."""
    from mgfa_ray.cli import main
    from mgfa_ray.search.export import UnfinishedSearchError
    from mgfa_ray.search.study import RAY_TRIAL_ATTR

    out = tmp_path / "export"
    assert export_search(search_dir, out)["finished"] is True
    before = (out / "best_config.yaml").read_bytes()
    record = read_record(search_dir)
    orphan = StudyRef(record.study.storage, record.study.study_name).load().ask()  # what a killed driver leaves
    orphan.set_user_attr(RAY_TRIAL_ATTR, "killed_trial")
    with pytest.raises(UnfinishedSearchError, match=r"1 of 2 trials finished \(COMPLETE 1, RUNNING 1\).*search resume"):
        export_search(search_dir, out)
    assert (out / "best_config.yaml").read_bytes() == before  # nothing was replaced
    capsys.readouterr()  # the search's own output so far
    assert main(["search", "export", search_dir, "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: search ")
    summary = export_search(search_dir, out, partial=True)
    assert summary["finished"] is False and "unfinished search: 1 of 2 trials finished" in summary["unfinished"]
    text = (out / "best_config.yaml").read_text()
    assert text.startswith("# UNFINISHED: the best so far of an unfinished search") and text.endswith(before.decode())
    assert load_config(TrainConfig, out / "best_config.yaml").lr == 0.01  # the header is a comment: still a config


@pytest.mark.slow
def test_search_samples_simplex_stops_early_and_exports(ray_cluster, tiny_train_config, tmp_path):
    search_dir = _search(tmp_path, {
        "scheduler": {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        "simplex": ["alpha", "beta", "gamma"],
        "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}},
        "points_to_evaluate": [{"alpha": 0.3, "beta": 0.5, "gamma": 0.2, "lr": 0.01}],
    }, tiny_train_config, num_samples=4, max_concurrent=2, seed=0)
    run_search(search_dir)
    summary = export_search(search_dir, tmp_path / "export")
    out = tmp_path / "export"

    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and (trials["ray_status"] == "TERMINATED").all()
    assert ((trials["alpha"] + trials["beta"] + trials["gamma"]) - 1.0).abs().max() <= 1e-9
    assert ((trials[["alpha", "beta", "gamma"]] >= 0).all()).all()
    assert set(trials["epochs_run"]) <= {1, 2}
    # One truth: two epochs = COMPLETE, fewer = stopped by ASHA = PRUNED (never COMPLETE)
    assert (trials["state"] == trials["epochs_run"].map({2: "COMPLETE", 1: "PRUNED"})).all()
    assert summary["total_trial_epochs"] == trials["epochs_run"].sum()
    paper = trials[(trials["lr"] == 0.01) & ((trials["alpha"] - 0.3).abs() < 1e-12)
                   & ((trials["beta"] - 0.5).abs() < 1e-12) & ((trials["gamma"] - 0.2).abs() < 1e-12)]
    assert len(paper) == 1  # the point to evaluate ran, exactly once
    assert pd.read_csv(out / "trials.csv").shape[0] == 4
    epochs = pd.read_parquet(out / "trial_epochs.parquet")
    assert len(epochs) == trials["epochs_run"].sum()
    assert {"train_loss_ce", "train_loss_vein", "train_loss_contour", "eval_top1"} <= set(epochs.columns)
    assert (epochs["worker_trial"] >= 1).all() and (epochs["setup_seconds"] > 0).all()

    best = load_config(TrainConfig, out / "best_config.yaml")
    assert best.epochs == 2 and best.manifest == tiny_train_config.manifest
    best_row = trials.loc[trials["trial"] == summary["best_trial"]].iloc[0]
    assert best_row["state"] == "COMPLETE"
    assert best.lr == pytest.approx(best_row["lr"]) and best.alpha == pytest.approx(best_row["alpha"])
    complete = trials[trials["state"] == "COMPLETE"]
    assert summary["best_eval_top1"] == best_row["eval_top1"] == complete["eval_top1"].max()
    assert load_checkpoint(out / "best_checkpoint" / "checkpoint.pt")["epoch"] == 2
    for plot in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(Path(summary["tensorboard_logdir"]).rglob("events.out.tfevents.*"))

    # The Optuna study holds the same states, values and best trial; PRUNED keeps its epochs.
    record = read_record(search_dir)
    study = StudyRef(record.study.storage, record.study.study_name).load()
    by_id = {t.user_attrs["ray_trial_id"]: t for t in search_trials(study)}
    for row in trials.to_dict("records"):
        t = by_id[row["trial"]]
        assert t.state.name == row["state"] and len(t.intermediate_values) == row["epochs_run"]
        assert t.value == pytest.approx(row["eval_top1"])
    assert best_trial(study).user_attrs["ray_trial_id"] == summary["best_trial"]
    assert all(t.state != TrialState.RUNNING for t in study.trials)


def test_rerun_with_other_settings_is_refused(tmp_path, tiny_train_config):
    doc = {"scheduler": {"max_epochs": 1}, "parameters": {"lr": 0.01}}
    first = _search(tmp_path, doc, tiny_train_config, num_samples=2)
    assert _search(tmp_path, doc, tiny_train_config, num_samples=2) == first  # same settings: the same search
    record = read_record(first)
    StudyRef(record.study.storage, record.study.study_name).load().ask().report(0.5, step=1)  # a result to keep
    with pytest.raises(ConfigError, match="exists, with 1 trial.* other settings: search.num_samples: 2 -> 3"):
        _search(tmp_path, doc, tiny_train_config, num_samples=3)


def test_object_store_search_needs_a_study_storage(tmp_path, tiny_train_config):
    space, space_file = _space(tmp_path, {"scheduler": {"max_epochs": 1}})
    with pytest.raises(ConfigError, match="search.study_storage: required when storage_path is an object store"):
        create_search(name="s", space=space, space_file=space_file, search=SearchConfig(space=space_file),
                      base=tiny_train_config, storage_path="s3://bucket/searches")


def test_warm_start_copies_finished_trials(tmp_path, tiny_train_config):
    import optuna

    source = StudyRef(str(tmp_path / "old.journal"), "old")
    old = source.load(create=True)
    for lr, state in [(0.01, TrialState.COMPLETE), (0.05, TrialState.PRUNED), (0.02, TrialState.FAIL)]:
        old.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)},
            value=None if state == TrialState.FAIL else 0.5, state=state,
            intermediate_values={1: 0.5} if state == TrialState.PRUNED else None))
    doc = {"scheduler": {"max_epochs": 1}, "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}}}
    search_dir = _search(tmp_path, doc, tiny_train_config, sampler="tpe",
                         warm_start={"storage": source.storage, "study_name": "old"})
    record = read_record(search_dir)
    study = StudyRef(record.study.storage, record.study.study_name).load()
    assert [(t.params["lr"], t.state) for t in study.trials] == [(0.01, TrialState.COMPLETE), (0.05, TrialState.PRUNED)]
    assert all("warm_start_from" in t.user_attrs for t in study.trials)
    assert search_trials(study) == [] and best_trial(study) is None  # copies are not this search's trials


def test_orphan_asked_before_a_crash_goes_to_the_next_ray_trial(tmp_path):
    """A driver killed between Optuna's ask (and part of the sampling) and Ray's snapshot leaves a
    RUNNING trial no Ray trial knows: the next suggestion takes it over, completing its parameters,
    so no trial is lost or added."""
    from mgfa_ray.search.study import SESSION
    from mgfa_ray.search.searcher import StudySearch

    space, _ = _space(tmp_path, {"scheduler": {"max_epochs": 2}, "simplex": ["alpha", "beta", "gamma"],
                                 "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}}})
    ref = StudyRef(str(tmp_path / "study.journal"), "s")
    crashed = ref.load(create=True).ask()  # the dead driver sampled lr and one simplex cut, then died
    crashed.suggest_float("lr", 1e-3, 0.1, log=True)
    crashed.suggest_float("simplex/u0", 0.0, 1.0)
    crashed.set_user_attr("driver_session", "dead-driver")

    searcher = StudySearch(space=space, study=ref, metric="eval_top1", sampler="tpe", seed=0, run="run-0")
    first, second = searcher.suggest("ray-a"), searcher.suggest("ray-b")
    assert first["optuna_trial"] == 0 and first["lr"] == crashed.params["lr"]
    assert first["simplex"]["u0"] == crashed.params["simplex/u0"] and "u1" in first["simplex"]
    assert abs(first["alpha"] + first["beta"] + first["gamma"] - 1) <= 1e-12
    assert second["optuna_trial"] == 1
    trials = ref.load().trials
    assert [t.user_attrs["ray_trial_id"] for t in trials] == ["ray-a", "ray-b"]
    assert {t.user_attrs["driver_session"] for t in trials} == {SESSION}


def test_points_to_evaluate_are_enqueued_once_per_study(tmp_path):
    """A new searcher on the same study (an extension, or a run restarted before Ray's first
    snapshot) does not enqueue the paper's point again, asked or still waiting."""
    from mgfa_ray.search.searcher import StudySearch

    space, _ = _space(tmp_path, {"scheduler": {"max_epochs": 2},
                                 "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}},
                                 "points_to_evaluate": [{"lr": 0.01}]})
    ref = StudyRef(str(tmp_path / "study.journal"), "s")
    StudySearch(space=space, study=ref, metric="eval_top1", sampler="tpe", seed=0, run="run-0")
    StudySearch(space=space, study=ref, metric="eval_top1", sampler="tpe", seed=0, run="run-0")  # still waiting
    assert [t.state for t in ref.load().trials] == [TrialState.WAITING]
    third = StudySearch(space=space, study=ref, metric="eval_top1", sampler="tpe", seed=1, run="run-1")
    assert third.suggest("a")["lr"] == 0.01
    StudySearch(space=space, study=ref, metric="eval_top1", sampler="tpe", seed=2, run="run-2")  # asked already
    assert len(ref.load().trials) == 1


def test_scheduler_tells_complete_pruned_or_fail_by_epochs_and_value(tmp_path):
    """The final state from what Ray hands the scheduler, without Ray: max epochs and a finite value
    is COMPLETE, fewer epochs is PRUNED (value = last intermediate), a diverged run is FAIL."""
    from types import SimpleNamespace

    from mgfa_ray.search.scheduler import StudyScheduler

    ref = StudyRef(str(tmp_path / "study.journal"), "s")
    study = ref.load(create=True)
    sched = StudyScheduler(study=ref, metric="eval_top1", max_epochs=3, grace_period=1, reduction_factor=2,
                           early_stopping=False)
    runs = {"done": [0.2, 0.4, 0.6], "stopped": [0.1, 0.3], "diverged": [0.2, 0.3, float("nan")]}
    for name, curve in runs.items():
        number = study.ask().number
        trial = SimpleNamespace(trial_id=name, config={"optuna_trial": number}, status="RUNNING")
        sched.on_trial_add(None, trial)
        for epoch, value in enumerate(curve, 1):
            result = {"eval_top1": value, "training_iteration": epoch}
            assert sched.on_trial_result(None, trial, result) == "CONTINUE"
        sched.on_trial_complete(None, trial, result)
    done, stopped, diverged = ref.load().trials
    assert (done.state, done.value, done.intermediate_values) == (TrialState.COMPLETE, 0.6, {1: 0.2, 2: 0.4, 3: 0.6})
    assert (stopped.state, stopped.value) == (TrialState.PRUNED, 0.3)
    assert diverged.state == TrialState.FAIL


def test_snapshot_period_is_set_only_around_the_fit(monkeypatch):
    import os

    from mgfa_ray.search.driver import _snapshot_period

    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    assert SearchConfig(space="s.yaml").snapshot_period_s == 0  # default: after every controller step
    with _snapshot_period(0.0):
        assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "0"
    with _snapshot_period(12.5):
        assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "12.5"
    assert "TUNE_GLOBAL_CHECKPOINT_S" not in os.environ  # restored: not for the whole process
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "auto")  # the user's own value wins, and stays
    with _snapshot_period(0.0):
        assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "auto"
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "auto"
    with pytest.raises(ValueError):
        SearchConfig(space="s.yaml", snapshot_period_s=-1)


def test_tensorboard_off_turns_off_rays_own_loggers_only_around_the_fit(monkeypatch):
    """search.tensorboard: false lists Ray's CSV and JSON loggers itself and, only while the
    search runs, tells Ray Tune to add none of its own (its TensorBoard logger imports torch)."""
    import os

    from mgfa_ray.search.driver import _result_loggers, _tensorboard

    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    monkeypatch.delenv(key, raising=False)
    assert SearchConfig(space="s.yaml").tensorboard is True  # the default: Ray's loggers, TensorBoard's too
    with _tensorboard(True):
        assert key not in os.environ
    with _tensorboard(False):
        assert os.environ[key] == "1"
    assert key not in os.environ  # restored: not for the whole process
    assert sorted(type(c).__name__ for c in _result_loggers()) == ["CSVLoggerCallback", "JsonLoggerCallback"]


def test_a_damaged_search_record_is_never_rewritten_by_a_rerun(tiny_train_config, tmp_path, capsys):
    """Issue 30 (weak): a truncated search.json gave "not JSON" with no remedy, and rerunning the
    job silently wrote a new record over it (its runs lost)."""
    from mgfa_ray.cli import main
    from mgfa_ray.search.driver import DamagedRecordError

    doc = {"scheduler": {"max_epochs": 1}, "parameters": {"lr": 0.01}}
    search_dir = _search(tmp_path, doc, tiny_train_config, num_samples=1)
    record_file = Path(search_dir) / "search.json"
    torn = record_file.read_bytes()[:-40]
    record_file.write_bytes(torn)
    with pytest.raises(DamagedRecordError, match=r"search\.json: damaged, not JSON .* restore it from a copy"):
        _search(tmp_path, doc, tiny_train_config, num_samples=1)  # what a rerun of the job does
    assert record_file.read_bytes() == torn
    assert main(["search", "status", search_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {record_file}: damaged, not JSON") and "remove the directory" in err


def test_a_moved_job_directory_exports_a_config_that_runs_where_it_is_now(ray_cluster, tiny_train_config,
                                                                          label_mask_set, tmp_path):
    """Issue 30, defect 7 and the resumed export's place: a job's output directory moved after its
    search began. The export names the manifest and the job's mask directory where they are now
    (it named the old output directory, so ``train --config`` failed), and a search resumed before
    its first export exports into the job's ``export/``, not into the search directory."""
    import shutil

    from mgfa_ray.search.export import default_export_dir
    from mgfa_ray.masks.reader import resolve_mask_set
    from mgfa_ray.masks.writer import write_current_set

    job = tmp_path / "job"
    job.mkdir()
    (job / "job.yaml").write_text("name: s\n")  # what every job writes first
    shutil.copy(tiny_train_config.manifest, job / "manifest.parquet")
    shutil.copytree(label_mask_set, job / "masks" / Path(label_mask_set).name)
    write_current_set(str(job / "masks"), Path(label_mask_set).name)  # as the job's mask stage does
    set_dir = resolve_mask_set(str(job / "masks"))
    assert set_dir == str(job / "masks" / Path(label_mask_set).name)
    cfg = tiny_train_config.model_copy(update={"epochs": 1, "threads": 1, "manifest": str(job / "manifest.parquet"),
                                               "masks": set_dir})
    space, space_file = _space(tmp_path, {"scheduler": {"max_epochs": 1}, "parameters": {"lr": 0.01}})
    search_dir = create_search(name="s", space=space, space_file=space_file,
                               search=SearchConfig(space=space_file, cpus_per_trial=1, num_samples=1), base=cfg,
                               export_base=cfg.model_copy(update={"masks": str(job / "masks")}),
                               storage_path=str(job / "search"), cache_dir=str(job / "cache"),
                               export_dir=str(job / "export"))
    run_search(search_dir)
    assert not (job / "export").exists()  # interrupted before its export, say
    shutil.move(job, tmp_path / "moved")
    moved_search = str(tmp_path / "moved" / "search" / "s")

    out = default_export_dir(moved_search)
    assert out == tmp_path / "moved" / "export"
    export_search(moved_search, out)
    best = load_config(TrainConfig, out / "best_config.yaml")
    assert best.manifest == str(tmp_path / "moved" / "manifest.parquet")
    assert best.masks == str(tmp_path / "moved" / "masks")
    assert resolve_mask_set(best.masks) == str(tmp_path / "moved" / "masks" / Path(set_dir).name)
    assert not job.exists()
