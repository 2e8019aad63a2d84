"""Table III as a job: rows and cells, the statistics against hand-computed values, bad input, and the
real command on tiny data with its driver SIGKILLed and resumed; seeds for a final number."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState
from test_search_resume import _check_one_truth

from mgfa_ray.analysis.ablation import ablation_cells, ablation_table, row_weights, table_markdown
from mgfa_ray.analysis.stats import ci95, paired_difference
from mgfa_ray.cli import main
from mgfa_ray.config import AblationConfig, ConfigError, TrainConfig, TrainParams, load_config
from mgfa_ray.search.export import export_search
from mgfa_ray.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAPER = TrainParams()  # alpha 0.3, beta 0.5, gamma 0.2, delta = lam = 0.1


def test_rows_keep_their_kinds_weights_and_give_the_rest_to_alpha():
    kinds = ["vein", "contour"]
    assert row_weights(PAPER, region_classes=kinds, row="backbone") == \
        {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0, "lam": 0.0}
    assert row_weights(PAPER, region_classes=kinds, row="vein") == \
        {"alpha": 0.5, "beta": 0.5, "gamma": 0.0, "delta": 0.1, "lam": 0.0}
    contour = row_weights(PAPER, region_classes=kinds, row="contour")
    assert contour == {"alpha": pytest.approx(0.8), "beta": 0.0, "gamma": 0.2, "delta": 0.0, "lam": 0.1}
    assert row_weights(PAPER, region_classes=kinds, row="all") == \
        {"alpha": 0.3, "beta": 0.5, "gamma": 0.2, "delta": 0.1, "lam": 0.1}
    one = TrainParams(alpha=0.3, beta=0.7, gamma=0.0, lam=0.0)  # the Cotton boxes: one region class
    assert row_weights(one, region_classes=["region"], row="region") == \
        {"alpha": pytest.approx(0.3), "beta": 0.7, "gamma": 0.0, "delta": 0.1, "lam": 0.0}


def test_cells_run_the_backbone_once_per_seed_and_every_other_row_per_formulation():
    ablation = AblationConfig(seeds=3, activations=["softmax", "softmax_scaled", "sigmoid"])
    cells = ablation_cells(PAPER.model_copy(update={"seed": 10}), region_classes=["vein", "contour"],
                           ablation=ablation)
    assert len(cells) == 3 + 3 * 3 * 3  # backbone x 3 seeds, then 3 rows x 3 activations x 3 seeds
    assert [c.row for c in cells[:3]] == ["backbone"] * 3 and {c.activation for c in cells[:3]} == {"any"}
    assert {c.seed for c in cells} == {10, 11, 12}
    keys = [tuple(sorted(c.params.items())) for c in cells]
    assert len(set(keys)) == len(keys)  # every cell trains a different config
    assert {c.params["activation"] for c in cells if c.row == "all"} == {"softmax", "softmax_scaled", "sigmoid"}
    # One region class: the default rows are backbone and that kind ("all" would be the same model).
    cells = ablation_cells(TrainParams(beta=0.7, gamma=0.0, lam=0.0), region_classes=["region"],
                           ablation=AblationConfig(seeds=1))
    assert [c.row for c in cells] == ["backbone", "region"]


def test_bad_rows_are_errors_naming_the_field():
    with pytest.raises(ConfigError, match=r"ablation.rows: unknown row 'leaf'.*\['vein', 'contour'\]"):
        ablation_cells(PAPER, region_classes=["vein", "contour"], ablation=AblationConfig(rows=["backbone", "leaf"]))
    with pytest.raises(ConfigError, match="named twice"):
        ablation_cells(PAPER, region_classes=["vein", "contour"], ablation=AblationConfig(rows=["vein", "vein"]))
    no_vein = TrainParams(alpha=0.8, beta=0.0, gamma=0.2, delta=0.0)
    with pytest.raises(ConfigError, match="rows 'backbone' and 'vein' train the same model"):
        ablation_cells(no_vein, region_classes=["vein", "contour"], ablation=AblationConfig())


@pytest.mark.parametrize(("args", "field"), [
    (["--rows", "backbone", "vein"], "ablation.rows: unknown row 'vein'"),  # the Cotton job has one kind
    (["--seeds", "0"], "ablation.seeds"),
    (["--activations", "relu"], "ablation.activations"),
])
def test_ablation_cli_rejects_bad_input_before_any_stage(args, field, capsys, tmp_path):
    rc = main(["ablation", "jobs/cotton80_paper.yaml", "--output-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and field in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_confidence_interval_and_paired_test_against_hand_computed_values():
    # mean 0.6, sd 0.1 (n - 1), t_{0.975, 2} = 4.302653: half-width 4.302653 * 0.1 / sqrt(3) = 0.248414
    s = ci95([0.5, 0.6, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.1)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.6 - 0.248414, 0.6 + 0.248414), abs=1e-6)
    one = ci95([0.4, math.nan])
    assert one["n"] == 1 and one["mean"] == 0.4 and math.isnan(one["ci_low"])
    # Paired: d = (0.1, 0.05, 0.1, 0.05), mean 0.075, sd 0.0288675, t = 0.075 / (0.0288675 / 2) = 5.196152,
    # df 3: two-sided p = 0.013846, t_{0.975, 3} = 3.182446, half-width 3.182446 * 0.0288675 / 2 = 0.045934.
    a, b = [0.6, 0.7, 0.8, 0.75], [0.5, 0.65, 0.7, 0.7]
    d = paired_difference(a, b)
    assert d["n"] == 4 and d["diff_mean"] == pytest.approx(0.075)
    assert (d["diff_ci_low"], d["diff_ci_high"]) == pytest.approx((0.075 - 0.045934, 0.075 + 0.045934), abs=1e-6)
    assert d["p_value"] == pytest.approx(0.013846, abs=1e-6)
    # Unpaired (Welch) on the same numbers would give p = 0.39: pairing by seed is what is tested.
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([0.1, 0.2], [0.1])


def test_table_pairs_each_row_with_the_backbone_of_the_same_seed():
    results = pd.DataFrame({
        "row": ["backbone"] * 3 + ["all"] * 3 + ["all"] * 2,
        "activation": ["any"] * 3 + ["sigmoid"] * 3 + ["softmax"] * 2,
        "seed": [0, 1, 2, 0, 1, 2, 0, 2],
        "state": ["COMPLETE"] * 8,
        "top1": [0.50, 0.60, 0.40, 0.55, 0.70, 0.42, 0.40, 0.40],
        "train_fit_prior_vein": [1.0, 1.1, 0.9, 0.5, 0.6, 0.7, 0.9, 1.2],
        "test_fit_prior_vein": [1.0, 1.1, 0.9, 0.8, 0.9, 1.0, 0.9, 1.3],
        "masks_learned": [None, None, None, True, True, True, True, False],
    })
    table = ablation_table(results, region_classes=["vein"], n_test=100).set_index(["activation", "row"])
    assert math.isnan(table.loc[("any", "backbone"), "vs_backbone_n"])  # the reference is not paired with itself
    assert table.loc[("any", "backbone"), "top1_mean"] == pytest.approx(0.5)
    sig = table.loc[("sigmoid", "all")]
    assert sig["vs_backbone_n"] == 3 and sig["vs_backbone_diff_mean"] == pytest.approx((0.05 + 0.10 + 0.02) / 3)
    assert sig["train_fit_prior_vein_mean"] == pytest.approx(0.6) and sig["top1_mean"] == pytest.approx(1.67 / 3)
    assert sig["test_fit_prior_vein_mean"] == pytest.approx(0.9)
    assert (sig["masks_learned"], sig["masks_used"]) == (3, 3)
    soft = table.loc[("softmax", "all")]  # seeds 0 and 2 only: paired with backbone seeds 0 and 2
    assert soft["vs_backbone_n"] == 2 and soft["vs_backbone_diff_mean"] == pytest.approx(((0.4 - 0.5) + 0.0) / 2)
    assert (soft["masks_learned"], soft["masks_used"]) == (1, 2)
    # the test set's own interval: Wilson for 50 of 100 is 0.404-0.596
    assert (table.loc[("any", "backbone"), "top1_test_set_ci_low"],
            table.loc[("any", "backbone"), "top1_test_set_ci_high"]) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    markdown = table_markdown(table.reset_index(), split="test", region_classes=["vein"])
    lines = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in markdown.splitlines()[2:]}
    assert lines["softmax/all"].rstrip().endswith("| **NOT LEARNED** (1/2) |")
    assert lines["sigmoid/all"].rstrip().endswith("| yes (3/3) |")
    assert "| vein 0.60 (" in lines["sigmoid/all"] and "— (unused)" in lines["any/backbone"]


def _tiny_job(tmp_path: Path) -> Path:
    """The main job on 3 species x 8 photos with the hand-drawn boxes as masks (no detector), a
    tiny MobileNetV2 from scratch, 2 epochs per cell, 2 rows x 2 seeds."""
    job = yaml.safe_load((REPO / "jobs" / "leafsnap20.yaml").read_text())
    job["output_dir"] = str(tmp_path / "job")
    job["dataset"].update(max_classes=3, max_per_class=8, val_fraction=0.25, test_fraction=0.25)
    job["regions"].update(source="labels", unlabelled="empty")
    job["masks"].update(num_actors=1, resolution=32)
    job["train"].update(weights=None, resize=72, train_crop=64, batch_size=8, epochs=2, lr=0.01, momentum=0.9,
                        output_stride=16, crop_to_region="contour")
    job["search"].update(max_concurrent=2)
    job["ablation"] = {"rows": ["backbone", "all"], "seeds": 2, "activations": ["softmax_scaled"]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _study(job_dir: Path):
    import optuna

    from mgfa_ray.search.study import StudyRef

    journal = job_dir / "ablation" / "leafsnap20" / "search" / "leafsnap20-ablation" / "optuna.journal"
    try:
        return StudyRef(str(journal), "leafsnap20-ablation").load()
    except (KeyError, optuna.exceptions.StorageInternalError, FileNotFoundError):
        return None


@pytest.mark.slow
def test_ablation_driver_killed_then_resumed_reruns_no_finished_cell(tmp_path, shared_cluster):
    job_file = _tiny_job(tmp_path)
    job_dir = tmp_path / "job"
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "mgfa-ray"), "ablation", str(job_file)]
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115 — closed below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        study = _study(job_dir)
        if study is not None and any(t.state == TrialState.COMPLETE for t in study.trials):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no cell finished in time")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    finished = [t for t in _study(job_dir).trials if t.state == TrialState.COMPLETE]
    runs = job_dir / "ablation" / "leafsnap20" / "search" / "leafsnap20-ablation" / "runs" / "run-0"
    before = {}
    for t in finished:  # each finished cell's per-epoch record, as the kill left it
        (result,) = runs.glob(f"*{t.user_attrs['ray_trial_id']}*/result.json")
        before[t.number] = (result, result.read_bytes())
    assert 1 <= len(before) < 4

    # The rerun joins a running cluster (the tests' shared one), as a rerun on a `ray start` cluster does.
    rerun = subprocess.run(cmd, cwd=REPO, env={**env, "RAY_ADDRESS": shared_cluster}, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for number, (result, content) in before.items():  # not trained again
        after = result.read_bytes()
        assert after.startswith(content), f"cell {number}: its record was rewritten"
        old = [json.loads(line) for line in content.decode().splitlines()]
        extra = [json.loads(line) for line in after[len(content):].decode().splitlines()]
        # At most its last epoch again, from its checkpoint, with the same result: the cell finished
        # in the moment before the kill, before Ray's snapshot recorded it (the search's guarantee).
        assert len(extra) <= 1, f"cell {number} was trained again: {len(extra)} more epochs"
        for e in extra:
            assert e["training_iteration"] == old[-1]["training_iteration"] == 2
            assert (e["train_loss"], e["test_top1"]) == (old[-1]["train_loss"], old[-1]["test_top1"])
    study = _study(job_dir)
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    # The search's guarantees with the real classifier (the stand-in's in test_search_resume.py):
    # Ray and Optuna agree, and the export's best checkpoint is the end of a finished cell.
    search_dir = str(job_dir / "ablation" / "leafsnap20" / "search" / "leafsnap20-ablation")
    _check_one_truth(search_dir, total=4, kills=1, max_epochs=2)
    export_search(search_dir, tmp_path / "export")
    assert load_config(TrainConfig, tmp_path / "export" / "best_config.yaml").epochs == 2
    assert load_checkpoint(tmp_path / "export" / "best_checkpoint" / "checkpoint.pt")["epoch"] == 2

    out = job_dir / "ablation" / "leafsnap20"
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(zip(cells["row"], cells["seed"])) == [("all", 0), ("all", 1), ("backbone", 0), ("backbone", 1)]
    assert (cells["state"] == "COMPLETE").all() and cells["top1"].between(0, 1).all()
    assert set(cells.loc[cells["row"] == "all", "activation"]) == {"softmax_scaled"}
    table = pd.read_csv(out / "table.csv").set_index("row")
    paired = cells.pivot(index="seed", columns="row", values="top1")
    assert table.loc["all", "vs_backbone_n"] == 2
    assert table.loc["all", "vs_backbone_diff_mean"] == pytest.approx((paired["all"] - paired["backbone"]).mean())
    assert table.loc["backbone", "top1_mean"] == pytest.approx(paired["backbone"].mean())
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| softmax_scaled | all | 2/2 |" in (out / "table.md").read_text()
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["cells"] == 4 and summary["split"] == "test" and summary["states"] == {"COMPLETE": 4}
    # The mask-fit check per kind, never pooled: the trial's own last-epoch ratios, and a row is
    # "learned" exactly where every kind it uses beats the prior on the training images.
    epochs = pd.read_parquet(out / "export" / "trial_epochs.parquet")
    last = epochs.sort_values("training_iteration").groupby("trial").tail(1).set_index("trial")
    for kind in ("vein", "contour"):
        np.testing.assert_allclose(cells[f"train_fit_prior_{kind}"],
                                   last.loc[cells["trial"], f"train_fit_prior_{kind}"].to_numpy())
        assert (cells[f"train_fit_prior_{kind}"] > 0).all()
    used = cells["row"] == "all"
    learned = (cells.loc[used, "train_fit_prior_vein"] < 1) & (cells.loc[used, "train_fit_prior_contour"] < 1)
    assert (cells.loc[used, "masks_learned"].astype(bool) == learned).all()
    assert cells.loc[~used, "masks_learned"].isna().all()
    assert table.loc["all", "masks_learned"] == learned.sum() and table.loc["all", "masks_used"] == 2


@pytest.mark.slow
def test_train_seeds_reports_mean_and_interval_of_real_seeds(tmp_path, tiny_train_config, shared_cluster):
    from mgfa_ray.config import to_dict
    from mgfa_ray.train.trial import run_trial

    cfg = tiny_train_config.model_copy(update={"threads": 1, "seed": 3})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    out = tmp_path / "seeds"
    run = subprocess.run([str(BIN / "mgfa-ray"), "train", "--config", str(config), "--seeds", "2",
                          "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_ADDRESS": shared_cluster})  # seeds on a running cluster
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    per_seed = pd.read_csv(out / "seeds.csv").sort_values("seed")
    assert per_seed["seed"].tolist() == [3, 4] and (per_seed["state"] == "COMPLETE").all()
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["top1_n"] == 2 and summary["top1_mean"] == pytest.approx(per_seed["top1"].mean())
    assert summary["split"] == "test" and "95% CI" in run.stdout
    # Seed 4 through Ray is the plain trial of seed 4 (CPU, one thread: bit for bit).
    direct = run_trial(cfg.model_copy(update={"seed": 4}))
    assert per_seed["top1"].iloc[1] == direct[-1]["test_top1"]
    # Each seed's mask-fit verdict is its last epoch's, and the summary counts them.
    assert per_seed["masks_learned"].iloc[1] == bool(direct[-1]["train_masks_learned"])
    assert summary["masks_learned"] == int(per_seed["masks_learned"].sum())
    assert ("masks not learned in" in run.stdout) == (summary["masks_learned"] < 2)
