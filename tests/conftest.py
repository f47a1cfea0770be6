"""Shared pytest fixtures."""

import os
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


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The built HTML folder, once per test session (tests/test_site.py, tests/test_theorem_refs.py): built here with
    the same command as `make book` (zero warnings), or FMTOY_SITE=_build/html to check an existing build."""
    if os.environ.get("FMTOY_SITE"):
        html = Path(os.environ["FMTOY_SITE"]).resolve()
        assert (html / "index.html").is_file(), f"FMTOY_SITE={html} holds no built book"
        return html
    out = tmp_path_factory.mktemp("site")
    exe = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run(
        [str(exe), "build", str(ROOT), "--path-output", str(out), "--all", "-n", "-W", "--keep-going"],
        capture_output=True,
        text=True,
    )
    log = proc.stdout + proc.stderr
    (out / "build.log").write_text(log)
    warnings = [line for line in log.splitlines() if "WARNING" in line]  # ipykernel 6: no TCP warning either
    assert proc.returncode == 0 and not warnings, (
        f"the book build failed (exit {proc.returncode}); warnings/errors:\n"
        + "\n".join(warnings[:30])
        + "\n"
        + log[-3000:]
    )
    return out / "_build" / "html"
