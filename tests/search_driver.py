"""A search driver with a fast stand-in trainable, run as its own process so tests can SIGKILL it.

    python tests/search_driver.py create DIR --num-samples 6 [--max-epochs 4] [--storage-path P] …
    python tests/search_driver.py run DIR [--more-trials N] [--errored skip|resume|restart]
    python tests/search_driver.py cli search resume DIR …   # the real CLI (mgfa_ray.cli.main), stand-in trials

``--real MANIFEST MASKS`` makes the trials the real classifier (mgfa_ray.search.driver.tune_trainable) at
tiny settings instead. The stand-in trains nothing: its "top-1" at epoch e is a smooth, deterministic function of the
sampled parameters, q(params) * (1 - 0.6^e), so an early-stopped trial's value is truncated and
the best trial is a property of the parameters. Each epoch sleeps ``MGFA_STANDIN_EPOCH_S``
seconds, checkpoints its epoch and reports. ``MGFA_STANDIN_FAIL_DIR`` names a directory: a trial
whose Optuna number has a file ``fail-<n>`` there raises once at epoch 2 (the file is removed).
``MGFA_STANDIN_LOG`` names a directory where every epoch run appends ``<optuna number> <epoch>``
to a file per trial, so tests can count what ran, where ``node-<optuna number>`` holds the Ray
node id the trial runs on (written when an epoch starts), and where ``span-<optuna number>`` holds
``<start> <end> <pid>``: the Unix times the trainable started and returned, and its process.
``MGFA_STANDIN_BARRIER=N`` (with the log directory) makes every trial, once started, wait until N
trials have started (or 120 s have passed) before its first epoch, so a test of how many trials Ray
runs at once does not depend on how fast a loaded machine starts their workers.
``MGFA_STANDIN_HOLD`` names a file: while it exists, every trial waits after its second epoch's
sleep, so a test can keep a driver running for as long as it needs, and no longer.

Searches are created without TensorBoard event files (``search.tensorboard: false``): a driver
then does not import torch, which the stand-in never needs (~3 s and 3.5 CPU-seconds per driver
start on 2 cores); ``create --tensorboard`` gives the product's default.

``run`` starts its own local cluster, unless ``$RAY_ADDRESS`` names a running one: it then joins
that cluster with its ``MGFA_*`` variables as the job's ``runtime_env`` (:func:`start_or_join_ray`).

``run --ray-cpus C --ray-gpus G`` starts the local cluster with those resources (G may exceed the
GPUs present: Ray then schedules onto a GPU that is only a number), and ``create --cpus-per-trial``
/ ``--gpus-per-trial`` set the trial's share, so tests can pack trials.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def quality(config: dict) -> float:
    """Deterministic final top-1 of a parameter set: best at lr = 0.01, alpha = 0.3, beta = 0.5."""
    lr = config.get("lr", 0.01)
    q = 0.95 - 0.1 * (math.log10(lr) + 2.0) ** 2
    q -= 0.3 * ((config.get("alpha", 0.3) - 0.3) ** 2 + (config.get("beta", 0.5) - 0.5) ** 2)
    return max(0.05, min(0.99, q))


def standin_trainable(config: dict, *, base: dict, cache_dir: str | None = None) -> None:
    """Ray function trainable: ``base['epochs']`` epochs of the stand-in curve, checkpointed."""
    from ray import tune

    number = config.get("optuna_trial")
    start = 1
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "state.json").read_text())["epoch"] + 1
    fail_dir = os.environ.get("MGFA_STANDIN_FAIL_DIR")
    log_dir = os.environ.get("MGFA_STANDIN_LOG")
    q = quality(config)
    begin = time.time()
    if log_dir and os.environ.get("MGFA_STANDIN_BARRIER"):
        _wait_for_starts(Path(log_dir), number, int(os.environ["MGFA_STANDIN_BARRIER"]))
    for epoch in range(start, int(base["epochs"]) + 1):
        if log_dir:
            import ray

            node_file = Path(log_dir) / f"node-{number}"
            node_file.with_suffix(".tmp").write_text(ray.get_runtime_context().get_node_id())
            node_file.with_suffix(".tmp").replace(node_file)  # readers never see it half written
        time.sleep(float(os.environ.get("MGFA_STANDIN_EPOCH_S", "0.2")))
        hold = os.environ.get("MGFA_STANDIN_HOLD")
        while epoch >= 2 and hold and os.path.exists(hold):  # the test holds the trial here
            time.sleep(0.05)
        if fail_dir and epoch == 2:
            marker = Path(fail_dir) / f"fail-{number}"
            if marker.exists():
                marker.unlink()
                raise RuntimeError(f"injected failure of Optuna trial {number} at epoch {epoch}")
        if log_dir:
            with open(Path(log_dir) / f"trial-{number}.log", "a") as f:
                f.write(f"{number} {epoch}\n")
        top1 = q * (1.0 - 0.6 ** epoch)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"eval_top1": top1, "test_top1": top1, "epoch": epoch, "train_loss": 1.0 - top1},
                        checkpoint=tune.Checkpoint.from_directory(d))
    if log_dir:
        (Path(log_dir) / f"span-{number}").write_text(f"{begin} {time.time()} {os.getpid()}")


def _wait_for_starts(log_dir: Path, number, n: int, timeout: float = 120.0) -> None:
    """Mark this trial started, then wait until ``n`` trials have (a barrier; gives up after ``timeout``)."""
    (log_dir / f"started-{number}").touch()
    deadline = time.monotonic() + timeout
    while len(list(log_dir.glob("started-*"))) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def space_doc(max_epochs: int, early_stopping: bool = True) -> dict:
    return {
        "scheduler": {"max_epochs": max_epochs, "grace_period": 1, "reduction_factor": 2,
                      "early_stopping": early_stopping},
        "simplex": ["alpha", "beta", "gamma"],
        "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}},
        "points_to_evaluate": [{"alpha": 0.3, "beta": 0.5, "gamma": 0.2, "lr": 0.01}],
    }


def create(storage: str, *args: str) -> str:
    """``create STORAGE ARGS…`` in this process (it starts no Ray); returns the search directory."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["create", storage, *args]) == 0
    return out.getvalue().strip().splitlines()[-1]


