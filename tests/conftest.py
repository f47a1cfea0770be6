"""Shared pytest fixtures."""

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
