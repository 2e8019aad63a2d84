"""Errors a user can cause and fix, and how the command line reports them.

Every exception derived from :class:`UserError` is printed by ``mgfa-ray`` as one line,
``error: <message>``, and ends the command with :attr:`UserError.exit_status`. Its message names the
file, field, image or location at fault and says what to do. ``--debug`` (or ``MGFA_DEBUG=1``)
prints the traceback as well. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """Bad input or state the user can mend: one ``error:`` line, exit status 2 (as argparse's)."""

    exit_status = 2


class InputError(UserError, ValueError):
    """A file, location, id or value the user gave is missing or unusable (a checkpoint that does
    not exist, an image id not in the manifest, a split without images): exit status 2.

    Also a ``ValueError``, as these problems were before they had their own type.
    """


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


def debug_enabled() -> bool:
    """True when ``MGFA_DEBUG`` is set to 1/true/yes/on (the CLI's ``--debug`` sets it)."""
    return os.environ.get("MGFA_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
