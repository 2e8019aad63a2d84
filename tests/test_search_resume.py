"""A search survives its driver being SIGKILLed, extends, retries, and agrees with itself.

Each driver is its own process (tests/search_driver.py, fast stand-in trainable) in its own
process group. A driver that is killed mostly starts its own local Ray cluster, as users run it,
and "killing the driver" SIGKILLs the whole group, as a preempted head node would lose it; one
kill test kills a driver that joined a running cluster instead. Drivers that run to their end join
the cluster this test process shares (conftest.shared_cluster), as a search resumed on a running
cluster does. The Optuna study is read from its journal by this process.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from mgfa_ray.search.export import export_search
from mgfa_ray.search.driver import ray_trials, read_record
from mgfa_ray.search.study import StudyRef, best_trial, search_trials

DRIVER = Path(__file__).with_name("search_driver.py")
MAX_EPOCHS = 4


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    log = tmp_path / "epoch-log"
    log.mkdir(exist_ok=True)
    return {**os.environ, "MGFA_STANDIN_EPOCH_S": "0.3", "MGFA_STANDIN_LOG": str(log), "RAY_ADDRESS": "",  # own cluster, unless joined
            "PYTHONUNBUFFERED": "1", **extra}


def _driver(tmp_path: Path, *args: str, env: dict[str, str] | None = None, join: str | None = None) -> subprocess.Popen:
    """A driver process with its own local Ray cluster, or joined to the running cluster at ``join``."""
    env = {**(env or _env(tmp_path)), **({"RAY_ADDRESS": join} if join else {})}
    log = open(tmp_path / "driver.log", "ab")  # noqa: SIM115 — closed with the process
    return subprocess.Popen([sys.executable, str(DRIVER), *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(tmp_path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, (tmp_path / "driver.log").read_text()[-4000:]


def _create(tmp_path: Path, *args: str, storage: str | None = None) -> str:
    """The driver's ``create`` in this process (it starts no Ray); returns the search directory."""
    import search_driver  # tests/search_driver.py

    return search_driver.create(storage or str(tmp_path / "searches"), *args)


def _study(search_dir: str):
    record = read_record(search_dir)
    return StudyRef(record.study.storage, record.study.study_name).load()


