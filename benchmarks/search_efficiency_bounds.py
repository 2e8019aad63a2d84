"""Two readings of the curve table behind ``search_efficiency.py compare`` (issue 17).

``signals``: how well each candidate rung signal at epoch e ranks the configurations by their final
val top-1 — Spearman over all 64, and the ranks at epoch e of the eight configurations that end
best (what ASHA's top-1/η cut needs is these near the top, not the whole order).

``floor``: the ratio an omniscient search would reach on ``compare``'s measure with its workers
kept busy: trial 0 is a configuration that ends at random search's best (the one finishing in
the fewest epochs), every other trial is stopped after one epoch (the mean over every
configuration as that other trial). Per seed ÷ random search's epochs to the same target, read
from a ``compare`` JSON.

    python benchmarks/search_efficiency_bounds.py signals
    python benchmarks/search_efficiency_bounds.py floor outputs/round2_g2f3.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import pandas as pd
from scipy.stats import spearmanr
from search_efficiency import SPACE, TABLE

from mgfa_ray.replay import CurveTable, simulate
from mgfa_ray.search_space import load_search_space


def signals(frame: pd.DataFrame) -> None:
    wide = lambda c: frame.pivot(index="config", columns="epoch", values=c)  # noqa: E731
    top, loss = wide("eval_top1"), wide("eval_loss_ce")
    final = top[top.columns.max()]
    cands = {
        "val top-1": top, "-val loss": -loss, "-train loss": -wide("train_loss"),
        "best-so-far top-1": top.cummax(axis=1), "mean of last 2 top-1": top.T.rolling(2, min_periods=1).mean().T,
        "top-1 - 0.01 loss": top - 0.01 * loss, "top-1 - 0.1 loss": top - 0.1 * loss,
        "-min val loss so far": -loss.cummin(axis=1),
    }
    epochs = [1, 2, 3, 4, 5, 6, 8, 10]
    print("Spearman with final val top-1 | " + " | ".join(f"e={e}" for e in epochs))
    for name, s in cands.items():
        print(f"{name} | " + " | ".join(f"{spearmanr(s[e], final).correlation:.2f}" for e in epochs))
    good = final.sort_values(ascending=False).index[:8]
    print(f"\nranks (of {len(final)}) at epoch e of the 8 best final configurations {list(good)}")
    for name, s in cands.items():
        for e in (1, 2, 6, 18):
            rk = s[e].rank(ascending=False, method="max")
            print(f"{name} e={e}: {[int(rk[c]) for c in good]}")


class _Omniscient:
    def __init__(self, table: CurveTable, best: int, other: int):
        self.table, self.best, self.other = table, best, other

    def start(self, trial):
        return self.table.curves[self.best if trial == 0 else self.other]

    def result(self, trial, epoch, value):
        return trial != 0

    def complete(self, *args):
        pass


def floor(frame: pd.DataFrame, compare_json: str, workers: int) -> None:
    table = CurveTable.from_frame(frame, space=load_search_space(SPACE))
    last = len(table.curves[0].values)
    doc = json.load(open(compare_json))
    ratios = []
    for seed in doc["results"][0]["per_seed"]:
        target, rnd = seed["target"], seed["methods"]["random"]["epochs_to_target"]
        best = None
        for g in (j for j, c in enumerate(table.curves) if c.values[-1] >= target):
            runs = [simulate(_Omniscient(table, g, o), workers=workers, max_total_epochs=100 * last)[0]
                    for o in range(len(table.curves))]
            mean = statistics.mean(next(x.cumulative_epochs for x in ev if x.trial == 0 and x.epoch == last)
                                   for ev in runs)
            best = mean if best is None else min(best, mean)
        ratios.append(best / rnd)
        print(f"seed {seed['seed']}: target {target:.3f}, random {rnd} epochs, omniscient {best:.1f} -> {best / rnd:.3f}")
    print(f"mean floor ratio {statistics.mean(ratios):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["signals", "floor"])
    p.add_argument("compare_json", nargs="?", help="floor: a compare JSON (its per-seed targets and random epochs)")
    p.add_argument("--workers", type=int, default=4)
    a = p.parse_args()
    frame = pd.read_parquet(TABLE).sort_values(["config", "epoch"])
    signals(frame) if a.action == "signals" else floor(frame, a.compare_json, a.workers)


if __name__ == "__main__":
    main()
