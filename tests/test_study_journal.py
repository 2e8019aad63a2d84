"""The Optuna journal (issue 15, defect 3): a record torn by a crash or a full disk during a write
is dropped with a warning naming the file, and the next write starts on a fresh line; any other
damage is one error naming the file and line, for every reader (here: ``mgfa-ray search export``)."""

from __future__ import annotations

import logging

import pytest
import yaml

from mgfa_ray import cli
from mgfa_ray.config import SearchConfig, TrainConfig
from mgfa_ray.search.driver import create_search
from mgfa_ray.search.space import load_search_space
from mgfa_ray.search.journal import DamagedJournalError
from mgfa_ray.search.study import StudyRef


def _study_with_trials(path, n=3) -> StudyRef:
    ref = StudyRef(str(path), "s")
    study = ref.load(create=True)
    for i in range(n):
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, float(i))
    return ref


def test_torn_last_record_is_dropped_with_a_warning_and_writes_start_on_a_fresh_line(tmp_path, caplog):
    journal = tmp_path / "optuna.journal"
    ref = _study_with_trials(journal)
    whole = journal.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    journal.write_bytes(whole + last[: len(last) // 2])  # a write cut mid-line
    with caplog.at_level(logging.WARNING, logger="mgfa_ray.search.journal"):
        study = ref.load()
    assert str(journal) in caplog.text and "torn last record" in caplog.text
    assert journal.read_bytes() == whole  # back to the last complete record, nothing more lost
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, 9.0)
    assert [t.value for t in ref.load().trials] == [0.0, 1.0, 2.0, 9.0]


def test_damage_inside_the_journal_names_file_and_line_and_changes_nothing(tmp_path):
    journal = tmp_path / "optuna.journal"
    ref = _study_with_trials(journal)
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:12] + lines[2]  # a torn record that a later write was appended onto
    damaged = b"".join(lines)
    journal.write_bytes(damaged)
    with pytest.raises(DamagedJournalError, match=f"{journal}:2: not an Optuna journal record"):
        ref.load()
    assert journal.read_bytes() == damaged


def test_search_export_of_a_damaged_journal_is_one_error_line(tmp_path, capsys):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"scheduler": {"max_epochs": 1}, "parameters": {"lr": 0.01}}))
    search_dir = create_search(name="s", space=load_search_space(space_file), space_file=str(space_file),
                               search=SearchConfig(space=str(space_file)),
                               base=TrainConfig(manifest="stand-in", masks="stand-in", weights=None),
                               storage_path=str(tmp_path / "searches"))
    journal = tmp_path / "searches" / "s" / "optuna.journal"
    journal.write_bytes(journal.read_bytes() + b'{"op_code":4,"worker_id":"x"\n{"op_code":5}\n')
    assert cli.main(["search", "export", search_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {journal}:") and "not an Optuna journal record" in err[0]



def test_lock_left_by_a_killed_writer_is_removed_and_a_live_one_is_not(tmp_path, caplog):
    """A driver killed during an append leaves ``<journal>.lock``; without this the next writer
    waited Optuna's 30 s grace period before releasing it by force. A lock that a live writer
    takes and releases is never removed."""
    import threading

    from optuna.storages.journal import JournalFileSymlinkLock

    from mgfa_ray.search.journal import release_stale_journal_lock

    journal = tmp_path / "optuna.journal"
    ref = _study_with_trials(journal)
    lock = JournalFileSymlinkLock(str(journal))
    assert lock.acquire()  # ... and its holder dies: nobody releases it
    with caplog.at_level(logging.WARNING, logger="mgfa_ray.search.journal"):
        assert release_stale_journal_lock(journal, settle_s=0.2)
    assert f"{journal}.lock" in caplog.text and "left behind" in caplog.text
    assert not (tmp_path / "optuna.journal.lock").exists()
    study = ref.load()
    trial = study.ask()  # writes go through at once
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, 9.0)
    assert len(ref.load().trials) == 4

    live = JournalFileSymlinkLock(str(journal))
    assert live.acquire()
    releaser = threading.Timer(0.3, live.release)  # a live writer: holds it, then lets go
    releaser.start()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgfa_ray.search.journal"):
        assert not release_stale_journal_lock(journal, settle_s=2.0)
    releaser.join()
    assert "left behind" not in caplog.text and not (tmp_path / "optuna.journal.lock").exists()
    with pytest.raises(ValueError, match="settle_s must be > 0, got 0"):
        release_stale_journal_lock(journal, settle_s=0)
