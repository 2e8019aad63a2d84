"""Search load: hundreds of short trials through the real search layer on a local multi-node Ray cluster.

One run makes, per experiment-snapshot setting, a search of ``trials`` short trials with
:func:`mgfa_ray.search.driver.create_search` + :func:`mgfa_ray.search.driver.run_search` exactly as a job does
(``StudySearch`` on an Optuna journal, ``StudyScheduler`` with ASHA, ``ConcurrencyLimiter``,
``reuse_actors=False``: a fresh worker process per trial, a checkpoint every epoch), on a Ray
cluster of this one machine built with ``ray.cluster_utils.Cluster``: a head node with no CPUs (so
no trial runs there; it holds GCS, dashboard and the driver) and ``worker_nodes`` nodes of
``cpus_per_node`` CPUs each, with a small object store. The trials are a stand-in
(:func:`load_standin`): ``epochs`` epochs that sleep ``epoch_s`` seconds, write a checkpoint and
report, so what is measured is the search machinery, not training.

Each search runs in its own subprocess (a fresh driver, a fresh cluster, ``TUNE_GLOBAL_CHECKPOINT_S``
read anew) and measures, see ``MEASURED``:

* wall time, trials/s, scheduling overhead per trial, per-trial start latency;
* the driver's memory (RSS sampled every ``sample_s`` by a thread, and getrusage's maxrss) and its
  growth from the first to the last quarter of the run;
* leaks: the cluster's live Ray worker processes (``ray::…``) and ALIVE actors (Ray's state API)
  sampled throughout, against the number of finished trials, and after the search against the
  baseline before it;
* ``TUNE_GLOBAL_CHECKPOINT_S=0`` (what ``run_search`` sets: Ray snapshots its experiment state at
  every controller step) against ``auto`` (Ray's default when unset: every >= 10 s).

Examples::

    python benchmarks/search_load.py --preset smoke      # ~1 min, a plumbing check
    python benchmarks/search_load.py --preset cpu        # 200 trials x 2 settings, writes results/benchmarks/

The cluster never touches ``/tmp/ray/ray_current_cluster`` (``Cluster`` would write it and so
redirect other ``ray.init()`` calls on the machine to this cluster) and lives in its own temp dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import new_document

REPO = Path(__file__).resolve().parents[1]
EPOCH_ENV = "MGFA_LOAD_EPOCH_S"
CHECKPOINT_ENV = "TUNE_GLOBAL_CHECKPOINT_S"

# Every setting; a preset overrides some, explicit flags override both.
DEFAULTS: dict[str, Any] = {
    "trials": 200, "epochs": 2, "epoch_s": 0.05, "max_concurrent": 4, "worker_nodes": 2, "cpus_per_node": 2,
    "object_store_mib": 100, "sampler": "tpe", "grace_period": 1, "reduction_factor": 2,
    "checkpoint_modes": ["0", "auto"], "repeats": 1, "sample_s": 0.5, "actor_sample_s": 2.0,
    "settle_timeout_s": 60.0, "tmp_dir": None, "keep": False,
}
PRESETS: dict[str, dict[str, Any]] = {
    # Plumbing check in about a minute: numbers mean little. One worker node (2 CPUs, so 2 trials
    # at once): each node is a raylet and its agents and workers, CPU that a 2-core CI machine lacks.
    "smoke": {"trials": 12, "worker_nodes": 1, "max_concurrent": 2},
    # The recorded run: 200 trials of 2 x 0.05 s epochs, 4 at once on 2 worker nodes x 2 CPUs; each
    # snapshot setting twice, in the order 0, auto, auto, 0.
    "cpu": {"repeats": 2},
}

MEASURED = {
    "cluster": (
        "ray.cluster_utils.Cluster on this machine: head node num_cpus=0 (GCS, dashboard; the driver connects to "
        "it), `worker_nodes` worker nodes with `cpus_per_node` CPUs each, every node `object_store_mib` MiB of "
        "object store. One fresh cluster and driver process per search."
    ),
    "search": (
        "create_search + run_search(trainable=load_standin): StudySearch (sampler `sampler`) on an Optuna journal, "
        "StudyScheduler with ASHA (grace_period, reduction_factor) over `epochs` epochs, ConcurrencyLimiter("
        "max_concurrent), 1 CPU per trial, reuse_actors=False, a checkpoint every epoch (2 kept). load_standin: "
        "per epoch sleep epoch_s, write a one-file checkpoint, tune.report."
    ),
    "wall_seconds": "the run_search call, from entry to return (Tuner set-up, every trial, Tune's shutdown).",
    "trials_per_second": "trials / wall_seconds; steady_trials_per_second: the middle half of the trials "
                         "(finished #n/4 .. #3n/4, by the study's datetime_complete) over the time between them.",
    "trial_run_seconds": (
        "per trial: last report's time.time() - time.time() at the trainable's entry, both inside the trial's "
        "worker process (sleep + checkpoint writes + tune.report). ray_time_total_s: Ray's time_total_s of the "
        "last result, for comparison."
    ),
    "scheduling_overhead_per_trial_s": (
        "(wall_seconds x max_concurrent - sum of trial_run_seconds) / trials: slot time not spent inside a "
        "trial's function (actor/process start, imports, scheduling, the driver's searcher/scheduler/study "
        "calls, snapshots, actor teardown, idle slots at the start and end)."
    ),
    "start_latency_s": (
        "per trial: trainable entry (worker clock) - the Optuna trial's datetime_start (set when StudySearch "
        "asked the study, i.e. when the ConcurrencyLimiter let Ray create the trial). Same machine, same clock. "
        "process_age_at_start_s: trainable entry - the worker process's create_time (a pre-started idle worker "
        "is older than the trial). told_latency_s: the study's datetime_complete - the last report."
    ),
    "driver_memory": (
        "RSS of the driver process (psutil), sampled by a thread every sample_s during run_search; maxrss = "
        "resource.getrusage(RUSAGE_SELF).ru_maxrss of the driver at the end (its whole life). growth = mean RSS of "
        "the samples in the last quarter of the run's time minus that of the first quarter."
    ),
    "leaks": (
        "Sampled every sample_s by one thread: the driver's descendant processes (its own Ray cluster only, not "
        "other Ray instances on the machine) by title (cmdline[0]): 'ray::IDLE' = idle pooled worker; "
        "'ray::DashboardAgent' / 'ray::RuntimeEnvAgent' = per-node agents (counted apart); any other 'ray::…' = "
        "an actor/task worker (a trial's process: actor_workers); zombies counted apart. Every actor_sample_s by "
        "another thread: ray.util.state.list_actors(filters=[('state','=','ALIVE')]) through this cluster's "
        "dashboard. finished trials at a sample = trials whose study datetime_complete precedes it; samples are "
        "grouped by quarter of finished trials. Baseline = before run_search (cluster up 3 s, nothing "
        "submitted); after = polled every 0.5 s after run_search returns until actor_workers and ALIVE actors "
        "are back at the baseline (or settle_timeout_s). returned_to_baseline: actor_workers, ray_workers (idle "
        "+ actor) and ALIVE actors all back. grows_with_finished_trials: for actor_workers or ray_workers, the mean "
        "over the last quarter of finished trials exceeds that over the second quarter by more than 1 (the first "
        "holds the Tuner's start-up before any trial), or the last quarter's max exceeds max(max_concurrent, "
        "worker CPUs) + 2. "
        "A trial's new worker is titled 'ray::IDLE' until Ray hands it the trial's actor, so most of a short "
        "trial's life (process start-up) counts as idle, not actor."
    ),
    "checkpoint_period": (
        "TUNE_GLOBAL_CHECKPOINT_S set explicitly in each search's driver before run_search (which only "
        "setdefaults it): '0' = run_search's setting (snapshot the experiment state at every controller step); "
        "'auto' = Ray's default when unset (every 10 s, raised to 19 x the snapshot's own time). ratio = "
        "wall_seconds('0') / wall_seconds('auto'), per repeat and of the means; driver_cpu ratio likewise with "
        "the driver's CPU seconds during run_search (user + system of the process, minus the two sampler "
        "threads' own thread_time). leak_check.by_finished_quarter[].driver_cpu_seconds: the same between the "
        "first and last sample of each quarter of finished trials (minus the RSS sampler's own thread time): a "
        "cost that grows with the trials so far (e.g. a snapshot of every trial at every step) rises per quarter."
    ),
    "driver_written_mib": (
        "bytes the driver process passed to write() during run_search (psutil io_counters write_chars: the "
        "experiment-state snapshots, searcher/scheduler state, the Optuna journal, logs; the trials' checkpoints "
        "are written by their workers); driver_disk_written_mib: write_bytes, what reached the block device "
        "(a file rewritten before writeback counts less). Per quarter of finished trials in "
        "leak_check.by_finished_quarter[].driver_written_mib. experiment_state_bytes: size of Ray's final "
        "experiment_state-*.json."
    ),
    "machine_load": "absolute times are from a shared 2-core CPU VM (other agents' Ray tests ran beside it): "
                    "see loadavg per search; ratios within one run are the meaningful part.",
}


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line → resolved settings (defaults, then the preset, then explicit flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a set of defaults (smoke: ~1 min; cpu: the real run)")
    p.add_argument("--trials", type=int, help="trials per search (default 200)")
    p.add_argument("--epochs", type=int, help="epochs per trial never stopped (default 2)")
    p.add_argument("--epoch-s", type=float, help="seconds each stand-in epoch sleeps (default 0.05)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default 4)")
    p.add_argument("--worker-nodes", type=int, help="worker nodes of the local cluster (default 2)")
    p.add_argument("--cpus-per-node", type=int, help="CPUs of each worker node (default 2)")
    p.add_argument("--object-store-mib", type=int, help="object store per node in MiB (default 100)")
    p.add_argument("--sampler", choices=["tpe", "random"], help="Optuna sampler (default tpe)")
    p.add_argument("--checkpoint-modes", nargs="+", help="TUNE_GLOBAL_CHECKPOINT_S values to compare (default 0 auto)")
    p.add_argument("--repeats", type=int, help="searches per mode, the order reversed every repeat (default 1; cpu 2)")
    p.add_argument("--sample-s", type=float, help="RSS / process sampling period (default 0.5)")
    p.add_argument("--actor-sample-s", type=float, help="list_actors sampling period (default 2)")
    p.add_argument("--settle-timeout-s", type=float, help="wait for actors to go after the search (default 60)")
    p.add_argument("--tmp-dir", help="parent of the searches' temporary directory (default the system's)")
    p.add_argument("--keep", action="store_const", const=True, help="keep the searches and Ray logs")
    p.add_argument("--out", type=Path, help="JSON result (default results/benchmarks/search_load_cpu.json for "
                                            "--preset cpu, else outputs/bench/search_load_<preset>.json)")
    p.add_argument("--one-search", nargs=2, metavar=("SETTINGS_JSON", "RESULT_JSON"), help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = vars(p.parse_args(argv))
    preset, out = args.pop("preset"), args.pop("out")
    one, mode = args.pop("one_search"), args.pop("mode")
    settings = {**DEFAULTS, **PRESETS.get(preset, {}), **{k: v for k, v in args.items() if v is not None}}
    if out is None:
        out = (REPO / "results" / "benchmarks" / "search_load_cpu.json" if preset == "cpu"
               else REPO / "outputs" / "bench" / f"search_load_{preset or 'custom'}.json")
    settings.update(preset=preset, out=str(Path(out).resolve()))
    if one:
        settings["_one_search"], settings["_mode"] = one, mode
    return settings


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[search_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# The stand-in trial (runs in Ray worker processes)


def quality(config: dict[str, Any]) -> float:
    """Deterministic final top-1 of a parameter set (as tests/search_driver.py): best at lr 0.01,
    alpha 0.3, beta 0.5."""
    q = 0.95 - 0.1 * (math.log10(config.get("lr", 0.01)) + 2.0) ** 2
    q -= 0.3 * ((config.get("alpha", 0.3) - 0.3) ** 2 + (config.get("beta", 0.5) - 0.5) ** 2)
    return max(0.05, min(0.99, q))


def load_standin(config: dict[str, Any], *, base: dict[str, Any], cache_dir: str | None = None) -> None:
    """Ray function trainable: ``base['epochs']`` epochs that sleep ``$MGFA_LOAD_EPOCH_S`` seconds,
    checkpoint and report top-1 = quality x (1 - 0.6^epoch), plus timing fields (worker clock)."""
    t_start = time.time()
    import psutil
    import ray
    from ray import tune

    proc_start = psutil.Process().create_time()
    node_id = ray.get_runtime_context().get_node_id()
    epoch_s = float(os.environ.get(EPOCH_ENV, "0.05"))
    start = 1
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["epoch"] + 1
    q = quality(config)
    for epoch in range(start, int(base["epochs"]) + 1):
        time.sleep(epoch_s)
        top1 = q * (1.0 - 0.6 ** epoch)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"eval_top1": top1, "epoch": epoch, "t_start": t_start, "t_report": time.time(),
                         "proc_start": proc_start, "node_id": node_id, "epoch_s": epoch_s},
                        checkpoint=tune.Checkpoint.from_directory(d))


def space_doc(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "scheduler": {"max_epochs": s["epochs"], "grace_period": s["grace_period"],
                      "reduction_factor": s["reduction_factor"], "early_stopping": True},
        "simplex": ["alpha", "beta", "gamma"],
        "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}},
    }


# ---------------------------------------------------------------------------------------------------
# One search in this process (the subprocess side)


PROC_KEYS = ("ray_workers", "idle_workers", "actor_workers", "agents", "zombies")
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # one each per node: not workers


def cluster_processes() -> dict[str, Any]:
    """This driver's Ray cluster, from its descendant processes: worker counts and the RSS of the rest."""
    import psutil

    out: dict[str, Any] = {"ray_workers": 0, "idle_workers": 0, "actor_workers": 0, "agents": 0, "zombies": 0,
                           "cluster_rss": 0, "titles": []}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                out["zombies"] += 1
                continue
            cmd = p.cmdline()
            title = cmd[0] if cmd else p.name()
            if title.startswith(RAY_AGENTS):
                out["agents"] += 1
                out["cluster_rss"] += p.memory_info().rss
            elif title.startswith("ray::"):
                out["ray_workers"] += 1
                if title.startswith("ray::IDLE"):
                    out["idle_workers"] += 1
                else:
                    out["actor_workers"] += 1
                    out["titles"].append(title.split()[0])
            else:
                out["cluster_rss"] += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


