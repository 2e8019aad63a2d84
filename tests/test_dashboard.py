"""optuna-dashboard for real: ``mgfa-ray search dashboard DIR`` serves a finished search's study, and
headless Chromium renders its pages with the study and every trial listed.

Needs the ``dashboard`` extra (``make test`` installs it with ``test``) and Debian's ``chromium``
(``make test`` installs it when /usr/bin/chromium is absent); skipped with the reason otherwise.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mgfa_ray.search.driver import read_record
from mgfa_ray.search.study import StudyRef, search_trials

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]

pytestmark = [
    pytest.mark.skipif(__import__("importlib").util.find_spec("optuna_dashboard") is None,
                       reason="optuna-dashboard not installed: pip install -e '.[dashboard]' (make test does)"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium (make test does)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _page_text(url: str, profile: Path) -> str:
    """The visible text of ``url`` after its JavaScript ran, from headless Chromium's DOM."""
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


@pytest.mark.slow
def test_dashboard_lists_the_study_and_its_trials(watched_search, tmp_path):
    search_dir, _ = watched_search
    record = read_record(search_dir)
    trials = search_trials(StudyRef(record.study.storage, record.study.study_name).load())
    port = _free_port()
    log = open(tmp_path / "dashboard.log", "wb")  # noqa: SIM115 — closed below
    proc = subprocess.Popen([sys.executable, "-m", "mgfa_ray.cli", "search", "dashboard", search_dir,
                             "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
                time.sleep(0.3)
        (study,) = [s for s in studies if s["study_name"] == record.study.study_name]
        api = _get(f"{base}/api/studies/{study['study_id']}")["trials"]
        assert [(t["number"], t["state"].upper()) for t in api] == [(t.number, t.state.name) for t in trials]

        listing = _page_text(f"{base}/dashboard", tmp_path / "profile-1")
        assert record.study.study_name in listing
        page = _page_text(f"{base}/dashboard/studies/{study['study_id']}/trials", tmp_path / "profile-2")
        assert f"{len(trials)} Trials" in page
        for t in trials:  # every trial listed with its state
            assert re.search(rf"Trial {t.number} {t.state.name.capitalize()}\b", page), (t.number, page[:2000])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
