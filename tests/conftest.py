"""Shared pytest fixtures."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fmtoy.threads  # noqa: F401  (imported first: it records torch's own thread count before the fixture below)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The whole run on one intra-op thread: an explicit user setting, which fmtoy's thread policy keeps (restored
    after). Tests of the policy itself pass threads= or set FMTOY_THREADS."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def solutions(request) -> dict[str, object]:
    """The code-exercise solutions of the test module's chapter (its CHAPTER; at least its EXERCISES blocks, default
    1), exec'd into one namespace by tests/chapter_solutions.py: the one fixture every chapter test uses."""
    from chapter_solutions import solution_namespace

    return solution_namespace(request.module.CHAPTER, min_blocks=getattr(request.module, "EXERCISES", 1))


ROOT = Path(__file__).resolve().parents[1]


_BUILD: dict[str, object] = {}  # the site build started beside the other tests: its process, log file and output
_NOTEBOOKS: dict[str, object] = {}  # the notebook run started beside them: process, log, output, run cache


def _build_command(out: Path) -> list[str]:
    """The same command as `make book`, writing into `out`."""
    exe = Path(sys.executable).with_name("jupyter-book")
    return [str(exe), "build", str(ROOT), "--path-output", str(out), "--all", "-n", "-W", "--keep-going"]


@pytest.hookimpl(trylast=True)  # after -m/-k deselection
def pytest_collection_modifyitems(session, config, items):
    """The tests that need the built site run last, and the build starts now in a subprocess, beside the other tests
    (their CPU-bound work makes it a build on a busy machine): the suite takes about the longer of the two, not their
    sum. FMTOY_SITE=<html folder> checks an existing build instead."""
    needs = [item for item in items if "site" in getattr(item, "fixturenames", ())]
    runs = [item for item in items if "executed_notebooks" in getattr(item, "fixturenames", ())]
    if not needs and not runs:
        return
    items[:] = [item for item in items if item not in needs + runs] + needs + runs
    if config.option.collectonly:
        return
    if needs and not os.environ.get("FMTOY_SITE"):
        out = config._tmp_path_factory.mktemp("site")
        log = open(out / "build.log", "w")
        _BUILD.update(out=out, log=log)
        _BUILD["proc"] = subprocess.Popen(
            _build_command(out), stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    if runs:  # `fmtoy notebooks --execute` beside the build, sharing its trainings (run_cache)
        out = config._tmp_path_factory.mktemp("notebooks")
        cache = _cache_folder(config._tmp_path_factory)
        log = open(out / "run.log", "w")
        from helpers import nbclient_chapters

        cmd = [sys.executable, "-m", "fmtoy", "notebooks", "--root", str(ROOT), "--out", str(out), "--execute",
               "--url", "https://github.com/example/flow-matching-by-derivation",
               "--only", ",".join(nbclient_chapters())]  # fmt: skip
        env = {**os.environ, "FMTOY_RUN_CACHE": str(cache)}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        _NOTEBOOKS.update(out=out, log=log, proc=proc)


def pytest_sessionfinish(session, exitstatus):
    """A build or notebook run still going when the session ends (an early stop) is ended with its kernels."""
    for proc in (_BUILD.get("proc"), _NOTEBOOKS.get("proc")):
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cache_folder(tmp_path_factory) -> Path:
    if "out" in _BUILD:
        return _BUILD["out"] / "_build" / "fmtoy-runs"
    if os.environ.get("FMTOY_SITE"):
        return Path(os.environ["FMTOY_SITE"]).resolve().parent / "fmtoy-runs"
    if "cache" not in _NOTEBOOKS:
        _NOTEBOOKS["cache"] = tmp_path_factory.mktemp("fmtoy-runs")
    return _NOTEBOOKS["cache"]


@pytest.fixture(scope="session")
def run_cache(tmp_path_factory) -> Path:
    """The run cache (FMTOY_RUN_CACHE) of the site build started beside the tests, or of FMTOY_SITE's build, else one
    folder for the session: what runs whole chapters (tests/test_lab.py, the notebook run of tests/test_notebooks.py)
    runs beside the build and shares its trainings, whichever trains a recipe first (files are written atomically)."""
    return _cache_folder(tmp_path_factory)


@pytest.fixture(scope="session")
def executed_notebooks() -> tuple[Path, dict, str]:
    """(folder, report, log) of `fmtoy notebooks --execute`, started at collection beside the other tests and the
    site build: every chapter written as .ipynb and run top to bottom in a fresh kernel (tests/test_notebooks.py)."""
    assert "proc" in _NOTEBOOKS, "the notebook run starts at collection (pytest_collection_modifyitems)"
    code = _NOTEBOOKS["proc"].wait()
    _NOTEBOOKS["log"].close()
    out = _NOTEBOOKS["out"]
    log = (out / "run.log").read_text()
    assert (out / "executed.json").is_file(), f"the notebook run wrote no report (exit {code}):\n{log[-3000:]}"
    return out, json.loads((out / "executed.json").read_text()), log


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The built HTML folder, once per test session (tests/test_site.py, tests/test_theorem_refs.py): built with the
    same command as `make book` (zero warnings), started at collection beside the other tests, or FMTOY_SITE=
    _build/html to check an existing build."""
    if os.environ.get("FMTOY_SITE"):
        html = Path(os.environ["FMTOY_SITE"]).resolve()
        assert (html / "index.html").is_file(), f"FMTOY_SITE={html} holds no built book"
        return html
    if "proc" not in _BUILD:  # not started at collection (a test that asked for the fixture itself)
        out = tmp_path_factory.mktemp("site")
        with open(out / "build.log", "w") as log:
            code = subprocess.run(_build_command(out), stdout=log, stderr=subprocess.STDOUT, text=True).returncode
    else:
        out, code = _BUILD["out"], _BUILD["proc"].wait()
        _BUILD["log"].close()
    log = (out / "build.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line]  # ipykernel 6: no TCP warning either
    assert code == 0 and not warnings, (
        f"the book build failed (exit {code}); warnings/errors:\n" + "\n".join(warnings[:30]) + "\n" + log[-3000:]
    )
    return out / "_build" / "html"
