"""The storage package: atomic writes (a reader sees the old file or the new one, never a part; modes as
open() gives), create-once, directory publishing, object-store outages."""

import os
import stat

import pytest

from mgfa_ray.storage import atomic_write_bytes, atomic_write_json


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


def test_create_once_of_racing_writers_exactly_one_wins_and_the_others_read_its_bytes(tmp_path):
    """The one publish primitive in create-once mode (mask shards, plan and metadata, the driver
    lock): writers of different bytes racing on one name; one creates it, every other one gets the
    winner's bytes back, the file is never replaced and no temporary is left."""
    import threading

    import pyarrow.fs as pafs

    from mgfa_ray.storage import create_once

    fs = pafs.LocalFileSystem()
    for round_ in range(20):
        path = str(tmp_path / f"r{round_}" / "shard.bin")
        start = threading.Barrier(6)
        results: dict[int, bytes | None] = {}

        def write(i, path=path, start=start, results=results):
            start.wait()
            results[i] = create_once(fs, path, f"writer {i} ".encode() * 1000)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, r in results.items() if r is None]
        assert len(winners) == 1, results.keys()
        won = f"writer {winners[0]} ".encode() * 1000
        assert all(r == won for r in results.values() if r is not None)
        assert open(path, "rb").read() == won
        assert os.listdir(os.path.dirname(path)) == ["shard.bin"]  # no temporary left


@pytest.mark.parametrize("mode", ["replace", "create_once"])
def test_a_writer_killed_before_the_rename_leaves_the_final_name_as_it_was(tmp_path, mode):
    """SIGKILL after the temporary is written in full, before it is renamed or linked: the old file
    (replace) or no file (create once) under the final name, only a hidden temporary beside it; a
    later writer publishes normally."""
    import signal
    import subprocess
    import sys

    from mgfa_ray.storage import atomic_write_bytes, create_local_once

    path = tmp_path / "f.bin"
    if mode == "replace":
        path.write_bytes(b"old")
    call = "atomic_write_bytes(p, d)" if mode == "replace" else "create_local_once(p, d)"
    code = ("import os, signal, sys\n"
            "from mgfa_ray.storage import atomic_write_bytes, create_local_once\n"
            "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # the crash: data written, not published\n"
            f"p, d = sys.argv[1], b'new' * 100000\n{call}\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    if mode == "replace":
        assert path.read_bytes() == b"old"
        assert names[1:] == ["f.bin"] and names[0].startswith(".f.bin.") and names[0].endswith(".tmp"), names
    else:
        assert len(names) == 1 and names[0].startswith(".f.bin.") and names[0].endswith(".tmp"), names
    (tmp_path / names[0]).unlink()
    if mode == "replace":
        atomic_write_bytes(path, b"next")
    else:
        assert create_local_once(path, b"next") and not create_local_once(path, b"other")
    assert path.read_bytes() == b"next" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_publish_dir_swaps_a_complete_directory_in(tmp_path):
    """A checkpoint directory published over an older one: the new content under the name, the old
    one gone, nothing left aside."""
    from mgfa_ray.storage import publish_dir

    final = tmp_path / "best_checkpoint"
    for content in (b"first", b"second"):
        tmp = tmp_path / ".best_checkpoint-tmp"
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "checkpoint.pt").write_bytes(content)
        assert publish_dir(tmp, final) == final
        assert (final / "sub" / "checkpoint.pt").read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best_checkpoint"]


def test_atomic_filesystem_shows_only_complete_files(tmp_path):
    """What Ray writes through the search's storage filesystem: a writer killed before close leaves
    the old file (here: none) under the final name, never a truncated one; copies and pickling work."""
    import pickle

    import pyarrow.fs as pafs

    from mgfa_ray.storage import atomic_filesystem

    fs = atomic_filesystem(pafs.LocalFileSystem())
    (tmp_path / "state.json").write_text("old")
    stream = fs.open_output_stream(str(tmp_path / "state.json"))
    stream.write(b"new, half written")
    assert (tmp_path / "state.json").read_text() == "old"  # a kill now keeps the old file
    stream.close()
    assert (tmp_path / "state.json").read_text() == "new, half written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "checkpoint.pt").write_bytes(b"\0" * 1000)
    pafs.copy_files(str(tmp_path / "src"), str(tmp_path / "dst"), destination_filesystem=pickle.loads(pickle.dumps(fs)))
    assert (tmp_path / "dst" / "sub" / "checkpoint.pt").read_bytes() == b"\0" * 1000
    assert atomic_filesystem(fs) is fs  # only LocalFileSystem is wrapped


