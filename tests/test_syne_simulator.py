"""This project's replay simulator against syne-tune's own (issue 32, item 3): the same syne-tune
scheduler, the same proposals and the same table give the same search in both."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import search_efficiency  # noqa: E402
from replay_policies import CurveTable  # noqa: E402
from syne_policies import TIME_ATTR, SynePolicy  # noqa: E402
from syne_simulator import run_syne_simulator, scheduler_classes  # noqa: E402
from test_benchmark_search_efficiency import synthetic_table  # noqa: E402

from mgfa_ray.search.replay import simulate  # noqa: E402
from mgfa_ray.search.space import load_search_space  # noqa: E402


def test_replay_and_syne_tune_simulator_run_the_same_search(tmp_path):
    """12 configurations x 6 epochs, each configuration's epochs a different length (no ties in time),
    syne-tune's ASHA at grace 1, factor 2, 3 workers: every trial gets the same configuration and runs
    the same epochs in both simulators, each epoch ending at the same simulated time."""
    synthetic_table(tmp_path / "t.parquet", epochs=6)
    frame = pd.read_parquet(tmp_path / "t.parquet")
    frame["time_total_s"] = frame["epoch"] * (1.0 + 0.137 * frame["config"])
    table = CurveTable.from_frame(frame, space=load_search_space(search_efficiency.SPACE))
    seeded = scheduler_classes()[0]

    def make(space, metric, time_attr):
        from syne_tune.optimizer.baselines import ASHA

        return seeded(ASHA(config_space=space, metric=metric, time_attr=time_attr, max_t=6, do_minimize=False,
                           random_seed=5, grace_period=1, reduction_factor=2), 5)

    policy = SynePolicy(table, make_scheduler=make, max_t=6)
    events, runs = simulate(policy, workers=3, max_trials=len(table.curves))
    syne = run_syne_simulator(table, make(policy.config_space, "eval_top1", TIME_ATTR), workers=3,
                              workdir=tmp_path / "syne")
    assert [(r.trial, r.key, r.epochs) for r in runs] == [tuple(t) for t in syne["trials"]]
    assert any(r.stopped and r.epochs < 6 for r in runs) and any(r.epochs == 6 for r in runs)  # ASHA cut some
    # every epoch at the same simulated time up to syne-tune's polling: its tuner starts a trial at its next
    # poll (every 0.1 simulated s), at most 4 starts per worker here; events closer than that may swap order
    ours = {(e.key, e.epoch): e.t for e in events}
    theirs = {(k, e): t for t, _, k, e, _ in syne["events"]}
    assert ours.keys() == theirs.keys()
    assert max(abs(ours[k] - theirs[k]) for k in ours) < 0.5
