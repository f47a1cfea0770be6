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


@pytest.mark.parametrize("text", [
    "# No front matter\n```{code-cell} ipython3\n1\n```\n",
    GOOD_HEADER.replace("format_name: myst", "format_name: markdown"),
    GOOD_HEADER.replace("kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n", ""),
    GOOD_HEADER.replace("  name: python3\n", ""),
], ids=["no-header", "wrong-format", "no-kernelspec", "kernelspec-without-name"])
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
        CONFIG["parse"]["myst_enable_extensions"])
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
    assert {"lipman2023flow", "liu2023flow", "albergo2023building", "lipman2024flow", "frans2025one",
            "guo2025variational", "tong2024improving", "chen2018neural", "geng2025mean"} <= set(keys)


def test_bibliography_page_has_the_directive():
    assert "{bibliography}" in (BOOK / "bibliography.md").read_text()
    assert "book/bibliography" in toc_files(TOC)


def test_every_citation_is_in_the_bibfile():
    keys = set(bib_keys())
    cited = {(p.name, k.strip()) for p in BOOK.glob("*.md") for m in CITE.findall(p.read_text())
             for k in m.split(",")}
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
            f"{chapter.name}: a widget cell must be tagged remove-output (a dead control in the static page)")
    if widget_cells:
        assert any("static_sweep(" in c.source for c in cells), (
            f"{chapter.name} has a widget but no static_sweep player for readers without a kernel")
