"""One driver per search directory: mgfa_ray.storage.lock.DirectoryLock on local disk and on an S3 server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from mgfa_ray.storage.lock import LOCK_FILE, DirectoryLock, LockedError

HOLD = """
import sys, time
from mgfa_ray.storage.lock import DirectoryLock, LockedError
try:
    with DirectoryLock(sys.argv[1]):
        print("got", flush=True)
        time.sleep(2.0)
except LockedError:
    print("refused", flush=True)
"""


def test_second_driver_is_refused_with_the_holder_named(tmp_path):
    with DirectoryLock(str(tmp_path), what="search") as lock:
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["token"] == lock.token and record["host"] == socket.gethostname()
        with pytest.raises(LockedError, match=rf"pid {record['pid']} on host .*{LOCK_FILE}") as err:
            DirectoryLock(str(tmp_path)).acquire()
        assert err.value.holder["token"] == lock.token
    assert not (tmp_path / LOCK_FILE).exists()  # released
    with DirectoryLock(str(tmp_path)):  # and free again
        pass


def test_lock_of_a_dead_driver_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"token": "old", "host": socket.gethostname(), "pid": int(dead.stdout), "pid_started": 1.0,
             "started": time.time(), "heartbeat": time.time()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with DirectoryLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left aside


@pytest.mark.parametrize(("age_s", "taken"), [(5.0, False), (120.0, True)])
def test_lock_of_another_host_goes_stale_without_heartbeat(tmp_path, age_s, taken):
    other = {"token": "theirs", "host": "node-7.cluster", "pid": 1234, "pid_started": 1.0,
             "started": time.time() - 3600, "heartbeat": time.time() - age_s}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    lock = DirectoryLock(str(tmp_path), stale_after_s=60)
    if taken:
        with lock:
            assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    else:
        with pytest.raises(LockedError, match=r"pid 1234 on host 'node-7.cluster'.*heartbeat 5 s ago"):
            lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"  # untouched


def test_heartbeat_refreshes_the_lock(tmp_path):
    with DirectoryLock(str(tmp_path), heartbeat_s=0.2, stale_after_s=1.0):
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.7)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first


def test_of_drivers_starting_together_exactly_one_gets_the_lock(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["got", "refused", "refused", "refused"]


def test_lock_on_an_object_store(s3_server):
    location = s3_server("locks", "team-a/search-1")
    with DirectoryLock(location, settle_s=0.2) as lock:
        with pytest.raises(LockedError, match="locks/team-a/search-1"):
            DirectoryLock(location, settle_s=0.2).acquire()
        assert lock.stale(json.loads(lock.fs.open_input_stream(lock.path).read())) is False
    with DirectoryLock(location, settle_s=0.2):  # released: free again
        pass


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_s=5"):
        DirectoryLock(str(tmp_path), heartbeat_s=5, stale_after_s=5)


def test_a_driver_that_loses_its_lock_stops_naming_the_new_holder(tmp_path):
    other = {"token": "theirs", "host": "node-7.cluster", "pid": 4321, "pid_started": 1.0,
             "started": time.time(), "heartbeat": time.time()}
    # A plain driver's SIGINT handler: in the full suite an earlier test left another one (Ray Tune
    # replaces it during a fit), and the heartbeat's SIGINT then did not interrupt the sleep.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _lose_the_lock(tmp_path, other)
    finally:
        signal.signal(signal.SIGINT, previous)


def _lose_the_lock(tmp_path, other: dict) -> None:
    with pytest.raises(LockedError, match=r"lost its lock .*driver.lock.* held by pid 4321 on host 'node-7.cluster'") \
            as err:
        with DirectoryLock(str(tmp_path), heartbeat_s=0.2, stale_after_s=1.0) as lock:
            lock.check()  # still ours
            (tmp_path / LOCK_FILE).write_text(json.dumps(other))  # another driver took it over
            time.sleep(30)  # the driver's work: interrupted at the next heartbeat
    # Interrupted, not left to finish its work: the error's cause is the heartbeat's KeyboardInterrupt.
    assert err.value.holder["token"] == "theirs" and isinstance(err.value.__cause__, KeyboardInterrupt)
    assert lock.lost == other
    with pytest.raises(LockedError, match="lost its lock"):
        lock.check()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"  # theirs is left in place
