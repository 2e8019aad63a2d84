"""Errors a user can cause and fix, and how the command line reports them.

Every exception derived from :class:`UserError` is printed by ``mgfa-ray`` as one line,
``error: <message>``, and ends the command with :attr:`UserError.exit_status`. Its message names the
file, field, image or location at fault and says what to do. ``--debug`` (or ``MGFA_DEBUG=1``)
prints the traceback as well. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input or state the user can mend: one ``error:`` line, exit status 2 (as argparse's)."""

    exit_status = 2


class InputError(UserError, ValueError):
    """A file, location, id or value the user gave is missing or unusable (a checkpoint that does
    not exist, an image id not in the manifest, a split without images): exit status 2.

    Also a ``ValueError``, as these problems were before they had their own type.
    """


class ConfigError(UserError, ValueError):
    """A configuration file or value is invalid; the message names the file and field. Defined
    here, below both :mod:`mgfa_ray.config` and :mod:`mgfa_ray.storage`, which both raise it."""


class StageError(UserError, RuntimeError):
    """A stage ran but its output is unusable (a weak detector, empty masks, every trial failed).

    Exit status 1. The message gives the numbers measured and the usual remedies.
    """

    exit_status = 1


class RunInterrupted(UserError):
    """The user stopped a run (Ctrl-C, SIGTERM); exit status 130 as a shell reports SIGINT.

    The message says how to continue; nothing half-done is presented as a result.
    """

    exit_status = 130


class DiskFullError(UserError):
    """A write failed because its disk or quota is full (``ENOSPC``, ``EDQUOT``): exit status 1.

    Every write of the project is atomic (a temporary file renamed into place; a journal record
    whole or not at all), so what finished is kept and the same command, run again once there is
    room, continues where it stopped. The message names the path and the space free there now.
    """

    exit_status = 1

    @classmethod
    def from_os_error(cls, err: OSError, *, again: str = "the same command again") -> DiskFullError | None:
        """The error for ``err`` when it says the disk or quota is full (its errno, or the
        message of a library that dropped the errno, such as pyarrow's), else ``None``; ``again``
        is how the message tells to continue."""
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in str(err):
            return None
        path = err.filename or err.filename2
        where = f"writing {path}" if path else "writing"
        return cls(f"disk full {where} ({_free_space(path)}): free space or enlarge the disk, then run {again}; "
                   "finished work is kept and it continues where it stopped")


def _free_space(path: str | os.PathLike | None) -> str:
    """``N MB free there now`` for the filesystem of ``path`` (its nearest existing parent)."""
    if not path:
        return "no path named"
    probe = Path(os.fspath(path)).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return f"free space at {probe} unknown"
    return f"{free / 2**20:.1f} MB free on that filesystem now"


def debug_enabled() -> bool:
    """True when ``MGFA_DEBUG`` is set to 1/true/yes/on (the CLI's ``--debug`` sets it)."""
    return os.environ.get("MGFA_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
