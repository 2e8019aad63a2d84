"""``mgfa-ray train CONFIG --seeds N``: one configuration trained with N seeds, next to the backbone
alone with the same seeds, reported as means with 95% confidence intervals and a paired difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mgfa_ray.analysis.ablation import result_prefix, run_cells, write_table
from mgfa_ray.analysis.stats import ci95
from mgfa_ray.config import (
    SearchConfig,
    TrainConfig,
    relative_to_cwd,
)
from mgfa_ray.errors import InputError
from mgfa_ray.runtime import ensure_ray
from mgfa_ray.storage import atomic_write_json


def run_seeds(cfg: TrainConfig, *, name: str, seeds: int, out_dir: Path, cache_dir: str | None = None) -> dict[str, Any]:
    """``mgfa-ray train --config C --seeds N``: train ``cfg`` with seeds ``cfg.seed`` … ``cfg.seed + N - 1``
    as trials on Ray (the local cluster, or the one of ``$RAY_ADDRESS``), resumable like a search,
    and report mean ± 95% CI of top-1 (test split when the config has one, else its eval split) and
    in how many seeds the masks were learned (``masks_learned``: the attention beat the position
    prior on the training images, :mod:`mgfa_ray.train.mask_fit`; ``None`` when the config uses no mask).

    Writes ``seeds.{parquet,csv}`` (one line per seed) and ``seeds.json`` (the summary) to
    ``out_dir``, the search under ``out_dir/search/`` and its export under ``out_dir/export/``.

    Raises:
        ValueError: ``seeds`` < 1.
        RuntimeError: No seed finished.
    """
    import ray

    if seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {seeds}")
    ensure_ray()
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and cfg.device != "cpu" else 0.0
    cpus = float(cfg.threads or 1)
    search = SearchConfig(space="<seeds>", num_samples=seeds, max_concurrent=seeds, cpus_per_trial=cpus,
                          gpus_per_trial=gpus)
    base = cfg.with_paths(relative_to_cwd)
    points = [{"seed": cfg.seed + i} for i in range(seeds)]
    trials = run_cells(name=f"{name}-seeds", points=points, base=base, search=search,
                       storage_path=str(Path(out_dir).resolve() / "search"), cache_dir=cache_dir,
                       export_dir=Path(out_dir) / "export")
    prefix, split = result_prefix(trials, cfg.eval_split)
    per_seed = pd.DataFrame({"seed": trials["seed"], "state": trials["state"], "trial": trials["trial"],
                             "top1": trials[f"final_{prefix}_top1"], "masks_learned": trials["masks_learned"]})
    write_table(per_seed, Path(out_dir) / "seeds")
    done = per_seed[per_seed["state"] == "COMPLETE"]
    stats = ci95(done["top1"])
    verdicts = done["masks_learned"].dropna()
    learned = None if verdicts.empty else int(verdicts.astype(bool).sum())
    summary = {"config": name, "split": split, "seeds": seeds, **{f"top1_{k}": v for k, v in stats.items()},
               "masks_learned": learned}
    if learned is not None and learned < len(verdicts):
        print(f"warning: masks not learned in {len(verdicts) - learned} of {len(verdicts)} seeds: the attention did not "
              "beat the position prior on the training images (seeds.csv: masks_learned)", flush=True)
    atomic_write_json(Path(out_dir) / "seeds.json", summary)
    print(f"{split} top-1 over {stats['n']} seeds: {stats['mean']:.4f} ± {stats['sd']:.4f} (sd), 95% CI "
          f"{stats['ci_low']:.4f}–{stats['ci_high']:.4f}", flush=True)
    return summary
