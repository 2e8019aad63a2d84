"""Does this project's replay simulator agree with a maintained one? (issue 32, item 3)

The same search — a syne-tune scheduler on the curve table, proposals mapped to the nearest
configuration not yet run (:class:`replay_policies.Unrun`) — is run twice:

- by :func:`mgfa_ray.search.replay.simulate` (:class:`syne_policies.SynePolicy`), the simulator that
  ``benchmarks/search_efficiency.py`` and ``mgfa-ray search replay`` use;
- by syne-tune's own ``Tuner`` with its ``SimulatorBackend`` and ``SimulatorCallback`` (syne-tune's
  documented way to run a scheduler on tabulated curves): each trial runs
  ``syne_table_entry.py``, which reports the recorded curve with the elapsed seconds, and syne-tune
  places the results on its simulated timeline and calls the scheduler.

:class:`TableScheduler` (a public ``TrialScheduler`` subclass) gives both the same no-repeat mapping;
every simulator delay is 0 (``SimulatorConfig``), and the tuner polls every ``poll_seconds`` of
simulated time. What is compared, per seed: each trial's configuration and epochs run, and the
yardstick's epochs to the top set (``search_efficiency.reach_top``, on syne-tune's results in
simulated-time order).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from replay_policies import CurveTable, Unrun
from syne_policies import TIME_ATTR, syne_config_space

ENTRY = Path(__file__).with_name("syne_table_entry.py")


def write_curves(table: CurveTable, path: Path) -> None:
    """The table's curves as the JSON ``syne_table_entry.py`` reads: key -> values, epoch seconds, set-up."""
    path.write_text(json.dumps({str(c.key): {"values": list(c.values), "epoch_seconds": list(c.epoch_seconds),
                                             "setup_seconds": c.setup_seconds} for c in table.curves}))


def scheduler_classes():
    """``(SeededProposals, TableScheduler)``, defined on first use so that importing this module needs no syne-tune."""
    from syne_tune.backend.trial_status import Trial
    from syne_tune.optimizer.scheduler import TrialScheduler, TrialSuggestion

    class Delegating(TrialScheduler):
        def __init__(self, inner: Any):
            super().__init__(random_seed=inner.random_seed)
            self.inner = inner

        def suggest(self):
            return self.inner.suggest()

        def on_trial_add(self, trial):
            self.inner.on_trial_add(trial=trial)

        def on_trial_result(self, trial, result):
            return self.inner.on_trial_result(trial=trial, result=result)

        def on_trial_complete(self, trial, result):
            self.inner.on_trial_complete(trial, result)

        def on_trial_remove(self, trial):
            self.inner.on_trial_remove(trial=trial)

        def on_trial_error(self, trial):
            self.inner.on_trial_error(trial)

        def metric_names(self) -> list[str]:
            return self.inner.metric_names()

        def metric_mode(self) -> str:
            return self.inner.metric_mode()

        def metadata(self) -> dict[str, Any]:
            return self.inner.metadata()

    class SeededProposals(Delegating):
        """``inner`` with numpy's global generator seeded before its n-th proposal (``seed`` * 10^6 + n).

        syne-tune 0.16.0's random searcher draws from numpy's global generator, which syne-tune's
        own ``Tuner`` loop draws from too: run by the Tuner and by the replay, the same scheduler and
        seed proposed the same first five configurations and then different ones. Seeding each
        proposal makes the proposals a function of the seed and the proposal's index only, so the two
        simulators can be compared on the same proposals.
        """

        def __init__(self, inner: Any, seed: int):
            super().__init__(inner)
            self.seed, self.proposals = seed, 0

        def suggest(self):
            import numpy as np

            np.random.seed(self.seed * 10**6 + self.proposals)
            self.proposals += 1
            return self.inner.suggest()

    class TableScheduler(Delegating):
        """A syne-tune scheduler whose proposals are answered by the nearest unrun table configuration.

        ``suggest`` returns ``{"table_config": key, "curves": file}`` (what the entry script reads); the
        wrapped scheduler sees its own proposal as the trial's config in every later call.

        Args:
            inner: The syne-tune scheduler (config space as :func:`syne_policies.syne_config_space`).
            table: The curve table. curves_file: Its JSON (:func:`write_curves`).
        """

        def __init__(self, inner: Any, table: CurveTable, curves_file: Path):
            super().__init__(inner)
            self.unrun, self.curves_file = Unrun(table), str(curves_file)
            self.space = syne_config_space(table.space)
            self._proposed: list[dict[str, Any]] = []
            self._trials: dict[int, Any] = {}
            self.keys: dict[int, Any] = {}

        def suggest(self):
            if self.unrun.exhausted:  # every configuration run: syne-tune's "config space exhausted"
                return None
            s = self.inner.suggest()
            if s is None or s.config is None:
                return s
            config = dict(s.config)
            curve = self.unrun.take({k: config[k] for k in self.space})
            self._proposed.append(config)
            return TrialSuggestion.start_suggestion(config={"table_config": curve.key, "curves": self.curves_file})

        def on_trial_add(self, trial):
            inner = Trial(trial_id=trial.trial_id, config=self._proposed.pop(0), creation_time=trial.creation_time)
            self._trials[trial.trial_id], self.keys[trial.trial_id] = inner, trial.config["table_config"]
            self.inner.on_trial_add(trial=inner)

        def on_trial_result(self, trial, result):
            return self.inner.on_trial_result(trial=self._trials[trial.trial_id], result=result)

        def on_trial_complete(self, trial, result):
            self.inner.on_trial_complete(self._trials[trial.trial_id], result)

        def on_trial_remove(self, trial):
            self.inner.on_trial_remove(trial=self._trials[trial.trial_id])

        def on_trial_error(self, trial):
            self.inner.on_trial_error(self._trials[trial.trial_id])

    return SeededProposals, TableScheduler


