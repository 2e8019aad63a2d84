"""Mask stage under faults: a killed mask actor, a lost worker node, a shard that keeps killing its
actor, a writer killed mid-write, and two writers of one set at the same time (local and S3).

Every fault is real: SIGKILL of the Ray actor's process, a Ray node removed without grace, the
kernel's SIGXFSZ in the middle of a write, two writers racing on one directory or bucket. To make a
kill land mid-run without any hook in the code, one photo of the manifest is replaced by a FIFO
(named pipe): the writer computing its shard blocks in ``open()`` until the test writes the real
photo's bytes into the pipe, so the test kills while that shard is in flight and only then lets it
finish. The manifest hash is path-free, so it is the same mask set as the undisturbed reference
built from the real paths, and its masks must equal the reference's bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mgfa_ray.masks.writer as mask_writer
from mgfa_ray.config import DetectorConfig, MasksConfig
from mgfa_ray.detector.training import train_detector
from mgfa_ray.storage import fs_list, resolve_location
from mgfa_ray.data.manifest import manifest_hash
from mgfa_ray.masks.sources import DetectorBoxes, LabelBoxes
from mgfa_ray.masks import build_mask_set, read_masks, read_metadata, read_rows, shard_name
from mgfa_ray.data.regions import index_labels

REGIONS = ["vein", "contour"]
#: 24 images, 6 shards of 4; one actor, so shards run in order and the pipe's shard is in flight.
CFG = MasksConfig(resolution=32, batch_size=2, num_actors=1, rows_per_shard=4)
PIPED = 13  # sorted position of the image read through the pipe: shard 3; shards 0-2 finish first
TIMEOUT = 150.0  # generous: the machine is shared with other agents' Ray tests


@pytest.fixture(scope="module")
def tiny_detector(data_root, tiny_manifest, tmp_path_factory) -> DetectorBoxes:
    df, _ = tiny_manifest
    labels = {k: v for k, v in index_labels(data_root / "leafsnap20-regions" / "labels").items()
              if k in set(df["image_id"])}
    cfg = DetectorConfig(imgsz=64, epochs=1, batch=4, conf=0.001)
    out = tmp_path_factory.mktemp("detector")
    metrics = train_detector(manifest=df, label_files=labels, region_classes=REGIONS, cfg=cfg, out_dir=out)
    return DetectorBoxes(weights=str(out / "weights.pt"), detector_key=metrics["detector_key"], imgsz=cfg.imgsz,
                         conf=cfg.conf, batch_size=CFG.batch_size)


def masks_of(set_location) -> dict[str, bytes]:
    rows = read_rows(set_location)
    return dict(zip(rows["image_id"], rows["masks"], strict=True))


@pytest.fixture(scope="module")
def reference(tiny_manifest, tiny_detector, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """The undisturbed set (in-process writer, real paths): its location and masks by image_id."""
    df, _ = tiny_manifest
    location = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=tiny_detector,
                              region_classes=REGIONS, cfg=CFG, location=tmp_path_factory.mktemp("reference"),
                              executor="local")
    masks = masks_of(location)
    assert sum(np.frombuffer(m, np.uint8).sum() for m in masks.values()) > 0  # not a comparison of zeros
    return location, masks


@pytest.fixture(scope="module")
def label_source(data_root) -> LabelBoxes:
    return LabelBoxes.create(index_labels(data_root / "leafsnap20-regions" / "labels"), classes=REGIONS,
                             unlabelled="empty")


def assert_complete_and_equal(set_location, df: pd.DataFrame, reference: dict[str, bytes]) -> None:
    """Metadata complete, exactly one row per manifest image, masks bitwise equal to the
    reference, readable by read_masks, and nothing in the set but its files (no temporaries)."""
    meta = read_metadata(set_location)
    assert meta["rows"] == len(df) == sum(meta["rows_per_shard"].values())
    rows = read_rows(set_location)
    assert rows["image_id"].tolist() == sorted(df["image_id"])  # each image once: none missing, none twice
    assert masks_of(set_location) == reference
    ids = df["image_id"].tolist()
    masks, _ = read_masks(set_location, image_ids=ids, region_classes=REGIONS, labels=df["label"].tolist())
    k, r = len(REGIONS), meta["mask_resolution"]
    np.testing.assert_array_equal(masks, np.stack([np.frombuffer(reference[i], np.uint8).reshape(k, r, r)
                                                   for i in ids]))
    fs, set_dir = resolve_location(set_location)
    assert fs_list(fs, set_dir) == sorted([*meta["rows_per_shard"], "metadata.json", "plan.json"])


class Pipe:
    """The manifest with the photo at sorted position ``position`` read through a FIFO."""

    def __init__(self, df: pd.DataFrame, tmp_path: Path, position: int = PIPED):
        self.image_id = sorted(df["image_id"])[position]
        row = df["image_id"] == self.image_id
        self.photo = Path(df.loc[row, "path"].iloc[0]).read_bytes()
        self.path = tmp_path / "blocks-until-fed.jpg"
        os.mkfifo(self.path)
        self.manifest = df.copy()
        self.manifest.loc[row, "path"] = str(self.path)
        assert manifest_hash(self.manifest) == manifest_hash(df)  # path-free: the same mask set

    def feed(self, keep_trying) -> bool:
        """Once a reader has opened the pipe, write the real photo into it; ``False`` if
        ``keep_trying()`` turned false first."""
        while keep_trying():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                time.sleep(0.05)
                continue
            os.set_blocking(fd, True)
            try:
                view = memoryview(self.photo)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            return True
        return False

    def release(self) -> None:
        """Let a reader still blocked on the pipe go (it reads an empty file)."""
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def blocked_on_pipe(pid: int) -> bool:
    """Whether a thread of process ``pid`` waits in the kernel for a FIFO's writer (Linux wchan)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            if Path(f"/proc/{pid}/task/{tid}/wchan").read_text() == "wait_for_partner":
                return True
        except OSError:
            continue
    return False


