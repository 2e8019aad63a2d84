"""``mgfa-ray search status`` on a search while it runs and once it finished, read-only; and the
export's plots of every trial (tests/conftest.py's ``watched_search``: stand-in trials, real Ray Tune
and Optuna)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from mgfa_ray.cli import main
from mgfa_ray.search.driver import read_record
from mgfa_ray.search.asha import rung_epochs
from mgfa_ray.search.status import ReadOnlyJournal, format_status, open_study_readonly, search_status
from mgfa_ray.search.study import StudyRef, best_trial, search_trials


def _listing(root: str) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time (ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(root).rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.slow
def test_status_of_a_running_search_from_another_process(watched_search):
    """Taken while the driver held the search's lock: status takes no lock (a DirectoryLock would
    have raised LockedError) and reports the trials in flight, the live driver and an ETA."""
    search_dir, running = watched_search
    if running is None:
        pytest.skip("the stand-in search finished before a status could be taken while it ran")
    assert running["finished"] is False and running["trials"]["RUNNING"] >= 1
    assert running["driver"]["alive"] is True and running["driver"]["pid"] != os.getpid()
    assert 0 < running["epochs"]["done"] < running["epochs"]["budget"] == 5 * 4
    assert running["rate"]["seconds_per_trial_epoch"] > 0 and running["eta_seconds"] > 0
    assert sum(running["trials"].values()) == 5
    text = format_status(running)
    assert "not finished" in text and "(alive)" in text and "ETA: at most" in text


def test_status_of_a_finished_search_agrees_with_the_study_and_writes_nothing(watched_search, capsys):
    search_dir, _ = watched_search
    before = _listing(search_dir)
    assert main(["search", "status", search_dir, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert main(["search", "status", search_dir]) == 0
    text = capsys.readouterr().out
    assert _listing(search_dir) == before  # no lock file, no journal record, nothing touched

    record = read_record(search_dir)
    study = StudyRef(record.study.storage, record.study.study_name).load()
    trials = search_trials(study)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    assert status["finished"] is True and status["driver"] is None
    assert status["trials"] == {**states, "NOT_STARTED": 0} and states["PRUNED"] >= 1  # ASHA stopped some
    best = best_trial(study)
    assert (status["best"]["optuna_trial"], status["best"]["eval_top1"]) == (best.number, best.value)
    assert abs(sum(status["best"]["params"][k] for k in ("alpha", "beta", "gamma")) - 1) < 1e-9
    assert "lr" in status["best"]["params"] and not any("/" in k for k in status["best"]["params"])
    # Rung occupancy: every trial reached the first rung; those that reached max_epochs are COMPLETE.
    assert [r["epoch"] for r in status["rungs"]] == rung_epochs(4, 1, 2, True) == [1, 2, 4]
    assert status["rungs"][0]["reached"] == 5 and status["rungs"][-1]["reached"] == states["COMPLETE"]
    assert sum(r["stopped_here"] for r in status["rungs"]) == states["PRUNED"]
    done = sum(len(t.intermediate_values) for t in trials)
    assert status["epochs"] == {"done": done, "budget": 20, "fraction": round(done / 20, 4), "remaining_at_most": 0}
    assert status["eta_seconds"] == 0
    assert f"epochs: {done} of the budget 20" in text and f"trial {best.number}" in text


def test_status_reads_a_journal_with_a_record_half_written(watched_search, tmp_path):
    """A driver writing (or killed writing) a record leaves a last line without its newline: status
    reads the complete records and leaves the file as it is."""
    search_dir, _ = watched_search
    record = read_record(search_dir)
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(Path(record.study.storage).read_bytes() + b'{"op_code": 6, "worker_id": "x", "tri')
    before = journal.read_bytes()
    study = open_study_readonly(str(journal), record.study.study_name)
    assert len(study.trials) == len(StudyRef(record.study.storage, record.study.study_name).load().trials)
    assert journal.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["optuna.journal"]
    with pytest.raises(PermissionError, match="read-only"):
        ReadOnlyJournal(str(journal)).append_logs([{"op_code": 0}])


def test_status_of_no_search_is_one_error_line(tmp_path, capsys):
    assert main(["search", "status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "search.json" in err[0]


def test_export_plots_every_trial_pruned_included(watched_search, tmp_path):
    """The export's pictures show the search that ran: one curve per trial with its stop point
    (x: stopped at a rung), and importances over all trials at the first rung, not COMPLETE ones only."""
    import matplotlib

    matplotlib.use("Agg")
    from mgfa_ray import plots
    from mgfa_ray.search.export import export_search

    search_dir, _ = watched_search
    export_search(search_dir, tmp_path)
    for name in ("trial_curves", "optimization_history", "param_importances", "parallel_coordinate"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table, epochs = pd.read_parquet(tmp_path / "trials.parquet"), pd.read_parquet(tmp_path / "trial_epochs.parquet")
    pruned = int((table["state"] == "PRUNED").sum())
    fig = plots._curves(table, epochs, "eval_top1", [1, 2, 4])
    ax = fig.axes[0]
    curves = [line for line in ax.lines if line.get_linestyle() == "-"]
    stops = [line.get_marker() for line in ax.lines if line.get_linestyle() == "None"]
    assert len(curves) == len(table) == 5 and stops.count("x") == pruned >= 1
    assert stops.count("o") == int((table["state"] == "COMPLETE").sum())
    record = read_record(search_dir)
    trials = search_trials(StudyRef(record.study.storage, record.study.study_name).load())
    assert len(plots._study_at(trials, 1).trials) == 5  # importances: every trial, at the first rung
    history = plots._history(table, trials, "eval_top1")
    assert sum(len(c.get_offsets()) for c in history.axes[0].collections) == 5  # one dot per trial


def test_status_of_a_search_on_object_storage(watched_search, s3_server):
    """The search directory on an S3 server (moto, loopback), its study in the journal the record
    names: the same status, read through pyarrow's S3 filesystem."""
    from mgfa_ray.storage import fs_write_atomic, location_join, resolve_location

    search_dir, _ = watched_search
    uri = s3_server("status", "searches/standin")
    fs, path = resolve_location(uri)
    # A search on object storage keeps its study elsewhere (a journal on local/NFS disk or an RDB):
    # the copied record names the local journal by its absolute path, as such a record would.
    record = json.loads((Path(search_dir) / "search.json").read_text())
    record["study"]["storage"] = str(Path(search_dir) / record["study"]["storage"])
    record["dir_relative"] = [f for f in record.get("dir_relative", []) if f != "study.storage"]
    fs_write_atomic(fs, location_join(path, "search.json"), json.dumps(record).encode())
    remote, local = search_status(uri), search_status(search_dir)
    assert remote["search_dir"] == uri and remote["driver"] is None
    for key in ("trials", "best", "rungs", "epochs", "finished"):
        assert remote[key] == local[key]
