"""The Jupyter Book's structure (toc, config, bibliography, jupytext headers) and, marked `notebooks`, its execution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CODE_CELL = re.compile(r"^(`{3,}|:{3,})\{code-cell\}", re.MULTILINE)
CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")
BIB_KEY = re.compile(r"^@\w+\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)


def front_matter(text: str) -> dict:
    """The YAML front matter of a MyST file ({} when there is none)."""
    m = re.match(r"---\n(.*?)\n---\s*\n", text, re.DOTALL)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


def jupytext_header_problems(text: str) -> list[str]:
    """Why JB1 would render this MyST file without executing it (an empty list when the header is right)."""
    meta = front_matter(text)
    fmt = ((meta.get("jupytext") or {}).get("text_representation") or {}).get("format_name")
    problems = [] if fmt == "myst" else [f"jupytext.text_representation.format_name is {fmt!r}, not 'myst'"]
    kernel = meta.get("kernelspec") or {}
    if not (kernel.get("name") and kernel.get("language") and kernel.get("display_name")):
        problems.append(f"kernelspec needs name, language and display_name, got {kernel!r}")
    return problems


def toc_files(entry: dict | list) -> list[str]:
    """Every `file:` (and the root) named anywhere in a _toc.yml structure."""
    if isinstance(entry, list):
        return [f for item in entry for f in toc_files(item)]
    found = [entry["root"]] if "root" in entry else []
    found += [entry["file"]] if "file" in entry else []
    for key in ("parts", "chapters", "sections"):
        found += toc_files(entry.get(key, []))
    return found


def resolve(doc: str) -> Path:
    """The source file of a toc entry (the toc omits the suffix)."""
    for suffix in ("", ".md", ".ipynb"):
        if (ROOT / (doc + suffix)).is_file():
            return ROOT / (doc + suffix)
    raise FileNotFoundError(doc)


TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
CHAPTERS = sorted(p for p in BOOK.glob("*.md") if CODE_CELL.search(p.read_text()))

GOOD_HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
# A chapter
"""


# --- (1) toc and jupytext headers -------------------------------------------------------------


def test_toc_is_a_book_rooted_at_the_intro():
    assert TOC["format"] == "jb-book"
    assert TOC["root"] == "book/intro"


@pytest.mark.parametrize("doc", toc_files(TOC))
def test_every_toc_entry_exists(doc):
    try:
        resolve(doc)
    except FileNotFoundError:
        pytest.fail(f"_toc.yml lists {doc!r} but neither {doc}.md nor {doc}.ipynb exists")


def test_every_book_page_is_in_the_toc():
    listed = {resolve(d) for d in toc_files(TOC)}
    missing = [p.name for p in sorted(BOOK.glob("*.md")) if p not in listed]
    assert not missing, f"{missing} are not in _toc.yml; with only_build_toc_files they would not be built"


def test_there_are_executable_chapters():
    assert CHAPTERS, "no book/*.md contains a {code-cell}"
    assert BOOK / "playground.md" in CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_executable_chapter_has_jupytext_header(chapter):
    problems = jupytext_header_problems(chapter.read_text())
    assert not problems, f"{chapter.name} has code cells but would not be executed by JB1: {problems}"


@pytest.mark.parametrize(
    "text",
    [
        "# No front matter\n```{code-cell} ipython3\n1\n```\n",
        GOOD_HEADER.replace("format_name: myst", "format_name: markdown"),
        GOOD_HEADER.replace("kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n", ""),
        GOOD_HEADER.replace("  name: python3\n", ""),
    ],
    ids=["no-header", "wrong-format", "no-kernelspec", "kernelspec-without-name"],
)
def test_header_check_rejects_a_bad_header(text):
    assert jupytext_header_problems(text)


def test_header_check_accepts_a_good_header():
    assert jupytext_header_problems(GOOD_HEADER) == []


def test_plain_pages_are_not_executed_by_accident():
    for page in ("intro.md", "bibliography.md"):
        assert not CODE_CELL.search((BOOK / page).read_text()), f"{page} is meant to be plain MyST"


# --- (2) configuration and bibliography ---------------------------------------------------------