class Build(threading.Thread):
    """``build_mask_set(**kwargs)`` in a thread; ``result`` or ``error`` once done."""

    def __init__(self, **kwargs):
        super().__init__(daemon=True)
        self.kwargs, self.result, self.error = kwargs, None, None

    def run(self) -> None:
        try:
            self.result = build_mask_set(**self.kwargs)
        except BaseException as err:  # noqa: BLE001 — handed to the test
            self.error = err


def start_piped_build(df: pd.DataFrame, source, tmp_path: Path, **kwargs) -> tuple[Pipe, Path, Build]:
    """A started :class:`Build` of ``df``'s mask set under ``tmp_path/masks`` whose manifest has the
    photo ``PIPED`` replaced by a named pipe: the writer blocks there until the test feeds it."""
    pipe = Pipe(df, tmp_path)
    location = tmp_path / "masks"
    build = Build(manifest=pipe.manifest, manifest_hash=manifest_hash(df), source=source, region_classes=REGIONS,
                  cfg=CFG, location=location, **kwargs)
    build.start()
    return pipe, location, build


def wait_for(condition, what: str, *, timeout: float = TIMEOUT, build: Build | None = None):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert build is None or build.is_alive(), f"the build ended before {what}: {build.error!r}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)
    return value


def shards_present(location: Path, indices) -> bool:
    return all(len(list(location.glob(f"*/{shard_name(i)}"))) == 1 for i in indices)


def pool_actor(exclude_pid: int | None = None) -> tuple[str, int] | None:
    """``(actor_id, pid)`` of this cluster's live mask-writer actor (from the cluster's own actor
    table, so never another cluster's process), or None."""
    import ray

    from ray_state import actor_table  # tests/ray_state.py

    job = ray.get_runtime_context().job_id
    for actor_id, info in actor_table(job_id=job, state="ALIVE").items():
        if "ShardWriter" in info["ActorClassName"] and info["Pid"] and info["Pid"] != exclude_pid:
            return actor_id, info["Pid"]
    return None


