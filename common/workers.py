"""One job per file, spread over worker processes behind one progress bar."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import cv2
from tqdm import tqdm


def die_with_parent() -> None:
    """A worker process's initializer: it ends when the command that started it ends, even by kill -9
    (Linux), instead of waiting forever for work that will not come."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def map_in_processes(function: Callable, jobs: list, workers: int, desc: str, unit: str = "img") -> list:
    """`function(job)` of each job, in order, over `workers` processes (one: in this process)."""
    cv2.setNumThreads(1)  # parallelism comes from the processes
    pool = ProcessPoolExecutor(workers, initializer=die_with_parent) if workers > 1 and len(jobs) > 1 else None
    results = []
    try:
        # closed before an error propagates, so that the error stays the last line
        with tqdm(total=len(jobs), desc=desc, unit=unit) as bar:
            for result in pool.map(function, jobs, chunksize=2) if pool else map(function, jobs):
                results.append(result)
                bar.update()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # on a bad file: stop at once, not after the queue
    return results
