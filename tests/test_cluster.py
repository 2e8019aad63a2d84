"""The cluster launchers in jobs/: ``submit.sh`` submitting the smoke job to a real two-node Ray
cluster (head and worker as separate processes on this machine) — the one end-to-end run of the
main job with its detector, extended and its best config trained again afterwards — the Slurm
script's flow with stub Slurm commands, the KubeRay manifest's structure, and the shell scripts'
syntax.

The cluster test never runs ``ray stop`` (it would stop every Ray cluster on the machine): it ends
the processes it started, by process group and by an environment marker that only its processes
and their descendants carry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import yaml
from ray.util.state.exception import RayStateApiException

from mgfa_ray.cli import _parser
from mgfa_ray.config import JobConfig, TrainConfig, load_config
from mgfa_ray.masks import resolve_mask_set

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
BIN = Path(__import__("sys").executable).parent
SUBMIT = JOBS / "submit.sh"
SBATCH = JOBS / "slurm" / "mgfa-ray.sbatch"
RAYJOB = JOBS / "kuberay" / "rayjob.yaml"


@pytest.mark.parametrize("script", [SUBMIT, SBATCH], ids=lambda p: p.name)
def test_shell_launchers_parse(script):
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    assert script.read_text().splitlines()[1].startswith("# ")  # a usage comment opens the script


def test_submit_script_refuses_bad_calls(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    usage = subprocess.run([str(SUBMIT)], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert usage.returncode == 2 and "Usage: RAY_ADDRESS=" in usage.stdout
    no_address = subprocess.run([str(SUBMIT), "jobs/leafsnap20.yaml"], capture_output=True, text=True,
                                env=env, timeout=30, check=False)
    assert no_address.returncode != 0 and "RAY_ADDRESS" in no_address.stderr
    missing = subprocess.run([str(SUBMIT), "jobs/absent.yaml"], capture_output=True, text=True,
                             env={**env, "RAY_ADDRESS": "http://127.0.0.1:1"}, timeout=30, check=False)
    assert missing.returncode == 2 and "jobs/absent.yaml not found" in missing.stderr


_STUBS = {  # stand-ins for the Slurm commands and the programs the batch script starts
    "scontrol": 'printf "node1\\nnode2\\nnode3\\n"',
    "srun": ('while [[ $1 == -* ]]; do [[ $1 == -w ]] && { node=$2; shift; }; shift; done\n'
             'echo "$node: $*" >> "$STUB_LOG"\n'
             'if [[ $1 == hostname ]]; then echo "fe80::1 10.1.2.3"; exit; fi\n'
             'echo $$ >> "$STUB_PIDS"; exec {sleep} 120'),  # `ray start --block` runs until stopped
    # The node count the script waits for: at most NODES_UP, and only once the three nodes' `ray start`
    # steps ran (they run concurrently with the script, so one may log after its first poll).
    "python": ('echo "ray.init log line"\n'
               'for _ in $(seq 100); do n=$(grep -c " ray start " "$STUB_LOG"); ((n >= 3)) && break; '
               '{sleep} 0.1; done\n'
               'echo $((n < NODES_UP ? n : NODES_UP))'),
    "mgfa-ray": 'echo "mgfa-ray $* RAY_ADDRESS=$RAY_ADDRESS" >> "$STUB_LOG"; exit 3',
    "sleep": "exit 0",
}


@pytest.mark.parametrize("nodes_up", [3, 1])
def test_slurm_script_starts_head_then_workers_then_runs_job_on_head(tmp_path, nodes_up):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in _STUBS.items():
        (stubs / name).write_text("#!/usr/bin/env bash\n" + body.replace("{sleep}", shutil.which("sleep")) + "\n")
        (stubs / name).chmod(0o755)
    log, pids = tmp_path / "log", tmp_path / "pids"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_PIDS": str(pids),
           "NODES_UP": str(nodes_up), "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_JOB_ID": "4242",
           "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_ON_NODE": "2", "MGFA_VENV": str(tmp_path / "no-venv")}
    run = subprocess.run(["bash", str(SBATCH), "jobs/cotton80_paper.yaml", "--smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    lines = log.read_text().splitlines()  # the stubs run concurrently: their order is not fixed
    ray_args = "--num-cpus=8 --num-gpus=2 --temp-dir=/tmp/ray-4242 --disable-usage-stats --block"
    starts = {
        "node1: ray start --head --node-ip-address=10.1.2.3 --port=6379 " + ray_args,
        "node2: ray start --address=10.1.2.3:6379 " + ray_args,
        "node3: ray start --address=10.1.2.3:6379 " + ray_args,
    }
    job = "mgfa-ray run jobs/cotton80_paper.yaml --smoke RAY_ADDRESS=10.1.2.3:6379"
    assert lines[0] == "node1: hostname --ip-address" and set(lines[1:4]) == starts
    if nodes_up == 3:  # all nodes joined: the job runs with the cluster's address; its status is the script's
        assert lines[4:] == [job] and run.returncode == 3, run.stderr
    else:  # a worker never joined: no job, failure
        assert len(lines) == 4 and run.returncode == 1 and "not every Ray node started" in run.stderr
    for pid in map(int, pids.read_text().split()):  # the Ray nodes' steps were stopped on exit
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load(RAYJOB.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["mgfa-ray", "run"]
    args = _parser().parse_args(argv[1:])  # the CLI accepts the entrypoint's options
    assert (REPO / args.job).is_file() and args.job.parts[0] == "jobs"
    load_config(JobConfig, REPO / args.job)

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == version("ray")  # the Ray pinned in pyproject.toml, as the image
    assert f"rayproject/ray:{version('ray')}" in RAYJOB.read_text()
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # rayStartParams values are strings
    workers = cluster["workerGroupSpecs"]
    assert len(workers) == 1 and workers[0]["groupName"] and workers[0]["replicas"] >= 1
    (worker,) = workers[0]["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert int(worker["resources"][kind]["nvidia.com/gpu"]) == 1

    # Every pod: the same working directory, the shared volume at the same path holding the data
    # root and the output dir, and the object store's endpoint and credentials (from a Secret).
    pods = [head["template"]["spec"], workers[0]["template"]["spec"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["workingDir"] == "/home/ray/mgfa-ray"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        shared = mounts[next(iter(claims))]
        env = {e["name"]: e for e in container["env"]}
        assert Path(env["MGFA_DATA_ROOT"]["value"]).is_relative_to(shared)
        assert Path(args.output_dir).is_relative_to(shared)
        assert env["AWS_ENDPOINT_URL"]["value"].startswith("http")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked_pids(marker: bytes) -> list[int]:
    """Processes whose environment carries ``marker`` (ours and their descendants: Ray's workers
    leave our process groups)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _end(groups: list[subprocess.Popen], marker: bytes) -> None:
    """SIGTERM to our process groups and marked processes, then SIGKILL to what is left."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for p in groups:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        for pid in _marked_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (any(p.poll() is None for p in groups) or _marked_pids(marker)):
            time.sleep(0.5)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
def test_submit_smoke_job_to_two_node_cluster(tmp_path, mobilenet_weights, data_root, shared_cluster):
    """Head with 0 CPUs + one worker with 2: the mask actor and every trial must run on the worker.
    Only submit.sh passes MGFA_DATA_ROOT to the job (the nodes do not have it)."""
    gcs, dashboard, client, agent_head, agent_worker = _free_ports(5)
    ray_tmp = tempfile.mkdtemp(prefix="mgc", dir="/tmp")  # short: Ray's socket paths are limited
    marker = f"MGFA_TEST_CLUSTER={ray_tmp}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MGFA_DATA_ROOT")}
    # RAY_AUTH_MODE: independent of a ~/.ray/auth_token another local ray.init() may have written.
    env.update(PATH=f"{BIN}:{env['PATH']}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               MGFA_TEST_CLUSTER=ray_tmp)
    common = ["--block", "--num-gpus", "0", "--object-store-memory", "100000000", "--disable-usage-stats"]
    head_cmd = [BIN / "ray", "start", "--head", "--port", gcs, "--dashboard-host", "127.0.0.1",
                "--dashboard-port", dashboard, "--include-dashboard", "true", "--ray-client-server-port", client,
                "--dashboard-agent-listen-port", agent_head, "--num-cpus", "0", "--temp-dir", f"{ray_tmp}/h", *common]
    worker_cmd = [BIN / "ray", "start", "--address", f"127.0.0.1:{gcs}", "--dashboard-agent-listen-port",
                  agent_worker, "--num-cpus", "2", "--temp-dir", f"{ray_tmp}/w", *common]
    address = f"http://127.0.0.1:{dashboard}"
    logs = {name: tmp_path / f"{name}.log" for name in ("head", "worker", "submit")}
    started: list[subprocess.Popen] = []

    def start(name, cmd, extra_env=None):
        with open(logs[name], "w") as log:
            started.append(subprocess.Popen([str(c) for c in cmd], env={**env, **(extra_env or {})}, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path))
        return started[-1]

    def ray_list(what):  # Ray's State API (what `ray list` prints), from this process
        from ray.util import state

        listing = {"nodes": state.list_nodes, "actors": state.list_actors}[what]
        return [dataclasses.asdict(row) for row in listing(address=address, detail=True, limit=10000, timeout=120)]

    def wait_for(what, ready, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in zip(("head", "worker"), started):
                assert p.poll() is None, f"ray {name} exited ({p.returncode}):\n{_tail(logs[name])}"
            try:
                if ready():
                    return
            except (OSError, AssertionError, json.JSONDecodeError, RayStateApiException):
                pass
            time.sleep(1)
        pytest.fail(f"{what} not ready after {timeout} s\nhead:\n{_tail(logs['head'])}\n"
                    f"worker:\n{_tail(logs['worker'])}")

    def dashboard_up():
        with urllib.request.urlopen(f"{address}/api/version", timeout=10) as r:
            return json.load(r)["ray_version"] == version("ray")

    job = yaml.safe_load((JOBS / "leafsnap20.yaml").read_text())
    # The job runs in an uploaded copy of the repository: ../shared/... does not exist beside it.
    job["train"]["weights"] = str(mobilenet_weights)
    job_file = tmp_path / "leafsnap20.yaml"
    job_file.write_text(yaml.safe_dump(job))
    out = tmp_path / "job"
    t0 = time.monotonic()
    try:
        start("head", head_cmd)
        start("worker", worker_cmd)
        wait_for("dashboard", dashboard_up, 180)
        wait_for("two nodes", lambda: sum(n["state"] == "ALIVE" for n in ray_list("nodes")) == 2, 180)
        print(f"cluster up in {time.monotonic() - t0:.0f} s")

        submit = start("submit", [SUBMIT, job_file, "--smoke", "--output-dir", out],
                       {"RAY_ADDRESS": address, "MGFA_DATA_ROOT": str(data_root)})
        rc = submit.wait(timeout=900)
        print(f"job done at {time.monotonic() - t0:.0f} s")
        submitted = logs["submit"].read_text(errors="replace")
        assert rc == 0, submitted[-6000:]
        for stage in ("manifest", "detector", "masks", "search"):
            assert f"=== mgfa-ray: {stage} ===" in submitted  # the job's output is streamed back

        nodes = ray_list("nodes")
        assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes)
        (head,) = [n for n in nodes if n["is_head_node"]]
        (worker,) = [n for n in nodes if not n["is_head_node"]]
        assert "CPU" not in head["resources_total"] and worker["resources_total"]["CPU"] == 2

        # Everything that needs a CPU ran on the worker node: the mask actor and both trials.
        actors = ray_list("actors")
        assert {a["node_id"] for a in actors if any(r.startswith("CPU") for r in a.get("required_resources") or {})} \
            == {worker["node_id"]}
        classes = [a["repr_name"] or a["class_name"] for a in actors if a["node_id"] == worker["node_id"]]
        assert classes.count("tune_trainable") == 2 and any("MapWorker" in c for c in classes)

        (job_info,) = [j for j in json.load(urllib.request.urlopen(f"{address}/api/jobs/", timeout=30))
                       if j["entrypoint"].startswith("mgfa-ray run")]
        assert job_info["status"] == "SUCCEEDED"
        runtime_env = job_info["runtime_env"]
        assert runtime_env["working_dir"].startswith("gcs://") and ".venv" in runtime_env["excludes"]
        assert runtime_env["env_vars"]["MGFA_DATA_ROOT"] == str(data_root)
    finally:
        _end(started[::-1], marker.encode())
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"cluster ended at {time.monotonic() - t0:.0f} s")
    assert not _marked_pids(marker.encode()), "processes of the test cluster survived"

    smoke = Path(f"{out}-smoke")
    report = json.loads((smoke / "report.json").read_text())
    assert report["smoke"] is True and report["output_dir"] == str(smoke)
    assert set(report["detector"]["per_class"]) == {"vein", "contour"}
    assert report["mask_set"]["rows"] == 24  # 3 classes x 8 photos
    assert report["search"]["num_trials"] == 2
    assert load_config(TrainConfig, smoke / "export" / "best_config.yaml").epochs == 1
    trials = pd.read_csv(smoke / "export" / "trials.csv")
    assert len(trials) == 2 and (trials["state"] == "COMPLETE").all() and (trials["epochs_run"] == 1).all()
    _extend_then_train_best_config(smoke, report, tmp_path, shared_cluster)


def _extend_then_train_best_config(smoke: Path, report: dict, tmp_path: Path, cluster: str) -> None:
    """After the cluster is gone, on another running cluster (the tests' shared one; the console
    script, as users run it): the CLI extends the job's finished search by exactly one trial and
    exports it again to the job's export/; the exported best config trains again to the same numbers."""
    search_dir = smoke / "search" / "leafsnap20"
    env = {**os.environ, "RAY_ADDRESS": cluster}
    more = subprocess.run([BIN / "mgfa-ray", "search", "resume", str(search_dir), "--more-trials", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    trials = pd.read_csv(smoke / "export" / "trials.csv")
    assert list(trials["run"]) == ["run-0", "run-0", "run-1"] and (trials["state"] == "COMPLETE").all()
    assert trials["optuna_trial"].tolist() == [0, 1, 2]

    best = smoke / "export" / "best_config.yaml"
    assert load_config(TrainConfig, best).epochs == 1
    # The export names the job's mask directory (its CURRENT set), not the set id.
    assert load_config(TrainConfig, best).masks == str(smoke / "masks")
    assert resolve_mask_set(str(smoke / "masks")) == report["mask_set"]["path"]
    train = subprocess.run([BIN / "mgfa-ray", "train", "--config", str(best), "--output-dir", str(tmp_path / "train")],
                           cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    final = json.loads((tmp_path / "train" / "final.json").read_text())
    assert final["epoch"] == 1 and 0.0 <= final["eval_top1"] <= 1.0
    # The exported config is exactly what the best trial ran: on CPU the rerun repeats it bit for bit.
    summary = json.loads((smoke / "export" / "summary.json").read_text())
    epochs = pd.read_csv(smoke / "export" / "trial_epochs.csv")
    trial = epochs[epochs["trial"] == summary["best_trial"]].iloc[-1]
    assert final["train_loss"] == trial["train_loss"] and final["eval_top1"] == trial["eval_top1"]


def test_submit_passes_the_object_store_settings_but_never_its_keys(tmp_path):
    """Ray writes a job's runtime_env into its logs: submit.sh hands the job the endpoint, region
    and profile name, and MGFA_DATA_ROOT, but no key (issue 30, defect 2). A stand-in ``ray`` on the
    PATH records the command line it is given."""
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {tmp_path / 'args.txt'}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "RAY_ADDRESS": "http://head:8265",
           "MGFA_DATA_ROOT": "/shared/data", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_PROFILE": "lab",
           "AWS_ACCESS_KEY_ID": "AKIASUBMITKEY", "AWS_SECRET_ACCESS_KEY": "submit-secret-1",
           "AWS_SESSION_TOKEN": "submit-token-2"}
    run = subprocess.run([str(SUBMIT), "jobs/leafsnap20.yaml", "--smoke"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    args = (tmp_path / "args.txt").read_text().splitlines()
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    expected = {k: v for k, v in env.items() if v and (k == "MGFA_DATA_ROOT" or k.startswith("AWS_")) and k not in keys}
    assert runtime_env["env_vars"] == expected and expected["AWS_PROFILE"] == "lab"
    assert not any(s in " ".join(args) for s in ("AKIASUBMITKEY", "submit-secret-1", "submit-token-2"))
    assert args[-2:] == ["jobs/leafsnap20.yaml", "--smoke"]
