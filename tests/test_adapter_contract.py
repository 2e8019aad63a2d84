"""The Ray / Optuna / pyarrow / Ultralytics boundary: every assumption :mod:`mgfa_ray.compat` makes about a
private API, checked against the installed versions, and a scan that keeps every other module of
``mgfa_ray`` on public API.

A failure here after an upgrade names the library, its version and the compat function to
rewrite; nothing else in ``mgfa_ray`` should need to change.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import optuna
import pyarrow
import pytest
import ray

from mgfa_ray import compat

PACKAGE = Path(compat.__file__).parent
THIRD_PARTY = ("ray", "optuna", "pyarrow")  # Ultralytics: its in-memory patches are in compat, tested above


def _broken(library, function: str, what: str) -> str:
    return (f"{library.__name__} {library.__version__}: {what} — mgfa_ray.compat.{function} relies on it; "
            f"rewrite it for this version (its docstring says what it needs and why)")


def _memory_study() -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    storage = optuna.storages.InMemoryStorage()
    return optuna.create_study(storage=storage, direction="maximize"), storage


# --- the contract of each compat function ------------------------------------------------------

def test_running_trial_completes_a_running_trials_parameters():
    study, storage = _memory_study()
    asked = study.ask()
    x = asked.suggest_float("x", 0.0, 1.0)
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), asked.number)
    params = list(inspect.signature(optuna.trial.Trial.__init__).parameters)
    assert params[:3] == ["self", "study", "trial_id"], _broken(
        optuna, "running_trial", f"optuna.trial.Trial.__init__ takes {params}, not (study, trial_id)")
    again = compat.running_trial(study, trial_id)
    assert again.number == asked.number and again.suggest_float("x", 0.0, 1.0) == x, _broken(
        optuna, "running_trial", "a Trial re-opened on a RUNNING trial no longer returns the value it holds")
    y = again.suggest_float("y", 0.0, 1.0)
    assert study.trials[asked.number].params == {"x": x, "y": y}, _broken(
        optuna, "running_trial", "a parameter suggested on a re-opened Trial is not stored in its trial")


def test_ultralytics_font_lookup_is_patched_within_the_block_and_restored(monkeypatch):
    import ultralytics
    import ultralytics.data.utils as data_utils

    original = getattr(data_utils, "check_font", None)
    assert callable(original), _broken(ultralytics, "ultralytics_offline_fonts", "ultralytics.data.utils.check_font is gone")
    assert "check_font" in data_utils.check_det_dataset.__code__.co_names, _broken(
        ultralytics, "ultralytics_offline_fonts", "check_det_dataset no longer looks check_font up in its module")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    with compat.ultralytics_offline_fonts():
        assert data_utils.check_font is not original
        assert data_utils.check_font("no-such-font-anywhere.ttf") is None  # looked up locally, nothing fetched
    assert data_utils.check_font is original


def test_trial_storage_can_be_read_and_moved(tmp_path):
    import pyarrow.fs as pafs
    from ray.tune.experiment import Trial

    try:
        from ray.train._internal.storage import StorageContext
    except ImportError as err:
        pytest.fail(_broken(ray, "move_trial_storage", f"no ray.train._internal.storage.StorageContext ({err})"))
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="old",
                             storage_filesystem=pafs.LocalFileSystem())
    trial = Trial("stand_in", config={}, storage=storage, stub=True)
    trial.storage.trial_dir_name = "trial_0"
    assert compat.trial_experiment_path(trial) == f"{tmp_path}/old", _broken(
        ray, "trial_experiment_path", "Trial.storage.experiment_fs_path is not the experiment directory")
    compat.move_trial_storage(trial, f"{tmp_path}/moved/new")
    assert compat.trial_experiment_path(trial) == f"{tmp_path}/moved/new", _broken(
        ray, "move_trial_storage", "Trial.set_storage with a changed StorageContext copy does not move the trial")
    assert trial.storage.trial_fs_path == f"{tmp_path}/moved/new/trial_0", _broken(
        ray, "move_trial_storage", "a moved StorageContext does not put the trial's folder in the new experiment")


def test_s3_options_rebuild_the_same_filesystem():
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(region="us-east-1", endpoint_override="http://127.0.0.1:9", background_writes=True)
    try:
        options = compat.s3_options(fs)
    except Exception as err:  # noqa: BLE001 — any change of the pickling protocol
        pytest.fail(_broken(pyarrow, "s3_options", f"S3FileSystem.__reduce__() is not (reconstruct, (kwargs,)): {err!r}"))
    assert options.get("endpoint_override") == "http://127.0.0.1:9" and options.get("background_writes") is True, \
        _broken(pyarrow, "s3_options", f"S3FileSystem.__reduce__()'s arguments are not its options: {options}")
    assert pafs.S3FileSystem(**options).equals(fs)
    assert not pafs.S3FileSystem(**{**options, "background_writes": False}).equals(fs)


def test_cluster_address_file_hooks_exist():
    """Only checked, not called: the no-ops would stay for the rest of the test session."""
    import ray._common.utils
    import ray._private.utils
    from ray import cluster_utils

    assert callable(getattr(ray._private.utils, "write_ray_address", None)), _broken(
        ray, "suppress_cluster_address_file", "no ray._private.utils.write_ray_address")
    assert callable(getattr(ray._common.utils, "reset_ray_address", None)), _broken(
        ray, "suppress_cluster_address_file", "no ray._common.utils.reset_ray_address")
    source = inspect.getsource(cluster_utils.Cluster)
    assert "_private.utils.write_ray_address" in source and "_common.utils.reset_ray_address" in source, _broken(
        ray, "suppress_cluster_address_file", "ray.cluster_utils.Cluster no longer writes the address file through them")


def test_scheduler_trial_is_all_ashas_scheduler_reads():
    """Ray's ASHAScheduler, driven outside Tune with compat.scheduler_trial, makes ASHA's decisions:
    at the first rung (grace 1, factor 2) the second trial below the first is stopped, the third
    above both goes on, and the fourth trial's result at max_t stops it (Ray's stop_last_trials)."""
    from ray.tune.schedulers import ASHAScheduler

    sched = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=4, grace_period=1,
                          reduction_factor=2)
    decisions = []
    for tid, value in (("a", 0.5), ("b", 0.2), ("c", 0.9)):
        trial = compat.scheduler_trial(tid)
        sched.on_trial_add(None, trial)
        decisions.append(sched.on_trial_result(None, trial, {"training_iteration": 1, "m": value}))
    assert decisions == ["CONTINUE", "STOP", "CONTINUE"], _broken(
        ray, "scheduler_trial", f"ASHAScheduler decided {decisions} on a stand-in trial, not CONTINUE/STOP/CONTINUE")
    last = compat.scheduler_trial("d")
    sched.on_trial_add(None, last)
    assert sched.on_trial_result(None, last, {"training_iteration": 4, "m": 1.0}) == "STOP", _broken(
        ray, "scheduler_trial", "ASHAScheduler no longer stops a trial that reached max_t")
    sched.on_trial_complete(None, last, {"training_iteration": 4, "m": 1.0})


def test_search_state_trials_read_and_set_what_ray_saves_and_restores(tmp_path):
    """Ray's SearchGenerator over a ConcurrencyLimiter, saved with one trial created and running:
    compat reads (1, {that trial}) from the saved file; set to (0, {}) and restored, the generator
    creates trials again from the first and the limiter holds none running."""
    from ray import cloudpickle
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

    class Points(Searcher):
        def suggest(self, trial_id):
            return {"x": 1}

        def save(self, checkpoint_path):
            open(checkpoint_path, "wb").close()

        def restore(self, checkpoint_path):
            pass

    def generator() -> SearchGenerator:
        gen = SearchGenerator(ConcurrencyLimiter(Points(metric="m", mode="max"), max_concurrent=2))
        gen.set_state({"counter": 0, "total_samples": 4, "finished": False, "experiment": None})
        return gen

    gen = generator()
    assert gen.searcher.suggest("t1") == {"x": 1}
    gen.set_state({**gen.get_state(), "counter": 1})
    gen.save_to_dir(str(tmp_path), session_str="s")
    (path,) = tmp_path.glob("search_gen_state-*.json")
    state = cloudpickle.loads(path.read_bytes())
    assert compat.search_state_trials(state) == (1, {"t1"}), _broken(
        ray, "search_state_trials", f"the saved search state reads {compat.search_state_trials(state)}, not (1, {{'t1'}})")
    compat.set_search_state_trials(state, created=0, live=set())
    path.write_bytes(cloudpickle.dumps(state))
    restored = generator()
    restored.set_state({**restored.get_state(), "counter": 3})
    restored.restore_from_dir(str(tmp_path))
    assert restored.get_state()["counter"] == 0 and not restored.is_finished(), _broken(
        ray, "set_search_state_trials", "a restored SearchGenerator does not take the counter it set")
    assert restored.searcher.live_trials == set(), _broken(
        ray, "set_search_state_trials", "a restored ConcurrencyLimiter does not take the running trials it set")
    assert compat.search_state_trials({"counter": "1"}) is None  # another format: not read


# --- the boundary: nothing else in mgfa_ray touches a private API ------------------------------

PUBLIC_MODULES = {
    "ray", "ray.data", "ray.train", "ray.tune", "ray.tune.schedulers", "ray.tune.search", "ray.tune.search.optuna",
    "ray.tune.logger",  # documented: "Tune Loggers (tune.logger)", its built-in LoggerCallbacks
    "ray.util",
    "ray.util.state",
    "optuna", "optuna.distributions", "optuna.exceptions", "optuna.pruners", "optuna.samplers", "optuna.storages",
    "optuna.storages.journal", "optuna.study", "optuna.trial", "optuna.visualization",
    "optuna.visualization.matplotlib",
    "pyarrow", "pyarrow.compute", "pyarrow.dataset", "pyarrow.fs", "pyarrow.parquet",
}
"""Modules of Ray, Optuna and pyarrow whose documented names mgfa_ray may import (a name with a
leading underscore never)."""

NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}
PICKLING_INTERNALS = {"__reduce__", "__reduce_ex__"}
INTERNAL_KEYS = {"fixed_params": "Optuna's internal system attribute of an enqueued trial",
                 "completed_rung_": "Optuna's SuccessiveHalvingPruner's internal system attributes"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.resolve() != Path(compat.__file__).resolve())


def _project_private_names() -> set[str]:
    """Private names the project defines itself (functions, classes, attributes it assigns)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
    return {n for n in names if n.startswith("_")}


