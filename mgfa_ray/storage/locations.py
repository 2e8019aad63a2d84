"""Locations: a local path, an NFS mount or an object-store URI, and the secrets they may carry.

A location is a string. :func:`is_uri` tells a URI (``s3://bucket/prefix``, ``gs://…``,
``file:///…``, or a database URL such as ``sqlite:///…``) from a local path; it is the one test for
that in the project. :func:`resolve_location` turns a location into a pyarrow filesystem and path.
Credentials are never written, logged or printed: :func:`take_credentials` moves them from a
location into the environment, and :func:`redact_location` / :func:`redact_text` /
:func:`redact_tree` hide any that remain.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mgfa_ray.errors import ConfigError, InputError
from mgfa_ray.storage.retrying import retrying_filesystem


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI or URL (``s3://bucket/prefix``, ``gs://…``, ``file:///…``, an
    RDB URL ``sqlite:///…`` / ``postgresql://…``) rather than a local path."""
    return "://" in str(location)


def location_join(location: str | os.PathLike, *names: str) -> str:
    """``location`` with ``names`` appended as path segments; a URI keeps its query string
    (``s3://b/masks?endpoint_override=…`` + ``set1`` → ``s3://b/masks/set1?endpoint_override=…``)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*names))
    parts = urlsplit(str(location))
    path = "/".join([parts.path.rstrip("/"), *names])
    return urlunsplit(parts._replace(path=path))


def safe_stem(name: str) -> str:
    """A flat file-name stem for an id such as an image_id: runs of characters other than
    ``[A-Za-z0-9._-]`` become ``_`` (``"acer_rubrum/ny1079-01-1"`` → ``"acer_rubrum_ny1079-01-1"``);
    never empty. Not injective: callers that need unique names add a hash."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def resolve_location(location: str | os.PathLike):
    """The pyarrow filesystem and path of a location.

    A local path (relative ones against the working directory) gives ``pyarrow.fs.LocalFileSystem``
    and the absolute path; a URI goes through ``pyarrow.fs.FileSystem.from_uri``, so an object store
    takes its endpoint, region and credentials from the URI's query string
    (``?endpoint_override=…&region=…``) or from the usual environment (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, …; pyarrow docs, "Filesystem Interface"), keys in the environment moved
    first into a private profile (:func:`mgfa_ray.runtime.hide_aws_secrets`). Nothing is hard-coded. A remote
    filesystem comes wrapped by :func:`~mgfa_ray.storage.retrying_filesystem`: while the store is
    unreachable, calls wait and retry for up to ``$MGFA_STORAGE_RETRY_S`` seconds.

    Returns:
        ``(filesystem, path)``: ``path`` is what the filesystem's methods take.

    Raises:
        InputError: pyarrow does not understand the URI (the message names it, secrets hidden), or
            ``$MGFA_STORAGE_RETRY_S`` is not seconds >= 0.
    """
    import pyarrow.fs as pafs

    from mgfa_ray.runtime import hide_aws_secrets

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    # Keys leave the environment before the first object-store filesystem is made: the AWS SDK
    # fixes its profile when a filesystem is built, so one built from environment keys would lose
    # them (every call 403) once they are moved (mgfa_ray.runtime.hide_aws_secrets, before Ray).
    hide_aws_secrets()
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise InputError(f"cannot open storage location {redact_location(location)!r}: "
                         f"{redact_text(str(err))}") from None
    return retrying_filesystem(fs), path


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
    out = text  # edited in place: urlunsplit would drop the empty authority of sqlite:////abs/path.db
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if parts.scheme in ("s3", "gs", "gcs", "abfs", "abfss", "az"):
            user = REDACTED
        out = out.replace(parts.netloc, f"{user}:{REDACTED}@{host}" if has_password else f"{user}@{host}", 1)
    query = _SECRET_ASSIGN.sub(lambda m: f"{m.group(1)}={REDACTED}", parts.query)
    if query != parts.query:
        out = out.replace(f"?{parts.query}", f"?{query}", 1)
    return out


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URI in it passed through
    :func:`redact_location` and any remaining ``<secret param>=<value>`` hidden."""
    text = _URI.sub(lambda m: redact_location(m.group(0)), text)
    return _SECRET_ASSIGN.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


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
    found, kept, netloc = _split_credentials(parts)
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


def _split_credentials(parts) -> tuple[dict[str, str], list[str], str]:
    """The secrets of a split URI (``user:password@`` as access_key / secret_key, and every
    :data:`SECRET_PARAMS` query item), the query items kept, and the netloc without userinfo."""
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
    return found, kept, netloc


_TAKEN: dict[str, dict[str, str]] = {}  # the keys taken from locations by this process (in memory only)
