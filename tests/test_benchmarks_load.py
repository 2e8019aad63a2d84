"""The search-load benchmark's smoke preset: it runs, writes its fields, and no trial process or actor
outlives the search (a leak would keep them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_search_load_smoke(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import search_load

    settings = search_load.parse_args(["--preset", "smoke", "--tmp-dir", str(tmp_path), "--out", str(tmp_path / "o.json")])
    doc = search_load.run(settings)

    s = doc["summary"]
    assert set(s["by_checkpoint_mode"]) == {"0", "auto"}
    for mode in s["by_checkpoint_mode"].values():
        for key in ("wall_seconds", "trials_per_second", "scheduling_overhead_per_trial_s", "median_start_latency_s",
                    "driver_peak_rss_mib", "driver_maxrss_mib"):
            assert mode[key] is not None and mode[key] > 0, key
        assert mode["driver_rss_growth_mib"] is not None
    assert s["checkpoint_ratio"]["wall_ratio_of_means"] > 0
    assert s["gpu_memory"] == "not measured: no CUDA" or isinstance(s["gpu_memory"], dict)
    for r in doc["searches"]:
        # every trial ran through the real search layer, on the worker nodes only, with the stand-in's epochs
        assert r["num_trials"] == r["trials_with_results"] == settings["trials"]
        assert sum(r["optuna_states"].get(k, 0) for k in ("COMPLETE", "PRUNED")) == settings["trials"]
        head = {n["node_id"] for n in r["cluster"]["nodes"] if n["head"]}
        assert r["trials_per_node"] and not head & set(r["trials_per_node"])
        assert r["epoch_s_seen_by_trials"] == [settings["epoch_s"]]
        assert r["checkpoint_env_seen"] == r["checkpoint_mode"]
        # no leak: trial processes and ALIVE actors are back at the baseline after the search
        assert r["after"]["actor_workers"] <= r["baseline"]["actor_workers"], r["after"]
        assert r["after"]["ray_workers"] <= r["baseline"]["ray_workers"], r["after"]
        assert r["after"]["alive_actors"] is not None and r["after"]["alive_actors"] <= r["baseline"]["alive_actors"]
        assert r["leak_check"]["max_ray_workers"] >= 1  # the sampler did see the trials' processes
        assert r["processes_after_shutdown"] == 0
    assert s["leaks"]["returned_to_baseline"] and s["leaks"]["alive_actors_measured"]
