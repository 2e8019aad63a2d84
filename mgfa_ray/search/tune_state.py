"""What the search layer knows of Ray Tune's experiment state files, for the storage filesystem.

Ray Tune writes its experiment state and checkpoints through the storage filesystem a search gives
it. :func:`mgfa_ray.search.driver` wraps that filesystem with :func:`mgfa_ray.storage.atomic_filesystem`
(temporary file, fsync, rename: a driver killed during a snapshot leaves no truncated file) and
passes :func:`complete_state_file` as its ``accept`` hook, because Ray writes these files in its
driver staging directory in place and uploads the directory from a background thread, so an
upload can read one half written (measured here: an empty ``experiment_state-*.json`` published
while the driver was rewriting it, which ``Tuner.restore`` cannot read; Ray 2.60). A copy that is
not whole is not published: the last whole one stays.

Whole files can still disagree with each other: the upload copies a snapshot's files one by one, so
a driver killed during it can leave the searcher state of one snapshot beside the trial list of
another. :func:`reconcile_search_state` makes them agree before ``Tuner.restore`` reads them.

The file names and formats below are Ray Tune's (not a public API; checked by
``tests/test_io.py::test_atomic_filesystem_keeps_the_last_whole_ray_state_file``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

#: Ray Tune's experiment state (JSON).
EXPERIMENT_STATE = "experiment_state-*.json"
#: Ray Tune's searcher state, which Ray pickles despite the ``.json`` suffix.
SEARCH_GEN_STATE = "search_gen_state-*.json"


def complete_state_file(name: str, path: str) -> bool:
    """Whether ``path``, a copy of the file ``name`` written through the search's storage, is whole.

    ``experiment_state-*.json`` must parse as JSON; a pickle (``*.pkl``, and
    ``search_gen_state-*.json``) must end with its STOP opcode (``.``). Other files pass.

    Args:
        name: The file's final base name.
        path: The local temporary holding its content.
    """
    if fnmatch.fnmatch(name, EXPERIMENT_STATE):
        try:
            with open(path, "rb") as f:
                json.load(f)
        except ValueError:
            return False
        return True
    if name.endswith(".pkl") or fnmatch.fnmatch(name, SEARCH_GEN_STATE):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"."
    return True


def reconcile_search_state(run_path: str, fs: Any) -> str | None:
    """Make the newest saved searcher state of the Ray Tune experiment at ``run_path`` agree with
    its newest saved trial list, before ``Tuner.restore`` reads both.

    Ray Tune counts the trials its search algorithm created (``SearchGenerator``: ``counter``, and
    it creates trials until ``counter`` reaches ``num_samples``) and the trials a
    ``ConcurrencyLimiter`` holds as running (``live_trials``), in ``search_gen_state-*.json``; the
    trial list is in ``experiment_state-*.json``. Ray writes both in one step but uploads them one
    by one, so a killed driver can leave them from different snapshots (measured: a counter one
    ahead of the list, a trial created just before the kill, so that the resumed run ended a trial
    short and every later resume too; Ray 2.60). In a consistent snapshot the counter is the
    number of trials in the list and the live trials are the listed trials not yet finished; this
    sets them so. A trial lost this way left its Optuna trial RUNNING: the next trial Ray creates
    takes it over (:meth:`mgfa_ray.search.searcher.StudySearch.suggest`).

    Args:
        run_path: The experiment's folder (``runs/run-N``) on ``fs``.
        fs: The pyarrow filesystem of the search's storage (rewrites go through it).

    Returns:
        What was changed, in words, or ``None`` when the two already agree, or there is no saved
        searcher state (nothing to restore).

    Raises:
        OSError: The storage cannot be read or written (pyarrow). A searcher state in another
            format than Ray 2.60's is left as it is, with a warning (:func:`mgfa_ray.compat.search_state_trials`).
    """
    import pyarrow.fs as pafs
    from ray import cloudpickle
    from ray.tune import ExperimentAnalysis

    from mgfa_ray.compat import search_state_trials, set_search_state_trials

    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(run_path))
             if fnmatch.fnmatch(i.base_name, SEARCH_GEN_STATE)]
    if not names:
        return None
    path = f"{run_path.rstrip('/')}/{max(names)}"  # the newest, as Ray picks it (its names sort by time)
    with fs.open_input_stream(path) as f:
        state = cloudpickle.loads(f.readall())
    saved = search_state_trials(state)
    if saved is None:
        log.warning("%s: not the searcher state format of Ray 2.60; left as it is", path)
        return None
    trials = ExperimentAnalysis(run_path, storage_filesystem=fs).trials
    created, live = len(trials), {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}
    changes = []
    if saved[0] != created:
        changes.append(f"trials created {saved[0]} -> {created}")
    if saved[1] is not None and saved[1] != live:
        changes.append(f"running trials {sorted(saved[1])} -> {sorted(live)}")
    if not changes:
        return None
    set_search_state_trials(state, created=created, live=live)
    with fs.open_output_stream(path) as f:
        f.write(cloudpickle.dumps(state))
    return f"{path}: " + "; ".join(changes)
