"""Several training runs at once: one worker process per CPU core, each on one thread (README, Threads).

A network this small cannot use two cores in one run (a step at batch 128 takes as long on 2 threads as on 1), but
two runs side by side can: the seeds and variants a chapter compares train about twice as fast on 2 cores. Each
worker is a fresh (spawned) Python process that imports fmtoy once and stays up for the jobs that follow; a worker
runs every fmtoy loop on 1 thread (FMTOY_THREADS=1), or on the count the user chose (FMTOY_THREADS, OMP_NUM_THREADS or
torch.set_num_threads() in this process). One thread cannot stall on a busy core, so no worker measures.

A job is a function with its arguments, e.g. functools.partial(train_flow, config, progress=False); it must be
importable by a worker (from fmtoy or another module; not a function defined in a notebook) and return something
picklable. The results are those of running the jobs one after another (each run is seeded), in the jobs' order.
With one job, one core, workers=1 or a GPU, the jobs run here, one after another.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Callable, Iterable, Sequence

import torch

from . import threads as _threads
from ._checks import check_positive_int

_POOL: dict[str, object] = {"executor": None, "key": None}


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_threads() -> str:
    """FMTOY_THREADS for the workers: the user's choice in this process if there is one (FMTOY_THREADS, an
    OMP/MKL variable, torch.set_num_threads()), else 1."""
    if os.environ.get(_threads.ENV):
        return os.environ[_threads.ENV]
    return str(torch.get_num_threads()) if _threads.user_setting() else "1"  # user_setting: OMP/MKL vars too


def _start_worker(threads: str) -> None:
    """A worker's setup: its thread setting, and Ctrl-C left to the parent (which ends the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a notebook's interrupt reaches the whole process group
    os.environ[_threads.ENV] = threads


def _where(job: Callable) -> Callable:
    return job.func if isinstance(job, partial) else job


def check_job(index: int, job: object) -> None:
    """ValueError unless job is a callable a spawned worker can import and receive (pickle)."""
    if not callable(job):
        raise ValueError(f"job {index} must be a function with its arguments (functools.partial), got {job!r}")
    fn = _where(job)
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", repr(fn))
    if module in (None, "__main__") or "<" in name:
        raise ValueError(
            f"job {index} calls {name}, defined in {module or 'no module'}: a worker process cannot import it; "
            "use a function from fmtoy or from a module (or workers=1 to run the jobs here)"
        )
    try:
        pickle.dumps(job)
    except Exception as err:
        raise ValueError(f"job {index} ({name}) cannot be sent to a worker process: {err}") from None


def _executor(workers: int) -> ProcessPoolExecutor:
    """The pool of `workers` spawned processes, kept for later calls with the same count, thread setting and FMTOY_*
    environment (a worker keeps the environment it started with: the run cache, the thread choice)."""
    threads = worker_threads()
    key = (workers, threads, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("FMTOY_"))))
    if _POOL["key"] != key:
        shutdown(now=True)
        ctx = multiprocessing.get_context("spawn")
        _POOL["executor"] = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(threads,))
        _POOL["key"] = key
    return _POOL["executor"]  # type: ignore[return-value]


def shutdown(now: bool = False) -> None:
    """Stop the worker processes: once their jobs end, or at once (now=True: running jobs are killed, as after an
    error or Ctrl-C); the next run_jobs starts new ones."""
    ex, _POOL["executor"], _POOL["key"] = _POOL["executor"], None, None
    if not isinstance(ex, ProcessPoolExecutor):
        return
    procs = list((getattr(ex, "_processes", None) or {}).values()) if now else []
    ex.shutdown(wait=not now, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()  # its job's result would be dropped anyway
        p.join(timeout=5)


def run_jobs(jobs: Iterable[Callable[[], object]], workers: int | None = None) -> list:
    """[job() for job in jobs], spread over `workers` processes (default: one per core, at most one per job)."""
    jobs = list(jobs)
    for i, job in enumerate(jobs):
        check_job(i, job)
    n = min(len(jobs), cpu_cores()) if workers is None else check_positive_int("workers", workers)
    if workers is None and torch.cuda.is_available():
        n = 1  # one process owns the GPU; its runs are not the small CPU runs this module is for
    if n <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    ex = _executor(n)
    try:
        return _collect(ex.map(_call, jobs))
    except BrokenProcessPool as err:
        shutdown(now=True)
        raise RuntimeError(
            f"a worker process died while running the jobs ({err}); no results were kept. A script that starts "
            'workers must do so under `if __name__ == "__main__":` (each worker imports the script)'
        ) from None
    except BaseException:  # an error in a job (raised here as it was there), Ctrl-C: end the rest
        shutdown(now=True)
        raise


def _call(job: Callable[[], object]) -> tuple[object, list[Warning]]:
    """job() in a worker, with the warnings it raised (re-raised in the parent, under the parent's filters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = job()
    return result, [w.message for w in caught]


def _collect(done: Iterable[tuple[object, list[Warning]]]) -> list:
    results = []
    for result, raised in done:
        for message in raised:
            warnings.warn(message, stacklevel=3)
        results.append(result)
    return results


def train_many(train: Callable[..., object], configs: Sequence[object], workers: int | None = None, **kwargs) -> list:
    """[train(config, **kwargs) for config in configs] in worker processes (run_jobs): e.g. the seeds of a recipe."""
    return run_jobs([partial(train, c, **kwargs) for c in configs], workers)


__all__ = ["cpu_cores", "worker_threads", "check_job", "run_jobs", "train_many", "shutdown"]