def run_syne_simulator(table: CurveTable, inner: Any, *, workers: int, poll_seconds: float = 0.1,
                       workdir: Path | None = None) -> dict[str, Any]:
    """One search of ``inner`` (a syne-tune scheduler) on ``table`` with syne-tune's simulator.

    Runs until every configuration has been started and every trial has ended. Returns
    ``{"events": [(sim_seconds, trial_id, table_config, epoch, value), ...] in simulated-time order,
    "trials": [(trial_id, table_config, epochs_run), ...]}``.
    """
    from syne_tune import StoppingCriterion, Tuner
    from syne_tune.backend.simulator_backend.simulator_backend import SimulatorBackend, SimulatorConfig
    from syne_tune.backend.simulator_backend.simulator_callback import SimulatorCallback
    from syne_tune.constants import ST_TUNER_TIME

    logging.getLogger("syne_tune").setLevel(logging.WARNING)
    work = Path(workdir or tempfile.mkdtemp(prefix="syne-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    curves = work / "curves.json"
    write_curves(table, curves)
    scheduler = scheduler_classes()[1](inner, table, curves)
    results: list[tuple[float, int, Any, int, float]] = []

    class Log(SimulatorCallback):
        def on_trial_result(self, trial, status, result, decision):
            super().on_trial_result(trial, status, result, decision)
            results.append((float(result[ST_TUNER_TIME]), trial.trial_id, int(result["table_config"]),
                            int(result[TIME_ATTR]), float(result["eval_top1"])))

    zero = SimulatorConfig(delay_on_trial_result=0, delay_complete_after_final_report=0, delay_complete_after_stop=0,
                           delay_start=0, delay_stop=0)
    backend = SimulatorBackend(entry_point=str(ENTRY), elapsed_time_attr="elapsed_time", simulator_config=zero,
                               tuner_sleep_time=poll_seconds)
    # syne-tune 0.16.0's SimulatorBackend runs the entry script with the `python` on PATH (its LocalBackend
    # uses sys.executable): put this interpreter first. SYNETUNE_FOLDER, read by Tuner(): not ~/syne-tune.
    before = {k: os.environ.get(k) for k in ("PATH", "SYNETUNE_FOLDER")}
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ["SYNETUNE_FOLDER"] = str(work / "experiments")
    tuner = Tuner(trial_backend=backend, scheduler=scheduler, n_workers=workers, sleep_time=0,
                  stop_criterion=StoppingCriterion(max_num_trials_started=len(table.curves)),
                  wait_trial_completion_when_stopping=True, callbacks=[Log()], save_tuner=False,
                  tuner_name=f"table-{datetime.now():%H%M%S%f}", trial_backend_path=str(work / "trials"),
                  print_update_interval=1e9, results_update_interval=1e9)
    try:
        tuner.run()
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    results.sort(key=lambda r: (r[0], r[1]))
    epochs: dict[int, int] = {}
    for _, trial, _, epoch, _ in results:
        epochs[trial] = max(epochs.get(trial, 0), epoch)
    return {"events": results, "trials": [(t, scheduler.keys[t], epochs.get(t, 0)) for t in sorted(scheduler.keys)]}


def compare_seed(job: tuple[str, int, int, int, int, float]) -> dict[str, Any]:
    """One seed: syne-tune's ASHA (seeded proposals) in the replay and in syne-tune's simulator."""
    from types import SimpleNamespace

    import search_efficiency as se
    from syne_policies import SynePolicy

    from mgfa_ray.search.replay import simulate

    table_file, seed, grace, factor, workers, poll = job
    table, _ = se._load_table(table_file)
    max_epochs = len(table.curves[0].values)
    top = set(se.top_set(table)["keys"])
    seeded = scheduler_classes()[0]

    def make(space: dict[str, Any], metric: str, time_attr: str) -> Any:
        from syne_tune.optimizer.baselines import ASHA

        return seeded(ASHA(config_space=space, metric=metric, time_attr=time_attr, max_t=max_epochs, do_minimize=False,
                           random_seed=seed, grace_period=grace, reduction_factor=factor), seed)

    policy = SynePolicy(table, make_scheduler=make, max_t=max_epochs)
    events, runs = simulate(policy, workers=workers, max_trials=len(table.curves))
    ours = {"trials": [(r.trial, r.key, r.epochs) for r in runs], **se.reach_top(events, top, max_epochs),
            "epochs": len(events)}
    syne = run_syne_simulator(table, make(policy.config_space, "eval_top1", TIME_ATTR), workers=workers,
                              poll_seconds=poll)
    ev = [SimpleNamespace(t=t, key=k, epoch=e, value=v, cumulative_epochs=i, compute_seconds=None)
          for i, (t, _, k, e, v) in enumerate(syne["events"], 1)]
    theirs = {"trials": syne["trials"], **se.reach_top(ev, top, max_epochs), "epochs": len(ev)}
    same = [a == tuple(b) for a, b in zip(ours["trials"], theirs["trials"], strict=False)]
    return {"seed": seed, "replay": ours, "syne_tune_simulator": theirs,
            "same_trials": sum(same), "first_difference": same.index(False) if False in same else None}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import multiprocessing
    import time

    import numpy as np
    import search_efficiency as se
    from common import new_document

    from mgfa_ray.storage import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--grace", type=int, default=2)
    p.add_argument("--factor", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--poll", type=float, default=0.1, help="simulated seconds between the tuner's polls")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--out", type=Path, default=se.OUT.with_name("search_efficiency_syne_simulator.json"))
    a = p.parse_args(argv)
    started = time.perf_counter()
    jobs = [(str(se.TABLE), seed, a.grace, a.factor, a.workers, a.poll) for seed in a.seeds]
    with multiprocessing.get_context("spawn").Pool(a.processes) as pool:
        per_seed = sorted(pool.map(compare_seed, jobs), key=lambda r: r["seed"])
    ours = [r["replay"]["epochs_to_top"] for r in per_seed]
    theirs = [r["syne_tune_simulator"]["epochs_to_top"] for r in per_seed]
    doc = new_document("search_efficiency_syne_simulator", settings=vars(a) | {"out": str(a.out)}, measured={
        "what": __doc__.split("\n\n", 1)[1].strip(),
        "same_trials": "trials (in start order) with the same table configuration and the same epochs run in both",
        "ratio": "sum of the replay's epochs to the top set over syne-tune's, over the seeds where both reached it, "
                 "paired BCa bootstrap (search_efficiency.ratio_of_totals)"})
    doc.update(per_seed=per_seed, seeds_identical=sum(r["first_difference"] is None for r in per_seed),
               epochs_to_top_equal=sum(o == t for o, t in zip(ours, theirs, strict=True)),
               ratio_replay_over_syne=se.ratio_of_totals(ours, theirs),
               mean_abs_epochs_to_top_difference=float(np.mean([abs(o - t) for o, t in zip(ours, theirs, strict=True)
                                                                if o is not None and t is not None])),
               total_seconds=time.perf_counter() - started)
    atomic_write_json(a.out, doc)
    print(f"[syne_simulator] {doc['seeds_identical']}/{len(per_seed)} seeds identical; epochs to top equal in "
          f"{doc['epochs_to_top_equal']}; ratio {doc['ratio_replay_over_syne']}")


if __name__ == "__main__":
    main()
