"""fmtoy.workers: training runs side by side in spawned worker processes, with the serial results."""

import os
from functools import partial

import pytest
import torch

from fmtoy import threads as TH
from fmtoy import workers
from fmtoy.train import TrainConfig, train_flow

STEPS = 20
CONFIGS = [TrainConfig(steps=STEPS, batch_size=64, hidden=32, depth=2, seed=s, device="cpu") for s in (0, 1, 2)]


@pytest.fixture(autouse=True, scope="module")
def stop_workers():
    """No run cache (a cached run would make every comparison below trivial), fresh workers, stopped at the end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FMTOY_RUN_CACHE", raising=False)
        workers.shutdown(now=True)
        yield
    workers.shutdown()


def test_a_change_of_the_fmtoy_environment_starts_fresh_workers(monkeypatch, tmp_path):
    workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    first = workers._POOL["executor"]
    workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    assert workers._POOL["executor"] is first  # kept while nothing changed
    monkeypatch.setenv("FMTOY_RUN_CACHE", str(tmp_path))  # a worker would keep the environment it started with
    [a, _] = workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    assert workers._POOL["executor"] is not first and not a.cached
    [b, _] = workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    assert b.cached and list(tmp_path.glob("*.pt"))  # the new workers use the cache


def same_run(a, b) -> bool:
    return a.losses == b.losses and all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_jobs_in_workers_give_the_serial_results_in_order():
    parallel = workers.train_many(train_flow, CONFIGS, workers=2, progress=False)
    serial = [train_flow(c, progress=False) for c in CONFIGS]
    assert all(same_run(a, b) for a, b in zip(parallel, serial))
    assert not same_run(parallel[0], parallel[1])  # the order is the jobs' order (seeds differ)
    assert [r.config.seed for r in parallel] == [0, 1, 2]


def test_a_warning_raised_in_a_worker_is_raised_here():
    import warnings

    with pytest.warns(UserWarning, match="from a worker") as record:
        assert workers.run_jobs([partial(warnings.warn, f"from a worker, job {i}") for i in range(3)], 2) == [None] * 3
    assert sorted(str(w.message) for w in record) == [f"from a worker, job {i}" for i in range(3)]


def test_workers_use_one_thread_unless_the_user_chose(monkeypatch):
    assert TH.user_setting() is not None  # the session fixture pinned torch to 1 thread: passed on as it is
    [run, _] = workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    assert run.threads == {1: STEPS}
    monkeypatch.setenv(TH.ENV, "2")  # an explicit FMTOY_THREADS reaches the workers
    assert workers.worker_threads() == "2"
    [run, _] = workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    assert run.threads == {2: STEPS}
    monkeypatch.delenv(TH.ENV)
    monkeypatch.setattr(TH, "user_setting", lambda: None)  # no choice anywhere: one thread per worker
    assert workers.worker_threads() == "1"


def test_an_error_in_a_job_is_raised_here_and_later_calls_still_work():
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        workers.run_jobs([partial(train_flow, CONFIGS[0], progress=False), partial(train_flow, "not a config")], 2)
    [a, b] = workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    assert same_run(a, train_flow(CONFIGS[0], progress=False))


def local_function():
    return 1


@pytest.mark.parametrize(
    "job, says",
    [
        (lambda: 1, "<lambda>"),
        (None, "must be a function with its arguments"),
        (partial(train_flow, CONFIGS[0], callback=lambda step: None), "cannot be sent to a worker process"),
    ],
    ids=["lambda", "not callable", "unpicklable argument"],
)
def test_jobs_a_worker_cannot_run_are_refused_in_one_line(job, says):
    with pytest.raises(ValueError, match="job 0") as err:
        workers.run_jobs([job, partial(train_flow, CONFIGS[0])], 2)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_function_defined_in_a_notebook_is_refused(monkeypatch):
    monkeypatch.setattr(local_function, "__module__", "__main__")  # what a notebook cell defines
    with pytest.raises(ValueError, match="a worker process cannot import it"):
        workers.run_jobs([local_function, local_function], 2)


def test_one_job_one_worker_or_a_gpu_run_here(monkeypatch):
    monkeypatch.setattr(workers, "_executor", lambda n: pytest.fail("no worker process expected"))
    assert workers.run_jobs([partial(local_function)]) == [1]
    assert workers.run_jobs([local_function] * 3, workers=1) == [1, 1, 1]
    monkeypatch.setattr(workers, "cpu_cores", lambda: 1)
    assert workers.run_jobs([local_function] * 3) == [1, 1, 1]
    monkeypatch.setattr(workers, "cpu_cores", lambda: 8)
    monkeypatch.setattr(workers.torch.cuda, "is_available", lambda: True)
    assert workers.run_jobs([local_function] * 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        workers.run_jobs([local_function] * 3, workers=0)


def running(pid: int) -> bool:
    """Whether process `pid` still runs (exists and is not a zombie); not Process.is_alive(), which reads "alive" when
    the pool's own thread reaped the process first."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_shutdown_ends_the_worker_processes():
    workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)
    procs = list(workers._POOL["executor"]._processes.values())
    assert len(procs) == 2 and all(running(p.pid) for p in procs)
    workers.shutdown()  # waits for the idle workers to exit
    assert not any(running(p.pid) for p in procs) and workers._POOL["executor"] is None
    workers.train_many(train_flow, CONFIGS[:2], workers=2, progress=False)  # a fresh pool ...
    procs = list(workers._POOL["executor"]._processes.values())
    workers.shutdown(now=True)  # ... ended at once, as after Ctrl-C
    assert not any(running(p.pid) for p in procs)