def _kill_when(proc: subprocess.Popen, search_dir: str, ready, timeout: float = 180) -> None:
    """SIGKILL the driver's process group as soon as ``ready(trials)`` holds for the study's trials."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the driver finished before the kill point"
        try:
            if ready(_study(search_dir).get_trials(deepcopy=False)):
                break
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("kill point not reached")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finished(trials) -> int:
    return sum(t.state.is_finished() for t in trials)


def _check_one_truth(search_dir: str, *, total: int, log_dir: Path | None = None, kills: int = 0,
                     max_epochs: int = MAX_EPOCHS) -> None:
    """Ray and Optuna agree: ``total`` trials, each Optuna trial in exactly one Ray trial, every
    state and value the same, the same best trial; no epoch run more than once per kill."""
    study = _study(search_dir)
    trials = {t.user_attrs["ray_trial_id"]: t for t in search_trials(study)}
    ray = ray_trials(search_dir)
    assert len(ray) == total and len(trials) == total
    assert set(ray["trial"]) == set(trials)
    assert sorted(t.number for t in trials.values()) == sorted({t.number for t in trials.values()})
    for r in ray.to_dict("records"):
        t = trials[r["trial"]]
        assert r["ray_status"] == "TERMINATED"
        history = r["history"]
        ray_curve = dict(zip(history["training_iteration"].astype(int), history["eval_top1"]))
        if max(t.intermediate_values) == max_epochs:  # the study's record decides; Ray's may lag (below)
            assert t.state == TrialState.COMPLETE and t.value == pytest.approx(t.intermediate_values[max_epochs])
            assert max_epochs not in ray_curve or t.value == pytest.approx(r["last_eval_top1"])
        else:  # stopped early by ASHA: PRUNED with its intermediate values, never COMPLETE
            assert t.state == TrialState.PRUNED and r["epochs_run"] < max_epochs
        # Per kill, one epoch may be in one record only: reported to Ray but not yet in the study,
        # or in the study while Ray's per-epoch log of it had not been uploaded (object store).
        assert len(set(ray_curve) ^ set(t.intermediate_values)) <= kills
        assert max(t.intermediate_values) - max(ray_curve) <= kills
        for step in set(ray_curve) & set(t.intermediate_values):
            assert t.intermediate_values[step] == pytest.approx(ray_curve[step])
    # COMPLETE trials whose last epoch Ray's per-epoch log lacks (uploaded by the killed driver too late)
    lagging = {rid for rid, t in trials.items() if t.state == TrialState.COMPLETE
               and int(ray.loc[ray["trial"] == rid, "epochs_run"].iloc[0]) < max_epochs}
    assert len(lagging) <= kills
    complete = ray[ray["epochs_run"] == max_epochs]
    ray_best = complete[complete["last_eval_top1"] == complete["last_eval_top1"].max()]  # ties: tiny eval sets
    best = best_trial(study)
    if best.user_attrs["ray_trial_id"] not in lagging:
        assert best.user_attrs["ray_trial_id"] in set(ray_best["trial"])
        assert best.value == pytest.approx(ray_best["last_eval_top1"].iloc[0])
        assert best.number == min(trials[t].number for t in ray_best["trial"])  # the tie-break: lowest number
    if log_dir is not None:  # what really ran: every (trial, epoch) at most once plus one replay per kill
        runs = collections.Counter()
        for f in log_dir.glob("trial-*.log"):
            runs.update(tuple(line.split()) for line in f.read_text().splitlines())
        assert max(runs.values()) <= 1 + kills, runs.most_common(3)
        numbers = {int(n) for n, _ in runs}
        assert numbers == {t.number for t in trials.values()}


def _skew_searcher_state(run_path: Path, skew: int) -> None:
    """Leave Ray's newest searcher state ``skew`` trials ahead of its trial list (one trial created
    after the list was saved; uploaded, the list not) or behind it (-1: the newest listed trial not
    yet created when the searcher state was saved), as a driver killed between uploading the two
    files leaves them."""
    from ray import cloudpickle
    from ray.tune import ExperimentAnalysis

    from mgfa_ray.compat import search_state_trials, set_search_state_trials

    path = max(run_path.glob("search_gen_state-*.json"))
    state = cloudpickle.loads(path.read_bytes())
    created, live = search_state_trials(state)
    newest = ExperimentAnalysis(str(run_path)).trials[-1].trial_id
    live = live | {"lost00001"} if skew > 0 else live - {newest}
    set_search_state_trials(state, created=created + skew, live=live)
    path.write_bytes(cloudpickle.dumps(state))


@pytest.mark.parametrize(("kill_point", "skew"), [("first_trial_running", 0), ("two_trials_finished", 1),
                                                   ("five_trials_finished", -1)])
@pytest.mark.slow
def test_driver_killed_then_resumed_finishes_exactly_num_samples(tmp_path, shared_cluster, kill_point, skew):
    """Killed at three points; at two of them Ray's saved searcher state is also one trial ahead of
    (or behind) its saved trial list, as a kill between uploading the two leaves it: without
    :func:`mgfa_ray.search.tune_state.reconcile_search_state` the resumed run ends a trial short (every
    later resume too) or runs one trial too many. The first search has TensorBoard event files (the
    product's default), the others not (``search.tensorboard: false``), across the resume too.
    At "two_trials_finished" the killed driver is one that joined a running cluster (the shared
    one): only the driver dies, and Ray ends its trials; at the others its own local cluster dies with it."""
    tensorboard = kill_point == "first_trial_running"
    joined = shared_cluster if kill_point == "two_trials_finished" else None
    search_dir = _create(tmp_path, "--num-samples", "7", "--max-epochs", str(MAX_EPOCHS),
                         *(["--tensorboard"] if tensorboard else []))
    ready = {
        "first_trial_running": lambda ts: any(t.intermediate_values for t in ts),
        "two_trials_finished": lambda ts: _finished(ts) >= 2,
        "five_trials_finished": lambda ts: _finished(ts) >= 5,
    }[kill_point]
    _kill_when(_driver(tmp_path, "run", search_dir, join=joined), search_dir, ready)
    if skew:
        _skew_searcher_state(Path(search_dir, "runs", "run-0"), skew)
    _finish(tmp_path, _driver(tmp_path, "run", search_dir, join=shared_cluster))
    assert not skew or "made them agree" in (tmp_path / "driver.log").read_text()
    _check_one_truth(search_dir, total=7, log_dir=tmp_path / "epoch-log", kills=1)
    states = collections.Counter(t.state for t in search_trials(_study(search_dir)))
    assert states[TrialState.PRUNED] >= 1 and states[TrialState.COMPLETE] >= 1  # ASHA stopped some

    listed = set(ray_trials(search_dir)["trial"])
    folders = [p for p in Path(search_dir, "runs", "run-0").iterdir() if (p / "result.json").is_file()]
    trial_dirs = [p for p in folders if any(f"_{trial}_" in p.name for trial in listed)]
    assert len(trial_dirs) == 7 and all((p / "progress.csv").is_file() for p in trial_dirs)
    assert all(any(p.glob("events.out.tfevents.*")) == tensorboard for p in trial_dirs)
    # A trial the killed driver started after its last saved trial list keeps its folder; Ray never
    # recorded it, and a listed trial took over its Optuna trial (same parameters, same number).
    lost = [p for p in folders if p not in trial_dirs]
    assert len(lost) <= 1, lost
    for p in lost:
        number = p.name.split("optuna_trial=")[1].split(",")[0]
        assert any(f"optuna_trial={number}," in q.name for q in trial_dirs), p.name

    # The export tells the same story.
    summary = export_search(search_dir, tmp_path / "export")
    assert summary["num_trials"] == 7 and summary["best_trial"] == best_trial(_study(search_dir)).user_attrs["ray_trial_id"]


@pytest.mark.slow
def test_resume_of_a_finished_search_runs_nothing_and_extend_adds_exactly_n(tmp_path, shared_cluster):
    search_dir = _create(tmp_path, "--num-samples", "4", "--max-epochs", str(MAX_EPOCHS))
    _finish(tmp_path, _driver(tmp_path, "run", search_dir, join=shared_cluster))
    epochs_before = sum(len(f.read_text().splitlines()) for f in (tmp_path / "epoch-log").glob("*.log"))
    _finish(tmp_path, _driver(tmp_path, "run", search_dir, join=shared_cluster))  # resume of a finished search
    assert sum(len(f.read_text().splitlines()) for f in (tmp_path / "epoch-log").glob("*.log")) == epochs_before
    _check_one_truth(search_dir, total=4)

    # A driver killed during a journal append leaves Optuna's lock link: the next one removes it
    # rather than stalling 30 s (Optuna's grace period) and then releasing it by force.
    os.symlink(Path(search_dir, "optuna.journal"), Path(search_dir, "optuna.journal.lock"))
    _finish(tmp_path, _driver(tmp_path, "run", search_dir, "--more-trials", "3", join=shared_cluster))
    log = (tmp_path / "driver.log").read_text()
    assert "optuna.journal.lock: removed the lock its last writer left behind" in log
    assert "Forcibly releasing" not in log and "taking longer than" not in log
    record = read_record(search_dir)
    assert [(r.name, r.num_samples) for r in record.runs] == [("run-0", 4), ("run-1", 3)]
    assert collections.Counter(ray_trials(search_dir)["run"]) == {"run-0": 4, "run-1": 3}
    _check_one_truth(search_dir, total=7, log_dir=tmp_path / "epoch-log")
    # The paper's point was enqueued once for the whole study, not once per run.
    lrs = [t.params["lr"] for t in search_trials(_study(search_dir))]
    assert sum(math.isclose(lr, 0.01) for lr in lrs) == 1


@pytest.mark.slow
def test_trial_retried_after_error_is_complete_in_ray_and_optuna(tmp_path, shared_cluster):
    fail = tmp_path / "fail"
    fail.mkdir()
    (fail / "fail-1").touch()  # Optuna trial 1 raises once at epoch 2; Ray retries it from its checkpoint
    search_dir = _create(tmp_path, "--num-samples", "3", "--max-epochs", str(MAX_EPOCHS), "--no-early-stopping",
                         "--max-failures", "1")
    _finish(tmp_path, _driver(tmp_path, "run", search_dir, env=_env(tmp_path, MGFA_STANDIN_FAIL_DIR=str(fail)),
                              join=shared_cluster))
    assert not (fail / "fail-1").exists()  # the failure happened
    study = _study(search_dir)
    assert [t.state for t in search_trials(study)] == [TrialState.COMPLETE] * 3
    assert [t.number for t in study.trials] == [0, 1, 2]  # no extra Optuna trial for the retry
    _check_one_truth(search_dir, total=3)


@pytest.fixture(scope="module")
def errored_search(tmp_path_factory, shared_cluster) -> Path:
    """A search whose Optuna trial 1 failed at epoch 2 (``max_failures`` 0), then resumed plainly:
    the failed trial stays failed. Each test resumes a copy (a search directory is relocatable)."""
    root = tmp_path_factory.mktemp("errored")
    fail = root / "fail"
    fail.mkdir()
    (fail / "fail-1").touch()
    search_dir = _create(root, "--num-samples", "3", "--max-epochs", str(MAX_EPOCHS), "--no-early-stopping",
                         "--max-failures", "0")
    _finish(root, _driver(root, "run", search_dir, env=_env(root, MGFA_STANDIN_FAIL_DIR=str(fail)),
                          join=shared_cluster))
    ray = ray_trials(search_dir)
    assert sorted(ray["ray_status"]) == ["ERROR", "TERMINATED", "TERMINATED"]
    assert collections.Counter(t.state for t in search_trials(_study(search_dir)))[TrialState.FAIL] == 1

    _finish(root, _driver(root, "run", search_dir, join=shared_cluster))  # a plain resume leaves it failed
    study = _study(search_dir)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert Path(search_dir).relative_to(root) == Path("searches", "standin")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("errored", ["resume", "restart"])
def test_errored_trial_run_again_on_resume_ends_complete_and_does_not_crash(tmp_path, shared_cluster, errored_search,
                                                                            errored):
    shutil.copytree(errored_search, tmp_path, dirs_exist_ok=True, symlinks=True)
    search_dir = str(tmp_path / "searches" / "standin")
    _finish(tmp_path, _driver(tmp_path, "run", search_dir, "--errored", errored, join=shared_cluster))
    study = _study(search_dir)
    trials = search_trials(study)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(retried) == 1 and study.trials[retried[0].system_attrs["failed_trial"]].state == TrialState.FAIL
    _check_one_truth(search_dir, total=3)
    if errored == "resume":  # continued from its checkpoint: epoch 1 ran once
        assert (tmp_path / "epoch-log" / "trial-1.log").read_text().splitlines().count("1 1") == 1


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_ctrl_c_exits_130_and_a_moved_copy_resumes_without_touching_the_original(tmp_path, shared_cluster):
    """Issue 15, defects 7 and 6. Ctrl-C (SIGINT to the CLI's process group, as a terminal sends
    it) ends the run with status 130 and the resume command, exporting nothing. The job's output
    directory is then copied and the original moved away: the copy resumes and finishes on its own
    study (Ray's pickled searcher and scheduler hold the original's journal path), writing nothing
    into the moved original and recreating nothing at the old path."""
    job = tmp_path / "job"
    search_dir = _create(tmp_path, "--num-samples", "3", "--max-epochs", "2", "--max-concurrent", "1",
                         "--cache-dir", str(job / "cache"), "--export-dir", str(job / "export"),
                         storage=str(job / "search"))
    log = tmp_path / "driver.log"
    proc = _driver(tmp_path, "cli", "search", "resume", search_dir)
    deadline = time.monotonic() + 180
    while _finished(_study(search_dir).get_trials(deepcopy=False)) < 1:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-4000:]
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], log.read_text()[-4000:]
    assert errors[0].endswith(f"Resume with: mgfa-ray search resume {search_dir}")
    assert not (job / "export").exists() and not (Path(search_dir) / "export").exists()  # no partial result
    assert _finished(_study(search_dir).get_trials(deepcopy=False)) < 3

    shutil.copytree(job, tmp_path / "copy", symlinks=True)
    shutil.move(job, tmp_path / "moved")
    original = _files(tmp_path / "moved")
    copy_dir = str(tmp_path / "copy" / "search" / "standin")
    _finish(tmp_path, _driver(tmp_path, "cli", "search", "resume", copy_dir, join=shared_cluster))
    assert _files(tmp_path / "moved") == original and not job.exists()
    _check_one_truth(copy_dir, total=3, kills=1, max_epochs=2)
    assert (Path(copy_dir) / "export" / "best_config.yaml").is_file()  # the job's export/ was never made: inside


def test_search_record_holds_no_absolute_path_into_its_job(tmp_path):
    """Issue 15, defect 6: search.json named its journal, cache and export by absolute paths."""
    from search_driver import main as driver

    job = tmp_path / "job"
    driver(["create", str(job / "search"), "--cache-dir", str(job / "cache"), "--export-dir", str(job / "export")])
    search_dir = job / "search" / "standin"
    assert str(tmp_path) not in (search_dir / "search.json").read_text()
    shutil.move(job, tmp_path / "moved")
    record = read_record(str(tmp_path / "moved" / "search" / "standin"))
    assert record.study.storage == str(tmp_path / "moved" / "search" / "standin" / "optuna.journal")
    assert record.cache_dir == str(tmp_path / "moved" / "cache")
    assert record.export_dir == str(tmp_path / "moved" / "export")


def test_ctrl_c_outside_ray_tune_is_one_error_line_and_status_130(monkeypatch, capsys):
    """Issue 15, defect 7: a KeyboardInterrupt (Ctrl-C before Ray Tune's handler is installed, or
    a second Ctrl-C during its last snapshot) ends the command with 130 and how to continue."""
    from mgfa_ray import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["search", "export", "somewhere"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: interrupted (Ctrl-C); run the same command again")
