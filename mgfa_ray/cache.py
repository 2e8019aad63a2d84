"""The process's caches, all of them: a trial worker that Ray Tune reuses (``search.reuse_workers``)
keeps what every trial of a search shares and costs seconds to rebuild, and nothing else.

* :data:`WEIGHT_FILES` — the last weights file read (:func:`mgfa_ray.weights.read_weights`), keyed by
  path, size and modification time.
* :data:`TRIAL_DATA` — the last decoded data set of a trial (images, masks, labels;
  :func:`mgfa_ray.train.data.load_trial_data`), keyed by what it was decoded from.

Each is a :class:`LastValue`: one entry, replaced when its key changes, so a worker's memory stays
bounded. No other module keeps state across calls, except Ultralytics' reference-counted settings
patch (:func:`mgfa_ray.compat.ultralytics_private_settings`) and the study a searcher is bound to
(:func:`mgfa_ray.search.study.bound_study`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")


class LastValue:
    """The last value computed for a key, per process: ``get(key, compute)`` returns it while the key
    is unchanged and otherwise drops it, then computes and keeps the new one.

    The value is shared by every caller with the same key: callers must not modify it. ``key=None``
    means "cannot be pinned": the value is computed and not kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Hashable | None = None
        self._value: Any = None
        self.hits = 0

    def get(self, key: Hashable | None, compute: Callable[[], T]) -> T:
        """The kept value of ``key``, or ``compute()`` (kept when ``key`` is not None)."""
        with self._lock:
            if key is not None and key == self._key:
                self.hits += 1
                return self._value
            self._key, self._value = None, None  # free the old value before building the new one
            value = compute()
            if key is not None:
                self._key, self._value = key, value
            return value

    def clear(self) -> None:
        """Drop the kept value."""
        with self._lock:
            self._key, self._value = None, None


WEIGHT_FILES = LastValue()
"""The last weights file read in this process (a state_dict): a reused trial worker reads it once."""

TRIAL_DATA = LastValue()
"""The last decoded data set of this process: a reused trial worker decodes it once."""
