"""CPU thread policy: how many torch threads fmtoy's loops (training, ODE solvers, likelihoods) use on the CPU.

Tiny networks on few cores: torch's OpenMP workers spin and wait for each other, so when another program holds a
core a step with 2 threads can stall 5-10x, while 1 thread is immune but slower on an idle machine. No fixed count
wins both, so the default policy "auto" measures: a loop times a few steps with 1 thread and with torch's default
count, keeps the faster, and measures again after RECHECK seconds (the verdict is shared by the loops that follow).
While the same count keeps winning the interval doubles up to RECHECK_MAX, and a probe whose step (its warm-up step:
WARM_ABORT times) is ABORT times slower than the count already timed stops at once: under load, a probe of the stalling
count is itself the cost. That cost is bounded too: the next measurement waits at least until the time the losing
probe lost is at most PROBE_SHARE of the time since (a loop of long steps, such as an exact likelihood, stalls for
seconds per probe step on a busy core; seen, chapter 1 took 11 minutes instead of 1 re-measuring every 64 s).

An explicit choice always wins, in this order: the `threads` argument or config field ("auto" or N), the environment
variable FMTOY_THREADS ("auto" or N), then a setting the user made to torch itself (OMP_NUM_THREADS or
MKL_NUM_THREADS in the environment, or torch.set_num_threads() after importing fmtoy), which fmtoy leaves as it is.
The user's thread count is restored when each fmtoy loop ends. On a GPU the policy does nothing.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Iterator

import torch

ENV = "FMTOY_THREADS"
PROBE = 4  # timed steps per candidate (after one warm-up step) ...
PROBE_SECONDS = 0.02  # ... or fewer (at least 2) that last this long in all: the scheduler's jitter is ~1 ms, so long
# steps need fewer (an exact likelihood's ODE step: 3 steps per count instead of 5, on a 32-step solve)
RECHECK = 2.0  # seconds until the first re-measurement, and after the winner changes
RECHECK_MAX = 64.0  # the interval doubles up to this while the same count keeps winning
ABORT = 3.0  # a probe step this many times the median of a count already timed ends that probe (it lost)
WARM_ABORT = 10.0  # the same for a probe's warm-up step (the first after a change of count, a little slower idle)
PROBE_SHARE = 0.05  # the time a probe lost to the winner is at most this share of the time until the next probe
_IMPORT_THREADS = torch.get_num_threads()  # torch's own choice, unless the user changed it before importing fmtoy
_VERDICT: dict[str, float] = {"threads": 0, "until": 0.0, "interval": RECHECK}  # last winner, until when, and the
# interval it was given
_ACTIVE = [0]  # loops (thread_policy) and one-shot calls (follow_policy) running now: inner ones change nothing


def _parse(value: object, where: str) -> str | int:
    """'auto' or a positive integer (a string of one, from the environment), else ValueError naming `where`."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"{where} must be 'auto' or a positive integer number of CPU threads, got {value!r}")


def check_threads(threads: str | int | None) -> str | int | None:
    """Return `threads` if it is None, 'auto' or an integer >= 1 (the `threads` option of fmtoy's configs)."""
    return None if threads is None else _parse(threads, "threads")


