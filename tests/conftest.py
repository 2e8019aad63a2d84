"""Shared fixtures: real leafsnap20 photos at tiny settings (3 classes, 64 px)."""

from __future__ import annotations

import os

# Before anything imports torch: its OpenMP runtime (libgomp) reads this once, when it is loaded.
# By default idle OpenMP threads spin; where the cores are shared (two pytest-xdist workers, Ray's
# processes and the drivers tests start, on CI's 2 cores) a 2-thread forward/backward of the tiny
# MobileNet then takes seconds instead of tens of milliseconds: 70x slower measured on this
# machine, tests/test_trial.py's learning tests 76 s against 9 s. Passive threads sleep instead.
# Inherited by every process the tests start (xdist workers, drivers, Ray workers).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

from mgfa_ray.compat import suppress_cluster_address_file
from mgfa_ray.config import DatasetConfig, MasksConfig, TrainConfig
from mgfa_ray.data.manifest import build_manifest, manifest_hash, write_manifest
from mgfa_ray.masks.sources import LabelBoxes
from mgfa_ray.masks import build_mask_set
from mgfa_ray.data.regions import index_labels
from mgfa_ray.runtime import configure

REPO = Path(__file__).resolve().parents[1]
REGION_CLASSES = ["vein", "contour"]



def pytest_configure(config):
    """The test process's set-up, before any test module is collected (imported).

    Credentials for the S3 API server the object-storage tests start on loopback (moto accepts
    any), set before any Ray cluster starts so Ray workers inherit them; never a real account. And
    :func:`mgfa_ray.runtime.configure`, as the ``mgfa-ray`` command line does, since tests also
    import Ultralytics themselves. And no ``ray.cluster_utils.Cluster`` started here writes (or, on
    shutdown, deletes) Ray's machine-wide address file ``/tmp/ray/ray_current_cluster``: through it
    every ``ray.init()`` on the machine — the drivers another test process (pytest-xdist) starts —
    would join that test's cluster and die with it when the test kills its nodes.
    """
    for key, value in {"AWS_ACCESS_KEY_ID": "mgfa-test", "AWS_SECRET_ACCESS_KEY": "mgfa-test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(key, value)
    configure()
    suppress_cluster_address_file()


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("MGFA_DATA_ROOT", REPO.parent / "shared" / "data"))
    assert (root / "leafsnap20").is_dir(), f"real data not found under {root}; set MGFA_DATA_ROOT"
    return root


@pytest.fixture(scope="session")
def mobilenet_weights(data_root) -> Path:
    return data_root.parent / "weights" / "mobilenet_v2-imagenet-features.pth"


@pytest.fixture(scope="session")
def tiny_manifest(data_root, tmp_path_factory):
    """3 species x 8 photos (8 groups each: 4 train, 2 val, 2 test per species)."""
    cfg = DatasetConfig(layout="class_folders", images="leafsnap20", max_classes=3, max_per_class=8,
                        val_fraction=0.25, test_fraction=0.25)
    df = build_manifest(data_root / "leafsnap20", cfg)
    path = write_manifest(df, tmp_path_factory.mktemp("manifest") / "manifest.parquet")
    return df, path


@pytest.fixture(scope="session")
def label_mask_set(data_root, tiny_manifest, tmp_path_factory) -> str:
    """A mask set whose boxes are the hand-drawn labels (empty for unlabelled photos), built without Ray."""
    df, _ = tiny_manifest
    source = LabelBoxes.create(index_labels(data_root / "leafsnap20-regions" / "labels"), classes=REGION_CLASSES,
                               unlabelled="empty")
    return build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGION_CLASSES,
                          cfg=MasksConfig(resolution=32), location=tmp_path_factory.mktemp("masks"), executor="local")


@pytest.fixture()
def tiny_train_config(tiny_manifest, label_mask_set) -> TrainConfig:
    _, manifest_path = tiny_manifest
    return TrainConfig(
        manifest=str(manifest_path), masks=str(label_mask_set), backbone="mobilenet_v2", weights=None,
        resize=72, train_crop=64, epochs=2, batch_size=8, lr=0.01, momentum=0.9, lr_step=1, threads=2, device="cpu",
    )


