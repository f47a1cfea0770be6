"""The chapters as plain .ipynb files to download and run elsewhere (`make notebooks`, the site's download menu).

Each notebook opens with one setup cell: where fmtoy is importable (this repository's venv, `make lab`) it does
nothing; elsewhere (Colab, a JupyterHub) it installs fmtoy with the chapters' extra packages from the book's
repository (`repository.url` and `repository.branch` in _config.yml), or, when no repository is set, stops with a
one-line message saying how to install it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import yaml

from .._files import write_atomically
from .assignments import read_chapter

SETUP_TAG = "fmtoy-setup"  # the setup cell's tag: found and replaced by it, never duplicated
SETUP_WITH_URL = """# Setup: install fmtoy where it is missing (Colab, a JupyterHub); in the book's repository: nothing.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("fmtoy") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", {requirement!r}])"""
SETUP_WITHOUT_URL = """# Setup: fmtoy must be importable; in the book's repository (make lab) it is: nothing to do.
import importlib.util

if importlib.util.find_spec("fmtoy") is None:
    raise ModuleNotFoundError(
        "fmtoy is not installed and this copy of the book names no repository to install it from (repository.url in "
        "_config.yml): clone the book and run `make lab`, or `pip install -e <clone>[notebooks]`"
    )"""


POLL_SLICE = 1.0  # seconds: the longest a kernel message waits unseen (see poll_in_slices)


def poll_in_slices(slice_s: float = POLL_SLICE, clock=time.monotonic) -> None:
    """Make this process's kernel clients (nbclient, myst-nb) wait for a message in polls of at most `slice_s` seconds.

    nbclient waits for a cell's reply with one asyncio poll of the zmq socket lasting the whole cell timeout. The
    zmq file descriptor is edge-triggered, and now and then (about one widget cell in 60 beside a busy process,
    measured) the wake-up is missed: the reply sits in the socket until the poll times out, whose last non-blocking
    check then finds it, so the cell "succeeds" after exactly the 600 s timeout (jupyter/nbclient#312; pyzmq#1558).
    Polling in slices bounds such a miss to `slice_s`; timeouts and messages are otherwise unchanged."""
    from queue import Empty

    from jupyter_client.channels import AsyncZMQSocketChannel

    if getattr(AsyncZMQSocketChannel.get_msg, "fmbook_slice", None) == (slice_s, clock):
        return
    whole = getattr(AsyncZMQSocketChannel.get_msg, "fmbook_whole", AsyncZMQSocketChannel.get_msg)

    async def get_msg(self, timeout: float | None = None):
        deadline = None if timeout is None else clock() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - clock())
            try:
                return await whole(self, slice_s if left is None else min(slice_s, left))
            except Empty:
                if left is not None and left <= slice_s:
                    raise

    get_msg.fmbook_slice, get_msg.fmbook_whole = (slice_s, clock), whole
    get_msg.__doc__ = whole.__doc__
    AsyncZMQSocketChannel.get_msg = get_msg


def write_notebook(nb, path: str | Path) -> None:
    """nb as .ipynb JSON at `path`, written atomically (a reader never sees half a notebook)."""
    import nbformat

    text = nbformat.writes(nb) + "\n"
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def execute(nb, folder: str | Path, env: dict | None = None, timeout: float = 600):
    """Run notebook `nb` top to bottom with nbclient in a fresh python3 kernel started in `folder` (with environment
    `env`, default this process's), polling in slices (poll_in_slices); nb gets its outputs and is returned."""
    from nbclient import NotebookClient

    poll_in_slices()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    client.execute(**({"env": env} if env is not None else {}))
    return nb


def execute_notebooks(paths, env: dict | None = None, timeout: float = 600) -> dict[str, dict]:
    """Each notebook run top to bottom in a fresh kernel, in a folder of its own beside it (<stem>/, with nothing of
    the book), and saved there with its outputs. {stem: {"seconds", "error" (None, or "Name: message" of the first
    error), "unexecuted" (code cells without an execution count)}}, in the order given."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    report = {}
    for path in map(Path, paths):
        work = path.parent / path.stem
        work.mkdir(exist_ok=True)
        nb, error, start = nbformat.read(path, as_version=4), None, time.perf_counter()
        try:
            execute(nb, work, env, timeout)
        except CellExecutionError as e:
            error = f"{e.ename}: {' '.join(str(e.evalue).split())[:300]}"
        seconds = time.perf_counter() - start
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        if errors and error is None:
            error = f"{errors[0].ename}: {errors[0].evalue}"
        unexecuted = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip() and not c.execution_count)
        write_notebook(nb, work / path.name)
        report[path.stem] = {"seconds": round(seconds, 2), "error": error, "unexecuted": unexecuted}
    return report


def book_config(root: str | Path) -> dict:
    """The book's _config.yml as a dict (ValueError naming the file if it is missing or not YAML)."""
    path = Path(root) / "_config.yml"
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the book's configuration {str(path)!r}: {e}") from e


