"""Small Sphinx hooks for this book (loaded through _config.yml's sphinx.local_extensions)."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

from sphinx.util import logging

from fmtoy.course.notebooks import POLL_SLICE, poll_in_slices  # noqa: F401  (the build's kernels; tests use both)

LAUNCH_KEYS = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url", "jupyterlite_url")
LOGGER = logging.getLogger(__name__)
# Execution-time budgets on 2 idle cores: (name, the docnames it sums as a regular expression, seconds).
EXECUTION_BUDGETS = (
    ("playground + chapters 1-7", r"book/(playground|ch[1-7]_\w+)", 240.0),
    ("chapter 8", r"book/ch8_\w+", 40.0),
    ("chapter 9", r"book/ch9_\w+", 40.0),
    ("chapter 10", r"book/ch10_\w+", 60.0),
    ("chapter 11", r"book/ch11_\w+", 40.0),
    ("whole book", r".*", 480.0),
)
FROM_CACHE = "from cache: time of the last real run"
EXECUTED = "fmbook_executed"  # key in myst-nb's env.nb_metadata[docname]: executed (not a cache hit) in this build
_READ_START: dict[str, float] = {}


def wait_for_kernels_in_slices(app, config) -> None:
    """Install poll_in_slices in the build process, which runs the chapters' kernels (myst-nb, nbclient)."""
    poll_in_slices()


def literal_docstrings(app, what, name, obj, options, lines: list[str]) -> None:
    """fmtoy's docstrings are plain text with math-like notation (|x|, *args, p_t): show them verbatim in the API
    appendix instead of parsing them as reStructuredText."""
    if any(line.strip() for line in lines):
        body = [line.rstrip() for line in lines]
        lines[:] = ["::", ""] + [("    " + line) if line else "" for line in body] + [""]


def share_trainings_within_the_build(app, config) -> None:
    """The kernels this build starts inherit FMTOY_RUN_CACHE=<build>/fmtoy-runs (unless set): a recipe that several
    chapters train (the playground's default model) is trained once per build and loaded by the others
    (fmtoy.runcache; the key holds the recipe, fmtoy's source, torch's version and the device)."""
    os.environ.setdefault("FMTOY_RUN_CACHE", str(Path(app.outdir).parent / "fmtoy-runs"))


def launch_buttons_need_a_repository(app, config) -> None:
    """Launch buttons are driven by one setting, repository.url: without it they are switched off (the theme would
    otherwise fail on an empty URL)."""
    opts = config.html_theme_options
    config.html_context.setdefault("default_mode", "auto")  # the theme logs a console error when this is empty
    if not opts.get("repository_url"):
        opts["launch_buttons"] = {**opts.get("launch_buttons", {}), **{k: "" for k in LAUNCH_KEYS}, "thebe": False}


def with_outputs(app, nb):
    """nb with its outputs: myst-nb writes a chapter taken from the execution cache to jupyter_execute/ without them
    (seen: every cached chapter of an incremental build), so they are merged back from the cache."""
    if any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
        return nb
    folder = getattr(app.config, "nb_execution_cache_path", "") or str(Path(app.outdir).parent / ".jupyter_cache")
    try:
        from jupyter_cache import get_cache

        return get_cache(folder).merge_match_into_notebook(nb)[1]
    except Exception:  # noqa: BLE001  (no cache, or no record of this notebook: offer it as it is)
        return nb