@pytest.fixture(scope="session")
def shared_cluster():
    """One Ray cluster per test process, a head node with 2 CPUs (``ray.cluster_utils.Cluster``, as
    ``ray start --head`` starts one), for the tests' in-process Ray work (:func:`ray_cluster`) and for
    search drivers that need no cluster of their own: a driver given ``RAY_ADDRESS=<its address>``
    joins it (tests/search_driver.py). A short stand-in search took ~15 s and ~14 CPU-seconds with a
    local cluster of its own on 2 cores, ~7.5 s and ~9 joined; the tests that kill a driver with its
    cluster, kill nodes, count processes or need other resources start their own.

    Its worker processes inherit this process's environment as it was at the start, so no
    ``MGFA_STANDIN_*`` variable of one test may be in it: drivers pass theirs as the job's
    ``runtime_env``. Yields its GCS address."""
    from ray.cluster_utils import Cluster

    assert not [k for k in os.environ if k.startswith("MGFA_STANDIN_")], "start the shared cluster outside monkeypatch"
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield cluster.address
    cluster.shutdown()


@pytest.fixture(scope="session")
def _shared_ray(shared_cluster):
    """This test process connected to :func:`shared_cluster`, and its GCS address (see :func:`ray_cluster`)."""
    import ray

    context = ray.init(address=shared_cluster, configure_logging=False)
    yield ray, context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def ray_cluster(_shared_ray):
    """This process connected to the Ray cluster the tests of this process share (:func:`shared_cluster`).

    Fails the test when an earlier test shut that cluster down: Ray Data would otherwise start a
    cluster of its own, unseen, and the test would run on it."""
    ray, address = _shared_ray
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == address, \
        "an earlier test shut down the shared Ray cluster (tests/conftest.py: ray_cluster); shut down only what you start"
    return ray


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on 127.0.0.1; yields ``uri(bucket, prefix)`` → an
    ``s3://`` location that carries the endpoint in its query string, creating the bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)  # see RestartableS3.uri

    def uri(bucket: str, prefix: str) -> str:
        client.create_bucket(Bucket=bucket)
        return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}"

    yield uri
    server.stop()


class RestartableS3:
    """A moto S3 server on a fixed loopback port that can be stopped and started again, as an
    object store restarted under a running search: moto keeps its buckets in this process, so the
    data survives the restart while every connection in between is refused."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._make = lambda port: ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server = self._make(0)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.running = True

    def uri(self, bucket: str, prefix: str) -> str:
        import boto3

        # A new boto3 session each time, not boto3's default one: that one keeps the profiles it read
        # first, and a test that ran before may have moved the keys into a profile since
        # (mgfa_ray.runtime.hide_aws_secrets), which it would then report as not found.
        boto3.session.Session().client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=bucket)
        return f"s3://{bucket}/{prefix}?endpoint_override={self.endpoint}"

    def stop(self) -> None:
        self._server.stop()
        self.running = False

    def start(self) -> None:
        self._server = self._make(self.port)
        self._server.start()
        self.running = True


@pytest.fixture()
def restartable_s3():
    """A :class:`RestartableS3` server, stopped at the end of the test."""
    server = RestartableS3()
    yield server
    if server.running:
        server.stop()


@pytest.fixture(scope="session")
def watched_search(tmp_path_factory, shared_cluster):
    """A finished stand-in search (tests/search_driver.py: 5 trials x 4 epochs, ASHA with rungs at 1 and 2
    epochs, 2 at once) run by its own driver process on the shared cluster, and
    :func:`mgfa_ray.search.status.search_status` of it taken from this process while the driver ran and
    held the search's lock (``None`` if the driver finished before a trial had reported an epoch
    while another still ran).

    Yields ``(search_dir, running_status)``.
    """
    import subprocess
    import sys
    import time

    import search_driver  # tests/search_driver.py

    from mgfa_ray.errors import UserError
    from mgfa_ray.search.status import search_status

    driver = REPO / "tests" / "search_driver.py"
    tmp = tmp_path_factory.mktemp("watched")
    env = {**os.environ, "MGFA_STANDIN_EPOCH_S": "0.4", "RAY_ADDRESS": shared_cluster, "PYTHONUNBUFFERED": "1"}
    search_dir = search_driver.create(str(tmp / "searches"), "--num-samples", "5")  # in this process
    with open(tmp / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(driver), "run", search_dir], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    running = None
    try:
        while proc.poll() is None and running is None:
            try:
                status = search_status(search_dir)
            except UserError:  # the study has no trial yet
                status = None
            if status and status["trials"]["RUNNING"] and status["epochs"]["done"] and proc.poll() is None:
                running = status
            time.sleep(0.25)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert rc == 0, (tmp / "driver.log").read_text()[-4000:]
    yield search_dir, running