def setup_source(url: str | None = None, branch: str = "main") -> str:
    """The setup cell's code: pip install fmtoy[notebooks] from git+url@branch when fmtoy is not importable."""
    url = (url or "").strip()
    if not url:
        return SETUP_WITHOUT_URL
    if not url.startswith(("https://", "http://", "ssh://", "git@", "file://")):
        raise ValueError(f"repository.url must be a git URL such as https://github.com/you/book, got {url!r}")
    return SETUP_WITH_URL.format(requirement=f"fmtoy[notebooks] @ git+{url.removesuffix('/')}@{branch or 'main'}")


def with_setup_cell(nb, url: str | None = None, branch: str = "main"):
    """A copy of notebook `nb` that opens with the setup cell, without jupytext's text-file metadata (a plain .ipynb);
    a setup cell already there is replaced."""
    import nbformat

    out = copy.deepcopy(nb)
    out.cells = [c for c in out.cells if SETUP_TAG not in c.get("metadata", {}).get("tags", [])]
    out.cells.insert(0, nbformat.v4.new_code_cell(setup_source(url, branch), metadata={"tags": [SETUP_TAG]}))
    out.metadata.pop("jupytext", None)
    out.nbformat, out.nbformat_minor = 4, max(5, out.get("nbformat_minor", 5))
    for i, cell in enumerate(out.cells):  # nbformat 4.5 wants cell ids; these are reproducible ones
        cell.setdefault("id", f"cell-{i}")
    out.cells[0]["id"] = SETUP_TAG
    return out


def chapter_notebooks(root: str | Path) -> list[Path]:
    """The toc's documents that are notebooks (MyST .md with a kernelspec), in toc order."""
    root = Path(root)
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]] + [c["file"] for c in toc.get("chapters", [])]
    paths = [root / f"{f}.md" for f in files]
    return [p for p in paths if p.is_file() and "kernelspec:" in p.read_text(encoding="utf-8").split("\n---", 1)[0]]


def widget_chapters(root: str | Path) -> list[Path]:
    """The chapter notebooks whose code builds an interactive_figure (a live widget), in toc order."""
    return [p for p in chapter_notebooks(root) if "interactive_figure(" in p.read_text(encoding="utf-8")]


def write_notebooks(
    root: str | Path, out: str | Path, url: str | None = None, branch: str | None = None, only=None
) -> list[Path]:
    """out/<chapter>.ipynb for every chapter notebook (or those named in `only`), each with the setup cell (url and
    branch default to the book's repository.url and repository.branch); every file is written atomically. Returns the
    paths in toc order."""

    root, out = Path(root), Path(out)
    if not (root / "_toc.yml").is_file():
        raise ValueError(f"{str(root)!r} is not the book's root (no _toc.yml there)")
    repo = book_config(root).get("repository") or {}
    url = repo.get("url") if url is None else url
    branch = repo.get("branch") or "main" if branch is None else branch
    setup_source(url, branch)  # a bad URL is reported before anything is written
    chapters = chapter_notebooks(root)
    if only is not None:
        unknown = sorted(set(only) - {p.stem for p in chapters})
        if unknown:
            raise ValueError(f"no chapter notebook {unknown[0]!r}; the chapters: {', '.join(p.stem for p in chapters)}")
        chapters = [p for p in chapters if p.stem in set(only)]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in chapters:
        nb = with_setup_cell(read_chapter(path), url, branch)
        target = out / f"{path.stem}.ipynb"
        write_notebook(nb, target)
        written.append(target)
    return written


__all__ = [
    "POLL_SLICE",
    "poll_in_slices",
    "execute",
    "execute_notebooks",
    "SETUP_TAG",
    "book_config",
    "setup_source",
    "with_setup_cell",
    "chapter_notebooks",
    "widget_chapters",
    "write_notebook",
    "write_notebooks",
]
