"""What the search layer knows of Ray Tune's experiment state files, for the storage filesystem.

Ray Tune writes its experiment state and checkpoints through the storage filesystem a search gives
it. :func:`mgfa_ray.search` wraps that filesystem with :func:`mgfa_ray.storage.atomic_filesystem`
(temporary file, fsync, rename: a driver killed during a snapshot leaves no truncated file) and
passes :func:`complete_state_file` as its ``accept`` hook, because Ray writes these files in its
driver staging directory in place and uploads the directory from a background thread, so an
upload can read one half written (measured here: an empty ``experiment_state-*.json`` published
while the driver was rewriting it, which ``Tuner.restore`` cannot read; Ray 2.60). A copy that is
not whole is not published: the last whole one stays.

The file names and formats below are Ray Tune's (not a public API; checked by
``tests/test_io.py::test_atomic_filesystem_keeps_the_last_whole_ray_state_file``).
"""

from __future__ import annotations

import fnmatch
import json
import os

#: Ray Tune's experiment state (JSON).
EXPERIMENT_STATE = "experiment_state-*.json"
#: Ray Tune's searcher state, which Ray pickles despite the ``.json`` suffix.
SEARCH_GEN_STATE = "search_gen_state-*.json"


def complete_state_file(name: str, path: str) -> bool:
    """Whether ``path``, a copy of the file ``name`` written through the search's storage, is whole.

    ``experiment_state-*.json`` must parse as JSON; a pickle (``*.pkl``, and
    ``search_gen_state-*.json``) must end with its STOP opcode (``.``). Other files pass.

    Args:
        name: The file's final base name.
        path: The local temporary holding its content.
    """
    if fnmatch.fnmatch(name, EXPERIMENT_STATE):
        try:
            with open(path, "rb") as f:
                json.load(f)
        except ValueError:
            return False
        return True
    if name.endswith(".pkl") or fnmatch.fnmatch(name, SEARCH_GEN_STATE):
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"."
    return True
