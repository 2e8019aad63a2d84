"""Atomic file writes, storage locations and content hashes shared by every stage.

Every file a stage publishes is written to a temporary name in the same directory and then
renamed into place (``os.replace`` is atomic on POSIX file systems), so a crash leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from .errors import InputError, UserError
from .runtime import umask

log = logging.getLogger(__name__)


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
        os.chmod(tmp, 0o666 & ~umask())
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


# --- Locations: a local path, an NFS mount, or an object-store URI, through pyarrow filesystems ---


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI (``s3://bucket/prefix``, ``gs://…``, ``file:///…``) rather than a
    local path."""
    return "://" in str(location)


def location_join(location: str | os.PathLike, *names: str) -> str:
    """``location`` with ``names`` appended as path segments; a URI keeps its query string
    (``s3://b/masks?endpoint_override=…`` + ``set1`` → ``s3://b/masks/set1?endpoint_override=…``)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*names))
    parts = urlsplit(str(location))
    path = "/".join([parts.path.rstrip("/"), *names])
    return urlunsplit(parts._replace(path=path))


# --- Secrets in locations: never written, logged or printed ---

REDACTED = "***"
SECRET_PARAMS = frozenset({
    "access_key", "secret_key", "session_token", "secret_access_key", "access_key_id", "account_key",
    "sas_token", "token", "password", "passwd", "secret", "client_secret", "credential", "credentials",
})
"""Query parameters whose values :func:`redact_location` hides (compared case-insensitively)."""

_SECRET_ASSIGN = re.compile(r"(?i)\b(" + "|".join(sorted(SECRET_PARAMS, key=len, reverse=True)) + r")=([^&\s'\"]+)")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_AWS_ENV = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
            "session_token": "AWS_SESSION_TOKEN"}


def redact_location(location: str | os.PathLike) -> str:
    """``location`` safe to write, log or print: secret query values (:data:`SECRET_PARAMS`, e.g.
    ``access_key``, ``secret_key``, ``session_token``) and the password of ``user:password@`` (for
    ``s3://KEY:SECRET@bucket`` both parts) become ``***``. Local paths and URIs without secrets are
    returned unchanged; the rest of the URI is kept byte for byte.

    Example: ``s3://b/p?endpoint_override=http://h:9000&secret_key=abc`` →
    ``s3://b/p?endpoint_override=http://h:9000&secret_key=***``.
    """
    text = str(location)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if parts.scheme in ("s3", "gs", "gcs", "abfs", "abfss", "az"):
            user = REDACTED
        netloc = f"{user}:{REDACTED}@{host}" if has_password else f"{user}@{host}"
    query = _SECRET_ASSIGN.sub(lambda m: f"{m.group(1)}={REDACTED}", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URI in it passed through
    :func:`redact_location` and any remaining ``<secret param>=<value>`` hidden."""
    return _SECRET_ASSIGN.sub(lambda m: f"{m.group(1)}={REDACTED}", _URI.sub(lambda m: redact_location(m.group(0)), text))


def redact_tree(obj: Any) -> Any:
    """A copy of a JSON/YAML-like tree (dicts, lists, scalars) with :func:`redact_text` applied to
    every string: what a file this project writes may hold."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return redact_text(obj) if isinstance(obj, str) else obj


def take_credentials(location: str | os.PathLike | None, *, field: str = "location") -> str | None:
    """``location`` without the credentials it carries, which go to this process's environment.

    An ``s3://`` URI's ``access_key`` / ``secret_key`` / ``session_token`` query parameters (or
    ``s3://KEY:SECRET@bucket/…``) are removed from it and set as ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (a session token not given is unset), where
    pyarrow and every process started from here (a local Ray cluster's workers) find them. The
    location handed on, recorded and printed then holds no secret. Call it where a location
    enters (job file, command line), before Ray starts.

    Raises:
        ConfigError: Two locations carry different keys (give them in the environment or a
            profile instead), or a URI of another scheme carries a secret (``user:password@`` or a
            secret query parameter), which this project would otherwise write into its records.
    """
    from .config import ConfigError

    if location is None or not is_uri(location):
        return None if location is None else str(location)
    text = str(location)
    if redact_location(text) == text:
        return text
    parts = urlsplit(text)
    shown = redact_location(text)
    if parts.scheme != "s3":
        raise ConfigError(f"{field}: {shown} carries a secret; this project would write it into its records. "
                          "Give it in the environment instead (e.g. PGPASSWORD or ~/.pgpass for PostgreSQL, the "
                          "store's usual variables or profile) and remove it from the location")
    found: dict[str, str] = {}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        key, _, secret = userinfo.partition(":")
        found.update(access_key=key, secret_key=secret)
    kept = []
    for item in parts.query.split("&") if parts.query else []:
        name, _, value = item.partition("=")
        if name.lower() in SECRET_PARAMS:
            found[name.lower()] = value
        else:
            kept.append(item)
    unknown = set(found) - set(_AWS_ENV)
    if unknown or not {"access_key", "secret_key"} <= set(found):
        raise ConfigError(f"{field}: {shown}: an s3 location takes access_key and secret_key together (and "
                          f"optionally session_token), got {sorted(found)}; better, give them in the environment "
                          "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a profile (AWS_PROFILE)")
    wanted = {_AWS_ENV[k]: v for k, v in found.items()}
    previous = _TAKEN.get("keys")  # still in force: the environment holds what an earlier location set
    if previous and previous != wanted and all(os.environ.get(k) == v for k, v in previous.items()):
        raise ConfigError(f"{field}: {shown} carries other keys than a location given before in this run; give "
                          "the credentials in the environment (AWS_*) or a profile instead of in the locations")
    _TAKEN["keys"] = wanted
    os.environ.update(wanted)
    if "AWS_SESSION_TOKEN" not in wanted:
        os.environ.pop("AWS_SESSION_TOKEN", None)
    return urlunsplit(parts._replace(netloc=netloc, query="&".join(kept)))


_TAKEN: dict[str, dict[str, str]] = {}  # the keys taken from locations by this process (in memory only)


def resolve_location(location: str | os.PathLike):
    """The pyarrow filesystem and path of a location.

    A local path (relative ones against the working directory) gives ``pyarrow.fs.LocalFileSystem``
    and the absolute path; a URI goes through ``pyarrow.fs.FileSystem.from_uri``, so an object store
    takes its endpoint, region and credentials from the URI's query string
    (``?endpoint_override=…&region=…``) or from the usual environment (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, …; pyarrow docs, "Filesystem Interface"). Nothing is hard-coded. A remote
    filesystem comes wrapped by :func:`retrying_filesystem`: while the store is unreachable, calls
    wait and retry for up to ``$MGFA_STORAGE_RETRY_S`` seconds.

    Returns:
        ``(filesystem, path)``: ``path`` is what the filesystem's methods take.

    Raises:
        ValueError: pyarrow does not understand the URI (the message names it), or
            ``$MGFA_STORAGE_RETRY_S`` is not seconds >= 0.
    """
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise InputError(f"cannot open storage location {redact_location(location)!r}: "
                         f"{redact_text(str(err))}") from None
    return retrying_filesystem(fs), path


def fs_write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on ``fs`` so that readers never see a partial file.

    Local filesystems (NFS included) use :func:`atomic_write_bytes` (fsync, then rename). Other
    filesystems write a hidden temporary object beside ``path`` and move it into place; on an
    object store an object only appears once its upload completes, so the final name never
    holds a partial file either.
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write_bytes(path, data)
        return
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def fs_read(fs, path: str) -> bytes:
    """The bytes of the file ``path`` on ``fs``."""
    with fs.open_input_file(path) as f:
        return f.read()


def fs_exists(fs, path: str) -> bool:
    """Whether ``path`` is a file on ``fs``."""
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def fs_list(fs, directory: str) -> list[str]:
    """Base names of the files directly in ``directory`` on ``fs`` (empty when it does not exist)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


class _RenameOnClose:
    """A binary file written under a hidden temporary name and renamed to ``path`` on close."""

    def __init__(self, path: str):
        self.path = path
        directory, name = os.path.split(path)
        self.tmp = os.path.join(directory, f".{name}.partial-{uuid.uuid4().hex[:8]}")
        self._f = open(self.tmp, "wb")  # noqa: SIM115 — closed in close()
        self.closed = False

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if not _complete_state_file(os.path.basename(self.path), self.tmp):
            os.unlink(self.tmp)  # keep the last complete version
            return
        os.chmod(self.tmp, 0o666 & ~umask())
        os.replace(self.tmp, self.path)


def _complete_state_file(name: str, path: str) -> bool:
    """Whether a copy of one of Ray Tune's experiment state files is whole.

    Ray writes these files in its driver staging directory in place and uploads the directory from
    a background thread, so an upload can read one half written (measured here: an empty
    ``experiment_state-*.json`` published while the driver was rewriting it; Ray 2.60).
    ``experiment_state-*.json`` must parse as JSON; a pickle (``*.pkl``, and
    ``search_gen_state-*.json``, which Ray pickles despite its name) must end with its STOP opcode.
    Other files pass.
    """
    import fnmatch

    if fnmatch.fnmatch(name, "experiment_state-*.json"):
        try:
            with open(path, "rb") as f:
                json.load(f)
        except ValueError:
            return False
        return True
    if name.endswith(".pkl") or fnmatch.fnmatch(name, "search_gen_state-*.json"):  # the latter is a pickle too
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"."
    return True


@functools.cache
def _atomic_local_handler_base():
    """The handler class, built once on first use (pyarrow is imported lazily by this module)."""
    import pyarrow.fs as pafs

    class AtomicLocalHandler(pafs.FileSystemHandler):
        """A pyarrow ``FileSystemHandler`` over the local filesystem whose output streams are
        written to a hidden temporary file and renamed into place on close, so a process killed
        mid-write leaves the old file or none, never a truncated one."""

        def __init__(self):
            self._fs = pafs.LocalFileSystem()

        def __reduce__(self):
            return (_atomic_local_handler, ())

        def __eq__(self, other):
            return isinstance(other, AtomicLocalHandler)

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
                writer = _RenameOnClose(dest)
                shutil.copyfileobj(f_in, writer)
                writer.close()

        def open_input_stream(self, path):
            return self._fs.open_input_stream(path)

        def open_input_file(self, path):
            return self._fs.open_input_file(path)

        def open_output_stream(self, path, metadata):
            import pyarrow as pa

            return pa.PythonFile(_RenameOnClose(path), mode="w")

        def open_append_stream(self, path, metadata):
            return self._fs.open_append_stream(path, metadata=metadata)

    return AtomicLocalHandler


def _atomic_local_handler():
    return _atomic_local_handler_base()()


def atomic_filesystem(fs):
    """``fs`` made safe against a writer killed mid-file: a local filesystem (NFS included) is
    wrapped so every file written through it appears only complete (temporary file, fsync,
    rename); other filesystems are returned as they are (an object-store upload appears only once
    complete).

    Ray Tune writes its experiment state and checkpoints through the storage filesystem it is
    given. With plain ``LocalFileSystem`` a driver killed during a snapshot can leave an empty
    ``experiment_state-*.json`` that ``Tuner.restore`` cannot read (measured here, Ray 2.60); and
    because Ray uploads its state files while it may be rewriting them, a state file that is not
    whole (:func:`_complete_state_file`) is not published at all: the last whole one stays.
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return pafs.PyFileSystem(_atomic_local_handler())
    return fs


# --- Object stores that go away for a while: wait and retry, then a clear error ---

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
    in one piece on close, with retries; the object appears only when the upload completes."""

    def __init__(self, fs, path: str, metadata, retry_s: float):
        self._fs, self.path, self._metadata, self._retry_s = fs, path, metadata, retry_s
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

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            _retry(f"write {self.path}", self._upload, retry_s=self._retry_s)
        finally:
            self._buf.close()


@functools.cache
def _retrying_handler_base():
    """The handler class, built once on first use (pyarrow is imported lazily by this module)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    class RetryingHandler(pafs.FileSystemHandler):
        """A pyarrow ``FileSystemHandler`` over a remote filesystem whose every call waits through
        an outage (:func:`_retry`). Reads download the whole object first and writes upload it on
        close, so a connection lost halfway repeats the whole transfer, never a part of it."""

        def __init__(self, fs, retry_s: float):
            self.fs, self.retry_s = fs, retry_s

        def __reduce__(self):
            return (_retrying_handler, (self.fs, self.retry_s))

        def __eq__(self, other):
            return isinstance(other, RetryingHandler) and self.fs.equals(other.fs) and self.retry_s == other.retry_s

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
            return pa.PythonFile(_UploadOnClose(self.fs, path, metadata, self.retry_s), mode="w")

        def open_append_stream(self, path, metadata):
            return self._call(f"append to {path}", self.fs.open_append_stream, path, metadata=metadata)

    return RetryingHandler


def _retrying_handler(fs, retry_s: float):
    return _retrying_handler_base()(fs, retry_s)


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
        options = fs.__reduce__()[1][0]  # the constructor's keyword arguments (pyarrow pickles S3FileSystem so)
        fs = pafs.S3FileSystem(**{**options, "background_writes": False})
    return pafs.PyFileSystem(_retrying_handler(fs, storage_retry_s() if retry_s is None else retry_s))
