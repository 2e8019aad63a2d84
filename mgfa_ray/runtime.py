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

Ray is started or joined in one place, :func:`ensure_ray`, by the stages that need it.
"""

from __future__ import annotations

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
        _configured = True


def ensure_ray() -> None:
    """Connect this process to Ray unless it already is: to the cluster ``$RAY_ADDRESS`` names, else
    the one ``ray start`` runs on this machine, else a new local cluster (``ray.init``'s own order),
    without the dashboard. The stages that use Ray (masks, search, seeds) call it; nothing else
    starts Ray, so a process that called ``ray.init`` itself keeps its cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