class Sampler(threading.Thread):
    """Every ``period`` s: the driver's RSS and the cluster's processes (``actors=False``), or the
    cluster's ALIVE actors by the state API (``actors=True``). Its own CPU time is kept apart."""

    def __init__(self, period: float, *, dashboard: str | None = None):
        super().__init__(daemon=True, name="search-load-sampler")
        self.dashboard, self.period = dashboard, period
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.cpu_seconds = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        me, c0 = psutil.Process(), time.thread_time()
        while not self._stop_event.is_set():
            t = time.time()
            if self.dashboard:
                self.samples.append({"t": t, "alive_actors": alive_actors(self.dashboard, self.errors)})
            else:
                cpu, io = me.cpu_times(), me.io_counters()
                sample = {"t": t, "rss": me.memory_info().rss, "cpu": cpu.user + cpu.system,
                          "own_cpu": time.thread_time() - c0, "write_chars": io.write_chars,
                          "write_bytes": io.write_bytes, **cluster_processes()}
                sample.pop("titles")
                self.samples.append(sample)
            self.cpu_seconds = time.thread_time() - c0
            self._stop_event.wait(max(0.0, self.period - (time.time() - t)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def alive_actors(dashboard: str, errors: list[str] | None = None) -> int | None:
    """ALIVE actors of the cluster by Ray's state API (None if it failed; the error is appended to ``errors``)."""
    try:
        from ray.util.state import list_actors

        return len(list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=10_000, timeout=20,
                               raise_on_missing_output=False))
    except Exception as err:  # noqa: BLE001 - the state API is best effort here; record why
        if errors is not None and len(errors) < 5:
            errors.append(f"{type(err).__name__}: {err}")
        return None


def alive_actor_classes(dashboard: str) -> dict[str, int] | None:
    """ALIVE actors by class name (None if the state API failed)."""
    try:
        from ray.util.state import list_actors

        counts: dict[str, int] = {}
        for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=10_000, timeout=20,
                             raise_on_missing_output=False):
            counts[a.class_name] = counts.get(a.class_name, 0) + 1
        return counts
    except Exception:  # noqa: BLE001 - best effort, as alive_actors
        return None


