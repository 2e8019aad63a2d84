"""Stage 6 — the search: Ray Tune runs the trials, an Optuna study proposes configurations and keeps every
result, an ASHA scheduler stops weak trials at its rungs.

``space`` (the search space file), ``study`` (the Optuna study and its storage), ``journal`` (its
journal file, repaired after a crash), ``searcher`` and ``scheduler`` (Ray Tune's ``Searcher`` and
``TrialScheduler`` kept in step with the study), ``asha`` (the rung rule), ``driver``
(:func:`~mgfa_ray.search.driver.run_search`: create, resume, extend), ``tune_state`` (Ray Tune's state
files), ``status`` (``search status``), ``export`` (best configuration, checkpoint, tables, plots),
``replay`` and ``replay_report`` (``search replay``: the search re-run on recorded learning curves).
"""
