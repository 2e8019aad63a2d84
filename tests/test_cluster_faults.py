"""Failures under a running search: a worker node killed mid-trial, the object store restarted,
a second driver on the same search.

Drivers are separate processes (tests/search_driver.py with its fast stand-in trainable) that join
the cluster this test process shares (conftest.shared_cluster), but for the node-kill test's, which
joins its own, and those refused before they start Ray. The multi-node cluster is
``ray.cluster_utils.Cluster`` — a head without CPUs and worker nodes, each its own raylet — so a
trial runs on a worker node and killing that node's processes is a node dying. Checks reuse
test_search_resume's: Ray and the Optuna study agree on every trial, and the per-epoch log counts
what really ran.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from test_search_resume import _check_one_truth, _create, _driver, _env, _finish, _finished, _kill_when, _study

from mgfa_ray.search.export import export_search
from mgfa_ray.search.study import best_trial, search_trials

pytestmark = pytest.mark.slow
MAX_EPOCHS = 4


def _wait_for(predicate, *, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            assert proc.poll() is None, f"the driver stopped before {what}"
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _epochs(log_dir: Path, number: int) -> list[int]:
    path = log_dir / f"trial-{number}.log"
    return [int(line.split()[1]) for line in path.read_text().splitlines()] if path.exists() else []


def test_worker_node_killed_mid_trial_resumes_from_its_checkpoint_on_another_node(tmp_path, s3_server, monkeypatch):
    from ray.cluster_utils import Cluster

    log_dir = tmp_path / "epoch-log"
    log_dir.mkdir()
    # Trials run in the nodes' worker processes, which inherit the environment of whoever started
    # the nodes (here this process), not the driver's.
    monkeypatch.setenv("MGFA_STANDIN_LOG", str(log_dir))
    monkeypatch.setenv("MGFA_STANDIN_EPOCH_S", "0.6")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * 2**20, "include_dashboard": False,
        # Declare a node dead after 3 missed health checks 0.5 s apart (Ray's default: 5 x 3 s).
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20) for _ in range(3)]
    try:
        cluster.wait_for_nodes()
        search_dir = _create(tmp_path, "--num-samples", "4", "--max-epochs", str(MAX_EPOCHS), "--no-early-stopping",
                             "--max-failures", "2", "--study-storage", f"sqlite:///{tmp_path / 'study.db'}",
                             storage=s3_server("nodekill", "team-a"))
        proc = _driver(tmp_path, "run", search_dir, join=cluster.address)

        def trial_in_epoch_3():  # a trial two epochs in: the second is being checkpointed, or the third runs
            for f in log_dir.glob("trial-*.log"):
                number = int(f.stem.split("-")[1])
                if _epochs(log_dir, number) == [1, 2] and (log_dir / f"node-{number}").exists():
                    return number
            return None

        victim = _wait_for(trial_in_epoch_3, timeout=180, what="a trial in its third epoch", proc=proc)
        node_id = (log_dir / f"node-{victim}").read_text()
        node = next(w for w in workers if w.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)  # SIGKILL the node's raylet and workers
        _finish(tmp_path, proc, timeout=300)
    finally:
        cluster.shutdown()

    _check_one_truth(search_dir, total=4, log_dir=log_dir, kills=1, max_epochs=MAX_EPOCHS)
    assert all(t.state == TrialState.COMPLETE for t in search_trials(_study(search_dir)))
    ran = _epochs(log_dir, victim)
    assert sorted(set(ran)) == [1, 2, 3, 4]
    assert ran.count(1) == 1  # resumed from its last checkpoint, not from scratch
    assert len(ran) <= MAX_EPOCHS + 1  # at most the epoch in flight (being run or checkpointed) ran twice
    assert (log_dir / f"node-{victim}").read_text() != node_id  # finished on another node
    assert "nodekill" in search_dir  # the checkpoints it resumed from were on the object store


def test_object_store_restarted_mid_search_the_search_waits_and_finishes(tmp_path, shared_cluster, restartable_s3):
    search_dir = _create(tmp_path, "--num-samples", "4", "--max-epochs", str(MAX_EPOCHS),
                         "--study-storage", f"sqlite:///{tmp_path / 'study.db'}",
                         storage=restartable_s3.uri("outage", "team-a"))
    proc = _driver(tmp_path, "run", search_dir, env=_env(tmp_path, MGFA_STORAGE_RETRY_S="120"), join=shared_cluster)
    _wait_for(lambda: _finished(_study(search_dir).get_trials(deepcopy=False)) >= 1, timeout=180,
              what="a finished trial", proc=proc)
    restartable_s3.stop()
    time.sleep(8)  # trials report and checkpoint into the outage
    restartable_s3.start()
    _finish(tmp_path, proc)
    log = (tmp_path / "driver.log").read_text()
    assert "object store unreachable" in log  # the driver or a trial did wait
    _check_one_truth(search_dir, total=4, log_dir=tmp_path / "epoch-log", kills=0)
    assert not [t for t in search_trials(_study(search_dir)) if t.state == TrialState.FAIL]


def test_object_store_down_at_resume_is_a_clear_error_then_resumes_cleanly(tmp_path, shared_cluster, restartable_s3):
    """A driver on an object store (with an SQLite study) is killed; a resume while the store is
    down fails clearly; once it is back, the resume finishes and the export reads from it."""
    search_dir = _create(tmp_path, "--num-samples", "4", "--max-epochs", str(MAX_EPOCHS),
                         "--study-storage", f"sqlite:///{tmp_path / 'study.db'}",
                         storage=restartable_s3.uri("outage2", "team-a"))
    # A driver on a running cluster (the shared one) is killed: Ray ends its trials, the cluster stays.
    _kill_when(_driver(tmp_path, "run", search_dir, join=shared_cluster), search_dir, lambda ts: _finished(ts) >= 1)
    restartable_s3.stop()
    down = _driver(tmp_path, "run", search_dir, env=_env(tmp_path, MGFA_STORAGE_RETRY_S="2"))  # fails before Ray
    assert down.wait(timeout=120) != 0
    assert "StorageUnavailableError: object store unreachable for 2 s (MGFA_STORAGE_RETRY_S)" in (
        tmp_path / "driver.log").read_text()
    restartable_s3.start()
    _finish(tmp_path, _driver(tmp_path, "run", search_dir, join=shared_cluster))
    _check_one_truth(search_dir, total=4, log_dir=tmp_path / "epoch-log", kills=1)
    # A search on an object store with an RDB study survived the kill: its export comes from there.
    summary = export_search(search_dir, tmp_path / "export")
    assert (tmp_path / "export" / "best_checkpoint" / "state.json").is_file()
    assert summary["best_trial"] == best_trial(_study(search_dir)).user_attrs["ray_trial_id"]


def test_second_driver_on_a_running_search_is_refused(tmp_path, shared_cluster):
    search_dir = _create(tmp_path, "--num-samples", "1", "--max-epochs", "4", "--no-early-stopping")
    hold = tmp_path / "hold"
    hold.touch()  # the first driver's trial waits after epoch 2 until the second driver was refused
    first = _driver(tmp_path, "run", search_dir, env=_env(tmp_path, MGFA_STANDIN_HOLD=str(hold)), join=shared_cluster)
    _wait_for(lambda: any(t.intermediate_values for t in _study(search_dir).get_trials(deepcopy=False)),
              timeout=180, what="a trial's first epoch", proc=first)
    second = _driver(tmp_path, "run", search_dir)  # refused before it starts Ray
    assert second.wait(timeout=120) != 0
    assert f"search {search_dir} is being run by another driver: pid {first.pid}" in (
        tmp_path / "driver.log").read_text()
    assert first.poll() is None  # refused while the first was still running
    hold.unlink()
    _finish(tmp_path, first)
    _check_one_truth(search_dir, total=1, log_dir=tmp_path / "epoch-log", kills=0, max_epochs=4)
