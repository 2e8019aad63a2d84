"""Does the mask help? Table III of the paper as a seeded, resumable job, and seeds for a final number.

:func:`run_ablation` (``mgfa-ray ablation JOB``) trains every *cell* — an ablation row × a seed ×
an attention activation — and reports, per row, the mean, standard deviation and
95% confidence interval of top-1 on the test split, the paired difference to the backbone-only row
of the same seed with a paired t-test, and per region class whether the attention learned the masks
(the mask-fit check, below).

Rows (paper Table III): ``backbone`` (α = 1, no attention in the features, no mask loss),
one row per region class (that kind's feature weight and loss weight from the job's ``train``,
the other kinds' weights 0 and their feature share given to α), and ``all`` (the job's weights).
The backbone row does not depend on the activation (its attention is neither used nor trained:
all its weights are 0), so it is trained once per seed and is every activation's reference.

The cells run as the trials of one search (:mod:`mgfa_ray.search.driver`) whose space has nothing to
sample: each cell is a point to evaluate, so the ablation has the search's storage (local, NFS
or object store), driver lock, crash-safe Optuna study and resume: a killed driver, rerun, trains
only the cells not yet finished and continues a cell in flight from its last checkpoint (a cell
that finished just before the kill, before Ray's snapshot recorded it, repeats at most its last
epoch from its checkpoint, with the same result).
:func:`run_seeds` (``mgfa-ray train --config C --seeds N``) runs one config's seeds the same way.

Statistics (``scipy.stats``): 95% CI = mean ± t_{0.975, n-1} · sd / √n over seeds (sd with n - 1);
paired difference d_s = top1(row, seed s) − top1(backbone, seed s), with its t interval and the
two-sided p of ``ttest_rel``; beside the seeds' interval, the test set's own: a 95% Wilson
interval of the mean accuracy on the test split's images (``scipy.stats.binomtest``).

Controls before conclusions: every row reports, per region class and never pooled, the mask-fit
check of :mod:`mgfa_ray.train.mask_fit` — the attention's Eq. 7 error over the position prior's (the
mean training target) on the training images and on the test split. A row whose attention did not
beat the prior on its training images is marked ``NOT LEARNED`` in ``table.md`` (and warned of):
its accuracy difference to the backbone says nothing about the masks.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mgfa_ray.analysis.stats import ci95, paired_difference, test_set_interval
from mgfa_ray.config import (
    AblationConfig,
    ConfigError,
    JobConfig,
    SearchConfig,
    TrainConfig,
    TrainParams,
    absolute,
    validate,
)
from mgfa_ray.search.driver import create_search, run_search
from mgfa_ray.search.export import export_search
from mgfa_ray.search.space import SchedulerSpec, SearchSpace
from mgfa_ray.storage import atomic_write_bytes, atomic_write_json
from mgfa_ray.train.mask_fit import masks_learned

BACKBONE = "backbone"
ALL = "all"
CELL_KEYS = ("alpha", "beta", "gamma", "delta", "lam", "activation", "seed")
"""The trial parameters a cell sets; together they identify it."""


@dataclass(frozen=True)
class Cell:
    """One ablation trial: ``row`` × ``activation`` × ``seed``; ``params`` are its values of
    :data:`CELL_KEYS`. The backbone row's activation is ``"any"``: it trains the same model under
    every activation."""

    row: str
    activation: str
    seed: int
    params: dict[str, Any]


def row_weights(train: TrainParams, *, region_classes: list[str], row: str) -> dict[str, float]:
    """α, β, γ, δ, λ of an ablation row (paper Table III).

    Args:
        train: The job's trial defaults (the paper's weights, or the user's).
        region_classes: The job's region classes (one or two).
        row: ``backbone``, a region class, or ``all``.

    Returns:
        ``{"alpha", "beta", "gamma", "delta", "lam"}``: the kept kinds' feature (β, γ) and loss
        (δ, λ) weights as in ``train``, the others 0; α = ``train.alpha`` + the dropped feature
        weights (1 for the backbone row).

    Raises:
        ConfigError: ``row`` is none of these (the message names ``ablation.rows``).
    """
    kinds = list(region_classes)
    if row == BACKBONE:
        kept: set[int] = set()
    elif row == ALL:
        kept = set(range(len(kinds)))
    elif row in kinds:
        kept = {kinds.index(row)}
    else:
        raise ConfigError(f"ablation.rows: unknown row {row!r}; rows are {BACKBONE!r}, a region class of "
                          f"regions.classes {kinds}, or {ALL!r}")
    feature = [train.beta, train.gamma][: len(kinds)]
    loss = [train.delta, train.lam][: len(kinds)]
    dropped = sum(w for k, w in enumerate(feature) if k not in kept)
    alpha = 1.0 if not kept else train.alpha + dropped  # exactly the job's alpha for "all"
    feature = [w if k in kept else 0.0 for k, w in enumerate(feature)] + [0.0] * (2 - len(kinds))
    loss = [w if k in kept else 0.0 for k, w in enumerate(loss)] + [0.0] * (2 - len(kinds))
    return {"alpha": alpha, "beta": feature[0], "gamma": feature[1], "delta": loss[0], "lam": loss[1]}


def ablation_cells(train: TrainParams, *, region_classes: list[str], ablation: AblationConfig) -> list[Cell]:
    """The cells of an ablation: every row × activation × seed, the backbone row once per seed.

    Seeds are ``train.seed``, ``train.seed + 1``, …; activations default to
    ``train.activation``; rows default to backbone, each region class, and ``all`` (two or more
    kinds).

    Raises:
        ConfigError: More than two region classes, an unknown row, a row named twice, or two rows
            that train the same model (e.g. a kind whose weights in ``train`` are 0); the message
            names the ``ablation`` field.
    """
    kinds = list(region_classes)
    if len(kinds) > 2:
        raise ConfigError(f"ablation: supports one or two region classes (the paper's vein and contour), "
                          f"the job has {len(kinds)}: {kinds}")
    rows = ablation.rows or [BACKBONE, *kinds, *([ALL] if len(kinds) > 1 else [])]
    if len(set(rows)) != len(rows):
        raise ConfigError(f"ablation.rows: a row is named twice: {rows}")
    activations = ablation.activations or [train.activation]
    if len(set(activations)) != len(activations):
        raise ConfigError(f"ablation.activations: an activation is named twice: {activations}")
    weights = {row: row_weights(train, region_classes=kinds, row=row) for row in rows}
    seen: dict[tuple, str] = {}
    for row, w in weights.items():
        key = tuple(sorted(w.items()))
        if key in seen:
            raise ConfigError(f"ablation.rows: rows {seen[key]!r} and {row!r} train the same model ({w}); "
                              f"give the region classes non-zero weights in train, or drop one row")
        seen[key] = row
    cells = []
    for row in rows:
        for activation in ([activations[0]] if row == BACKBONE else activations):
            for i in range(ablation.seeds):
                seed = train.seed + i
                params = {**weights[row], "activation": activation, "seed": seed}
                cells.append(Cell(row=row, activation="any" if row == BACKBONE else activation, seed=seed,
                                  params=params))
    return cells


def cells_space(points: list[dict[str, Any]], *, epochs: int) -> SearchSpace:
    """A search space with nothing to sample: every point is a trial to run, in order; each
    parameter is a categorical of the values the points use. No early stopping."""
    keys = sorted({k for p in points for k in p})
    parameters = {k: {"type": "categorical", "choices": sorted({p[k] for p in points}, key=repr)} for k in keys}
    return validate(SearchSpace, {
        "scheduler": SchedulerSpec(max_epochs=epochs, grace_period=epochs, early_stopping=False).model_dump(),
        "parameters": parameters, "points_to_evaluate": points,
    }, source="cells")


def run_cells(
    *,
    name: str,
    points: list[dict[str, Any]],
    base: TrainConfig,
    search: SearchConfig,
    storage_path: str,
    cache_dir: str | None,
    export_dir: Path,
) -> pd.DataFrame:
    """Train every point (a dict of trial parameters) of ``base`` as a trial of one resumable
    search, and return each trial's final metrics.

    Args:
        name: Search name (its directory under ``storage_path``).
        points: Parameter values of each trial; each must make a valid config with ``base``.
        base: The trial template (paths relative to the working directory, as exported).
        search: Concurrency, resources, storage of the search (``num_samples`` is ``len(points)``).
        storage_path: Directory or object-store URI holding the search.
        cache_dir: Decoded-image cache of the trials.
        export_dir: Where the search's export (trial tables) goes.

    Returns:
        One row per trial (the export's ``trials`` table): ``trial``, ``state`` (COMPLETE / FAIL /
        …), ``epochs_run``, the parameters, and the last epoch's metrics prefixed ``final_``
        (``final_test_top1``, ``final_eval_top1``, ``final_train_fit_prior_<kind>``, …).

    Raises:
        ConfigError: A point does not make a valid trial config, or a search of this name exists
            with other cells.
        RuntimeError: No trial finished.
    """
    for i, p in enumerate(points):
        validate(TrainConfig, {**base.model_dump(), **p}, source=f"{name}: cell {i} {p}")
    space = cells_space(points, epochs=base.epochs)
    search = search.model_copy(update={"num_samples": len(points)})
    search_dir = create_search(
        name=name, space=space, space_file=f"<{len(points)} cells>", search=search, base=base.with_paths(absolute),
        export_base=base, storage_path=storage_path, cache_dir=cache_dir, export_dir=str(export_dir))
    print(f"{len(points)} cells in {search_dir} (a rerun resumes; finished cells are not trained again)", flush=True)
    run_search(search_dir)
    export_search(search_dir, export_dir)
    trials = pd.read_parquet(export_dir / "trials.parquet")
    epochs = pd.read_parquet(export_dir / "trial_epochs.parquet")
    last = epochs.sort_values("training_iteration").groupby("trial").tail(1)
    keep = [c for c in last.columns if c.startswith(("train_", "eval_", "test_"))]
    return trials.merge(last[["trial", *keep]].rename(columns={c: f"final_{c}" for c in keep}), on="trial", how="left")


def result_prefix(trials: pd.DataFrame, eval_split: str) -> tuple[str, str]:
    """Which final metrics report the test split: ``("test", "test")`` when the trials evaluated
    another split and reported ``test_*`` too, else ``("eval", eval_split)``.

    Returns:
        ``(metric prefix, split name)``.
    """
    if eval_split != "test" and "final_test_top1" in trials and trials["final_test_top1"].notna().any():
        return "test", "test"
    return "eval", eval_split


def cell_results(cells: list[Cell], trials: pd.DataFrame, *, region_classes: list[str], prefix: str) -> pd.DataFrame:
    """Each cell's outcome, matched to the trials (:func:`run_cells`) by their parameters: row,
    activation, seed, state, ``top1`` (``final_<prefix>_top1``), ``eval_top1`` (the search metric's
    split) and ``train_loss_ce`` (did the classifier train?) of its last epoch, and the mask-fit check of its
    last epoch (:mod:`mgfa_ray.train.mask_fit`) per region class, never pooled: ``train_fit_prior_<kind>``
    and ``test_fit_prior_<kind>`` (the attention's Eq. 7 error over the position prior's on the
    training images and on the ``prefix`` split), ``train_fit_const_<kind>`` and
    ``test_fit_const_<kind>`` (over the best constant map's); and ``masks_learned``: whether every
    kind the row uses beats the prior on the training images (``None`` for the backbone row,
    whose attention is unused).

    Raises:
        RuntimeError: A cell has no trial (the search does not hold this ablation).
    """
    rows = []
    for cell in cells:
        match = np.ones(len(trials), dtype=bool)
        for k, v in cell.params.items():
            match &= (trials[k] == v).to_numpy()
        if not match.any():
            raise RuntimeError(f"no trial for cell {cell}")
        t = trials[match].iloc[-1]
        done = t["state"] == "COMPLETE"
        fits: dict[str, float] = {}
        for kind in region_classes:
            for split, source in (("train", "train"), ("test", prefix)):
                for term in ("fit_prior", "fit_const"):
                    column = f"final_{source}_{term}_{kind}"
                    fits[f"{split}_{term}_{kind}"] = float(t[column]) if done and column in t else math.nan
        used = [] if cell.row == BACKBONE else [k for k in region_classes if cell.row in (ALL, k)]
        learned = masks_learned(fits, used) if done else None  # reads the train_fit_prior_<kind> ratios
        rows.append({"row": cell.row, "activation": cell.activation, "seed": cell.seed, "state": t["state"],
                     "trial": t["trial"], "top1": float(t[f"final_{prefix}_top1"]) if done else math.nan,
                     "eval_top1": float(t["final_eval_top1"]) if done else math.nan,
                     "train_loss_ce": float(t["final_train_loss_ce"]) if done else math.nan,
                     "masks_learned": learned, **fits,
                     **{k: t[k] for k in ("alpha", "beta", "gamma", "delta", "lam")}})
    return pd.DataFrame(rows)


def row_classes(row: str, region_classes: list[str]) -> list[str]:
    """The region classes whose mask fit a row reports: the kinds it uses; every kind for the
    backbone row (its untrained attention, for reference)."""
    return list(region_classes) if row in (BACKBONE, ALL) else [row]


def ablation_table(results: pd.DataFrame, *, region_classes: list[str], n_test: int | None = None) -> pd.DataFrame:
    """Per (activation, row): n, mean, sd and 95% CI of top-1 over the seeds, the test-set
    interval of the mean (:func:`test_set_interval`), the paired difference in top-1 to the
    backbone row over the seeds both have (``paired_difference``), per region class the mean and
    95% CI of the train and test mask fit against the position prior (``train_fit_prior_<kind>_*``,
    ``test_fit_prior_<kind>_*``; the kinds of :func:`row_classes`), and ``masks_learned`` (seeds whose
    attention beat the prior on the training images for every kind the row uses) of
    ``masks_used`` (seeds; 0 for the backbone row). Ordered: the backbone row, then each
    activation's rows, in the order of ``results``.

    Args:
        results: From :func:`cell_results` (the backbone row's activation is ``any``).
        region_classes: The job's region classes.
        n_test: Images in the test split, for :func:`test_set_interval`.
    """
    backbone = results[results["row"] == BACKBONE].set_index("seed")["top1"]
    activations, rows = list(dict.fromkeys(results["activation"])), list(dict.fromkeys(results["row"]))
    groups = sorted(results.groupby(["activation", "row"], sort=False),
                    key=lambda kv: (kv[0][0] != "any", activations.index(kv[0][0]), rows.index(kv[0][1])))
    out = []
    for (activation, row), g in groups:
        top1 = ci95(g["top1"])
        low, high = test_set_interval(top1["mean"], n_test)
        entry = {"activation": activation, "row": row, "seeds": int(g["seed"].nunique()),
                 "finished": int((g["state"] == "COMPLETE").sum()),
                 **{f"top1_{k}": v for k, v in top1.items() if k != "n"},
                 "top1_test_set_ci_low": low, "top1_test_set_ci_high": high}
        for kind in row_classes(row, region_classes):
            for split in ("train", "test"):
                fit = ci95(g[f"{split}_fit_prior_{kind}"])
                entry.update({f"{split}_fit_prior_{kind}_{k}": fit[k] for k in ("mean", "ci_low", "ci_high")})
        done = g[g["state"] == "COMPLETE"]
        entry["masks_used"] = 0 if row == BACKBONE else len(done)
        entry["masks_learned"] = 0 if row == BACKBONE else int(done["masks_learned"].astype(bool).sum())
        if row != BACKBONE and len(backbone):
            paired = g.set_index("seed")["top1"].to_frame("row").join(backbone.rename("base"), how="inner").dropna()
            entry.update({f"vs_backbone_{k}": v for k, v in paired_difference(paired["row"], paired["base"]).items()})
        out.append(entry)
    return pd.DataFrame(out)


def _fit_cell(r: dict[str, Any], split: str, kinds: list[str]) -> str:
    """``vein 0.82 (0.70–0.94); contour …``: a row's mask fit per region class, mean and 95% CI over seeds."""
    def f(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"

    parts = []
    for kind in kinds:
        key = f"{split}_fit_prior_{kind}"
        if key + "_mean" in r:
            parts.append(f"{kind} {f(r[key + '_mean'])} ({f(r[key + '_ci_low'])}–{f(r[key + '_ci_high'])})")
    return "; ".join(parts) or "—"


def masks_learned_cell(r: dict[str, Any]) -> str:
    """The ``masks learned`` column: ``yes (5/5)`` when every finished seed's attention beat the
    position prior on its training images, ``**NOT LEARNED** (k/n)`` when not (an accuracy
    difference of such a row says nothing about the masks), ``— (unused)`` for the backbone row."""
    used = int(r.get("masks_used", 0) or 0)
    if not used:
        return "— (unused)"
    learned = int(r.get("masks_learned", 0) or 0)
    return f"yes ({learned}/{used})" if learned == used else f"**NOT LEARNED** ({learned}/{used})"


def table_markdown(table: pd.DataFrame, *, split: str, region_classes: list[str]) -> str:
    """The table as Markdown: one line per (activation, row), with its mask-fit columns."""

    def f(x, digits=3):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    lines = [f"| activation | row | seeds | {split} top-1 mean ± sd | 95% CI (seeds) | 95% CI ({split} set) "
             "| Δ vs backbone (95% CI) | paired p | mask fit vs prior, train | mask fit vs prior, "
             f"{split} | masks learned |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        diff = "—"
        if not math.isnan(r.get("vs_backbone_diff_mean", math.nan)):
            diff = f"{r['vs_backbone_diff_mean']:+.3f} ({f(r['vs_backbone_diff_ci_low'])}, {f(r['vs_backbone_diff_ci_high'])})"
        kinds = row_classes(r["row"], region_classes)
        lines.append(
            f"| {r['activation']} | {r['row']} | {r['finished']}/{r['seeds']} | {f(r['top1_mean'])} ± {f(r['top1_sd'])} "
            f"| {f(r['top1_ci_low'])}–{f(r['top1_ci_high'])} "
            f"| {f(r['top1_test_set_ci_low'])}–{f(r['top1_test_set_ci_high'])} | {diff} "
            f"| {f(r.get('vs_backbone_p_value', math.nan))} | {_fit_cell(r, 'train', kinds)} "
            f"| {_fit_cell(r, 'test', kinds)} | {masks_learned_cell(r)} |")
    return "\n".join(lines) + "\n"


def plot_ablation(results: pd.DataFrame, table: pd.DataFrame, path: Path, *, split: str) -> None:
    """One panel per activation: each row's seeds (dots) and mean with its 95% CI (bar), the
    backbone row repeated in every panel as the reference (PNG, matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    activations = [f for f in dict.fromkeys(results["activation"]) if f != "any"] or ["any"]
    fig, axes = plt.subplots(1, len(activations), figsize=(4.5 * len(activations), 4), sharey=True, squeeze=False)
    rows = list(dict.fromkeys(results["row"]))
    for ax, activation in zip(axes[0], activations):
        for x, row in enumerate(rows):
            sel = "any" if row == BACKBONE else activation
            g = results[(results["row"] == row) & (results["activation"] == sel)]
            t = table[(table["row"] == row) & (table["activation"] == sel)]
            if g.empty:
                continue
            ax.scatter(np.full(len(g), x) + np.linspace(-0.12, 0.12, len(g)), g["top1"], s=12, alpha=0.6)
            m = t["top1_mean"].iloc[0]
            lo, hi = t["top1_ci_low"].iloc[0], t["top1_ci_high"].iloc[0]
            yerr = None if math.isnan(lo) else [[m - lo], [hi - m]]
            ax.errorbar([x + 0.25], [m], yerr=yerr, fmt="o", color="black", capsize=4)
        ax.set_xticks(range(len(rows)), rows)
        ax.set_title(activation)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"{split} top-1 (seeds; mean and 95% CI)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def split_size(manifest: str, split: str) -> int:
    """Images in ``split`` of the manifest file (the test-set size of :func:`test_set_interval`)."""
    from mgfa_ray.data.manifest import read_manifest

    return int((read_manifest(manifest)["split"] == split).sum())


def write_table(df: pd.DataFrame, stem: Path) -> None:
    """Write ``df`` atomically as ``<stem>.parquet`` and ``<stem>.csv`` (the ablation's and ``train --seeds``' tables)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(stem.with_suffix(".parquet"), buf.getvalue())
    atomic_write_bytes(stem.with_suffix(".csv"), df.to_csv(index=False).encode())


def run_ablation(job: JobConfig, *, ablation: AblationConfig | None = None, smoke: bool = False) -> dict[str, Any]:
    """``mgfa-ray ablation JOB``: the job's data stages (skipped when done), then every cell, then
    the table. Writes to ``<output_dir>/ablation/<job name>/`` (job files that share an output
    directory share its detector and masks, and keep their ablations apart): ``cells.{parquet,csv}``
    (one line per cell), ``table.{parquet,csv,md}``, ``ablation.png``, ``ablation.json`` (settings
    and summary), the search (``search/``) and its export (``export/``).

    Args:
        job: The job (its ``train`` weights are the ``all`` row's).
        ablation: Rows, seeds, activations (default ``job.ablation``).
        smoke: The job shrunk by :func:`mgfa_ray.pipeline.smoke_config`, 1 epoch per cell.

    Returns:
        The summary written to ``ablation.json``.

    Raises:
        ConfigError: Bad rows, activations or job (the message names the field).
        LockedError: Another driver runs this job or ablation.
        RuntimeError: No cell finished.
    """
    from mgfa_ray.pipeline import job_directory, prepare_data, prepared_job

    ablation = ablation or job.ablation
    job, _ = prepared_job(job, smoke=smoke)
    cells = ablation_cells(job.train, region_classes=job.regions.classes, ablation=ablation)
    with job_directory(job) as (out, data_root):
        timings: dict[str, float] = {}
        base, _, set_dir, _ = prepare_data(job, data_root=data_root, out=out, timings=timings)
        if smoke:
            base = base.model_copy(update={"epochs": 1})
        print(f"\n=== mgfa-ray: ablation ({len(cells)} cells) ===", flush=True)
        t = time.perf_counter()
        search = job.search.model_copy(update={"max_concurrent": ablation.max_concurrent or job.search.max_concurrent})
        dest = out / "ablation" / job.name
        trials = run_cells(name=f"{job.name}-ablation", points=[c.params for c in cells], base=base, search=search,
                           storage_path=str(dest / "search"), cache_dir=str(out / "cache"),
                           export_dir=dest / "export")
        timings["ablation"] = time.perf_counter() - t
    prefix, split = result_prefix(trials, base.eval_split)
    kinds = job.regions.classes
    results = cell_results(cells, trials, region_classes=kinds, prefix=prefix)
    table = ablation_table(results, region_classes=kinds, n_test=split_size(base.manifest, split))
    write_table(results, dest / "cells")
    write_table(table, dest / "table")
    markdown = table_markdown(table, split=split, region_classes=kinds)
    atomic_write_bytes(dest / "table.md", markdown.encode())
    for r in table.to_dict("records"):
        if r["masks_used"] and r["masks_learned"] < r["masks_used"]:
            print(f"warning: masks not learned in row {r['row']} ({r['activation']}): the attention beat the position "
                  f"prior on the training images in {r['masks_learned']} of {r['masks_used']} seeds; its accuracy "
                  "difference to the backbone says nothing about the masks", flush=True)
    plot_ablation(results, table, dest / "ablation.png", split=split)
    summary = {"job": job.name, "smoke": smoke, "cells": len(cells), "split": split, "mask_set": set_dir,
               "ablation": ablation.model_dump(), "train": base.model_dump(mode="json"),
               "states": results["state"].value_counts().to_dict(), "timings_seconds": timings,
               "table": json.loads(table.to_json(orient="records"))}
    atomic_write_json(dest / "ablation.json", summary)
    print("\n" + markdown + f"\n=== mgfa-ray: ablation table in {dest / 'table.md'}, plot {dest / 'ablation.png'}",
          flush=True)
    return summary


