"""The search-efficiency benchmark on a small synthetic curve table: every method runs to the same
epoch budget, random search's target is its own best finished trial, and ratios are against it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def synthetic_table(path: Path, n: int = 12, epochs: int = 20) -> None:
    """``n`` configurations sampled from the benchmark's space, each with a saturating curve whose
    level depends on lr (best near 3e-3), one second per epoch."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import search_efficiency

    from replay_policies import PARAM_PREFIX
    from mgfa_ray.search.space import define_by_run, load_search_space

    space = load_search_space(search_efficiency.SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    rows = []
    for config in range(n):
        trial = study.ask()
        define_by_run(trial, space=space)
        level = max(0.05, 0.9 - 0.15 * (math.log10(trial.params["lr"]) + 2.5) ** 2)
        for e in range(1, epochs + 1):
            value = level * (1 - 0.8 ** e)
            rows.append({"config": config, "epoch": e, "eval_top1": value, "test_top1": value - 0.01,
                         "time_total_s": float(e), **{PARAM_PREFIX + k: v for k, v in trial.params.items()}})
    pd.DataFrame(rows).to_parquet(path)


def test_compare_runs_every_method_to_the_same_budget(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import search_efficiency

    synthetic_table(tmp_path / "t.parquet")
    action, s = search_efficiency.parse_args(["compare", "--preset", "smoke", "--table", str(tmp_path / "t.parquet"),
                                              "--seeds", "0", "1", "--budget-trials", "12"])
    doc = search_efficiency.compare(s)
    (result,) = doc["results"]
    summary = result["summary"]
    assert set(summary) == set(search_efficiency.methods(5, 2, 20, 12))
    assert summary["random"]["per_seed_ratio"] == [1.0, 1.0]
    for seed in result["per_seed"]:
        random = seed["methods"]["random"]
        assert random["trials"] == 12 and random["reached"]
        assert random["best_at_budget"]["1"]["val"] == seed["target"]
        for name, m in seed["methods"].items():  # stopped trials leave room in the budget for more
            assert m["trials"] >= 12 and m["epochs_to_target"] <= 12 * 20
            assert m["epochs_to_target_any_epoch"] <= m["epochs_to_target"]
    # The omniscient floor: no method that keeps its 4 workers busy finishes a target trial sooner
    # (every epoch takes 1 s here, so up to 3 epochs of other workers may tie with its last).
    floors = {f["seed"]: f for f in doc["floor"]["per_seed"]}
    assert sorted(floors) == [0, 1]
    for seed in result["per_seed"]:
        floor = floors[seed["seed"]]
        assert 20 <= floor["epochs_to_target"] <= 4 * 20 and 0 < floor["ratio"] <= 1
        assert all(m["epochs_to_target"] >= floor["epochs_to_target"] - 3 for m in seed["methods"].values())