def test_atomic_filesystem_keeps_the_last_whole_ray_state_file(tmp_path):
    """Ray uploads its experiment state while rewriting it; a copy read half written (empty, cut
    JSON, cut pickle) must not replace the last whole one. The storage package knows no Ray file:
    the search layer's hook (mgfa_ray.search.tune_state) does, and the wrapper pickles with it."""
    import pickle

    import pyarrow.fs as pafs

    from mgfa_ray.storage import atomic_filesystem
    from mgfa_ray.search.tune_state import complete_state_file

    fs = pickle.loads(pickle.dumps(atomic_filesystem(pafs.LocalFileSystem(), accept=complete_state_file)))

    def write(name, data):
        with fs.open_output_stream(str(tmp_path / name)) as f:
            f.write(data)

    whole_state, whole_pickle = b'{"trial_data": []}', pickle.dumps({"a": 1})
    write("experiment_state-x.json", whole_state)
    write("searcher-state-x.pkl", whole_pickle)
    for cut in (b"", b'{"trial_da'):
        write("experiment_state-x.json", cut)
    write("search_gen_state-x.json", whole_pickle)  # Ray pickles it despite the name
    for cut in (b"", whole_pickle[:-3]):
        write("searcher-state-x.pkl", cut)
        write("search_gen_state-x.json", cut)
    assert (tmp_path / "experiment_state-x.json").read_bytes() == whole_state
    assert (tmp_path / "searcher-state-x.pkl").read_bytes() == whole_pickle
    assert (tmp_path / "search_gen_state-x.json").read_bytes() == whole_pickle
    write("result.json", b'{"a": 1}\n{"a"')  # other files: whatever was written
    assert (tmp_path / "result.json").read_bytes() == b'{"a": 1}\n{"a"'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment_state-x.json", "result.json",
                                                          "search_gen_state-x.json", "searcher-state-x.pkl"]


def test_object_store_uploads_keep_the_last_whole_ray_state_file(s3_server):
    """The same on an object store (a real S3 API server): through the retrying filesystem with the
    search layer's hook, a state file read half written is not uploaded over the last whole one,
    and the hook survives pickling (Ray ships the filesystem to its workers)."""
    import pickle

    from mgfa_ray.storage import atomic_filesystem, resolve_location
    from mgfa_ray.search.tune_state import complete_state_file

    fs, root = resolve_location(s3_server("state-files", "run"))
    fs = pickle.loads(pickle.dumps(atomic_filesystem(fs, accept=complete_state_file)))

    def write(name, data):
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(data)

    def read(name):
        with fs.open_input_stream(f"{root}/{name}") as f:
            return f.read()

    whole = b'{"trial_data": []}'
    write("experiment_state-x.json", whole)
    for cut in (b"", b'{"trial_da'):
        write("experiment_state-x.json", cut)
    assert read("experiment_state-x.json") == whole
    write("result.json", b'{"a"')  # other files: whatever was written
    assert read("result.json") == b'{"a"'


def test_a_filesystem_made_from_environment_keys_works_after_they_leave_it(s3_server, monkeypatch):
    """Keys in the environment move into a private profile before Ray starts (ensure_ray:
    hide_aws_secrets). The AWS SDK fixes its profile when a filesystem is built, so one built from
    the environment's keys answered every call after the move with 403 (order-dependent CI
    failures); the keys now move before the first object-store filesystem is made."""
    from mgfa_ray.runtime import hide_aws_secrets
    from mgfa_ray.storage import fs_exists, fs_write_atomic, resolve_location

    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        monkeypatch.setenv(name, "")  # recorded, so restored after: hide_aws_secrets sets them itself
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mgfa-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "mgfa-test")
    fs, root = resolve_location(s3_server("keys-move", "x"))
    fs_write_atomic(fs, f"{root}/a", b"1")
    hide_aws_secrets()  # as ensure_ray does before Ray starts
    assert fs_exists(fs, f"{root}/a")


def test_object_store_calls_wait_through_a_restart(restartable_s3):
    """A write started while the store is down completes once it is back; nothing is lost."""
    import threading
    import time

    from mgfa_ray.storage import fs_read, fs_write_atomic, resolve_location

    fs, root = resolve_location(restartable_s3.uri("outage-unit", "x"))
    fs_write_atomic(fs, f"{root}/before", b"kept")
    restartable_s3.stop()
    timer = threading.Timer(3.0, restartable_s3.start)
    timer.start()
    t0 = time.monotonic()
    fs_write_atomic(fs, f"{root}/during", b"written during the outage")
    assert time.monotonic() - t0 >= 2.5  # it really waited for the server
    timer.join()
    assert fs_read(fs, f"{root}/during") == b"written during the outage"
    assert fs_read(fs, f"{root}/before") == b"kept"


def test_object_store_outage_past_the_window_is_a_clear_error(restartable_s3, monkeypatch):
    import pyarrow.fs as pafs

    from mgfa_ray.storage import StorageUnavailableError, fs_write_atomic, resolve_location

    monkeypatch.setenv("MGFA_STORAGE_RETRY_S", "1")
    fs, root = resolve_location(restartable_s3.uri("outage-unit2", "x"))
    restartable_s3.stop()
    with pytest.raises(StorageUnavailableError, match=r"unreachable for 1 s \(MGFA_STORAGE_RETRY_S\).*outage-unit2/x"):
        fs_write_atomic(fs, f"{root}/file", b"data")
    restartable_s3.start()
    assert fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True)) == []  # nothing partial
    with pytest.raises(FileNotFoundError):  # an answer, not an outage: raised at once
        fs.open_input_file(f"{root}/missing")


def test_bad_storage_retry_setting_is_refused(monkeypatch):
    from mgfa_ray.storage import storage_retry_s

    monkeypatch.setenv("MGFA_STORAGE_RETRY_S", "-3")
    with pytest.raises(ValueError, match="MGFA_STORAGE_RETRY_S='-3'"):
        storage_retry_s()
