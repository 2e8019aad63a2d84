"""The search through real Ray Tune + Optuna on tiny real data, and its export."""

import pandas as pd
import pytest
import yaml

from mgfa_ray.config import SearchConfig, TrainConfig, load_config
from mgfa_ray.search import export_results, run_search
from mgfa_ray.search_space import load_search_space
from mgfa_ray.trial import run_trial


def _space(tmp_path, doc):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_search_space(path)


def test_trial_through_ray_equals_direct_call(ray_cluster, tiny_train_config, tmp_path):
    cfg = tiny_train_config.model_copy(update={"epochs": 1, "threads": 1})
    direct = run_trial(cfg)
    space = _space(tmp_path, {"scheduler": {"max_epochs": 1}, "parameters": {"lr": 0.01}})
    results = run_search(name="direct", space=space, search=SearchConfig(space="-", num_samples=1, cpus_per_trial=1),
                         base=cfg, storage_path=tmp_path / "search")
    (result,) = list(results)
    assert result.error is None
    assert result.metrics["train_loss"] == direct[0]["train_loss"]
    assert result.metrics["eval_top1"] == direct[0]["eval_top1"]
    assert result.checkpoint is not None


def test_search_samples_simplex_stops_early_and_exports(ray_cluster, tiny_train_config, tmp_path):
    space = _space(tmp_path, {
        "scheduler": {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2},
        "simplex": ["alpha", "beta", "gamma"],
        "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}},
        "points_to_evaluate": [{"alpha": 0.3, "beta": 0.5, "gamma": 0.2, "lr": 0.01}],
    })
    search = SearchConfig(space="-", num_samples=4, max_concurrent=2, cpus_per_trial=1, seed=0)
    results = run_search(name="s", space=space, search=search, base=tiny_train_config, storage_path=tmp_path / "search")
    summary = export_results(results, search=search, base=tiny_train_config, max_epochs=2, out_dir=tmp_path / "export")

    trials = pd.read_parquet(tmp_path / "export" / "trials.parquet")
    assert len(trials) == 4 and (trials["state"] == "TERMINATED").all()
    assert ((trials["alpha"] + trials["beta"] + trials["gamma"]) - 1.0).abs().max() <= 1e-9
    assert ((trials[["alpha", "beta", "gamma"]] >= 0).all()).all()
    assert set(trials["epochs_run"]) <= {1, 2}
    assert trials["stopped_early"].tolist() == (trials["epochs_run"] < 2).tolist()
    assert summary["total_trial_epochs"] == trials["epochs_run"].sum()
    paper = trials[(trials["lr"] == 0.01) & ((trials["alpha"] - 0.3).abs() < 1e-12)
                   & ((trials["beta"] - 0.5).abs() < 1e-12) & ((trials["gamma"] - 0.2).abs() < 1e-12)]
    assert len(paper) == 1  # the point to evaluate ran, exactly once
    assert pd.read_csv(tmp_path / "export" / "trials.csv").shape[0] == 4
    epochs = pd.read_parquet(tmp_path / "export" / "trial_epochs.parquet")
    assert len(epochs) == trials["epochs_run"].sum()

    best = load_config(TrainConfig, tmp_path / "export" / "best_config.yaml")
    assert best.epochs == 2 and best.manifest == tiny_train_config.manifest
    best_row = trials.loc[trials["trial"] == summary["best_trial"]].iloc[0]
    assert best.lr == pytest.approx(best_row["lr"]) and best.alpha == pytest.approx(best_row["alpha"])
    assert summary["best_eval_top1"] == best_row["eval_top1"] == trials["eval_top1"].max()