def test_config_extensions_execution_and_exclusions():
    assert CONFIG["title"] == "Flow Matching by Derivation"
    assert {"sphinx_proof", "sphinx_exercise"} <= set(CONFIG["sphinx"]["extra_extensions"])
    assert {"dollarmath", "amsmath", "colon_fence", "deflist", "html_image", "substitution"} <= set(
        CONFIG["parse"]["myst_enable_extensions"]
    )
    execute = CONFIG["execute"]
    assert execute["execute_notebooks"] == "cache" and execute["allow_errors"] is False
    assert execute["timeout"] >= 60
    assert CONFIG["only_build_toc_files"] is True
    assert {".venv", "_build", "README.md", "bench", "tests", "fmtoy"} <= set(CONFIG["exclude_patterns"])
    assert CONFIG["html"]["use_issues_button"] is False and CONFIG["html"]["use_edit_page_button"] is False


def test_config_defines_the_notation_macros():
    macros = CONFIG["sphinx"]["config"]["mathjax3_config"]["tex"]["macros"]
    assert {"R", "E", "N", "x", "xt", "ut", "vt", "pt", "Lfm", "Lcfm", "div", "dd"} <= set(macros)
    for name in macros:
        assert re.fullmatch(r"[A-Za-z]+", name), f"MathJax macro names are letters only, got {name!r}"


def bib_keys() -> list[str]:
    return BIB_KEY.findall((ROOT / CONFIG["bibtex_bibfiles"][0]).read_text())


def test_bibfile_is_configured_and_has_unique_keys():
    assert CONFIG["bibtex_bibfiles"] == ["book/references.bib"]
    keys = bib_keys()
    assert len(keys) == len(set(keys)), "duplicate BibTeX keys"
    assert {
        "lipman2023flow",
        "liu2023flow",
        "albergo2023building",
        "lipman2024flow",
        "frans2025one",
        "guo2025variational",
        "tong2024improving",
        "chen2018neural",
        "geng2025mean",
    } <= set(keys)


def test_bibliography_page_has_the_directive():
    assert "{bibliography}" in (BOOK / "bibliography.md").read_text()
    assert "book/bibliography" in toc_files(TOC)


def test_every_citation_is_in_the_bibfile():
    keys = set(bib_keys())
    cited = {(p.name, k.strip()) for p in BOOK.glob("*.md") for m in CITE.findall(p.read_text()) for k in m.split(",")}
    unknown = sorted(f"{name}: {k}" for name, k in cited if k not in keys)
    assert cited and not unknown, f"citations missing from references.bib: {unknown}"


# --- (3) widgets have kernel-free counterparts ----------------------------------------------------
# (Execution is tested by tests/test_site.py, whose fixture builds the whole book with every notebook executed.)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_widget_has_a_static_sweep_and_no_dead_output(chapter):
    import jupytext

    cells = [c for c in jupytext.read(chapter).cells if c.cell_type == "code"]
    widget_cells = [c for c in cells if re.search(r"(^|\n)\s*interactive_figure\(", c.source)]
    for c in widget_cells:
        assert "remove-output" in c.metadata.get("tags", []), (
            f"{chapter.name}: a widget cell must be tagged remove-output (a dead control in the static page)"
        )
    if widget_cells:
        assert any("static_sweep(" in c.source for c in cells), (
            f"{chapter.name} has a widget but no static_sweep player for readers without a kernel"
        )


# --- (4) the execution-time report (book/_ext/fmbook.py writes _build/execution-times.md and .json) -------------


@pytest.fixture(scope="module")
def fmbook():
    """The book's local Sphinx extension, imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fmbook", BOOK / "_ext" / "fmbook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(docname: str, seconds: float | None, executed: bool = True, method: str = "cache") -> dict:
    return {
        "docname": docname,
        "title": docname.split("/")[-1].title(),
        "seconds": seconds,
        "executed": executed,
        "method": method,
    }


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the per-document rows (the ones numbered 1, 2, ...)."""
    return [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in markdown.splitlines()
        if re.match(r"\| \d+ \|", line)
    ]


def budget_line(markdown: str, name: str) -> str:
    [line] = [line for line in markdown.splitlines() if line.startswith(f"| {name} |")]
    return line


