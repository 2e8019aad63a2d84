"""Process set-up done explicitly, never at import: :func:`configure`.

Importing an ``mgfa_ray`` module changes nothing in the process (no environment variable, logger
level, umask or third-party setting). What a process needs before it uses Ultralytics or Optuna is
done by :func:`configure`, which the entry points call: the ``mgfa-ray`` command line
(:func:`mgfa_ray.cli.main`), the Ray Tune trainable (:func:`mgfa_ray.search.tune_trainable`), the
mask-stage actors (:class:`mgfa_ray.masks.ShardWriter`), and, for library use, the functions that
import Ultralytics (:mod:`mgfa_ray.detector`, :mod:`mgfa_ray.detector_backbone`) or open an Optuna
study (:meth:`mgfa_ray.study.StudyRef.load`). It is idempotent: the first call does the work,
later calls return at once.

:func:`configure` sets:

* unless already set, ``YOLO_OFFLINE=1`` (no connectivity probe, telemetry or update check),
  ``YOLO_AUTOINSTALL=false`` (no ``pip install`` of missing extras) and ``YOLO_CONFIG_DIR`` to a
  per-user temporary directory (Ultralytics' settings file and font cache stay out of the
  repository and out of ``~/.config``). Ultralytics reads them once, when it is first imported,
  so :func:`configure` must run before that import (see :mod:`mgfa_ray.detector`, "Offline
  operation"). Ray workers inherit the driver's environment.
* Optuna's log level to WARNING (no line per trial on stderr).
* reads the process umask once (:func:`umask`), for the mode of atomically written files.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from pathlib import Path

#: The environment defaults :func:`configure` sets (``os.environ.setdefault``).
YOLO_ENV_DEFAULTS = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    "YOLO_CONFIG_DIR": str(Path(tempfile.gettempdir()) / f"mgfa-ray-ultralytics-{os.getuid()}"),
}

_lock = threading.Lock()
_configured = False


def configure() -> None:
    """Set up this process for Ultralytics and Optuna (see the module doc); idempotent, thread-safe."""
    global _configured
    if _configured:
        return
    with _lock:
        if _configured:
            return
        for key, value in YOLO_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        umask()
        _configured = True


@functools.cache
def umask() -> int:
    """The process umask (e.g. 0o022), read once, without changing it.

    ``os.umask`` can only be read by setting it, which for a moment gives every thread of the
    process another umask; so the value is read from ``/proc/self/status`` (``Umask:``, Linux
    4.7+), else from the mode of a file created for the purpose in a fresh temporary directory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with tempfile.TemporaryDirectory(prefix="mgfa-umask-") as d:
        fd = os.open(os.path.join(d, "probe"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777)
        try:
            return 0o777 & ~os.fstat(fd).st_mode
        finally:
            os.close(fd)
