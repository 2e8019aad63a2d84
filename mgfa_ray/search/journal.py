"""The study's journal file (Optuna's ``JournalStorage`` on a local or NFS file): appends that keep it
whole when the disk fills, repair of a record cut short by a crash, and release of a lock a killed
driver left behind.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from mgfa_ray.errors import UserError

log = logging.getLogger(__name__)


class DamagedJournalError(UserError):
    """An Optuna journal file damaged other than by a torn last record (which is repaired): the
    message names the file and line and what to do."""


def _scan_journal(path: Path) -> tuple[int, int]:
    """``(size, end)``: the file's size and the end of its last complete record (a line ending in a
    newline, which Optuna writes last, and fsyncs). ``end < size``: the last record is torn.

    Raises:
        DamagedJournalError: A complete line that is not a JSON record (``path:line``).
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            json.loads(line)
        except ValueError as err:
            raise DamagedJournalError(
                f"{path}:{number}: not an Optuna journal record ({err}); the study cannot be read past "
                f"this line. Restore the file from a backup, or keep the records before it by cutting "
                f"the file after line {number - 1} (the trials recorded after it are then lost)") from None
    return len(data), end


class WholeRecordJournal(JournalFileBackend):
    """Optuna's journal file (``JournalFileBackend``: the same file, format and symlink lock) whose
    appends are whole or nothing: when a write fails — a full disk, a quota — the bytes written so
    far are cut off again (``ftruncate`` under the lock) before the error propagates, so the
    journal is never left with a torn record and the study stays readable and resumable. (A
    process killed in mid-write can still leave one; :func:`repair_journal` drops it when the
    journal is next opened.)

    Args:
        file_path: The journal file (created empty when absent, as Optuna does).
    """

    def __init__(self, file_path: str) -> None:
        self._append_lock = JournalFileSymlinkLock(file_path)
        super().__init__(file_path, lock_obj=self._append_lock)
        self._journal_path = file_path

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Append ``logs`` (Optuna's operation records) as JSON lines, all or none of them.

        Raises:
            OSError: The write or its ``fsync`` failed (the file is as it was before the call).
        """
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        self._append_lock.acquire()
        try:
            fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        finally:
            self._append_lock.release()


def repair_journal(path: str | os.PathLike) -> None:
    """Make an Optuna journal file safe to read and append to.

    A record torn by a crash or a full disk during a write (a last line without its newline) is
    dropped: the file is truncated back to the end of its last complete record — one ``truncate``
    under the journal's own lock (the lock Optuna's writers take), so a live writer finishing its
    record is never cut and a crash during the repair loses nothing more — and a warning names the
    file. Optuna itself skips such a line when reading but appends the next record onto it, which
    makes the whole study unreadable. A missing file is left alone.

    Raises:
        DamagedJournalError: Any other damage: a complete line that is not a JSON record (the
            message names ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        return
    size, end = _scan_journal(path)
    if end == size:
        return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        size, end = _scan_journal(path)  # again, under the lock: a writer may have finished it
        if end == size:
            return
        try:
            os.truncate(path, end)
        except OSError as err:  # e.g. a read-only copy: Optuna reads past the torn record anyway
            log.warning("%s: its last record is torn (%d bytes, a write cut short) and cannot be dropped "
                        "(%s); reading without it", path, size - end, err)
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        lock.release()
    log.warning("%s: dropped its torn last record (%d bytes: a write cut short by a crash or a full disk); "
                "the study keeps every complete record", path, size - end)


def release_stale_journal_lock(path: str | os.PathLike, *, settle_s: float = 2.0) -> bool:
    """Remove the lock an Optuna journal's writer left behind when it was killed during an append.

    Optuna's writers hold ``<journal>.lock`` (a symbolic link: ``JournalFileSymlinkLock``, the
    ``JournalFileBackend`` default) for one append, milliseconds. A driver killed during one leaves
    the link, and the next writer waits Optuna's grace period (30 s, then it releases it by force):
    every resume after such a crash stalled for 30 s. For the caller that holds the search's
    :class:`~mgfa_ray.storage.lock.DirectoryLock` — no other driver writes the study — the link is removed
    once the same link (inode and mtime, ``lstat``) has stood for ``settle_s`` seconds of this
    process's clock: any live writer (optuna-dashboard, a script of the user's) would have released
    it long before. A warning names the file.

    Args:
        path: The journal file (its lock is ``path + ".lock"``).
        settle_s: Seconds the same link must stand before it counts as left behind, > 0.

    Returns:
        Whether a left-behind link was removed (False: none, or released meanwhile).

    Raises:
        ValueError: ``settle_s`` <= 0.
    """
    if settle_s <= 0:
        raise ValueError(f"settle_s must be > 0, got {settle_s}")
    link = Path(f"{os.fspath(path)}.lock")
    seen, since = None, time.monotonic()
    while True:
        try:
            st = os.lstat(link)
        except FileNotFoundError:
            return False
        if (st.st_ino, st.st_mtime_ns) != seen:  # a new holder: wait for this one
            seen, since = (st.st_ino, st.st_mtime_ns), time.monotonic()
        elif time.monotonic() - since >= settle_s:
            break
        time.sleep(0.05)
    try:
        link.unlink()
    except FileNotFoundError:
        return False
    log.warning("%s: removed the lock its last writer left behind (a driver killed while writing the study); "
                "the search holds its own lock, so no other driver writes this journal", link)
    return True
