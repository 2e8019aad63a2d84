"""Atomic file writes and content hashes shared by every stage.

Every file a stage publishes is written to a temporary name in the same directory and then
renamed into place (``os.replace`` is atomic on POSIX file systems), so a crash leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

_UMASK = os.umask(0)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then rename).

    Args:
        path: Destination file; parent directories are created.
        data: The full file content.

    Returns:
        The destination as a ``Path``; its mode is what ``open()`` would give (0o666 less the
        umask), not ``mkstemp``'s owner-only 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as block-style YAML (keys in insertion order), atomically."""
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=False))


def publish_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written temporary directory to ``final_dir`` with one rename.

    An existing ``final_dir`` is replaced (moved aside first, then deleted), so readers see either
    the old complete directory or the new complete one.
    """
    final_dir = Path(final_dir)
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    return final_dir


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_stem(name: str) -> str:
    """A flat file-name stem for an id such as an image_id: runs of characters other than
    ``[A-Za-z0-9._-]`` become ``_`` (``"acer_rubrum/ny1079-01-1"`` → ``"acer_rubrum_ny1079-01-1"``);
    never empty. Not injective: callers that need unique names add a hash."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of the canonical (key-sorted, compact) JSON of ``obj``."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()
