"""One driver at a time per directory: a lock file with a heartbeat.

Two drivers running the same search (or the same job output directory) would interleave two Ray
experiments' state files in one folder. :class:`DirectoryLock` prevents that: the first driver
writes ``<dir>/driver.lock`` (JSON: host, pid, start time, heartbeat), refreshes its heartbeat
every ``heartbeat_s`` seconds while it runs and removes the file when it stops. A second driver
finds the file and stops with :class:`LockedError`, naming the holder.

A driver killed without cleaning up leaves its lock behind; the lock is then *stale* and the next
driver takes it over:

* same host: at once, when the holder's pid is gone (or belongs to a process started later);
* another host: when its heartbeat is older than ``stale_after_s`` (default 60 s; the hosts'
  clocks must agree to well within that, as NTP keeps them).

On a local or NFS directory the lock is taken exclusively (a complete temporary file hard-linked
to ``driver.lock``: ``link`` fails when the name exists). An object store has no exclusive create
through pyarrow, so there the driver writes its lock, waits ``settle_s`` and reads it back: of
two drivers starting within that window the last writer wins and the other stops. S3 and its
clones read their own writes consistently, which this relies on.

A driver that loses its lock (its heartbeat finds another driver's record in the file, e.g. one
that took the lock over after this driver's host was unreachable for ``stale_after_s``) stops:
the heartbeat thread records the loss and, when the lock was taken in the main thread, sends that
thread SIGINT as Ctrl-C would (Ray Tune saves and stops its experiment on it); leaving the ``with`` block
then raises :class:`LockedError` naming the new holder. :meth:`DirectoryLock.check` raises the
same error at once, for drivers that poll.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

from mgfa_ray.errors import UserError
from mgfa_ray.storage import create_local_once, fs_read, fs_write_atomic, location_join, resolve_location

log = logging.getLogger(__name__)

LOCK_FILE = "driver.lock"


class LockedError(UserError, RuntimeError):
    """Another live driver holds the directory's lock; ``holder`` is its lock record. Exit status 1."""

    exit_status = 1

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def _process_started(pid: int) -> float | None:
    """Start time (epoch seconds) of process ``pid`` on this host, None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class DirectoryLock:
    """Context manager holding ``<location>/driver.lock`` for one driver (see the module doc).

    Args:
        location: Directory or object-store URI (created if missing).
        what: What the directory is, for messages ("search", "job").
        heartbeat_s: Seconds between heartbeats (> 0).
        stale_after_s: Age of the last heartbeat after which another host's lock is stale
            (> ``heartbeat_s``).
        settle_s: Object stores only: seconds between writing the lock and reading it back.

    Raises:
        ValueError: ``heartbeat_s`` <= 0 or ``stale_after_s`` <= ``heartbeat_s``.
        LockedError: On enter, when a live driver holds the lock (the message names its host, pid,
            start time and the lock file); on exit (and from :meth:`check`), when this driver lost
            the lock while it ran (the message names the lock file and the new holder).
    """

    def __init__(self, location: str, *, what: str = "search", heartbeat_s: float = 10.0,
                 stale_after_s: float = 60.0, settle_s: float = 1.0):
        if not heartbeat_s > 0 or not stale_after_s > heartbeat_s:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got heartbeat_s={heartbeat_s}, "
                             f"stale_after_s={stale_after_s}")
        self.location, self.what = str(location), what
        self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
        self.fs, directory = resolve_location(self.location)
        self.path = location_join(directory, LOCK_FILE)
        self.display = location_join(self.location, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._main_thread: int | None = None  # taken in the main thread: its id, interrupted on a loss
        self.lost: dict[str, Any] | None = None
        """The record found in the lock file when this driver lost the lock ({} when it was
        removed); None while the lock is held."""

    # --- the record ---

    def _record(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": _process_started(os.getpid()), "started": self._started,
                "heartbeat": time.time(), "command": " ".join(sys.argv)[:300]}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(fs_read(self.fs, self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON: never written by a DirectoryLock (writes are atomic)
            log.warning("%s is not a lock record; treating it as stale", self.display)
            return {}

    def stale(self, holder: dict[str, Any]) -> bool:
        """Whether ``holder`` (a lock record) no longer guards the directory."""
        if not holder.get("token"):
            return True
        if holder.get("host") == socket.gethostname():
            started = _process_started(int(holder.get("pid", -1)))
            return started is None or abs(started - float(holder.get("pid_started") or 0)) > 1.0
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def _locked_error(self, holder: dict[str, Any]) -> LockedError:
        age = time.time() - float(holder.get("heartbeat", 0))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        return LockedError(
            f"{self.what} {self.location} is being run by another driver: pid {holder.get('pid')} on host "
            f"{holder.get('host')!r} since {since} (heartbeat {age:.0f} s ago; lock {self.display}). Two drivers "
            f"on one {self.what} would corrupt each other's state: wait for it to finish or stop it. A lock "
            f"left by a driver that died is taken over at once on the same host, and after "
            f"{self.stale_after_s:.0f} s without heartbeat from another host.", holder)

    def _lost_error(self) -> LockedError:
        holder = self.lost or {}
        who = (f"pid {holder.get('pid')} on host {holder.get('host')!r}" if holder.get("token")
               else "nobody (the lock file was removed or replaced)")
        return LockedError(
            f"{self.what} {self.location}: this driver lost its lock {self.display} while it ran; it is now held by "
            f"{who}, so this driver stopped (two drivers on one {self.what} would corrupt each other's state). "
            f"Check that driver; once it has finished, run the same command again to continue.", holder)

    def check(self) -> None:
        """Raise :class:`LockedError` (naming the new holder) when this driver lost the lock."""
        if self.lost is not None:
            raise self._lost_error()

    # --- acquire / heartbeat / release ---

    def _publish_exclusive(self, record: dict[str, Any]) -> bool:
        """Local/NFS: create the lock file only if absent, complete from its first byte
        (:func:`mgfa_ray.storage.create_local_once`: a complete temporary hard-linked to the name)."""
        return create_local_once(self.path, json.dumps(record).encode())

    def _remove_stale(self, holder: dict[str, Any]) -> bool:
        """Local/NFS: move the stale lock ``holder`` aside; False when the file there is no longer
        it (another driver took over first: its fresh lock is put back)."""
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside) as f:
                moved = json.load(f)
        except ValueError:
            moved = {}
        if moved.get("token") != holder.get("token"):
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockedError` (see the class doc)."""
        import pyarrow.fs as pafs

        self._started = time.time()
        local = isinstance(self.fs, pafs.LocalFileSystem)
        for _ in range(3):  # a stale lock removed by someone else between our read and our write
            holder = self._read()
            if holder is not None and not self.stale(holder):
                raise self._locked_error(holder)
            if holder is not None:
                log.warning("taking over the stale lock %s of pid %s on %r", self.display, holder.get("pid"),
                            holder.get("host"))
            if not local:
                fs_write_atomic(self.fs, self.path, json.dumps(self._record()).encode())
                time.sleep(self.settle_s)
                holder = self._read()
                if holder is None or holder.get("token") != self.token:
                    raise self._locked_error(holder or {})
                break
            if holder is not None and not self._remove_stale(holder):
                continue
            if self._publish_exclusive(self._record()):
                break
        else:
            raise self._locked_error(self._read() or {})
        self._stop.clear()
        self.lost = None
        main = threading.main_thread()
        self._main_thread = main.ident if threading.current_thread() is main else None
        self._thread = threading.Thread(target=self._beat, name="mgfa-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read()
                if holder is None or holder.get("token") != self.token:
                    self.lost = holder or {}
                    log.error("lost the lock %s to %s; stopping this driver", self.display, holder)
                    if self._main_thread is not None and not self._stop.is_set():
                        # As Ctrl-C (a real signal, so a blocking call returns): Ray Tune saves and stops.
                        signal.pthread_kill(self._main_thread, signal.SIGINT)
                    return
                fs_write_atomic(self.fs, self.path, json.dumps(self._record()).encode())
            except OSError as err:  # the store is away: the next beat tries again
                log.warning("heartbeat of %s failed: %s", self.display, err)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self._read()
        if holder and holder.get("token") == self.token:
            try:
                self.fs.delete_file(self.path)
            except FileNotFoundError:  # taken over and removed meanwhile
                pass

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except KeyboardInterrupt:  # the heartbeat's interrupt, delivered during release
            if self.lost is None:
                raise
        if self.lost is not None and (exc is None or isinstance(exc, (KeyboardInterrupt, UserError))):
            raise self._lost_error() from exc
