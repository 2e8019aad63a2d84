"""Ray's actor table for the failure tests (tests/test_masks_faults.py): the one private Ray API the
tests use that mgfa_ray itself does not, so it lives here and not in :mod:`mgfa_ray.compat`.
tests/test_ray_state.py checks the assumption against the installed Ray."""

from __future__ import annotations


def actor_table(*, actor_id: str | None = None, job_id=None, state: str | None = None) -> dict:
    """Ray's actor table as ``ray._private.state.actors`` gives it: one actor's record (``actor_id``)
    or ``{actor_id: record}`` filtered by ``job_id`` and ``state`` (e.g. ``"ALIVE"``); records hold
    ``ActorClassName``, ``Pid``, ``NumRestarts``.

    Private use: the public ``ray.util.state`` API needs the dashboard, which the tests' clusters do
    not start; ``ray._private.state.actors`` reads the cluster's own GCS table.
    """
    from ray._private import state as ray_state

    return ray_state.actors(actor_id=actor_id, job_id=job_id, actor_state_name=state)