def offer_notebook_download(app, pagename, templatename, context, doctree) -> None:
    """Put the executed notebook of each MyST-notebook chapter in _sources/ so that the header's download menu
    offers it as .ipynb, opening with the setup cell that installs fmtoy elsewhere (fmtoy.course.notebooks; the
    same notebooks as `make notebooks`, with their outputs)."""
    import nbformat

    from fmtoy.course.notebooks import with_setup_cell, write_notebook

    executed = Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"
    if not executed.is_file():
        return
    opts = app.config.html_theme_options
    nb = with_outputs(app, nbformat.read(executed, as_version=4))
    nb = with_setup_cell(nb, opts.get("repository_url"), opts.get("repository_branch") or "main")
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_notebook(nb, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def drop_unused_thebe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Live code (thebe) is off: drop its scripts, which the build adds twice (a JavaScript error, 'THEBE_JS_URL has
    already been declared') and which name a CDN URL."""
    if app.config.html_theme_options.get("launch_buttons", {}).get("thebe"):
        return
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [
            js
            for js in scripts
            if "thebe" not in str(getattr(js, "filename", js) or "")
            and "THEBE_JS_URL" not in str(getattr(js, "attributes", {}).get("body", ""))
        ]


# --- execution times: _build/execution-times.md and .json after every successful build -------------------------


def forget_earlier_executions(app, env, docnames) -> None:
    """A notebook that is not re-read in this build was not executed in it (the environment is pickled)."""
    for meta in getattr(env, "nb_metadata", {}).values():
        meta.pop(EXECUTED, None)


def note_reading_starts(app, docname, source) -> None:
    """Remember when each document starts being read (see note_fresh_execution)."""
    _READ_START[docname] = time.time()


def note_fresh_execution(app, doctree) -> None:
    """Mark a notebook executed in this build: its exec_data mtime falls while it was being read."""
    # a cache hit's exec_data differs only in its mtime, the cache record's creation time (naive UTC, which
    # .timestamp() reads as local time: it can even lie in the future), hence the window, not a build start time
    meta = getattr(app.env, "nb_metadata", {}).get(app.env.docname, {})
    data = meta.get("exec_data")
    if data and _READ_START.pop(app.env.docname, math.inf) <= data["mtime"] <= time.time():
        meta[EXECUTED] = True


def execution_records(env) -> list[dict]:
    """One record per notebook myst-nb executed or took from its cache (from env.nb_metadata[docname]["exec_data"])."""
    return [
        {
            "docname": doc,
            "title": env.titles[doc].astext() if doc in env.titles else "",
            "seconds": meta["exec_data"]["runtime"],
            "executed": bool(meta.get(EXECUTED)),
            "method": meta["exec_data"]["method"],
        }
        for doc, meta in sorted(getattr(env, "nb_metadata", {}).items())
        if meta.get("exec_data")
    ]


def toc_order(env, root: str) -> list[str]:
    """Docnames in reading order: the root, then a depth-first walk of the toctrees."""
    order, stack = [], [root]
    while stack:
        doc = stack.pop()
        if doc not in order:
            order.append(doc)
            stack += reversed(env.toctree_includes.get(doc, []))
    return order


def execution_table(records: list[dict], budgets=EXECUTION_BUDGETS, order=()) -> tuple[str, dict]:
    """The report (markdown, JSON-ready dict) of records {docname, title, seconds, executed, method}, in toc order."""
    rank = {doc: i for i, doc in enumerate(order)}
    rows = sorted(records, key=lambda r: rank.get(r["docname"], len(rank)))  # stable: the rest keep their order
    totals = []
    for name, pattern, limit in budgets:
        seconds = round(sum(r["seconds"] or 0.0 for r in rows if re.fullmatch(pattern, r["docname"])), 2)
        totals.append({"budget": name, "seconds": seconds, "limit": limit, "over": seconds > limit})
    cell = lambda text: str(text).replace("|", "\\|")
    lines = [
        "# Execution times",
        "",
        "Seconds each notebook took to execute, in toc order (written by "
        "book/_ext/fmbook.py after every build). A notebook taken from the jupyter cache shows the time of its "
        "last real run.",
        "",
        "| # | Document | Title | Seconds | Executed | Method |",
        "| ---: | --- | --- | ---: | --- | --- |",
    ]
    lines += [
        f"| {i} | {cell(r['docname'])} | {cell(r['title'])} | "
        f"{'-' if r['seconds'] is None else format(r['seconds'], '.2f')} | "
        f"{'in this build' if r['executed'] else FROM_CACHE} | {r['method']} |"
        for i, r in enumerate(rows, 1)
    ]
    lines += ["", "| Budget | Seconds | Limit (s) | Status |", "| --- | ---: | ---: | --- |"]
    lines += [
        f"| {t['budget']} | {t['seconds']:.2f} | {t['limit']:g} | "
        f"{'**OVER BUDGET**' if t['over'] else 'within budget'} |"
        for t in totals
    ]
    documents = [{k: r[k] for k in ("docname", "title", "seconds", "executed", "method")} for r in rows]
    return "\n".join(lines) + "\n", {"documents": documents, "budgets": totals}


def write_atomically(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder, so that no reader sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_execution_times(app, exception) -> None:
    """After a successful build, write execution-times.md and .json beside the output folder and log the totals."""
    if exception is not None:
        return
    markdown, data = execution_table(execution_records(app.env), order=toc_order(app.env, app.config.root_doc))
    folder = Path(app.outdir).resolve().parent  # _build/html -> _build, where myst-nb keeps jupyter_execute
    write_atomically(folder / "execution-times.json", json.dumps(data, indent=2) + "\n")
    write_atomically(folder / "execution-times.md", markdown)
    totals = "; ".join(
        f"{t['budget']} {t['seconds']:.1f} s of {t['limit']:g} s" + (" OVER BUDGET" if t["over"] else "")
        for t in data["budgets"]
    )
    LOGGER.info(f"execution times: {folder / 'execution-times.md'} ({totals})")


def setup(app):
    app.connect("autodoc-process-docstring", literal_docstrings)
    app.connect("config-inited", launch_buttons_need_a_repository)
    app.connect("config-inited", share_trainings_within_the_build)
    app.connect("config-inited", wait_for_kernels_in_slices)
    app.connect("html-page-context", offer_notebook_download, priority=500)
    app.connect("html-page-context", drop_unused_thebe_scripts, priority=900)
    app.connect("env-before-read-docs", forget_earlier_executions)
    app.connect("source-read", note_reading_starts)
    app.connect("doctree-read", note_fresh_execution)
    app.connect("build-finished", write_execution_times)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