def gpu_memory_mib() -> list[int] | str:
    """nvidia-smi's used memory per GPU, or why not measured."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "not measured: no CUDA"
    except ImportError:
        return "not measured: no torch"
    if not shutil.which("nvidia-smi"):
        return "not measured: no nvidia-smi"
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False).stdout
    return [int(x) for x in out.split()]


def _quiet_address_file() -> None:
    """``Cluster`` writes (and on shutdown deletes) /tmp/ray/ray_current_cluster, through which a plain
    ``ray.init()`` anywhere on the machine would join this cluster: other users' Ray runs share the
    machine, so this process does neither (:func:`mgfa_ray.compat.suppress_cluster_address_file`)."""
    from mgfa_ray.compat import suppress_cluster_address_file

    suppress_cluster_address_file()


def one_search(s: dict[str, Any], mode: str) -> dict[str, Any]:
    """Start a cluster, run one search with ``TUNE_GLOBAL_CHECKPOINT_S=mode``, measure, shut down."""
    os.environ[CHECKPOINT_ENV] = mode
    os.environ[EPOCH_ENV] = str(s["epoch_s"])  # the nodes (and so the trial workers) inherit it
    os.environ.pop("RAY_ADDRESS", None)
    import psutil
    import ray
    import yaml
    from ray.cluster_utils import Cluster

    from mgfa_ray.config import SearchConfig, TrainConfig
    from mgfa_ray.search.driver import create_search, ray_trials, read_record, run_search
    from mgfa_ray.search.space import load_search_space
    from mgfa_ray.search.study import StudyRef, search_trials

    if load_standin.__module__ != "__main__":  # imported (tests): send the trainable by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[load_standin.__module__])
    _quiet_address_file()
    work = Path(tempfile.mkdtemp(prefix="mgfa-search-load-", dir=s["tmp_dir"]))
    ray_tmp = tempfile.mkdtemp(prefix="mgfa-ray-")  # short: Ray's socket paths must fit 107 bytes
    res: dict[str, Any] = {"checkpoint_mode": mode, "loadavg_start": os.getloadavg(), "pid": os.getpid()}
    cluster = None
    t_cluster = time.time()
    try:
        store = s["object_store_mib"] * 2**20
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": store, "include_dashboard": True, "temp_dir": ray_tmp,
            "dashboard_agent_listen_port": None})
        for _ in range(s["worker_nodes"]):
            cluster.add_node(num_cpus=s["cpus_per_node"], object_store_memory=store, temp_dir=ray_tmp)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        dashboard = f"http://{cluster.webui_url}"
        nodes = [n for n in ray.nodes() if n["Alive"]]
        res["cluster"] = {"start_seconds": time.time() - t_cluster, "dashboard": dashboard,
                          "nodes": [{"node_id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0),
                                     "head": n["NodeID"] == cluster.head_node.node_id} for n in nodes]}
        log(f"mode {mode}: cluster of {len(nodes)} nodes up in {res['cluster']['start_seconds']:.1f} s")

        space_file = work / "space.yaml"
        space_file.write_text(yaml.safe_dump(space_doc(s), sort_keys=False))
        search = SearchConfig(space=str(space_file), num_samples=s["trials"], max_concurrent=s["max_concurrent"],
                              cpus_per_trial=1, seed=0, sampler=s["sampler"])
        base = TrainConfig(manifest="stand-in", masks="stand-in", weights=None)
        search_dir = create_search(name="load", space=load_search_space(space_file), space_file=str(space_file),
                                   search=search, base=base, storage_path=str(work / "searches"))

        # Baseline: the cluster up and idle (pre-started workers have come up), nothing submitted.
        time.sleep(3.0)
        procs0, actors0 = cluster_processes(), alive_actors(dashboard)
        res["baseline"] = {**{k: procs0[k] for k in PROC_KEYS},
                           "alive_actors": actors0, "cluster_rss_mib": procs0["cluster_rss"] / 2**20,
                           "driver_rss_mib": psutil.Process().memory_info().rss / 2**20,
                           "gpu_memory_used_mib": gpu_memory_mib()}
        sampler, actor_sampler = Sampler(s["sample_s"]), Sampler(s["actor_sample_s"], dashboard=dashboard)
        cpu0, io0 = psutil.Process().cpu_times(), psutil.Process().io_counters()
        sampler.start()
        actor_sampler.start()
        t0 = time.time()
        try:
            run_search(search_dir, trainable=load_standin)
        finally:
            t1 = time.time()
            sampler.stop()
            actor_sampler.stop()
        cpu1, io1 = psutil.Process().cpu_times(), psutil.Process().io_counters()
        res["driver_written_mib"] = (io1.write_chars - io0.write_chars) / 2**20
        res["driver_disk_written_mib"] = (io1.write_bytes - io0.write_bytes) / 2**20
        res["wall_seconds"] = t1 - t0
        res["driver_cpu_seconds_all_threads"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        res["sampler_cpu_seconds"] = sampler.cpu_seconds + actor_sampler.cpu_seconds
        res["driver_cpu_seconds"] = res["driver_cpu_seconds_all_threads"] - res["sampler_cpu_seconds"]
        res["checkpoint_env_seen"] = os.environ.get(CHECKPOINT_ENV)
        log(f"mode {mode}: run_search {res['wall_seconds']:.1f} s")

        # After: wait for actor processes and ALIVE actors to go back to the baseline.
        settle, after = time.time(), None
        while True:
            procs, actors = cluster_processes(), alive_actors(dashboard)
            back = (procs["actor_workers"] <= procs0["actor_workers"] and procs["ray_workers"] <= procs0["ray_workers"]
                    and (actors is None or actors0 is None or actors <= actors0))
            if back or time.time() - settle > s["settle_timeout_s"]:
                after = {**{k: procs[k] for k in PROC_KEYS},
                         "alive_actors": actors, "actor_titles": sorted(set(procs["titles"])),
                         "alive_actor_classes": alive_actor_classes(dashboard),
                         "cluster_rss_mib": procs["cluster_rss"] / 2**20,
                         "seconds_after_search": time.time() - settle,
                         "gpu_memory_used_mib": gpu_memory_mib()}
                break
            time.sleep(0.5)
        res["after"] = after
        res["driver_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        # Per-trial timings: the trainable's own fields (Ray's trial folders) joined with the study.
        record = read_record(search_dir)
        study = StudyRef(record.study.storage, record.study.study_name).load()
        told = {t.user_attrs["ray_trial_id"]: t for t in search_trials(study)}
        trials = []
        for row in ray_trials(search_dir).to_dict("records"):
            h, ot = row["history"], told.get(row["trial"])
            entry = {"trial": row["trial"], "optuna_trial": ot.number if ot else None,
                     "state": ot.state.name if ot else None, "ray_status": row["ray_status"],
                     "epochs_run": int(row["epochs_run"]),
                     "suggested": ot.datetime_start.timestamp() if ot and ot.datetime_start else None,
                     "told": ot.datetime_complete.timestamp() if ot and ot.datetime_complete else None}
            if h is not None and len(h):
                last = h.iloc[-1]
                entry.update(start=float(h["t_start"].iloc[0]), end=float(last["t_report"]),
                             proc_start=float(h["proc_start"].iloc[0]), node_id=str(last["node_id"]),
                             ray_time_total_s=float(last["time_total_s"]), epoch_s=float(last["epoch_s"]))
            trials.append(entry)
        res.update(summarise_search(s, t0, t1, trials, sampler.samples, actor_sampler.samples))
        res["actor_sample_errors"] = actor_sampler.errors
        res["samples"] = [{"t": round(x["t"] - t0, 3), "rss_mib": round(x["rss"] / 2**20, 2),
                           **{k: x[k] for k in PROC_KEYS}, "cluster_rss_mib": round(x["cluster_rss"] / 2**20, 1)}
                          for x in sampler.samples]
        res["actor_samples"] = [{"t": round(x["t"] - t0, 3), "alive_actors": x["alive_actors"]}
                                for x in actor_sampler.samples]
        res["trials"] = [{k: (round(v - t0, 4) if k in ("suggested", "told", "start", "end", "proc_start")
                              and v is not None else v) for k, v in t.items()} for t in trials]
        state_files = sorted((work / "searches" / "load" / "runs" / "run-0").glob("experiment_state*.json"))
        res["experiment_state_bytes"] = state_files[-1].stat().st_size if state_files else None
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        time.sleep(1.0)
        res["processes_after_shutdown"] = len(psutil.Process().children(recursive=True))
        res["loadavg_end"] = os.getloadavg()
        if s["keep"]:
            res["kept"] = [str(work), ray_tmp]
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return res


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def _stats(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median": statistics.median(values) if values else None, "p90": _q(values, 0.9),
            "max": max(values) if values else None, "mean": statistics.fmean(values) if values else None}


def summarise_search(s: dict[str, Any], t0: float, t1: float, trials: list[dict[str, Any]],
                     samples: list[dict[str, Any]], actor_samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of one search (see MEASURED)."""
    wall, n = t1 - t0, len(trials)
    ran = [t for t in trials if "start" in t]
    run_s = [t["end"] - t["start"] for t in ran]
    told = sorted(t["told"] for t in trials if t.get("told") is not None)
    steady = None
    if len(told) >= 8:
        a, b = told[len(told) // 4], told[(3 * len(told)) // 4]
        steady = ((3 * len(told)) // 4 - len(told) // 4) / (b - a) if b > a else None
    states: dict[str, int] = {}
    for t in trials:
        states[str(t["state"])] = states.get(str(t["state"]), 0) + 1
    nodes: dict[str, int] = {}
    for t in ran:
        nodes[t["node_id"]] = nodes.get(t["node_id"], 0) + 1
    out: dict[str, Any] = {
        "num_trials": n, "trials_with_results": len(ran), "optuna_states": states, "trials_per_node": nodes,
        "total_epochs": sum(t["epochs_run"] for t in trials),
        "trials_per_second": n / wall, "steady_trials_per_second": steady,
        "sum_trial_run_seconds": sum(run_s), "trial_run_seconds": _stats(run_s),
        "ray_time_total_s": _stats([t["ray_time_total_s"] for t in ran]),
        "scheduling_overhead_per_trial_s": (wall * s["max_concurrent"] - sum(run_s)) / n if n else None,
        "effective_concurrency": sum(run_s) / wall,
        "start_latency_s": _stats([t["start"] - t["suggested"] for t in ran if t["suggested"] is not None]),
        "process_age_at_start_s": _stats([t["start"] - t["proc_start"] for t in ran]),
        "told_latency_s": _stats([t["told"] - t["end"] for t in ran if t["told"] is not None]),
        "epoch_s_seen_by_trials": sorted({t["epoch_s"] for t in ran}),
    }
    # Driver memory: first vs last quarter of the run's time.
    rss = [(x["t"], x["rss"] / 2**20) for x in samples]
    first = [r for t, r in rss if t <= t0 + wall / 4]
    last = [r for t, r in rss if t >= t1 - wall / 4]
    out["driver_rss_mib"] = {
        "samples": len(rss), "peak_sampled": max((r for _, r in rss), default=None),
        "first_quarter_mean": statistics.fmean(first) if first else None,
        "last_quarter_mean": statistics.fmean(last) if last else None,
        "growth_first_to_last_quarter": (statistics.fmean(last) - statistics.fmean(first)) if first and last else None,
    }
    # Leaks: live workers/actors against finished trials.
    def finished_at(t: float) -> int:
        return sum(1 for x in told if x <= t)

    quarters = []
    for i in range(4):
        lo, hi = i * n / 4, (i + 1) * n / 4

        def in_quarter(t: float, lo=lo, hi=hi, last=i == 3) -> bool:
            k = finished_at(t)
            return lo <= k < hi or (last and k >= hi)

        sel = [x for x in samples if in_quarter(x["t"])]
        act = [x["alive_actors"] for x in actor_samples if in_quarter(x["t"]) and x["alive_actors"] is not None]
        quarters.append({
            "finished_trials": [math.ceil(lo), math.ceil(hi)], "samples": len(sel),
            "max_actor_workers": max((x["actor_workers"] for x in sel), default=None),
            "mean_actor_workers": statistics.fmean(x["actor_workers"] for x in sel) if sel else None,
            "max_ray_workers": max((x["ray_workers"] for x in sel), default=None),
            "mean_ray_workers": statistics.fmean(x["ray_workers"] for x in sel) if sel else None,
            "max_idle_workers": max((x["idle_workers"] for x in sel), default=None),
            "max_zombies": max((x["zombies"] for x in sel), default=None),
            "max_alive_actors": max(act, default=None),
            "mean_alive_actors": statistics.fmean(act) if act else None, "actor_samples": len(act),
            "mean_cluster_rss_mib": statistics.fmean(x["cluster_rss"] / 2**20 for x in sel) if sel else None,
            "driver_cpu_seconds": ((sel[-1]["cpu"] - sel[0]["cpu"]) - (sel[-1]["own_cpu"] - sel[0]["own_cpu"])
                                   if len(sel) > 1 else None),
            "seconds": sel[-1]["t"] - sel[0]["t"] if len(sel) > 1 else None,
            "driver_written_mib": (sel[-1]["write_chars"] - sel[0]["write_chars"]) / 2**20 if len(sel) > 1 else None,
        })
    # Quarter 1 holds the Tuner's start-up (no trial yet) and quarter 4 the ramp-down, so the mean is
    # compared with quarter 2's; a leak also pushes the count past what the cluster can run at once.
    cap = max(s["max_concurrent"], s["worker_nodes"] * s["cpus_per_node"]) + 2

    def grows(key: str) -> bool:
        ref, last = quarters[1][f"mean_{key}"], quarters[-1][f"mean_{key}"]
        return ((ref is not None and last is not None and last > ref + 1.0)
                or (quarters[-1][f"max_{key}"] or 0) > cap)

    alive = [x["alive_actors"] for x in actor_samples if x["alive_actors"] is not None]
    out["leak_check"] = {
        "by_finished_quarter": quarters,
        "max_actor_workers": max((x["actor_workers"] for x in samples), default=None),
        "max_ray_workers": max((x["ray_workers"] for x in samples), default=None),
        "max_alive_actors": max(alive, default=None),
        "actor_samples_ok": len(alive), "actor_samples_failed": len(actor_samples) - len(alive),
        "grows_with_finished_trials": grows("actor_workers") or grows("ray_workers"),
    }
    return out


def child_main(s: dict[str, Any]) -> None:
    settings_json, result_json = s["_one_search"]
    settings = json.loads(Path(settings_json).read_text())
    from mgfa_ray.storage import atomic_write_json

    res = one_search(settings, s["_mode"])
    atomic_write_json(result_json, res)


# ---------------------------------------------------------------------------------------------------
# The benchmark (parent side): one subprocess per search


def run(s: dict[str, Any]) -> dict[str, Any]:
    """Every search of the settings ``s`` (each in a fresh subprocess); the JSON document."""
    started = time.perf_counter()
    doc = new_document("search_load", settings=s, measured=MEASURED)
    work = Path(tempfile.mkdtemp(prefix="mgfa-search-load-parent-", dir=s["tmp_dir"]))
    settings_file = work / "settings.json"
    settings_file.write_text(json.dumps(s))
    searches = []
    try:
        for rep in range(s["repeats"]):
            modes = s["checkpoint_modes"] if rep % 2 == 0 else list(reversed(s["checkpoint_modes"]))
            for mode in modes:
                result_file = work / f"result-{rep}-{mode}.json"
                log_file = work / f"search-{rep}-{mode}.log"
                log(f"repeat {rep}: {s['trials']} trials with {CHECKPOINT_ENV}={mode} (log {log_file})")
                with open(log_file, "w") as f:
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one-search",
                                           str(settings_file), str(result_file), "--mode", mode],
                                          stdout=f, stderr=subprocess.STDOUT, cwd=REPO, check=False)
                if proc.returncode != 0 or not result_file.exists():
                    tail = log_file.read_text()[-4000:]
                    raise RuntimeError(f"search with {CHECKPOINT_ENV}={mode} failed (exit {proc.returncode}):\n{tail}")
                res = json.loads(result_file.read_text())
                res["repeat"] = rep
                searches.append(res)
                log(f"repeat {rep}, mode {mode}: {res['wall_seconds']:.1f} s, {res['trials_per_second']:.2f} "
                    f"trials/s, overhead {res['scheduling_overhead_per_trial_s']:.2f} s/trial, actors after "
                    f"{res['after']['actor_workers']} processes / {res['after']['alive_actors']} alive")
    finally:
        if not s["keep"]:
            shutil.rmtree(work, ignore_errors=True)
    doc["searches"] = searches
    doc["summary"] = summarise(s, searches)
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["total_seconds"] = time.perf_counter() - started
    return doc


