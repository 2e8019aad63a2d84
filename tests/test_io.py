"""Atomic writes: a reader sees the old file or the new one, never a part; modes as open() gives."""

import os
import stat

import pytest

from mgfa_ray.io import atomic_write_bytes, atomic_write_json


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    path = atomic_write_bytes(tmp_path / "sub" / "f.bin", b"old")
    atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]  # no temporary file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails while writing the temporary file
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
