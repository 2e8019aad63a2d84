"""The one publish primitive: a complete, fsync'ed temporary file, then one rename or one link.

Every file the project publishes — shards, plans and ``metadata.json`` of a mask set, checkpoints,
search records, the driver lock, the files Ray Tune writes through a search's storage filesystem —
goes through :class:`_TempFile`: its bytes are written to a hidden temporary beside the final name
(``.<name>.<12 hex digits>.tmp``, created exclusively with the mode ``open()`` gives: 0o666 less
the umask), flushed and fsync'ed, and then

* **replace** (:func:`atomic_write_bytes`, :func:`fs_write_atomic`, :func:`atomic_filesystem`):
  ``os.replace`` onto the name; a reader sees the old file or the new one, never a part;
* **create once** (:func:`create_once`): ``os.link`` to the name, which fails when the name exists,
  so of several writers exactly one creates the file and the others read the winner's bytes.

A crash at any point leaves the final name as it was (at most a hidden temporary beside it, which
the callers that care clean up). On an object store (any pyarrow filesystem other than the local
one) an object appears only once its upload completes, so the temporary is uploaded whole and
moved into place; pyarrow has no exclusive create there, so :func:`create_once` checks first and
two writers racing in that window both upload (the last stays).

A directory is published with :func:`publish_dir` (complete temporary directory, then rename).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mgfa_ray.storage.files import fs_exists, fs_read
from mgfa_ray.storage.retrying import with_accept

#: ``accept(final_name, temporary_path) -> bool`` of :func:`atomic_filesystem`: whether a file
#: completely written through the filesystem is published (True) or dropped, keeping the last one.
AcceptFile = Callable[[str, str], bool]


def temporary_name(name: str) -> str:
    """The hidden temporary name beside ``name``: ``.<name>.<12 hex digits>.tmp`` (unique)."""
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


class _TempFile:
    """A hidden temporary file beside ``path``, to be published as ``path`` by :meth:`commit`.

    Args:
        path: The final local path; its parent directory is created.

    The temporary is created exclusively (``O_EXCL``) with mode 0o666 less the umask, as ``open()``
    creates files (not ``mkstemp``'s owner-only 0o600). Whatever happens, :meth:`commit` and
    :meth:`discard` leave no temporary behind.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent, name = os.path.split(self.path)
        os.makedirs(parent or ".", exist_ok=True)
        self.tmp = os.path.join(parent, temporary_name(name))
        self._f = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            raise self._named(err)

    def _named(self, err: OSError) -> OSError:
        """``err`` naming the final path when it names no file (a full disk reported on a write
        or flush), so the message says what could not be written."""
        if err.filename is None:
            err.filename = self.path
        return err

    def flush(self) -> None:
        self._f.flush()

    def _close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def discard(self) -> None:
        """Close and delete the temporary; the final name is untouched."""
        try:
            self._f.close()
        except OSError:
            pass  # the buffer could not be flushed (a full disk): the temporary goes anyway
        finally:
            Path(self.tmp).unlink(missing_ok=True)

    def commit(self, *, once: bool = False) -> bool:
        """Fsync the temporary and publish it as :attr:`path`.

        Args:
            once: False: replace whatever is there (``os.replace``). True: create the file only if
                the name is free (``os.link``, failing when it exists; on a filesystem without
                hard links: a check, then a rename).

        Returns:
            True when this call published the file; False (``once`` only) when a file was there
            already — also when another writer's clean-up removed this temporary, which it does
            only once the final file exists.
        """
        try:
            try:
                self._close()
            except OSError as err:
                raise self._named(err)
            if not once:
                os.replace(self.tmp, self.path)
                return True
            return self._link()
        finally:
            Path(self.tmp).unlink(missing_ok=True)

    def _link(self) -> bool:
        try:
            os.link(self.tmp, self.path)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:  # our temporary was cleaned up because the file exists
            if not os.path.exists(self.path):
                raise
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP) or os.path.exists(self.path):
                raise
            os.replace(self.tmp, self.path)  # no hard links on this filesystem
            return True


def _written(path: str | os.PathLike, data: bytes) -> _TempFile:
    """A temporary beside ``path`` holding all of ``data``, not yet published (its ``commit``
    fsyncs and renames or links it); none is left if writing fails."""
    tmp = _TempFile(path)
    try:
        tmp.write(data)
    except BaseException:
        tmp.discard()
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to the local ``path`` atomically (temporary beside it, fsync, rename).

    Args:
        path: Destination file; parent directories are created.
        data: The full file content.

    Returns:
        The destination as a ``Path``; its mode is what ``open()`` would give (0o666 less the
        umask). On failure the old file (if any) is kept and no temporary is left.
    """
    _written(path, data).commit()
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any, *, comment: str | None = None) -> Path:
    """Write ``obj`` as block-style YAML (keys in insertion order), atomically, after ``comment``
    as a first ``# …`` line when given (one line; YAML readers skip it)."""
    text = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
    return atomic_write_text(path, text if comment is None else f"# {comment}\n{text}")


def fs_write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on the pyarrow filesystem ``fs``, replacing any file there, so
    that readers never see a partial file.

    Local filesystems (NFS included): :func:`atomic_write_bytes`. Other filesystems: a hidden
    temporary object beside ``path`` (:func:`temporary_name`) is uploaded whole and moved into
    place; on an object store an object only appears once its upload completes, so the final name
    never holds a partial file either.
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write_bytes(path, data)
        return
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/{temporary_name(name)}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def create_local_once(path: str | os.PathLike, data: bytes) -> bool:
    """Create the local file ``path`` holding ``data`` unless a file is already there; never replace
    one (:meth:`_TempFile.commit` with ``once=True``: a complete temporary hard-linked to ``path``).

    Returns:
        True when this call created the file; False when a file was there (also when another
        writer's clean-up removed this call's temporary, which it does only once the file exists).
    """
    return _written(path, data).commit(once=True)