def main(argv=None) -> int:
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cli"]:  # the command line as users run it, with this file's fast trials
        import mgfa_ray.search.driver
        from mgfa_ray import cli

        start_or_join_ray()
        if read_record_base(argv)["manifest"] == "stand-in":
            mgfa_ray.search.driver.tune_trainable = standin_trainable
        return cli.main(argv[1:])

    from mgfa_ray.config import SearchConfig, TrainConfig
    from mgfa_ray.search.driver import create_search, read_record, run_search
    from mgfa_ray.search.space import load_search_space

    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["create", "run"])
    p.add_argument("dir", help="storage path (create) or search directory (run)")
    p.add_argument("--name", default="standin")
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--max-failures", type=int, default=1)
    p.add_argument("--no-early-stopping", action="store_true")
    p.add_argument("--study-storage", default=None)
    p.add_argument("--more-trials", type=int, default=0)
    p.add_argument("--errored", default="skip")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--no-reuse-workers", action="store_true")
    p.add_argument("--tensorboard", action="store_true", help="create: search.tensorboard true (the product default)")
    p.add_argument("--ray-cpus", type=float, default=None, help="run: start the local cluster with these CPUs")
    p.add_argument("--ray-gpus", type=float, default=None, help="run: ... and these GPUs")
    p.add_argument("--cache-dir", default=None, help="create: the trials' image cache (recorded)")
    p.add_argument("--export-dir", default=None, help="create: the default export directory (recorded)")
    p.add_argument("--real", nargs=2, metavar=("MANIFEST", "MASKS"), default=None,
                   help="create: trials are the real classifier (tune_trainable) on this manifest and mask set")
    args = p.parse_args(argv)
    if args.action == "create":
        space_file = Path(tempfile.mkdtemp()) / "space.yaml"
        space_file.write_text(yaml.safe_dump(space_doc(args.max_epochs, not args.no_early_stopping)))
        search = SearchConfig(space=str(space_file), num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                              cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, seed=0,
                              max_failures=args.max_failures, study_storage=args.study_storage,
                              reuse_workers=not args.no_reuse_workers, tensorboard=args.tensorboard)
        if args.real:  # tiny settings, as tests/conftest.py's tiny_train_config
            base = TrainConfig(manifest=args.real[0], masks=args.real[1], backbone="mobilenet_v2", weights=None,
                               resize=72, train_crop=64, batch_size=8, lr=0.01, momentum=0.9, lr_step=1, device="cpu")
        else:
            base = TrainConfig(manifest="stand-in", masks="stand-in", weights=None)
        print(create_search(name=args.name, space=load_search_space(space_file), space_file=str(space_file),
                            search=search, base=base, storage_path=args.dir, cache_dir=args.cache_dir,
                            export_dir=args.export_dir))
        return 0
    start_or_join_ray()
    if args.ray_cpus is not None or args.ray_gpus is not None:
        import ray

        ray.init(address="local", num_cpus=args.ray_cpus, num_gpus=args.ray_gpus, include_dashboard=False,
                 configure_logging=False)
    real = read_record(args.dir).trial_base["manifest"] != "stand-in"
    run_search(args.dir, more_trials=args.more_trials, errored=args.errored,
               trainable=None if real else standin_trainable)
    return 0


def start_or_join_ray() -> None:
    """Where this driver's trials run. ``$RAY_ADDRESS`` empty or unset: ``local``, so ``run_search``
    starts a new local cluster once it holds the search's lock, even when a ``ray start`` cluster runs
    on this machine (which ``ray.init()`` would otherwise join). Naming a running cluster
    (tests/conftest.py: shared_cluster): connect to it now, with this process's ``MGFA_*`` variables
    as the job's ``runtime_env`` (trial workers inherit the environment of whoever started the
    nodes, not the driver's); ``run_search`` keeps that connection (mgfa_ray.runtime.ensure_ray)."""
    address = os.environ["RAY_ADDRESS"] = os.environ.get("RAY_ADDRESS") or "local"
    if address in ("local", "auto"):
        return
    import ray

    ray.init(address=address, configure_logging=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("MGFA_")}})


def read_record_base(argv: list[str]) -> dict:
    """The trial template of the search directory named on a ``cli search …`` command line."""
    from mgfa_ray.search.driver import read_record

    return read_record(next(a for a in argv[3:] if not a.startswith("-"))).trial_base


if __name__ == "__main__":
    sys.exit(main())