def user_setting() -> str | None:
    """Why torch's thread count counts as the user's explicit choice (an environment variable or a changed count)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    if torch.get_num_threads() != _IMPORT_THREADS:
        return f"torch.set_num_threads({torch.get_num_threads()})"
    return None


def resolve_threads(threads: str | int | None = None) -> tuple[str, tuple[int, ...]]:
    """The plan for one loop: ("fixed", (N,)), ("auto", (1, N)) to measure, or ("keep", (current,)) (README,
    Threads)."""
    choice = check_threads(threads)
    if choice is None and os.environ.get(ENV):
        choice = _parse(os.environ[ENV], f"the environment variable {ENV}")
    if choice is None and user_setting() is not None:
        return "keep", (torch.get_num_threads(),)
    if isinstance(choice, int):
        return "fixed", (choice,)
    most = max(_IMPORT_THREADS, torch.get_num_threads())
    return ("auto", (1, most)) if most > 1 else ("keep", (torch.get_num_threads(),))


class ThreadTuner:
    """Per-step thread count of one loop: call tick() at the start of every step; counts records steps per count."""

    def __init__(self, mode: str, candidates: tuple[int, ...], probe: int = PROBE, recheck: float = RECHECK) -> None:
        self.mode, self.candidates, self.probe, self.recheck = mode, candidates, probe, recheck
        self.counts: dict[int, int] = {}
        self.samples: dict[int, list[float]] = {}  # timed steps of the probe under way, per count
        self.spent: dict[int, list[float]] = {}  # [time, steps] of all its steps per count, warm-up included
        self.queue: list[int] = []
        self.last: float | None = None
        self.warm = True
        self.current = torch.get_num_threads()
        if mode == "fixed":
            self._set(candidates[0])

    def _set(self, n: int) -> None:
        if n != self.current:
            torch.set_num_threads(n)
            self.current, self.warm = n, True

    def _judge(self, now: float) -> None:
        """Keep the count with the shortest median step until the next probe, which waits longer while the same count
        wins and until the time this probe lost (the losers' steps minus the winner's) is PROBE_SHARE of the wait."""
        med = {n: statistics.median(v) for n, v in self.samples.items()}
        best = min(med, key=med.get)
        same = best == _VERDICT["threads"]
        interval = min(2 * _VERDICT.get("interval", self.recheck), RECHECK_MAX) if same else self.recheck
        lost = sum(t - k * med[best] for n, (t, k) in self.spent.items() if n != best)
        wait = max(interval, lost / PROBE_SHARE)
        _VERDICT.update(threads=best, until=now + wait, interval=interval)

    def tick(self) -> None:
        """Account the step that just ended to the current count and choose the count for the next one."""
        if self.mode != "auto":
            self.counts[self.current] = self.counts.get(self.current, 0) + 1
            return
        now = time.perf_counter()
        if self.queue and self.last is not None:
            step, warm = now - self.last, self.warm
            spent = self.spent.setdefault(self.current, [0.0, 0])
            spent[0], spent[1] = spent[0] + step, spent[1] + 1
            if warm:
                self.warm = False
            else:
                self.samples.setdefault(self.current, []).append(step)
            timed = [statistics.median(v) for n, v in self.samples.items() if n != self.current]
            mine = self.samples.get(self.current, ())
            stalled = timed and step > (WARM_ABORT if warm else ABORT) * min(timed)
            enough = len(mine) >= self.probe or (len(mine) >= 2 and sum(mine) >= PROBE_SECONDS)
            if enough or stalled:
                self.queue.pop(0)
                if not self.queue:  # every candidate timed: keep the fastest (median step time) for a while
                    self._judge(now)
        if not self.queue and now >= _VERDICT["until"]:
            self.queue, self.samples, self.spent = list(self.candidates), {}, {}
        self._set(self.queue[0] if self.queue else int(_VERDICT["threads"]))
        self.counts[self.current] = self.counts.get(self.current, 0) + 1
        self.last = time.perf_counter()


def _nested(threads: str | int | None) -> bool:
    """Inside another fmtoy loop or one-shot call, with no explicit choice here: keep the outer count."""
    return bool(_ACTIVE[0]) and threads is None


@contextmanager
def _restoring(saved: int) -> Iterator[None]:
    """Count this loop or call as active, and put torch's thread count back to `saved` when it ends."""
    _ACTIVE[0] += 1
    try:
        yield
    finally:
        _ACTIVE[0] -= 1
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


@contextmanager
def thread_policy(threads: str | int | None = None, device: torch.device | str = "cpu") -> Iterator[ThreadTuner]:
    """Apply the policy to the loop inside (tick() once per step); torch's thread count is restored afterwards."""
    saved = torch.get_num_threads()
    mode, candidates = resolve_threads(threads)
    if torch.device(device).type != "cpu" or _nested(threads):  # inside another fmtoy loop: its count
        mode, candidates = "keep", (saved,)
    tuner = ThreadTuner(mode, candidates)
    with _restoring(saved):
        yield tuner


@contextmanager
def follow_policy(threads: str | int | None = None) -> Iterator[int]:
    """The policy for a one-shot computation (no steps to time): a fixed choice as in thread_policy, under "auto" the
    count the latest loop measured, or 1 thread before any loop has (it cannot stall on a busy core: seen, chapter 1's
    grid checks took minutes on torch's 2 threads beside one busy process); nothing inside another fmtoy loop."""
    saved = n = torch.get_num_threads()
    if not _nested(threads):  # resolved only here: inside a loop (every ODE step's field call) this costs nothing
        mode, candidates = resolve_threads(threads)
        if mode == "fixed":
            n = candidates[0]
        elif mode == "auto":
            n = int(_VERDICT["threads"]) or candidates[0]
    if n != saved:
        torch.set_num_threads(n)
    with _restoring(saved):
        yield n


def under_policy(fn):
    """Decorator: run fn under follow_policy() (its `threads` keyword, if it has one, is the choice)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with follow_policy(kwargs.get("threads")):
            return fn(*args, **kwargs)

    return wrapper


def describe(threads: str | int | None = None) -> str:
    """One line saying what the policy does here, e.g. 'auto: measures 1 vs 2 threads and keeps the faster, ...'."""
    mode, candidates = resolve_threads(threads)
    if mode == "auto":
        return (
            f"auto: measures {candidates[0]} vs {candidates[1]} threads and keeps the faster, again after "
            f"{RECHECK:g} s (up to {RECHECK_MAX:g} s while the same count wins)"
        )
    if mode == "fixed":
        return f"fixed: {candidates[0]} thread(s) ({'threads argument' if threads is not None else ENV})"
    return f"keep: {candidates[0]} thread(s), the user's setting ({user_setting() or 'a single core'})"


__all__ = [
    "ENV",
    "check_threads",
    "user_setting",
    "resolve_threads",
    "ThreadTuner",
    "thread_policy",
    "follow_policy",
    "under_policy",
    "describe",
]