def create_once(fs, path: str, data: bytes) -> bytes | None:
    """Create the file ``path`` on ``fs`` holding ``data`` unless a file is already there; never
    replace one.

    Local and NFS: :func:`create_local_once` (a complete temporary hard-linked to ``path``;
    ``link`` fails when the name exists), so of two writers exactly one creates the file
    and no reader sees part of it. Object store: pyarrow has no exclusive create, so the name is
    checked, then :func:`fs_write_atomic` uploads the file whole; two writers racing in between
    both upload it and the last upload stays.

    Returns:
        ``None`` when this call created the file, else the bytes of the file already there —
        also when another writer's clean-up removed this call's temporary (it does so only once
        the file exists).
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        if create_local_once(path, data):
            return None
    elif not fs_exists(fs, path):
        try:
            fs_write_atomic(fs, path, data)
            return None
        except OSError:
            if not fs_exists(fs, path):  # not a temporary cleaned up by another writer: a real failure
                raise
    return fs_read(fs, path)


def publish_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> Path:
    """Move a fully written temporary directory (beside ``final_dir``) to ``final_dir``.

    An existing ``final_dir`` is first renamed aside (``.<name>.old-<hex>``), the new one renamed
    in, and the old one deleted. Readers see the old complete directory or the new complete one;
    between the two renames the name is absent for an instant, and a crash exactly there leaves
    the old directory aside under its hidden name, never a partial one under the final name.

    Returns:
        ``final_dir`` as a ``Path``.
    """
    final_dir = Path(final_dir)
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    return final_dir


class _PublishOnClose:
    """A binary file written to a :class:`_TempFile` and published on close when ``accept`` allows
    (else dropped: the last published version stays)."""

    def __init__(self, path: str, accept: AcceptFile | None):
        self.path, self._accept = path, accept
        self._tmp = _TempFile(path)
        self.closed = False

    def write(self, data) -> int:
        return self._tmp.write(data)

    def flush(self) -> None:
        self._tmp.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._tmp.flush()
        if self._accept is not None and not self._accept(os.path.basename(self.path), self._tmp.tmp):
            self._tmp.discard()  # keep the last complete version
            return
        self._tmp.commit()


@functools.cache
def _atomic_local_handler_base():
    """The handler class, built once on first use (pyarrow is imported lazily by this package).

    Length: one class, pyarrow's ``FileSystemHandler`` interface, each
    method a line or two.
    """
    import pyarrow.fs as pafs

    class AtomicLocalHandler(pafs.FileSystemHandler):
        """A pyarrow ``FileSystemHandler`` over the local filesystem whose output streams and copies
        are published on close through :class:`_PublishOnClose`, so a process killed mid-write
        leaves the old file or none, never a truncated one."""

        def __init__(self, accept: AcceptFile | None = None):
            self._fs = pafs.LocalFileSystem()
            self.accept = accept

        def __reduce__(self):
            return (_atomic_local_handler, (self.accept,))

        def __eq__(self, other):
            return isinstance(other, AtomicLocalHandler) and self.accept == other.accept

        def __ne__(self, other):
            return not self == other

        def get_type_name(self):
            return "mgfa-atomic-local"

        def normalize_path(self, path):
            return self._fs.normalize_path(path)

        def get_file_info(self, paths):
            return self._fs.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return self._fs.get_file_info(selector)

        def create_dir(self, path, recursive):
            self._fs.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            self._fs.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            raise OSError("refusing to delete the contents of the root directory")

        def delete_file(self, path):
            self._fs.delete_file(path)

        def move(self, src, dest):
            self._fs.move(src, dest)

        def copy_file(self, src, dest):
            with self._fs.open_input_stream(src) as f_in:
                writer = _PublishOnClose(dest, self.accept)
                shutil.copyfileobj(f_in, writer)
                writer.close()

        def open_input_stream(self, path):
            return self._fs.open_input_stream(path)

        def open_input_file(self, path):
            return self._fs.open_input_file(path)

        def open_output_stream(self, path, metadata):
            import pyarrow as pa

            return pa.PythonFile(_PublishOnClose(path, self.accept), mode="w")

        def open_append_stream(self, path, metadata):
            return self._fs.open_append_stream(path, metadata=metadata)

    return AtomicLocalHandler


def _atomic_local_handler(accept: AcceptFile | None = None):
    return _atomic_local_handler_base()(accept)


def atomic_filesystem(fs, *, accept: AcceptFile | None = None):
    """``fs`` made safe against a writer killed mid-file: a local filesystem (NFS included) is
    wrapped so every file written through it appears only complete (temporary file, fsync,
    rename); an object store's upload appears only once complete anyway, and a retrying one
    (:func:`mgfa_ray.storage.retrying_filesystem`) gets ``accept`` for its uploads; other
    filesystems are returned as they are.

    Args:
        fs: A pyarrow filesystem.
        accept: Optional hook ``accept(final_name, temporary_path) -> bool``, called with each file
            completely written through the wrapper before it is published: False drops it and
            keeps the file already there. A module-level function, so that the wrapper pickles
            (Ray ships it to its workers). The search layer passes
            :func:`mgfa_ray.search.tune_state.complete_state_file`, which knows Ray Tune's state files.

    Returns:
        A ``pyarrow.fs.PyFileSystem`` (type name ``py::mgfa-atomic-local``) over the local
        filesystem, or ``fs`` itself when it is not local.
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return pafs.PyFileSystem(_atomic_local_handler(accept))
    return with_accept(fs, accept) if accept is not None else fs