def sigkill_actor(pid: int) -> None:
    title = " ".join(psutil.Process(pid).cmdline())
    assert title.startswith("ray::MapWorker(MapBatches(ShardWriter))"), title  # Ray's title for the actor
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_killed_mask_actor_is_restarted_and_the_same_call_completes(ray_cluster, tiny_manifest, tiny_detector,
                                                                    reference, tmp_path):
    """SIGKILL the actor while its shard is in flight: Ray restarts it (max_restarts=ACTOR_RESTARTS)
    and retries the shards it held (max_task_retries=-1), so the same build_mask_set call completes."""
    df, _ = tiny_manifest
    pipe, location, build = start_piped_build(df, tiny_detector, tmp_path)
    try:
        wait_for(lambda: shards_present(location, range(3)), "shards 0-2", build=build)
        actor_id, pid = wait_for(pool_actor, "live mask actor", build=build)
        wait_for(lambda: blocked_on_pipe(pid), "actor blocked on the piped photo", build=build)
        (set_dir,) = location.iterdir()
        before = sorted(p.name for p in set_dir.iterdir())
        assert shard_name(PIPED // CFG.rows_per_shard) not in before  # the kill lands mid-run
        sigkill_actor(pid)
        # Ray restarts the actor in a new process, which takes the shard again and opens the pipe.
        _, new_pid = wait_for(lambda: pool_actor(exclude_pid=pid), "restarted actor", build=build)
        assert pipe.feed(build.is_alive)
        build.join(TIMEOUT)
    finally:
        pipe.release()
    assert not build.is_alive() and build.error is None, build.error
    assert build.result == str(location / Path(reference[0]).name)
    from ray_state import actor_table  # tests/ray_state.py

    assert actor_table(actor_id=actor_id)["NumRestarts"] >= 1  # the same actor, restarted, not a new one
    assert new_pid != pid
    assert_complete_and_equal(build.result, df, reference[1])


NODE_LOSS = r'''
import errno, json, os, signal, sys, threading, time
from pathlib import Path
import pandas as pd, ray
from ray.cluster_utils import Cluster
from mgfa_ray.config import MasksConfig
from mgfa_ray.data.manifest import manifest_hash
from mgfa_ray.masks import DetectorBoxes, build_mask_set

signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))  # run the finally below: shut the cluster down
a = json.load(open(sys.argv[1]))
location = Path(a["location"])
# Declare a node dead after 3 missed health checks 0.5 s apart (Ray's default: 5 x 3 s), as
# tests/test_cluster_faults.py does: the test waits for the death, not for the default's 15 s.
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "include_dashboard": False,
    "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
try:
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, configure_logging=False)
    out = {}
    def run():
        try:
            out["result"] = build_mask_set(
                manifest=pd.read_parquet(a["manifest"]), manifest_hash=a["manifest_hash"],
                source=DetectorBoxes(**a["source"]), region_classes=a["regions"], cfg=MasksConfig(**a["cfg"]),
                location=location)
        except BaseException as err:
            out["error"] = repr(err)
    build = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    build.start()
    while not all(list(location.glob(f"*/shard-{i:05d}.parquet")) for i in range(3)):
        assert build.is_alive(), out
        assert time.monotonic() - t0 < a["timeout"], "no shard"
        time.sleep(0.05)
    out["before"] = sorted(p.name for p in next(location.iterdir()).iterdir())
    cluster.remove_node(node, allow_graceful=False)  # the worker node dies, with the actor on it
    out["removed_at"] = time.monotonic() - t0
    cluster.add_node(num_cpus=1)  # a replacement joins; the actor is restarted there
    fed = False
    while build.is_alive() and not fed and time.monotonic() - t0 < a["timeout"]:
        try:
            fd = os.open(a["pipe"], os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            assert err.errno == errno.ENXIO, err
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        os.write(fd, Path(a["photo"]).read_bytes())
        os.close(fd)
        fed = True
    out["fed_at"] = time.monotonic() - t0
    build.join(a["timeout"])
    out["seconds"] = time.monotonic() - t0
    print("RESULT " + json.dumps(out), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
'''


@pytest.mark.slow
def test_lost_worker_node_mid_run_the_same_call_completes(tiny_manifest, tiny_detector, reference, tmp_path):
    """A 2-node cluster (head without CPUs + one worker node): the worker node is removed without
    grace while a shard is in flight and a new node joins; the actor is restarted on it and the
    call completes. Runs in a child process, which owns that cluster (this one has its own)."""
    df, _ = tiny_manifest
    pipe = Pipe(df, tmp_path)
    pipe.manifest.to_parquet(tmp_path / "manifest.parquet")
    args = {"manifest": str(tmp_path / "manifest.parquet"), "manifest_hash": manifest_hash(df),
            "source": tiny_detector.__dict__, "regions": REGIONS, "cfg": CFG.model_dump(),
            "location": str(tmp_path / "masks"), "pipe": str(pipe.path),
            "photo": str(df.loc[df["image_id"] == pipe.image_id, "path"].iloc[0]), "timeout": TIMEOUT}
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "node_loss.py").write_text(NODE_LOSS)
    # Its own Ray temp dir (short: socket paths are limited), so that the address file Cluster writes
    # for ray.init() to find is not the machine-wide /tmp/ray one that other Ray users read.
    ray_tmp = tempfile.mkdtemp(prefix="mgfa-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "node_loss.py"), str(tmp_path / "args.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the child shuts its cluster down
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"the node-loss run did not finish:\n{output[-4000:]}")
    finally:
        pipe.release()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, output[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in out, out
    assert shard_name(PIPED // CFG.rows_per_shard) not in out["before"]  # the node died mid-run
    assert_complete_and_equal(out["result"], df, reference[1])


@pytest.mark.slow
def test_shard_that_keeps_killing_its_actor_fails_clearly_then_a_rerun_completes(
        ray_cluster, tiny_manifest, tiny_detector, reference, tmp_path, monkeypatch):
    """A shard whose actor dies every time it takes it (as an image that crashes the decoder would)
    ends the call after ACTOR_RESTARTS restarts with a clear error instead of looping (Ray Data's
    default restarts forever); finished shards are kept and a rerun completes the set."""
    monkeypatch.setattr(mask_writer, "ACTOR_RESTARTS", 2)  # the bound under test, small to keep the test short
    df, _ = tiny_manifest
    pipe, location, build = start_piped_build(df, tiny_detector, tmp_path)
    kills, pid = 0, None
    try:
        wait_for(lambda: shards_present(location, range(3)), "shards 0-2", build=build)
        while build.is_alive() and kills <= mask_writer.ACTOR_RESTARTS + 1:
            found = wait_for(lambda p=pid: pool_actor(exclude_pid=p) or not build.is_alive(), "live mask actor")
            if found is True:
                break
            _, pid = found
            wait_for(lambda p=pid: blocked_on_pipe(p) or not build.is_alive(), "actor blocked on the pipe")
            if build.is_alive():
                sigkill_actor(pid)
                kills += 1
        if build.is_alive():  # restarted beyond the bound: let it finish so the test ends
            pipe.feed(build.is_alive)
        build.join(TIMEOUT)
    finally:
        pipe.release()
    assert not build.is_alive()
    assert kills == mask_writer.ACTOR_RESTARTS + 1, f"the call ended after {kills} kills: {build.error!r}"
    assert isinstance(build.error, RuntimeError), build.error
    assert "finished shards are kept, a rerun computes the rest" in str(build.error)
    (set_dir,) = location.iterdir()
    assert not (set_dir / "metadata.json").exists()
    kept = {p.name: p.stat().st_ino for p in set_dir.glob("shard-*.parquet")}
    assert {shard_name(i) for i in range(3)} <= set(kept)
    assert shard_name(PIPED // CFG.rows_per_shard) not in kept

    again = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=tiny_detector,
                           region_classes=REGIONS, cfg=CFG, location=location)
    assert again == str(set_dir)
    assert {n: (set_dir / n).stat().st_ino for n in kept} == kept  # finished shards were not rewritten
    assert_complete_and_equal(again, df, reference[1])


@pytest.mark.slow
def test_straggler_writer_never_rewrites_a_set_another_writer_finished(ray_cluster, tiny_manifest, tiny_detector,
                                                                        reference, tmp_path):
    """Writer A (Ray) is blocked mid-run on a shard; writer B (in-process) computes and publishes the
    whole set meanwhile. When A goes on it finds its shard already written with equal rows, keeps
    it, skips the rest and returns the same set: no file of B's is replaced."""
    df, _ = tiny_manifest
    pipe, location, a = start_piped_build(df, tiny_detector, tmp_path)
    try:
        wait_for(lambda: shards_present(location, range(3)), "shards 0-2 of writer A", build=a)
        _, pid = wait_for(pool_actor, "live mask actor", build=a)
        wait_for(lambda: blocked_on_pipe(pid), "writer A blocked on the piped photo", build=a)
        b = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=tiny_detector,
                           region_classes=REGIONS, cfg=CFG, location=location, executor="local")
        files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(b).iterdir()}
        assert "metadata.json" in files and len(files) == 2 + 6
        assert pipe.feed(a.is_alive)  # A computes the piped shard only now, after B published it
        a.join(TIMEOUT)
    finally:
        pipe.release()
    assert not a.is_alive() and a.error is None, a.error
    assert a.result == b
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(b).iterdir()} == files
    assert_complete_and_equal(b, df, reference[1])


