"""Process set-up is explicit: importing mgfa_ray changes nothing; mgfa_ray.runtime.configure() does it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mgfa_ray import runtime

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, logging, os, pkgutil, importlib, sys
import mgfa_ray

def state():
    return {"env": {k: os.environ.get(k) for k in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR",
                                                   "TUNE_GLOBAL_CHECKPOINT_S")},
            "optuna_level": logging.getLogger("optuna").level, "ultralytics": "ultralytics" in sys.modules}

before = state()
for m in pkgutil.iter_modules(mgfa_ray.__path__):
    importlib.import_module(f"mgfa_ray.{m.name}")
imported = state()
from mgfa_ray.runtime import configure
configure(); configure()
print(json.dumps({"before": before, "imported": imported, "configured": state()}))
"""


def test_importing_changes_nothing_and_configure_sets_up_the_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "TUNE_GLOBAL"))}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["imported"]["env"] == doc["before"]["env"] == {k: None for k in doc["before"]["env"]}
    assert not doc["imported"]["ultralytics"]
    assert doc["imported"]["optuna_level"] != 30  # Optuna's own INFO, untouched by imports
    assert doc["configured"]["env"] == {**runtime.YOLO_ENV_DEFAULTS, "TUNE_GLOBAL_CHECKPOINT_S": None}
    assert doc["configured"]["optuna_level"] == 30  # logging.WARNING


def test_ultralytics_settings_are_private_only_within_the_block_and_never_written():
    from mgfa_ray.compat import ultralytics_private_settings
    from mgfa_ray.detector.yolo import import_ultralytics

    import_ultralytics()
    from ultralytics.utils import SETTINGS

    before, file_before = dict(SETTINGS), SETTINGS.file.read_bytes()
    with ultralytics_private_settings():
        with ultralytics_private_settings():  # nested (or another thread's): one patch
            assert SETTINGS["raytune"] is False and SETTINGS["sync"] is False
        assert SETTINGS["raytune"] is False  # still inside the outer block
        assert SETTINGS["weights_dir"] == str(Path(runtime.YOLO_ENV_DEFAULTS["YOLO_CONFIG_DIR"]) / "weights")
    assert dict(SETTINGS) == before
    assert SETTINGS.file.read_bytes() == file_before


def test_object_storage_keys_leave_the_environment_for_a_private_credentials_file(monkeypatch):
    """What Ray Tune would copy into every trainable's runtime_env (and Ray would log) is gone from
    the environment; the same keys are in a 0600 file that the AWS SDKs read through the profile."""
    import stat

    import boto3

    from mgfa_ray.runtime import hide_aws_secrets

    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        # set first so monkeypatch records (and restores) even an absent variable: hide_aws_secrets
        # writes AWS_PROFILE / AWS_SHARED_CREDENTIALS_FILE itself, and left behind they sent later
        # tests of this process (and a Ray cluster started after) to this test's throwaway profile
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTHIDE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hide-me-123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-456")
    path = hide_aws_secrets()
    assert path is not None
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(os.environ)
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(path) and os.environ["AWS_PROFILE"] == "mgfa-ray"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    creds = boto3.Session().get_credentials()
    assert (creds.access_key, creds.secret_key, creds.token) == ("AKIATESTHIDE", "hide-me-123", "token-456")
    assert hide_aws_secrets() is None  # nothing left to hide


FORKED_CHILD = """
import os, sys
from mgfa_ray.runtime import hide_aws_secrets
path = hide_aws_secrets()
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit runs the exit handlers inherited from the parent
os.waitpid(pid, 0)
print(path.is_file())
"""


def test_a_forked_child_leaves_the_private_credentials_file_to_its_parent():
    """A child forked after the keys were hidden runs the parent's exit handlers when it exits
    normally (e.g. a fork-based worker pool); the credentials file must outlive it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="AKIATESTFORK", AWS_SECRET_ACCESS_KEY="fork-secret")
    run = subprocess.run([sys.executable, "-c", FORKED_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
