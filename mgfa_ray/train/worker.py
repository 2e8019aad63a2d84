"""What a trial worker process keeps between trials, and what it must not.

With ``search.reuse_workers`` (Ray Tune's ``reuse_actors``) one worker process runs trial after
trial. It keeps what is the same for every trial of a search and costs seconds to rebuild: the
imported libraries, the CUDA context, the decoded images and masks (:func:`mgfa_ray.train.data.load_trial_data`)
and the backbone weights file (:func:`mgfa_ray.train.model.build_backbone`), each held by a
:class:`mgfa_ray.cache.LastValue` (:mod:`mgfa_ray.cache` lists them): one entry, replaced when its key
changes, so a worker's memory stays bounded.
Everything a trial changes — model, optimizer, scheduler, generator, global RNG — is created (or
seeded) anew by :func:`mgfa_ray.train.trial.run_trial`, and :func:`release_trial_memory` hands back the
C heap and CUDA memory the trial freed before the next one starts; :func:`worker_stats` reports
the worker's memory at every trial's start, so a search can check that nothing accumulates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from collections.abc import Callable

_trials_started = 0

UNWIND_TIMEOUT_ENV = "TUNE_FUNCTION_THREAD_TIMEOUT_S"
UNWIND_TIMEOUT_S = 120


def allow_slow_unwind(seconds: int = UNWIND_TIMEOUT_S) -> None:
    """Let Ray Tune wait up to ``seconds`` for a finished trial's thread to end before it reuses the worker.

    A reused worker (Ray Tune's ``reuse_actors``) starts the next trial only after the last one's
    training thread has unwound (its ``finally`` blocks: :func:`release_trial_memory`, temporary
    checkpoint directories); Ray waits ``$TUNE_FUNCTION_THREAD_TIMEOUT_S`` seconds for it (default 2,
    Ray Tune's documented environment variable, read at every reuse in the worker process) and
    otherwise fails the *next* trial with "Trainable runner reuse requires reset_config() to be
    implemented and return True" — not retried. On an oversubscribed machine (4 trials on 2 CPU cores)
    2 of the 32 trials of a search failed so. The wait ends as soon as the thread does, so a long limit
    costs nothing when unwinding is quick. A value already in the environment is kept.

    Raises:
        ValueError: ``seconds`` < 1.
    """
    if seconds < 1:
        raise ValueError(f"seconds must be >= 1, got {seconds}")
    os.environ.setdefault(UNWIND_TIMEOUT_ENV, str(int(seconds)))


def start_trial() -> dict[str, float]:
    """Count one more trial in this process and return :func:`worker_stats` as it starts.

    Returns:
        ``worker_pid``, ``worker_trial`` (1 for a process's first trial, 2 for the next in a reused
        worker, ...), ``worker_rss_mb`` (resident memory, MiB), ``worker_cuda_allocated_mb`` and
        ``worker_cuda_reserved_mb`` (torch's CUDA allocator; 0 without CUDA). Read at a trial's start,
        the CUDA figures of a reused worker stay at one level from trial to trial (torch keeps e.g.
        cuBLAS workspaces; nothing of an earlier trial's model, optimizer or data).
    """
    global _trials_started
    _trials_started += 1
    return worker_stats()


def worker_stats() -> dict[str, float]:
    """This process's pid, trial count, resident memory and CUDA memory (MiB); see :func:`start_trial`."""
    import psutil
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "worker_pid": os.getpid(),
        "worker_trial": _trials_started,
        "worker_rss_mb": psutil.Process().memory_info().rss / 2**20,
        "worker_cuda_allocated_mb": torch.cuda.memory_allocated() / 2**20 if cuda else 0.0,
        "worker_cuda_reserved_mb": torch.cuda.memory_reserved() / 2**20 if cuda else 0.0,
    }


def release_trial_memory() -> None:
    """Between trials: hand back what the trial before freed.

    * CPU: freed C heap memory goes back to the operating system (glibc's ``malloc_trim``). Ray runs
      every trial in a new thread, and glibc keeps what a thread's malloc arena freed for later use:
      without the trim a reused worker's resident memory grew by ~50 MiB per trial (842 MiB to
      ~1.9 GiB over 25 trials, ``benchmarks/trial_overhead.py``). Other C libraries: nothing.
    * CUDA: the blocks torch's caching allocator holds are returned, so trials packed on one GPU
      (fractional ``gpus_per_trial``) and the next trial of a reused worker get them. Tensors are
      freed when their last reference goes; a garbage collection (~0.2 s with torch and Ray
      loaded) runs only when CUDA memory is still allocated, e.g. held by a reference cycle.
    """
    import torch

    _trim_c_heap()
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    if torch.cuda.memory_allocated():
        gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _trim_c_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once per process (``find_library`` may run ``ldconfig``);
    None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