def test_writers_that_disagree_fail_clearly_and_keep_the_first_shard(tiny_manifest, tiny_detector, reference,
                                                                      tmp_path):
    """While this writer computes shard 3, another writer of the set writes shard 3 with other masks
    (as a detector that differs across machines would): this writer fails naming the disagreement
    and does not replace the other's shard; the set stays unpublished."""
    df, _ = tiny_manifest
    pipe, location, build = start_piped_build(df, tiny_detector, tmp_path, executor="local")
    piped = shard_name(PIPED // CFG.rows_per_shard)
    try:
        wait_for(lambda: shards_present(location, range(3)), "shards 0-2", build=build)
        wait_for(lambda: blocked_on_pipe(os.getpid()), "writer blocked on the piped photo", build=build)
        theirs = pq.read_table(Path(reference[0]) / piped)
        masks = theirs.column("masks").to_pylist()
        masks[0] = bytes([1 - masks[0][0]]) + masks[0][1:]  # one pixel differs
        theirs = theirs.set_column(theirs.schema.get_field_index("masks"), "masks", pa.array(masks, pa.binary()))
        (set_dir,) = location.iterdir()
        pq.write_table(theirs, tmp_path / "theirs.parquet")
        os.replace(tmp_path / "theirs.parquet", set_dir / piped)  # the other writer's complete shard
        planted = (set_dir / piped).read_bytes()
        assert pipe.feed(build.is_alive)
        build.join(TIMEOUT)
    finally:
        pipe.release()
    assert not build.is_alive()
    assert isinstance(build.error, RuntimeError) and "two writers disagree" in str(build.error), build.error
    assert (set_dir / piped).read_bytes() == planted
    assert not (set_dir / "metadata.json").exists()
    with pytest.raises(ValueError, match="not a complete mask set"):
        read_masks(set_dir, image_ids=df["image_id"].tolist(), region_classes=REGIONS)


KILLED_MID_WRITE = r'''
import json, resource, signal, sys
import pandas as pd
from mgfa_ray.config import MasksConfig
from mgfa_ray.data.manifest import manifest_hash
from mgfa_ray.masks import LabelBoxes, build_mask_set
a = json.load(open(sys.argv[1]))
df = pd.read_parquet(a["manifest"])
source = LabelBoxes.create(a["labels"], classes=a["regions"], unlabelled="empty")
# The kernel kills this process (SIGXFSZ) at the first write beyond the limit: plan.json fits,
# the first shard does not, so the writer dies in the middle of writing it.
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
resource.setrlimit(resource.RLIMIT_FSIZE, (a["limit"], a["limit"]))
build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=a["regions"],
               cfg=MasksConfig(**a["cfg"]), location=a["location"], executor="local")
'''


def test_writer_killed_mid_write_leaves_no_partial_shard_and_a_rerun_leaves_no_temporary(
        tiny_manifest, label_source, data_root, tmp_path):
    """The kernel kills a writer process in the middle of writing its first shard: only a hidden
    partial temporary is left (no shard file), and the rerun that completes the set removes it."""
    df, manifest_path = tiny_manifest
    cfg = MasksConfig(resolution=16, rows_per_shard=6)
    location = tmp_path / "masks"
    args = {"manifest": str(manifest_path), "labels": dict(label_source.label_files), "regions": REGIONS,
            "cfg": cfg.model_dump(), "location": str(location), "limit": 1500}
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "killed.py").write_text(KILLED_MID_WRITE)
    proc = subprocess.run([sys.executable, str(tmp_path / "killed.py"), str(tmp_path / "args.json")], check=False,
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-3000:]
    (set_dir,) = location.iterdir()
    left = sorted(p.name for p in set_dir.iterdir())
    assert left[0].startswith(f".{shard_name(0)}.") and left[1:] == ["plan.json"], left  # a partial temporary only
    assert (set_dir / left[0]).stat().st_size == 1500

    done = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=label_source, region_classes=REGIONS,
                          cfg=cfg, location=location, executor="local")
    reference = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=label_source,
                               region_classes=REGIONS, cfg=cfg, location=tmp_path / "reference", executor="local")
    assert_complete_and_equal(done, df, masks_of(reference))


