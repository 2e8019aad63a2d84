"""Every use of Ray, Optuna, pyarrow or Ultralytics beyond their public API, in one place.

The rest of ``mgfa_ray`` talks to Ray through ``Searcher`` / ``TrialScheduler`` / ``Tuner``, to
Optuna through ``Study.ask`` / ``tell`` / ``enqueue_trial`` / ``get_trials`` and the public methods
of the ``BaseStorage`` object it opens itself, and to pyarrow through ``pyarrow.fs``. What has no
public route is here, one function per assumption, each docstring naming the private API it relies
on and why. ``tests/test_adapter_contract.py`` checks every assumption against the installed
versions and fails naming the library, its version and the function below: on an upgrade, that
test says what to rewrite.

Verified with Ray 2.60, Optuna 5.0, pyarrow 26, Ultralytics 8.4.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from mgfa_ray.runtime import YOLO_ENV_DEFAULTS


def running_trial(study, trial_id: int):
    """An ``optuna.trial.Trial`` for a RUNNING trial the study already holds (storage id ``trial_id``,
    from the public ``BaseStorage.get_trial_id_from_study_id_trial_number``).

    Private use: Optuna documents the ``Trial(study, trial_id)`` constructor but says "direct use
    of this constructor is not recommended" (``ask`` is the public way to get a ``Trial``, and only
    for a new trial). A driver killed between ``ask`` and Ray's snapshot leaves a RUNNING trial with
    part of its parameters sampled; suggesting on this object returns the values it holds and
    samples the rest, so the trial is completed instead of lost (``mgfa_ray.search.searcher.StudySearch``).
    """
    import optuna

    return optuna.trial.Trial(study, trial_id)


def search_state_trials(state: Any) -> tuple[int, set[str] | None] | None:
    """From Ray Tune's saved search-algorithm state (an unpickled ``search_gen_state-*.json``): the
    number of trials its ``SearchGenerator`` created, and the trial ids its ``ConcurrencyLimiter``
    holds as running (``None`` without a limiter). ``None`` when ``state`` is not in that format.

    Private use: the file is what ``SearchGenerator.save_to_dir`` pickles (Ray 2.60,
    ``ray/tune/search/search_generator.py``): ``get_state()``'s dict, whose ``counter`` Ray compares
    with ``num_samples`` to stop creating trials, plus each wrapper's state under
    ``name:<class>``; the ``ConcurrencyLimiter``'s is its ``__dict__`` with ``live_trials`` (a set
    of trial ids) and ``num_unfinished_live_trials``.
    """
    if not isinstance(state, dict) or not isinstance(state.get("counter"), int):
        return None
    limiter = state.get("name:ConcurrencyLimiter")
    if limiter is None:
        return state["counter"], None
    if not isinstance(limiter, dict) or not isinstance(limiter.get("live_trials"), set):
        return None
    return state["counter"], set(limiter["live_trials"])


def set_search_state_trials(state: dict[str, Any], *, created: int, live: set[str]) -> None:
    """Set, in a state :func:`search_state_trials` read, the number of trials created and (when it
    has a ``ConcurrencyLimiter``) the trial ids held as running. Same private format."""
    state["counter"] = created
    limiter = state.get("name:ConcurrencyLimiter")
    if limiter is not None:
        limiter["live_trials"], limiter["num_unfinished_live_trials"] = set(live), len(live)


def trial_experiment_path(trial) -> str | None:
    """The experiment directory (path on its storage filesystem) a Ray trial writes to, or ``None``
    when the trial has no storage yet.

    Private use: ``Trial.storage`` is a ``ray.train._internal.storage.StorageContext`` (no public
    type); ``experiment_fs_path`` is its attribute.
    """
    storage = getattr(trial, "storage", None)
    return None if storage is None else storage.experiment_fs_path


def move_trial_storage(trial, experiment_path: str) -> None:
    """Point a Ray trial (and its checkpoints) at the experiment directory ``experiment_path``, the
    same re-pointing Ray does for the trials it restores.

    Private use: Ray 2.60, after ``Tuner.restore`` of an experiment directory moved or copied,
    re-points the restored trials (``TuneController._restore_trials`` calls ``Trial.set_storage``)
    but creates new trials from the ``Experiment`` pickled in its search generator's state, i.e. in
    the old directory. Fixing that needs a copy of the trial's ``StorageContext`` (private type)
    with ``storage_fs_path`` / ``experiment_dir_name`` changed, given to ``Trial.set_storage``
    (developer API, taking that private type).
    """
    import copy
    import posixpath

    moved = copy.copy(trial.storage)
    moved.storage_fs_path = posixpath.dirname(experiment_path)
    moved.experiment_dir_name = posixpath.basename(experiment_path)
    trial.set_storage(moved)


def s3_options(fs) -> dict[str, Any]:
    """The constructor keyword arguments of a ``pyarrow.fs.S3FileSystem`` (to build the same one
    with one option changed).

    Private use: pyarrow exposes no getter for them; ``S3FileSystem.__reduce__()`` returns
    ``(S3FileSystem._reconstruct, (kwargs,))``, the way pyarrow pickles the filesystem.
    """
    return dict(fs.__reduce__()[1][0])


def suppress_cluster_address_file() -> None:
    """Stop ``ray.cluster_utils.Cluster`` in this process from writing (and deleting on shutdown)
    ``/tmp/ray/ray_current_cluster``, through which a plain ``ray.init()`` anywhere on the machine
    would join it (benchmarks that share the machine with other users' Ray runs).

    Private use: ``Cluster`` calls ``ray._private.utils.write_ray_address`` and
    ``ray._common.utils.reset_ray_address``; no public option turns that off. Both are replaced by
    no-ops for the rest of the process.
    """
    import ray._common.utils
    import ray._private.utils

    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None


def scheduler_trial(trial_id: str):
    """A stand-in for Ray Tune's ``Trial`` that a ``TrialScheduler`` of the ASHA family
    (``AsyncHyperBandScheduler`` / ``ASHAScheduler``) accepts outside a Tune run: its
    ``on_trial_add`` / ``on_trial_result`` / ``on_trial_complete`` read only ``trial.trial_id``
    (Ray 2.60, ``ray/tune/schedulers/async_hyperband.py``). Used by
    ``RayStockPolicy`` (``benchmarks/replay_policies.py``) to replay Ray's stock scheduler on recorded curves.

    Private assumption: a real ``Trial`` needs a registered trainable and storage; nothing public
    builds one detached from a run.
    """
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=trial_id)


# Ultralytics: its settings and its font lookup, patched in memory while it trains or predicts offline.
# One process-wide state: the settings patch is reference-counted across nested blocks and threads.


_OFF_SETTINGS = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


def _env_true(value: str | None) -> bool:
    """Ultralytics' own reading of a boolean environment variable (``utils.env_bool``)."""
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on", "y", "t"}


_settings_lock = threading.Lock()
_settings_users = 0
_settings_saved: dict[str, Any] = {}


@contextlib.contextmanager
def ultralytics_private_settings():
    """Within the block Ultralytics' settings have telemetry and the integrations off and its
    default directories in the private config dir (see the module doc, "Offline operation").

    Only the settings of the private ``YOLO_CONFIG_DIR`` that :func:`mgfa_ray.runtime.configure`
    sets are changed (a user's own ``$YOLO_CONFIG_DIR`` is left as it is), and only in memory:
    Ultralytics' ``SETTINGS.update`` would rewrite its settings file. Ultralytics reads them when
    a trainer starts (integration callbacks) and when it resolves files (``weights_dir``). Blocks
    may nest and overlap across threads: the first to enter changes the settings, the last to
    leave restores them.
    """
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    config_dir = Path(USER_CONFIG_DIR).parent
    if config_dir != Path(YOLO_ENV_DEFAULTS["YOLO_CONFIG_DIR"]):
        yield
        return
    global _settings_users
    with _settings_lock:
        if _settings_users == 0:
            # No telemetry, and no integration callbacks (the Ray Tune one warns outside a Tune
            # trial; the others would log to external services). Default directories point into
            # the private dir: Ultralytics derives them from the git root of its own install,
            # which is this repository when the virtualenv lives in it.
            wanted: dict[str, Any] = {k: False for k in _OFF_SETTINGS if k in SETTINGS}
            wanted.update({k: str(config_dir / k.removesuffix("_dir"))
                           for k in ("runs_dir", "weights_dir", "datasets_dir")})
            _settings_saved.clear()
            _settings_saved.update({k: SETTINGS[k] for k in wanted if k in SETTINGS})
            dict.update(SETTINGS, wanted)  # dict's own update: in memory, the file untouched
        _settings_users += 1
    try:
        yield
    finally:
        with _settings_lock:
            _settings_users -= 1
            if _settings_users == 0:
                dict.update(SETTINGS, _settings_saved)


@contextlib.contextmanager
def ultralytics_offline_fonts():
    """Within the block, Ultralytics' dataset check looks up fonts locally only (offline mode).

    ``ultralytics.data.utils.check_det_dataset`` (run by ``train`` and ``val``) calls
    ``check_font("Arial.ttf")``, which, when the font is not in the config dir or matplotlib's font
    list, sends an HTTP HEAD request to github.com (3 s timeout) and downloads the font. Offline
    that request can only fail, or hang until the timeout where DNS resolves but traffic is
    dropped. Ultralytics' ``YOLO_OFFLINE`` does not cover this call.
    """
    import ultralytics.data.utils as data_utils

    if not _env_true(os.environ.get("YOLO_OFFLINE")):
        yield
        return
    original = data_utils.check_font

    def local_font_only(font: str = "Arial.ttf"):
        from matplotlib import font_manager
        from ultralytics.utils import USER_CONFIG_DIR

        file = Path(USER_CONFIG_DIR) / Path(font).name
        if file.exists():
            return file
        matches = [f.fname for f in font_manager.fontManager.ttflist if font in f.fname]
        return matches[0] if matches else None

    data_utils.check_font = local_font_only
    try:
        yield
    finally:
        data_utils.check_font = original