def _third_party_private_names(cls: type) -> set[str]:
    """Private attributes the Ray / Optuna / pyarrow classes in ``cls``'s MRO define or assign."""
    names = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] not in THIRD_PARTY:
            continue
        names |= {n for n in vars(base) if n.startswith("_") and not n.startswith("__")}
        try:
            names |= set(re.findall(r"self\.(_[A-Za-z]\w*)", inspect.getsource(base)))
        except (OSError, TypeError):
            pass
    return names


def _violations(path: Path, owned: set[str], root: Path = PACKAGE.parent) -> list[str]:
    """What module ``path`` (importable from ``root``) does beyond public API, one line each."""
    tree = ast.parse(path.read_text())
    module = importlib.import_module(".".join(path.relative_to(root).with_suffix("").parts))
    out = []
    where = f"{path.relative_to(root)}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if getattr(node, "level", 0) == 0 and mod.split(".")[0] in THIRD_PARTY and mod not in PUBLIC_MODULES:
                    out.append(f"{where}:{node.lineno}: imports {mod} (not a public module)")
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in THIRD_PARTY:
                out += [f"{where}:{node.lineno}: imports private {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute):
            name = node.attr
            if name in PICKLING_INTERNALS:
                out.append(f"{where}:{node.lineno}: {ast.unparse(node)} (pickling internals)")
            elif name.startswith("_") and not name.startswith("__") and name not in NAMEDTUPLE_API \
                    and name not in owned:
                out.append(f"{where}:{node.lineno}: {ast.unparse(node)} (a private attribute mgfa_ray does not define)")
        elif isinstance(node, ast.ClassDef):
            cls = getattr(module, node.name, None)
            if not isinstance(cls, type):
                continue
            theirs = _third_party_private_names(cls)
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self" \
                        and sub.attr in theirs:
                    out.append(f"{where}:{sub.lineno}: self.{sub.attr} is a private attribute of a base class "
                               f"from {', '.join(THIRD_PARTY)}")
                elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub in node.body \
                        and sub.name in theirs:
                    out.append(f"{where}:{sub.lineno}: def {sub.name} overrides a private method of a base class")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out += [f"{where}:{node.lineno}: {node.value!r} names {what}"
                    for key, what in INTERNAL_KEYS.items() if key in node.value]
    return out


def test_no_module_outside_compat_touches_a_private_api():
    owned = _project_private_names()
    found = [v for path in _modules() for v in _violations(path, owned)]
    assert not found, ("private Ray / Optuna / pyarrow API outside mgfa_ray/compat.py (move it there, with a "
                       "contract test here):\n" + "\n".join(found))


def test_the_scan_catches_what_it_is_for(tmp_path):
    """The boundary scan itself: the private uses mgfa_ray had before compat are each found (the
    documented import of OptunaSearch is not one; overriding its private methods is)."""
    owned = _project_private_names()
    bad = tmp_path / "mgfa_ray_bad.py"
    bad.write_text(
        "from ray.tune.utils.util import unflatten_dict\n"
        "from ray.tune.search.optuna import OptunaSearch\n"
        "import ray._private.utils\n"
        "def f(study, orphan, fs):\n"
        "    study._storage.get_trial(orphan._trial_id)\n"
        "    return fs.__reduce__()[1][0]\n"
        "class S(OptunaSearch):\n"
        "    def _setup_study(self, mode):\n"
        "        self._ot_study = None\n"
        "        return [t.system_attrs.get('fixed_params') for t in self.study.trials]\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        found = _violations(bad, owned, root=tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
    text = "\n".join(found)
    assert "ray.tune.search.optuna" not in text, f"the documented import of OptunaSearch was flagged:\n{text}"
    for expected in ("ray.tune.utils.util", "ray._private.utils", "study._storage",
                     "orphan._trial_id", "fs.__reduce__", "self._ot_study", "def _setup_study",
                     "'fixed_params'"):
        assert expected in text, f"{expected} not found by the scan:\n{text}"

