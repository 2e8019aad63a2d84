"""The private Ray API of the test helper tests/ray_state.py, checked against the installed Ray
(as tests/test_adapter_contract.py does for mgfa_ray.compat)."""

import inspect

import ray


def test_actor_table_signature():
    from ray._private import state

    params = set(inspect.signature(state.actors).parameters)
    assert {"actor_id", "job_id", "actor_state_name"} <= params, (
        f"ray {ray.__version__}: ray._private.state.actors takes {sorted(params)} — tests/ray_state.py's "
        f"actor_table relies on actor_id, job_id and actor_state_name; rewrite it for this version")