def test_execution_table_sums_each_budget(fmbook):
    records = [
        record("book/playground", 30.5),
        record("book/ch1_continuity", 100.0),
        record("book/ch7_vrfm", 100.0),
        record("book/instructors", 20.0),
        record("book/ch3_cfm", None),
        record("book/ch8_guidance", 41.0),
        record("book/ch9_sde", 39.0),
        record("book/ch10_reflow", 50.0),
        record("book/ch11_discrete", 12.0),
    ]
    markdown, data = fmbook.execution_table(records)
    assert data["budgets"] == [
        {"budget": "playground + chapters 1-7", "seconds": 230.5, "limit": 240.0, "over": False},
        {"budget": "chapter 8", "seconds": 41.0, "limit": 40.0, "over": True},
        {"budget": "chapter 9", "seconds": 39.0, "limit": 40.0, "over": False},
        {"budget": "chapter 10", "seconds": 50.0, "limit": 60.0, "over": False},
        {"budget": "chapter 11", "seconds": 12.0, "limit": 40.0, "over": False},
        {"budget": "whole book", "seconds": 392.5, "limit": 480.0, "over": False},
    ]
    assert "OVER BUDGET" in budget_line(markdown, "chapter 8")
    assert "| 230.50 | 240 | within budget |" in budget_line(markdown, "playground + chapters 1-7")
    assert [r for r in table_rows(markdown) if r[1] == "book/ch3_cfm"][0][3] == "-"  # no recorded time


@pytest.mark.parametrize("seconds, over", [(240.0, False), (240.01, True), (500.0, True)])
def test_execution_table_marks_a_budget_that_is_exceeded(fmbook, seconds, over):
    records = [record("book/playground", seconds / 2), record("book/ch4_gaussian_paths", seconds / 2)]
    markdown, data = fmbook.execution_table(records)
    assert data["budgets"][0]["over"] is over
    assert ("**OVER BUDGET**" in budget_line(markdown, "playground + chapters 1-7")) is over
    assert ("OVER BUDGET" in budget_line(markdown, "whole book")) is (seconds > 480)


def test_only_the_playground_and_chapters_1_to_7_count_against_the_240_s_budget(fmbook):
    name, pattern, limit = fmbook.EXECUTION_BUDGETS[0]
    counted = [d for d in toc_files(TOC) if re.fullmatch(pattern, d)]
    assert limit == 240 and fmbook.EXECUTION_BUDGETS[-1][2] == 480
    assert [(n, lim) for n, _, lim in fmbook.EXECUTION_BUDGETS[1:-1]] == [
        ("chapter 8", 40.0),
        ("chapter 9", 40.0),
        ("chapter 10", 60.0),
        ("chapter 11", 40.0),
    ]
    assert counted == ["book/playground"] + sorted(d for d in toc_files(TOC) if re.fullmatch(r"book/ch[1-7]_\w+", d))
    assert len(counted) == 8 and not re.fullmatch(pattern, "book/ch10_more")


def test_execution_table_follows_the_toc_order(fmbook):
    order = ["book/intro", "book/playground", "book/ch1_continuity", "book/ch2_marginal", "book/instructors"]
    records = [
        record("book/instructors", 1),
        record("book/zz_not_in_toc", 1),
        record("book/ch2_marginal", 1),
        record("book/playground", 1),
        record("book/aa_not_in_toc", 1),
        record("book/ch1_continuity", 1),
    ]
    markdown, data = fmbook.execution_table(records, order=order)
    expected = [
        "book/playground",
        "book/ch1_continuity",
        "book/ch2_marginal",
        "book/instructors",
        "book/zz_not_in_toc",
        "book/aa_not_in_toc",
    ]  # pages outside the toc last, in the order given
    assert [r[1] for r in table_rows(markdown)] == expected
    assert [r[0] for r in table_rows(markdown)] == ["1", "2", "3", "4", "5", "6"]
    assert [d["docname"] for d in data["documents"]] == expected


