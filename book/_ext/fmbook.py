"""Small Sphinx hooks for this book (loaded through _config.yml's sphinx.local_extensions)."""
from __future__ import annotations

import shutil
from pathlib import Path

LAUNCH_KEYS = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url", "jupyterlite_url")


def literal_docstrings(app, what, name, obj, options, lines: list[str]) -> None:
    """fmtoy's docstrings are plain text with math-like notation (|x|, *args, p_t): show them verbatim in the API
    appendix instead of parsing them as reStructuredText."""
    if any(line.strip() for line in lines):
        body = [line.rstrip() for line in lines]
        lines[:] = ["::", ""] + [("    " + line) if line else "" for line in body] + [""]


def launch_buttons_need_a_repository(app, config) -> None:
    """Launch buttons are driven by one setting, repository.url: without it they are switched off (the theme would
    otherwise fail on an empty URL)."""
    opts = config.html_theme_options
    config.html_context.setdefault("default_mode", "auto")   # the theme logs a console error when this is empty
    if not opts.get("repository_url"):
        opts["launch_buttons"] = {**opts.get("launch_buttons", {}), **{k: "" for k in LAUNCH_KEYS}, "thebe": False}


def offer_notebook_download(app, pagename, templatename, context, doctree) -> None:
    """Put the executed notebook of each MyST-notebook chapter in _sources/ so that the header's download menu
    offers it as .ipynb (the theme does this itself only when a launch button is configured)."""
    executed = Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"
    if context.get("ipynb_source") or not executed.is_file():
        return
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(executed, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def drop_unused_thebe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Live code (thebe) is off: drop its scripts, which the build adds twice (a JavaScript error, 'THEBE_JS_URL has
    already been declared') and which name a CDN URL."""
    if app.config.html_theme_options.get("launch_buttons", {}).get("thebe"):
        return
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [js for js in scripts if "thebe" not in str(getattr(js, "filename", js) or "")
                                   and "THEBE_JS_URL" not in str(getattr(js, "attributes", {}).get("body", ""))]


def setup(app):
    app.connect("autodoc-process-docstring", literal_docstrings)
    app.connect("config-inited", launch_buttons_need_a_repository)
    app.connect("html-page-context", offer_notebook_download, priority=500)
    app.connect("html-page-context", drop_unused_thebe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