def summarise(s: dict[str, Any], searches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode means and the checkpoint-period ratio; the leak verdict over all searches."""
    by_mode: dict[str, Any] = {}
    for mode in s["checkpoint_modes"]:
        rs = [r for r in searches if r["checkpoint_mode"] == mode]
        if not rs:
            continue

        def mean(key: str, sub: str | None = None, rs=rs) -> float | None:
            vals = [(r[key][sub] if sub else r[key]) for r in rs]
            vals = [v for v in vals if v is not None]
            return statistics.fmean(vals) if vals else None

        by_mode[mode] = {
            "searches": len(rs), "wall_seconds": mean("wall_seconds"), "trials_per_second": mean("trials_per_second"),
            "steady_trials_per_second": mean("steady_trials_per_second"),
            "scheduling_overhead_per_trial_s": mean("scheduling_overhead_per_trial_s"),
            "median_trial_run_seconds": mean("trial_run_seconds", "median"),
            "median_start_latency_s": mean("start_latency_s", "median"),
            "p90_start_latency_s": mean("start_latency_s", "p90"),
            "median_told_latency_s": mean("told_latency_s", "median"),
            "driver_cpu_seconds": mean("driver_cpu_seconds"),
            "driver_peak_rss_mib": max(r["driver_rss_mib"]["peak_sampled"] or 0 for r in rs),
            "driver_maxrss_mib": max(r["driver_maxrss_mib"] for r in rs),
            "driver_rss_growth_mib": mean("driver_rss_mib", "growth_first_to_last_quarter"),
            "experiment_state_bytes": mean("experiment_state_bytes"),
            "driver_written_mib": mean("driver_written_mib"),
            "driver_cpu_seconds_by_finished_quarter": [
                statistics.fmean(q) if all(v is not None for v in q) else None
                for q in zip(*[[x["driver_cpu_seconds"] for x in r["leak_check"]["by_finished_quarter"]] for r in rs],
                             strict=True)],
        }
    out: dict[str, Any] = {"by_checkpoint_mode": by_mode}
    modes = s["checkpoint_modes"]
    if len(modes) == 2 and all(m in by_mode for m in modes):
        a, b = modes
        pairs = [(x, y) for x in searches for y in searches
                 if x["checkpoint_mode"] == a and y["checkpoint_mode"] == b and x["repeat"] == y["repeat"]]
        out["checkpoint_ratio"] = {
            "numerator": a, "denominator": b,
            "wall_ratio_of_means": by_mode[a]["wall_seconds"] / by_mode[b]["wall_seconds"],
            "wall_ratio_per_repeat": [x["wall_seconds"] / y["wall_seconds"] for x, y in pairs],
            "driver_cpu_ratio_of_means": by_mode[a]["driver_cpu_seconds"] / by_mode[b]["driver_cpu_seconds"],
        }
    out["leaks"] = {
        "returned_to_baseline": all(
            r["after"]["actor_workers"] <= r["baseline"]["actor_workers"]
            and r["after"]["ray_workers"] <= r["baseline"]["ray_workers"]
            and (r["after"]["alive_actors"] is None or r["baseline"]["alive_actors"] is None
                 or r["after"]["alive_actors"] <= r["baseline"]["alive_actors"]) for r in searches),
        "alive_actors_measured": all(r["after"]["alive_actors"] is not None for r in searches),
        "grows_with_finished_trials": any(r["leak_check"]["grows_with_finished_trials"] for r in searches),
        "max_actor_workers": max(r["leak_check"]["max_actor_workers"] for r in searches),
        "max_alive_actors": max((r["leak_check"]["max_alive_actors"] or 0) for r in searches),
        "processes_after_shutdown": max(r["processes_after_shutdown"] for r in searches),
        "per_search": [{"mode": r["checkpoint_mode"], "repeat": r["repeat"], "baseline": r["baseline"],
                        "after": r["after"]} for r in searches],
    }
    gpu = [r["after"]["gpu_memory_used_mib"] for r in searches]
    out["gpu_memory"] = gpu[0] if gpu and isinstance(gpu[0], str) else {
        "before": [r["baseline"]["gpu_memory_used_mib"] for r in searches], "after": gpu}
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the searches, write the JSON atomically."""
    settings = parse_args(argv)
    if "_one_search" in settings:
        child_main(settings)
        return
    from mgfa_ray.storage import atomic_write_json

    doc = run(settings)
    atomic_write_json(settings["out"], doc)
    log(f"wrote {settings['out']} ({doc['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
