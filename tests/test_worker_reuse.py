"""Reused trial workers carry nothing over, and fractional resources pack trials as asked.

A reused worker (``search.reuse_workers``, Ray Tune's ``reuse_actors``) keeps the decoded data and
the weights file between trials (:mod:`mgfa_ray.train.worker`); the same config must still give the same
result, bit for bit on CPU, as in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mgfa_ray.cache import TRIAL_DATA
from mgfa_ray.config import SearchConfig
from mgfa_ray.search.driver import create_search, ray_trials, run_search
from mgfa_ray.search.space import load_search_space
from mgfa_ray.train.checkpoint import load_checkpoint
from mgfa_ray.train.trial import run_trial
from test_search_resume import _create

DRIVER = Path(__file__).with_name("search_driver.py")
RESULT_KEYS = ("train_loss", "train_loss_ce", "train_loss_vein", "train_loss_contour", "eval_top1",
               "eval_loss_ce", "eval_loss_vein", "eval_loss_contour", "test_top1", "test_loss_vein",
               "train_fit_prior_vein", "eval_fit_prior_contour", "train_masks_learned")
POINT_A = {"lr": 0.01, "seed": 0, "resize": 72}
POINT_B = {"lr": 0.05, "seed": 3, "resize": 80}  # other data (resize), RNG stream and optimizer state


def _results(history) -> list[tuple]:
    return [tuple(epoch[k] for k in RESULT_KEYS) for epoch in history]


def test_same_config_after_another_in_the_same_process_is_bit_identical(tiny_train_config, mobilenet_weights):
    cfg = tiny_train_config.model_copy(update={"weights": str(mobilenet_weights), "threads": 1})
    a = cfg.model_copy(update=POINT_A)
    b = cfg.model_copy(update=POINT_B)
    TRIAL_DATA.clear()  # an earlier test may have left a's data
    hits = TRIAL_DATA.hits
    first = run_trial(a)
    run_trial(a)
    assert TRIAL_DATA.hits == hits + 1  # the second run took the kept data
    other = run_trial(b)
    again = run_trial(a)  # after b replaced the kept data and moved the global RNG on
    assert _results(again) == _results(first)
    assert _results(other) != _results(first)


def _space(tmp_path: Path, points: list[dict], cfg) -> tuple:
    doc = {"scheduler": {"max_epochs": 2, "early_stopping": False},
           "parameters": {"lr": {"type": "categorical", "choices": [0.01, 0.05]},
                          "seed": {"type": "categorical", "choices": [0, 3]},
                          "resize": {"type": "categorical", "choices": [72, 80]}},
           "points_to_evaluate": points}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_search_space(path, base=cfg), str(path)


def _run(tmp_path: Path, cfg, points: list[dict], *, reuse: bool) -> list[dict]:
    space, space_file = _space(tmp_path, points, cfg)
    search = SearchConfig(space=space_file, num_samples=len(points), max_concurrent=1, cpus_per_trial=1,
                          reuse_workers=reuse)
    search_dir = create_search(name="reuse" if reuse else "fresh", space=space, space_file=space_file, search=search,
                               base=cfg, storage_path=str(tmp_path / "searches"))
    run_search(search_dir)
    rows = ray_trials(search_dir).to_dict("records")
    return sorted(rows, key=lambda r: r["optuna_trial"])


@pytest.mark.slow
def test_reused_ray_worker_gives_bit_identical_trial(ray_cluster, tiny_train_config, mobilenet_weights, tmp_path):
    cfg = tiny_train_config.model_copy(update={"weights": str(mobilenet_weights)})
    reused_b, reused_a = _run(tmp_path, cfg, [POINT_B, POINT_A], reuse=True)
    (fresh_a,) = _run(tmp_path, cfg, [POINT_A], reuse=False)

    for row in (reused_b, reused_a, fresh_a):
        assert row["ray_status"] == "TERMINATED" and row["epochs_run"] == 2
    hist_b, hist_a, hist_fresh = reused_b["history"], reused_a["history"], fresh_a["history"]
    # a ran in b's process, as its second trial; the reference ran first in a process of its own
    assert hist_a["worker_pid"].iloc[0] == hist_b["worker_pid"].iloc[0]
    assert hist_b["worker_trial"].iloc[0] == 1 and hist_a["worker_trial"].iloc[0] == 2
    assert hist_fresh["worker_trial"].iloc[0] == 1
    assert hist_fresh["worker_pid"].iloc[0] != hist_a["worker_pid"].iloc[0]

    assert list(hist_a.lr) == list(hist_fresh.lr)
    for key in RESULT_KEYS:  # exactly equal; NaN (a mask metric of a split without that region) equals NaN
        np.testing.assert_array_equal(hist_a[key].to_numpy(), hist_fresh[key].to_numpy(), err_msg=key)
    assert list(hist_b["eval_loss_ce"]) != list(hist_a["eval_loss_ce"])
    state_a, state_fresh = load_checkpoint(reused_a["checkpoint"] + "/checkpoint.pt"), \
        load_checkpoint(fresh_a["checkpoint"] + "/checkpoint.pt")
    assert state_a["model"].keys() == state_fresh["model"].keys()
    assert all(torch.equal(state_a["model"][k], state_fresh["model"][k]) for k in state_a["model"])
    assert torch.equal(state_a["torch_rng"], state_fresh["torch_rng"])


def test_reused_worker_waits_for_a_slow_unwinding_trial(ray_cluster, tmp_path):
    """Without :func:`allow_slow_unwind` Ray 2.60 waits 2 s for the stopped trial's thread, then fails the
    next trial ("Trainable runner reuse requires reset_config() ...", seen in a live search of 4 trials
    on 2 cores) or, with this stand-in, never starts it: the search below then does not finish."""
    import threading

    from ray import tune

    def slow_unwinding_trial(config: dict) -> None:  # local: Ray pickles it by value for its workers
        """A stand-in trial whose thread needs 3 s to unwind after Ray stops it (Ray waits 2 s by default)."""
        import time

        from mgfa_ray.train.worker import allow_slow_unwind

        allow_slow_unwind()
        try:
            tune.report({"pid": os.getpid()})  # the stop at iteration 1 ends the thread here
        finally:
            time.sleep(3)

    tuner = tune.Tuner(slow_unwinding_trial, param_space={"n": tune.grid_search([0, 1])},
                       tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), stop={"training_iteration": 1},
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    out: list = []
    fit = threading.Thread(target=lambda: out.append(tuner.fit()), daemon=True)
    fit.start()
    fit.join(timeout=120)
    assert out, "the second trial never ran in the reused worker"
    grid = out[0]
    assert [r.error for r in grid] == [None, None]
    assert [r.metrics["training_iteration"] for r in grid] == [1, 1]
    assert len({r.metrics["pid"] for r in grid}) == 1  # both trials ran in one reused worker


@pytest.mark.slow
def test_fractional_gpus_pack_four_trials_at_once(tmp_path):
    """8 stand-in trials, each 0.5 CPU and 0.25 GPU, on a cluster of 4 CPUs and 1 GPU: the GPU
    allows 4 at once (the CPUs 8), so exactly 4 run together, and reused workers serve them. Each
    trial waits until 4 have started (a barrier): were Ray to run only 3 at once, the barrier would
    time out and the spans overlap 3 deep; were it to run 5, they would overlap 5 deep."""
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "MGFA_STANDIN_EPOCH_S": "1.5", "MGFA_STANDIN_LOG": str(log), "RAY_ADDRESS": "",
           "MGFA_STANDIN_BARRIER": "4"}
    search_dir = _create(tmp_path, "--num-samples", "8", "--max-epochs", "2", "--max-concurrent", "8",
                         "--no-early-stopping", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.25")
    subprocess.run([sys.executable, str(DRIVER), "run", search_dir, "--ray-cpus", "4", "--ray-gpus", "1"],
                   env=env, capture_output=True, text=True, check=True, timeout=300)

    spans = [tuple(float(x) for x in p.read_text().split()) for p in log.glob("span-*")]
    assert len(spans) == 8
    events = sorted([(start, 1) for start, _, _ in spans] + [(end, -1) for _, end, _ in spans])
    running, most = 0, 0
    for _, step in events:  # at equal times an end (-1) sorts first: a slot handed on is not an overlap
        running += step
        most = max(most, running)
    assert most == 4
    assert len({pid for _, _, pid in spans}) < 8  # some trials ran in a reused worker


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_returns_to_its_level_between_trials(tiny_train_config):
    """What a reused worker does between trials: after release_trial_memory the CUDA memory still
    allocated is the same after every trial (torch keeps e.g. cuBLAS workspaces; nothing of a
    trial's model, optimizer or data stays), and the blocks the trial had reserved are handed back."""
    from mgfa_ray.train.worker import release_trial_memory

    cfg = tiny_train_config.model_copy(update={"device": "cuda", "epochs": 1})
    levels = []
    for update in (POINT_A, POINT_B, POINT_A):
        torch.cuda.reset_peak_memory_stats()
        run_trial(cfg.model_copy(update=update))
        release_trial_memory()
        levels.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.max_memory_reserved()))
    assert levels[1][0] == levels[0][0] and levels[2][0] == levels[0][0]
    assert all(reserved < peak for _, reserved, peak in levels)  # the trial's cached blocks were handed back