def test_execution_table_says_which_times_come_from_the_cache(fmbook):
    records = [
        record("book/playground", 12.345, executed=True),
        record("book/ch1_continuity", 50.0, executed=False),
        record("book/ch2_marginal", 3.0, executed=True, method="force"),
    ]
    markdown, data = fmbook.execution_table(records)
    rows = {r[1]: r for r in table_rows(markdown)}
    assert rows["book/playground"][3:] == ["12.35", "in this build", "cache"]
    assert rows["book/ch1_continuity"][3:] == ["50.00", "from cache: time of the last real run", "cache"]
    assert rows["book/ch2_marginal"][5] == "force"
    assert "| Executed | Method |" in markdown
    assert [d["executed"] for d in data["documents"]] == [True, False, True]


def test_toc_order_walks_the_toctrees_depth_first(fmbook):
    class Env:
        toctree_includes = {"intro": ["a", "b"], "a": ["a1"], "b": ["a"]}

    assert fmbook.toc_order(Env(), "intro") == ["intro", "a", "a1", "b"]


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(fmbook, tmp_path):
    target = tmp_path / "execution-times.md"
    target.write_text("old")
    fmbook.write_atomically(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


# --- (5) kernel replies: a missed zmq wake-up costs at most one poll slice, not the 600 s cell timeout ----------


class MissedWakeUp:
    """A zmq socket whose message arrived but whose wake-up was missed: each poll lasts its whole timeout (on a fake
    clock) and only its final check sees a message, as in jupyter/nbclient#312."""

    def __init__(self, clock: dict, arrives_at: float | None) -> None:
        self.clock, self.arrives_at, self.polls = clock, arrives_at, []

    async def poll(self, timeout_ms):
        self.polls.append(timeout_ms)
        self.clock["now"] += timeout_ms / 1000
        return int(self.arrives_at is not None and self.clock["now"] >= self.arrives_at)


@pytest.fixture
def sliced(fmbook, monkeypatch):
    """poll_in_slices installed on jupyter_client's async channel for one test (the class is restored after it)."""
    from jupyter_client.channels import AsyncZMQSocketChannel

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", AsyncZMQSocketChannel.get_msg)
    clock = {"now": 0.0}
    fake = lambda: clock["now"]  # noqa: E731
    fmbook.poll_in_slices(clock=fake)
    fmbook.poll_in_slices(clock=fake)  # installing twice wraps once

    def channel(arrives_at):
        ch = AsyncZMQSocketChannel.__new__(AsyncZMQSocketChannel)
        ch.socket = MissedWakeUp(clock, arrives_at)

        async def recv(**kwargs):
            return {"content": "reply", "at": clock["now"]}

        ch._recv = recv
        return ch

    return channel, clock


def test_a_missed_wake_up_costs_one_poll_slice_not_the_cell_timeout(sliced, fmbook):
    import asyncio

    channel, clock = sliced
    ch = channel(arrives_at=0.0)  # the reply is there at once; unsliced, the poll would last the 600 s timeout
    msg = asyncio.run(ch.get_msg(timeout=600))
    assert msg["content"] == "reply" and msg["at"] <= fmbook.POLL_SLICE
    assert ch.socket.polls == [fmbook.POLL_SLICE * 1000]
    from jupyter_client.channels import AsyncZMQSocketChannel

    assert not hasattr(AsyncZMQSocketChannel.get_msg.fmbook_whole, "fmbook_slice")  # wrapped once


def test_sliced_polls_keep_the_timeout_and_wait_without_one(sliced, fmbook):
    import asyncio
    from queue import Empty

    channel, clock = sliced
    ch = channel(arrives_at=None)  # nothing ever comes: Empty after the whole timeout, not after one slice
    with pytest.raises(Empty):
        asyncio.run(ch.get_msg(timeout=2.5))
    assert clock["now"] == pytest.approx(2.5) and max(ch.socket.polls) <= fmbook.POLL_SLICE * 1000
    clock["now"] = 0.0
    ch = channel(arrives_at=7.2)  # timeout=None waits as long as it takes, in slices
    assert asyncio.run(ch.get_msg(timeout=None))["at"] == pytest.approx(8.0)
    ch = channel(arrives_at=None)
    with pytest.raises(Empty):  # timeout=0: one non-blocking check, as before
        asyncio.run(ch.get_msg(timeout=0))
    assert ch.socket.polls == [0]
