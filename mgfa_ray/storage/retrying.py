"""Object stores that go away for a while: wait and retry, then one clear error.

:func:`retrying_filesystem` wraps a remote pyarrow filesystem so that every call failing because
the store cannot be reached (connection refused or reset, timeout, HTTP 5xx or throttling:
:func:`is_transient_storage_error`) is retried with backoff for up to ``$MGFA_STORAGE_RETRY_S``
seconds (:func:`storage_retry_s`), then raises :class:`StorageUnavailableError`. Reads download a
whole object and writes upload it whole on close, so a connection lost halfway repeats the whole
transfer and nothing partial is ever published.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
import time

from mgfa_ray.compat import s3_options
from mgfa_ray.errors import InputError, UserError

log = logging.getLogger(__name__)

STORAGE_RETRY_ENV = "MGFA_STORAGE_RETRY_S"
DEFAULT_STORAGE_RETRY_S = 300.0

# pyarrow's S3 errors read "AWS Error <S3Errors name> during <Operation> operation: …" (Arrow's
# s3_internal.h); these names, and plain connection failures, are an outage rather than an answer.
_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|SLOW_DOWN|REQUEST_TIMEOUT)"
    r"|could not connect|connection refused|connection reset|timed out",
    re.IGNORECASE,
)


class StorageUnavailableError(UserError, OSError):
    """The object store did not answer within the retry window (``$MGFA_STORAGE_RETRY_S``).

    Raised instead of the last transient error; nothing was published by the failed call (uploads
    appear only once complete), so rerunning the same command after the store is back resumes.
    Exit status 1.
    """

    exit_status = 1


def is_transient_storage_error(err: BaseException) -> bool:
    """Whether ``err`` says the store could not be reached (connection refused or reset, timeout,
    HTTP 5xx/throttling), as opposed to an answer such as "not found" or "access denied"."""
    if not isinstance(err, OSError) or isinstance(err, FileNotFoundError | FileExistsError | PermissionError):
        return False
    return bool(_TRANSIENT.search(str(err)))


def storage_retry_s() -> float:
    """Seconds a storage call keeps retrying through an outage: ``$MGFA_STORAGE_RETRY_S`` (default
    300; 0 = fail at the first transient error).

    Raises:
        ValueError: The variable is not a non-negative number.
    """
    raw = os.environ.get(STORAGE_RETRY_ENV, str(DEFAULT_STORAGE_RETRY_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise InputError(f"{STORAGE_RETRY_ENV}={raw!r}: expected seconds >= 0")
    return value


def _retry(what: str, call, *, retry_s: float):
    """``call()``, retried with exponential backoff (0.5 s doubling to 10 s) while it fails with a
    transient storage error, for at most ``retry_s`` seconds from the first failure."""
    deadline = None
    delay = 0.5
    while True:
        try:
            return call()
        except OSError as err:
            if not is_transient_storage_error(err):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + retry_s
                log.warning("object store unreachable (%s): %s; retrying for up to %.0f s (%s)",
                            what, err, retry_s, STORAGE_RETRY_ENV)
            if now >= deadline:
                raise StorageUnavailableError(
                    f"object store unreachable for {retry_s:.0f} s ({STORAGE_RETRY_ENV}) while trying to {what}: "
                    f"{err}. Nothing partial was published; rerun the same command once the store answers "
                    f"(a search: mgfa-ray search resume <search dir>)") from err
            time.sleep(min(delay, deadline - now))
            delay = min(2 * delay, 10.0)


class _UploadOnClose:
    """A binary file buffered locally (in memory up to 64 MiB, then a temporary file) and uploaded
    in one piece on close, with retries; the object appears only when the upload completes.

    With ``accept`` (the hook of :func:`mgfa_ray.storage.atomic_filesystem`), a file of at most
    64 MiB is uploaded only if ``accept(base name, local copy)`` is true; otherwise the object
    already there is kept (a larger file is uploaded unchecked: the hook is for small state files).
    """

    def __init__(self, fs, path: str, metadata, retry_s: float, accept=None):
        self._fs, self.path, self._metadata, self._retry_s, self._accept = fs, path, metadata, retry_s, accept
        self._buf = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 — closed in close()
        self.closed = False

    def write(self, data) -> int:
        return self._buf.write(data)

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def _upload(self) -> None:
        self._buf.seek(0)
        with self._fs.open_output_stream(self.path, metadata=self._metadata) as out:
            shutil.copyfileobj(self._buf, out, 8 << 20)

    def _accepted(self) -> bool:
        if self._accept is None or self._buf.tell() > 64 << 20:
            return True
        self._buf.seek(0)
        with tempfile.NamedTemporaryFile(prefix=".mgfa-upload-", suffix=".tmp") as copy:
            shutil.copyfileobj(self._buf, copy)
            copy.flush()
            return bool(self._accept(self.path.rstrip("/").rsplit("/", 1)[-1], copy.name))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._accepted():
                _retry(f"write {self.path}", self._upload, retry_s=self._retry_s)
            else:
                log.warning("not uploaded, incomplete: %s (the last complete copy is kept)", self.path)
        finally:
            self._buf.close()


@functools.cache
def _retrying_handler_base():
    """The handler class, built once on first use (pyarrow is imported lazily by this package).

    Length: one class, pyarrow's ``FileSystemHandler`` interface, each
    method a line or two.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    class RetryingHandler(pafs.FileSystemHandler):
        """A pyarrow ``FileSystemHandler`` over a remote filesystem whose every call waits through
        an outage (:func:`_retry`). Reads download the whole object first and writes upload it on
        close, so a connection lost halfway repeats the whole transfer, never a part of it."""

        def __init__(self, fs, retry_s: float, accept=None):
            self.fs, self.retry_s, self.accept = fs, retry_s, accept

        def __reduce__(self):
            return (_retrying_handler, (self.fs, self.retry_s, self.accept))

        def __eq__(self, other):
            return (isinstance(other, RetryingHandler) and self.fs.equals(other.fs) and self.retry_s == other.retry_s
                    and self.accept is other.accept)

        def __ne__(self, other):
            return not self == other

        def _call(self, what: str, fn, *args, **kwargs):
            return _retry(what, lambda: fn(*args, **kwargs), retry_s=self.retry_s)

        def get_type_name(self):
            return f"mgfa-retrying-{self.fs.type_name}"

        def normalize_path(self, path):
            return self.fs.normalize_path(path)

        def get_file_info(self, paths):
            return self._call(f"stat {paths[:3]}", self.fs.get_file_info, paths)

        def get_file_info_selector(self, selector):
            return self._call(f"list {selector.base_dir}", self.fs.get_file_info, selector)

        def create_dir(self, path, recursive):
            self._call(f"create {path}", self.fs.create_dir, path, recursive=recursive)

        def delete_dir(self, path):
            self._call(f"delete {path}", self.fs.delete_dir, path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            self._call(f"delete the contents of {path}", self.fs.delete_dir_contents, path,
                       missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            raise OSError("refusing to delete the contents of the root directory")

        def delete_file(self, path):
            self._call(f"delete {path}", self.fs.delete_file, path)

        def move(self, src, dest):
            self._call(f"move {src} to {dest}", self.fs.move, src, dest)

        def copy_file(self, src, dest):
            self._call(f"copy {src} to {dest}", self.fs.copy_file, src, dest)

        def _download(self, path):
            def fetch():
                buf = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 — returned open
                try:
                    with self.fs.open_input_stream(path) as f:
                        shutil.copyfileobj(f, buf, 8 << 20)
                except BaseException:
                    buf.close()
                    raise
                buf.seek(0)
                return buf

            return pa.PythonFile(self._call(f"read {path}", fetch), mode="r")

        def open_input_stream(self, path):
            return self._download(path)

        def open_input_file(self, path):
            return self._download(path)

        def open_output_stream(self, path, metadata):
            return pa.PythonFile(_UploadOnClose(self.fs, path, metadata, self.retry_s, self.accept), mode="w")

        def open_append_stream(self, path, metadata):
            return self._call(f"append to {path}", self.fs.open_append_stream, path, metadata=metadata)

    return RetryingHandler


def _retrying_handler(fs, retry_s: float, accept=None):
    return _retrying_handler_base()(fs, retry_s, accept)


def with_accept(fs, accept):
    """The retrying filesystem ``fs`` with the upload hook ``accept`` (see :class:`_UploadOnClose`);
    any other filesystem as it is."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, _retrying_handler_base()):
        return pafs.PyFileSystem(_retrying_handler(fs.handler.fs, fs.handler.retry_s, accept))
    return fs


def retrying_filesystem(fs, *, retry_s: float | None = None):
    """``fs`` made to wait through an object-store outage: every call that fails because the store
    cannot be reached (:func:`is_transient_storage_error`) is retried with backoff for up to
    ``retry_s`` seconds, then raises :class:`StorageUnavailableError`. A local filesystem is returned
    as it is.

    The wrapper is a ``pyarrow.fs.PyFileSystem`` that pickles with its settings, so Ray ships it to
    trial actors (their checkpoint uploads wait too). An S3 filesystem is rebuilt with
    ``background_writes=False``: uploads happen whole on close, and pyarrow's background writes from
    inside ``copy_files``' thread pool can deadlock (apache/arrow#32372, the reason Ray turns
    threads off for S3 uploads).

    Args:
        fs: A pyarrow filesystem.
        retry_s: Retry window in seconds (default :func:`storage_retry_s`).

    Returns:
        A ``pyarrow.fs.PyFileSystem`` (type name ``py::mgfa-retrying-<inner type>``), or ``fs`` itself
        when it is local or already wrapped.

    Raises:
        ValueError: ``retry_s`` is None and ``$MGFA_STORAGE_RETRY_S`` is not seconds >= 0.
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem) or (
            isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, _retrying_handler_base())):
        return fs
    if isinstance(fs, pafs.S3FileSystem):
        fs = pafs.S3FileSystem(**{**s3_options(fs), "background_writes": False})
    return pafs.PyFileSystem(_retrying_handler(fs, storage_retry_s() if retry_s is None else retry_s))
