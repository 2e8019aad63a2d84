"""Process set-up done explicitly, never at import: :func:`configure`.

Importing an ``mgfa_ray`` module changes nothing in the process (no environment variable, logger
level, umask or third-party setting). What a process needs before it uses Ultralytics or Optuna is
done by :func:`configure`, which the entry points call: the ``mgfa-ray`` command line
(:func:`mgfa_ray.cli.main`), the Ray Tune trainable (:func:`mgfa_ray.search.driver.tune_trainable`), the
mask-stage actors (:class:`mgfa_ray.masks.ShardWriter`), and, for library use, the functions that
import Ultralytics (:mod:`mgfa_ray.detector.training`, :mod:`mgfa_ray.detector.backbone`) or open an Optuna
study (:meth:`mgfa_ray.search.study.StudyRef.load`). It is idempotent: the first call does the work,
later calls return at once.

:func:`configure` sets:

* unless already set, ``YOLO_OFFLINE=1`` (no connectivity probe, telemetry or update check),
  ``YOLO_AUTOINSTALL=false`` (no ``pip install`` of missing extras) and ``YOLO_CONFIG_DIR`` to a
  per-user temporary directory (Ultralytics' settings file and font cache stay out of the
  repository and out of ``~/.config``). Ultralytics reads them once, when it is first imported,
  so :func:`configure` must run before that import (see :mod:`mgfa_ray.detector.training`, "Offline
  operation"). Ray workers inherit the driver's environment.
* Optuna's log level to WARNING (no line per trial on stderr).

Ray is started or joined in one place, :func:`ensure_ray`, by the stages that need it. Before
that it moves object-storage keys out of the environment (:func:`hide_aws_secrets`): Ray Tune copies
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` from the driver's
environment into every trainable's ``runtime_env`` (``ray/tune/execution/class_cache.py``), and Ray
writes runtime environments verbatim into its session logs (``runtime_env_agent.log``, mode 0644;
ray-project/ray#28276).
"""

from __future__ import annotations

import atexit
import os
import shutil
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


#: Environment variables that hold object-storage secrets, all of which Ray Tune copies into the
#: trainables' ``runtime_env`` (and so into Ray's logs) when the driver has them.
AWS_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
#: The profile :func:`hide_aws_secrets` writes the keys under.
AWS_PROFILE_NAME = "mgfa-ray"


def hide_aws_secrets() -> Path | None:
    """Move the object-storage keys of this process's environment (:data:`AWS_SECRET_VARS`) into a
    private credentials file, so no ``runtime_env`` and no Ray log can hold them.

    The keys are written as profile ``mgfa-ray`` to ``credentials`` in a new directory of mode 0700
    (the file 0600), removed when this process exits; ``AWS_SHARED_CREDENTIALS_FILE`` and
    ``AWS_PROFILE`` name it instead, and the key variables are removed. pyarrow (the AWS SDK's
    default chain), boto3 and the workers of a local cluster this process then starts (they
    inherit its environment) read the same keys from there. Workers of a cluster started
    elsewhere (``ray start``) never receive keys from a driver: give each node its own credentials
    (a profile, ``AWS_SHARED_CREDENTIALS_FILE``, or the machine's role).

    Returns:
        The credentials file, or ``None`` when the environment holds no key.
    """
    keys = {name: os.environ[name] for name in AWS_SECRET_VARS if os.environ.get(name)}
    if not keys:
        return None
    directory = Path(tempfile.mkdtemp(prefix="mgfa-ray-aws-"))  # mode 0700
    atexit.register(_remove_own_directory, directory, os.getpid())
    path = directory / "credentials"
    lines = [f"[{AWS_PROFILE_NAME}]"] + [f"{name.lower()} = {value}" for name, value in keys.items()
                                          if name != "AWS_SECURITY_TOKEN"]
    if "AWS_SESSION_TOKEN" not in keys and "AWS_SECURITY_TOKEN" in keys:
        lines.append(f"aws_session_token = {keys['AWS_SECURITY_TOKEN']}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    for name in keys:
        del os.environ[name]
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(path)
    os.environ["AWS_PROFILE"] = AWS_PROFILE_NAME
    return path


def _remove_own_directory(directory: Path, owner_pid: int) -> None:
    """At exit, remove ``directory`` in the process that made it only: a forked child that exits
    normally runs its parent's exit handlers too, and must not take the parent's credentials away."""
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


def ensure_ray() -> None:
    """Connect this process to Ray unless it already is: to the cluster ``$RAY_ADDRESS`` names, else
    the one ``ray start`` runs on this machine, else a new local cluster (``ray.init``'s own order),
    without the dashboard. The stages that use Ray (masks, search, seeds) call it; nothing else
    starts Ray, so a process that called ``ray.init`` itself keeps its cluster. Object-storage keys
    leave the environment first (:func:`hide_aws_secrets`)."""
    import ray

    hide_aws_secrets()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
