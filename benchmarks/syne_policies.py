"""syne-tune's multi-fidelity schedulers as policies of the replay simulator
(:func:`mgfa_ray.search.replay.simulate`), for ``benchmarks/search_efficiency.py`` (issue 32, item 3):
maintained optimisers side by side with this project's search, on the same table, through the same
mapping of proposals to curves (:class:`replay_policies.Unrun`: the nearest configuration not yet
run, so no curve is replayed twice).

:class:`SynePolicy` drives a syne-tune ``TrialScheduler`` through its public API exactly as syne-tune's
own ``Tuner`` does (``syne_tune/tuner.py``, 0.16.0): ``suggest()`` → a config, ``on_trial_add`` when
the trial starts, ``on_trial_result`` after every epoch; a STOP is followed by ``on_trial_remove``
(and no ``on_trial_complete``), a trial whose curve ran out without a STOP by
``on_trial_complete`` with its last result. syne-tune's ASHA answers STOP at ``max_t`` too; as for
Ray's, that ends a trial that ran its course and is not an early stop.

The methods (:func:`syne_methods`) are syne-tune's baselines as its users configure them, with this
benchmark's rungs (``grace_period``, ``reduction_factor``, ``max_t`` = the table's epochs) and the
simulation seed as ``random_seed``:

- ``ASHA``: asynchronous successive halving, random proposals (stopping type: syne-tune 0.16.0's
  ``AsynchronousSuccessiveHalving`` answers CONTINUE or STOP only; it has no promotion variant);
- ``BOHB``: the same scheduler with syne-tune's KDE searcher (its ``BOHB`` baseline: the
  asynchronous variant, the KDE fitted on every trial's last value), with its defaults and with the
  BOHB paper's minimum of d + 1 points in the model (see :func:`syne_methods`);
- ``ASHABORE``: the same scheduler with BORE proposals (a classifier of good against bad
  configurations, Tiao et al., ICML 2021).

``ASHACQR`` is left out: its module imports syne-tune's blackbox repository, which needs
``huggingface_hub``, not a dependency of ``syne-tune`` itself.

MOBSTER and Hyper-Tune are not in syne-tune 0.16.0 (its Gaussian-process searchers were removed);
no PAUSE-type (promotion) scheduler is used, so the simulator needs no pause/resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from mgfa_ray.search.replay import Curve
from mgfa_ray.search.space import Categorical, IntRange, LogUniform, SearchSpace, Uniform
from replay_policies import SIMPLEX_PREFIX, CurveTable, Unrun

TIME_ATTR = "training_iteration"


def syne_config_space(space: SearchSpace) -> dict[str, Any]:
    """``space`` as a syne-tune config space with the Optuna parameter names the other policies use
    (log-uniform stays log-uniform; the simplex as its sorted-cut variables ``simplex/u<i>`` in [0, 1],
    as :func:`mgfa_ray.search.space.define_by_run` draws it)."""
    from syne_tune import config_space as cs

    out: dict[str, Any] = {}
    for name, dist in space.parameters.items():
        if isinstance(dist, LogUniform):
            out[name] = cs.loguniform(dist.low, dist.high)
        elif isinstance(dist, Uniform):
            out[name] = cs.uniform(dist.low, dist.high)
        elif isinstance(dist, IntRange):
            out[name] = (cs.lograndint if dist.log else cs.randint)(dist.low, dist.high)
        elif isinstance(dist, Categorical):
            out[name] = cs.choice(list(dist.choices))
        else:
            raise TypeError(f"parameter {name!r}: no syne-tune domain for {type(dist).__name__}")
    if space.simplex:
        out.update({f"{SIMPLEX_PREFIX}{i}": cs.uniform(0.0, 1.0) for i in range(len(space.simplex) - 1)})
    return out


class SynePolicy:
    """A syne-tune scheduler on a curve table (see the module docstring).

    Args:
        table: The recorded curves.
        make_scheduler: ``(config_space, metric, time_attr) -> TrialScheduler`` (maximising ``metric``).
        max_t: The schedule's epochs (a STOP there ends a trial that ran its course).
        metric: The reported metric's name.

    Attributes:
        decisions: Every ``(trial, epoch, decision)`` the scheduler answered, in order.
    """

    def __init__(self, table: CurveTable, *, make_scheduler: Callable[[dict[str, Any], str, str], Any], max_t: int,
                 metric: str = "eval_top1"):
        logging.getLogger("syne_tune").setLevel(logging.WARNING)
        self.table, self.metric, self.max_t = table, metric, max_t
        self.config_space = syne_config_space(table.space)
        self.scheduler = make_scheduler(self.config_space, metric, TIME_ATTR)
        self.unrun = Unrun(table)
        self._trials: dict[int, Any] = {}
        self._removed: set[int] = set()
        self.decisions: list[tuple[int, int, str]] = []

    def start(self, trial: int) -> Curve:
        from syne_tune.backend.trial_status import Trial

        suggestion = self.scheduler.suggest()
        if suggestion is None or not suggestion.spawn_new_trial_id or suggestion.config is None:
            raise RuntimeError(f"syne-tune scheduler gave no new configuration for trial {trial}: {suggestion!r}")
        config = dict(suggestion.config)
        self._trials[trial] = Trial(trial_id=trial, config=config, creation_time=datetime.now())
        self.scheduler.on_trial_add(trial=self._trials[trial])
        return self.unrun.take({k: config[k] for k in self.config_space})

    def _result(self, epoch: int, value: float) -> dict[str, Any]:
        return {self.metric: value, TIME_ATTR: epoch}

    def result(self, trial: int, epoch: int, value: float) -> bool:
        from syne_tune.optimizer.scheduler import SchedulerDecision

        decision = self.scheduler.on_trial_result(trial=self._trials[trial], result=self._result(epoch, value))
        self.decisions.append((trial, epoch, decision))
        if decision == SchedulerDecision.PAUSE:
            raise NotImplementedError("a PAUSE-type (promotion) scheduler needs pause/resume, which the replay lacks")
        if decision == SchedulerDecision.STOP:
            self.scheduler.on_trial_remove(trial=self._trials[trial])  # as syne-tune's Tuner: no on_trial_complete
            self._removed.add(trial)
        return decision == SchedulerDecision.STOP and epoch < self.max_t

    def complete(self, trial: int, epoch: int, value: float, stopped: bool) -> None:
        t = self._trials.pop(trial)
        if trial not in self._removed:
            self.scheduler.on_trial_complete(t, self._result(epoch, value))


def syne_methods(grace: int, factor: int, max_epochs: int) -> dict[str, Callable[[CurveTable, int], SynePolicy]]:
    """name -> ``(table, seed) -> SynePolicy`` for syne-tune's multi-fidelity baselines at these rungs."""

    def make(cls_name: str, extra: Callable[[dict[str, Any]], dict[str, Any]] = lambda space: {}
             ) -> Callable[[CurveTable, int], SynePolicy]:
        def factory(table: CurveTable, seed: int) -> SynePolicy:
            from syne_tune.optimizer import baselines

            cls = getattr(baselines, cls_name)
            return SynePolicy(table, max_t=max_epochs, make_scheduler=lambda space, metric, time_attr: cls(
                config_space=space, metric=metric, time_attr=time_attr, max_t=max_epochs, do_minimize=False,
                random_seed=seed, grace_period=grace, reduction_factor=factor, **extra(space)))
        return factory

    return {
        "syne-tune ASHA": make("ASHA"),
        "syne-tune BOHB": make("BOHB"),
        # the BOHB paper's min_points_in_model, d + 1 (d: searched dimensions): with syne-tune's default, d, its
        # KDE is fitted only once the good set, max(d, 15 % of n), exceeds d, i.e. from n = 7 d + 4 (74 > 64 here)
        "syne-tune BOHB, min points d+1": make("BOHB", lambda space: {"num_min_data_points": len(space) + 1}),
        "syne-tune ASHA-BORE": make("ASHABORE"),
    }


SYNE_METHODS = list(syne_methods(1, 2, 2))
