"""fmtoy.course.notebooks (`make notebooks`, the site's .ipynb downloads): one notebook per chapter, the chapter's cells
behind one setup cell, which installs fmtoy only where it is not importable; and (marker notebooks) every written
notebook executes top to bottom with nbclient in a fresh kernel, outside the book folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import AS_MARKDOWN, nbclient_chapters, widget_chapters

from fmtoy.course import notebooks as NB
from fmtoy.course.assignments import read_chapter

ROOT = Path(__file__).resolve().parents[1]
URL = "https://github.com/example/flow-matching-by-derivation"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> list[Path]:
    return NB.write_notebooks(ROOT, tmp_path_factory.mktemp("notebooks"), url=URL, branch="main")


def test_one_notebook_per_chapter_in_toc_order(written):
    chapters = NB.chapter_notebooks(ROOT)
    assert [p.stem for p in written] == [p.stem for p in chapters]
    assert {"playground", "ch1_continuity", "ch9_sde", "ch11_discrete"} <= {p.stem for p in written}
    assert not {"bibliography", "symbols", "api"} & {p.stem for p in written}  # pages without code
    for path, chapter in zip(written, chapters):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert "jupytext" not in nb.metadata and nb.metadata.kernelspec.name == "python3"
        assert NB.SETUP_TAG in nb.cells[0].metadata.tags
        assert [c.source for c in nb.cells[1:]] == [c.source for c in read_chapter(chapter).cells]


def run_setup(source: str, monkeypatch, importable: bool) -> list[list[str]]:
    """Execute a setup cell with fmtoy (not) importable; return the commands it ran."""
    calls: list[list[str]] = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real(name, *a) if importable else None)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, *a, **k: calls.append(cmd) or 0)
    exec(compile(source, "<setup cell>", "exec"), {})
    return calls


def test_the_setup_cell_installs_fmtoy_only_where_it_is_missing(written, monkeypatch):
    source = nbformat.read(written[0], as_version=4).cells[0].source
    assert run_setup(source, monkeypatch, importable=True) == []  # in this repository: nothing
    [cmd] = run_setup(source, monkeypatch, importable=False)
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and cmd[-1] == f"fmtoy[notebooks] @ git+{URL}@main"


def test_without_a_repository_the_setup_cell_says_how_to_install(monkeypatch):
    source = NB.setup_source(None)
    assert run_setup(source, monkeypatch, importable=True) == []
    with pytest.raises(ModuleNotFoundError, match=r"repository\.url.*make lab"):
        run_setup(source, monkeypatch, importable=False)


def test_the_setup_cell_is_not_duplicated_and_bad_urls_are_refused(tmp_path):
    nb = read_chapter(ROOT / "book" / "ch11_discrete.md")
    twice = NB.with_setup_cell(NB.with_setup_cell(nb, URL), "https://example.org/other")
    assert sum(NB.SETUP_TAG in c.metadata.get("tags", []) for c in twice.cells) == 1
    assert "example.org/other" in twice.cells[0].source
    with pytest.raises(ValueError, match="repository.url must be a git URL"):
        NB.write_notebooks(ROOT, tmp_path / "out", url="not a url")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not the book's root"):
        NB.write_notebooks(tmp_path, tmp_path / "out")


def test_the_cli_writes_them(tmp_path):
    from fmtoy import cli

    assert cli.main(["notebooks", "--root", str(ROOT), "--out", str(tmp_path), "--url", URL]) == 0
    assert sorted(p.stem for p in tmp_path.glob("*.ipynb")) == sorted(p.stem for p in NB.chapter_notebooks(ROOT))
    assert cli.main(["notebooks", "--root", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.notebooks
def test_every_written_notebook_executes_top_to_bottom_in_a_fresh_kernel(executed_notebooks):
    """`fmtoy notebooks --execute --only ...`, started at collection beside the site build (tests/conftest.py): each
    notebook that JupyterLab does not run (tests/helpers.py) run by nbclient in a new kernel, in a folder of its own
    (no book next to it), sharing the build's trainings; with test_lab's runs, every written notebook once."""
    out, report, log = executed_notebooks
    assert list(report) == nbclient_chapters(), log[-2000:]
    lab = set(widget_chapters()) - {AS_MARKDOWN}  # run as .ipynb in JupyterLab (tests/test_lab.py)
    assert set(report) | lab == {p.stem for p in NB.chapter_notebooks(ROOT)} and not set(report) & lab
    for name, r in report.items():
        assert r["error"] is None and r["unexecuted"] == 0, f"{name}: {r}"
        nb = nbformat.read(out / name / f"{name}.ipynb", as_version=4)
        assert NB.SETUP_TAG in nb.cells[0].metadata.tags and nb.cells[0].execution_count == 1
        assert all(c.execution_count for c in nb.cells if c.cell_type == "code" and c.source.strip())
    print("executed:", ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in report.items()))


def test_execute_notebooks_reports_an_error_and_unexecuted_cells(tmp_path):
    """A notebook whose second cell raises: the run stops there, the report names the error and the cell after it."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in ("x = 1", "1 / 0", "y = 2")])
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    report = NB.execute_notebooks([path], timeout=120)
    assert report["bad"]["error"].startswith("ZeroDivisionError") and report["bad"]["unexecuted"] == 1
    assert (tmp_path / "bad" / "bad.ipynb").is_file()