def concurrent_writers(kwargs: list[dict], rounds: int, location_of) -> list[tuple[str, ...]]:
    """``rounds`` times, the builds of ``kwargs`` started together (a barrier) on the location
    ``location_of(round)``; per round, what each returned (any exception fails the test)."""
    results = []
    for r in range(rounds):
        barrier = threading.Barrier(len(kwargs))
        out: list = [None] * len(kwargs)
        location = location_of(r)

        def go(i, kw, location, barrier=barrier, out=out):
            barrier.wait()
            try:
                out[i] = build_mask_set(**kw, location=location)
            except Exception as err:  # noqa: BLE001 — reported below
                out[i] = err

        threads = [threading.Thread(target=go, args=(i, kw, location)) for i, kw in enumerate(kwargs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not any(isinstance(o, Exception) for o in out), f"round {r}: {out}"
        results.append(tuple(out))
    return results


def test_two_writers_on_one_directory_at_once_give_one_complete_set(tiny_manifest, label_source, tmp_path):
    """Two writers of one set started together, one shard per image, fresh and over a partial set
    left by a killed run: both calls succeed and return the same complete set (before the fix, one
    of the two failed in most rounds: the other's startup deleted its plan temporary)."""
    df, _ = tiny_manifest
    cfg = MasksConfig(resolution=16, rows_per_shard=1)
    kw = {"manifest": df, "manifest_hash": manifest_hash(df), "source": label_source, "region_classes": REGIONS,
          "cfg": cfg, "executor": "local"}
    reference = masks_of(build_mask_set(**kw, location=tmp_path / "reference"))
    for (a, b) in concurrent_writers([kw, kw], rounds=6, location_of=lambda r: tmp_path / f"fresh-{r}"):
        assert a == b
        assert_complete_and_equal(a, df, reference)

    def partial(r):  # what a killed earlier run leaves: some shards, a temporary, no metadata
        location = tmp_path / f"partial-{r}"
        set_dir = Path(build_mask_set(**kw, location=location))
        (set_dir / "metadata.json").unlink()
        for i in range(4, len(df)):
            (set_dir / shard_name(i)).unlink()
        (set_dir / f".{shard_name(7)}.killed.tmp").write_bytes(b"PAR1 half a shard")
        return location

    for (a, b) in concurrent_writers([kw, kw], rounds=4, location_of=partial):
        assert a == b
        assert_complete_and_equal(a, df, reference)


@pytest.mark.slow
def test_two_writers_on_one_object_store_prefix_at_once_give_one_complete_set(ray_cluster, s3_server, tiny_manifest,
                                                                             label_source, tmp_path):
    """The same on S3 (a real S3 API server): a Ray Data writer and two in-process writers at once."""
    df, _ = tiny_manifest
    cfg = MasksConfig(resolution=16, rows_per_shard=2, num_actors=2)
    kw = {"manifest": df, "manifest_hash": manifest_hash(df), "source": label_source, "region_classes": REGIONS,
          "cfg": cfg}
    reference = masks_of(build_mask_set(**kw, location=tmp_path / "reference", executor="local"))
    root = s3_server("concurrent-masks", "runs")
    writers = [{**kw, "executor": "ray"}, {**kw, "executor": "local"}, {**kw, "executor": "local"}]
    for returned in concurrent_writers(writers, rounds=2, location_of=lambda r: root.replace("/runs?", f"/runs/{r}?")):
        assert len(set(returned)) == 1 and returned[0].startswith("s3://concurrent-masks/runs/")
        assert_complete_and_equal(returned[0], df, reference)
