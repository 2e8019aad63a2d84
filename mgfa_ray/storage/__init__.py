"""Storage: where files live and how they are published, for every stage.

* :mod:`~mgfa_ray.storage.locations` — a location is a local path, an NFS mount or an object-store
  URI (:func:`is_uri`, :func:`location_join`, :func:`resolve_location`); secrets in locations are
  taken into the environment (:func:`take_credentials`) and hidden (:func:`redact_location`,
  :func:`redact_text`, :func:`redact_tree`); :func:`safe_stem` makes a file name of an id.
* :mod:`~mgfa_ray.storage.atomic` — the one publish primitive: a complete, fsync'ed temporary,
  then a rename (:func:`atomic_write_bytes`, :func:`fs_write_atomic`) or a link that fails when
  the name exists (:func:`create_once`, :func:`create_local_once`); :func:`publish_dir` for directories;
  :func:`atomic_filesystem` puts the same protocol under a pyarrow filesystem, with an ``accept``
  hook for callers that know their files' formats.
* :mod:`~mgfa_ray.storage.retrying` — object stores that go away for a while
  (:func:`retrying_filesystem`, :class:`StorageUnavailableError`).
* :mod:`~mgfa_ray.storage.files` — reading on any filesystem (:func:`fs_read`, :func:`fs_exists`,
  :func:`fs_list`); :mod:`~mgfa_ray.storage.hashing` — content digests.

Nothing here knows the formats of the files it stores. pyarrow is imported on first use.
"""

from mgfa_ray.storage.atomic import (
    AcceptFile,
    atomic_filesystem,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_yaml,
    create_local_once,
    create_once,
    fs_write_atomic,
    publish_dir,
    temporary_name,
)
from mgfa_ray.storage.files import fs_exists, fs_list, fs_read
from mgfa_ray.storage.hashing import sha256_file, sha256_json
from mgfa_ray.storage.locations import (
    REDACTED,
    SECRET_PARAMS,
    is_uri,
    location_join,
    redact_location,
    redact_text,
    redact_tree,
    resolve_location,
    safe_stem,
    take_credentials,
)
from mgfa_ray.storage.retrying import (
    DEFAULT_STORAGE_RETRY_S,
    STORAGE_RETRY_ENV,
    StorageUnavailableError,
    is_transient_storage_error,
    retrying_filesystem,
    storage_retry_s,
)

__all__ = [
    "AcceptFile", "DEFAULT_STORAGE_RETRY_S", "REDACTED", "SECRET_PARAMS", "STORAGE_RETRY_ENV",
    "StorageUnavailableError", "atomic_filesystem", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
    "atomic_write_yaml", "create_local_once", "create_once", "fs_exists", "fs_list", "fs_read", "fs_write_atomic",
    "is_transient_storage_error", "is_uri", "location_join", "publish_dir", "redact_location", "redact_text",
    "redact_tree", "resolve_location", "retrying_filesystem", "safe_stem", "sha256_file", "sha256_json",
    "storage_retry_s", "take_credentials", "temporary_name",
]
