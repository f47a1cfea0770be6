"""The student path in a real JupyterLab (issue 20): `make lab`'s server and settings, each chapter with a widget
opened as a notebook, run top to bottom in a fresh kernel, and its widget's main control moved in the browser.

The playground opens from its .md through jupytext's notebook view (make lab's default viewer); every other chapter
opens as the .ipynb that `make notebooks` writes, in a folder without the book, so these runs are also the
top-to-bottom runs of those notebooks (tests/test_notebooks.py runs the rest with nbclient).

JupyterLab runs headless from this venv on a free loopback port with a token, on a copy of the book (autosave off: the
chapters are never rewritten), with temporary config, data, runtime and workspace folders (nothing of the user's is
read or written) and the run cache of the site build, beside which it runs (tests/conftest.py: run_cache). The browser
is playwright with the system chromium, as in tests/test_site.py. For every chapter the test asserts that the cells
ran without an error output, that moving the control redraws the widget's image (a different PNG) within
REDRAW_BOUND seconds, and saves a screenshot before and after the change under _build/screenshots/lab/. The
redraw times themselves are the benchmark's (make bench); the bound here is generous, for a busy CI machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import AS_MARKDOWN, widget_chapters

from fmtoy.course.notebooks import write_notebooks

pytestmark = pytest.mark.notebooks

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots" / "lab"
REDRAW_BOUND = 20.0  # seconds from the control's change to the new image: generous (the budget is 0.5 s idle)
RUN_TIMEOUT = float(os.environ.get("DEBUG_LAB_TIMEOUT", 600))  # seconds for one chapter's cells
WIDGET_CHAPTERS = widget_chapters()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(run_cache, tmp_path_factory):
    """(base URL, token) of a JupyterLab started as `make lab` starts it, on a copy of the book."""
    tmp = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "book", tmp / "book", ignore=shutil.ignore_patterns("_build", "*.ipynb"))
    write_notebooks(ROOT, tmp / "notebooks", url="https://github.com/example/flow-matching-by-derivation")
    settings = tmp / "settings"
    settings.mkdir()
    overrides = json.loads((ROOT / "book" / "_lab" / "overrides.json").read_text())  # make lab's settings
    overrides.setdefault("@jupyterlab/docmanager-extension:plugin", {})["autosave"] = False
    overrides["@jupyterlab/notebook-extension:tracker"] = {"windowingMode": "none"}  # every cell in the page
    overrides["@jupyterlab/apputils-extension:notification"] = {"fetchNews": "false"}  # no news pop-up
    (settings / "overrides.json").write_text(json.dumps(overrides))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp / "user-settings"),
        "FMTOY_RUN_CACHE": str(run_cache),
    }
    cmd = [
        str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tmp}", f"--LabApp.app_settings_dir={settings}", "--LabApp.expose_app_in_browser=True",
    ]  # fmt: skip
    if os.geteuid() == 0:  # a CI container: JupyterLab refuses root without it
        cmd.append("--allow-root")
    log = open(tmp / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"JupyterLab exited:\n{(tmp / 'lab.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "JupyterLab did not answer within 120 s"
            time.sleep(0.5)
        yield base, token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no system chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


NOTEBOOK = """() => { const app = window.jupyterapp; const w = app && app.shell && app.shell.currentWidget;
  return w && w.content && w.sessionContext ? true : null; }"""
STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.widgets.map(c => c.model);
  const code = cells.filter(m => m.type === 'code' && m.sharedModel.getSource().trim());
  const errors = [];
  for (const m of code)
    for (const o of m.outputs.toJSON()) if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
  return {status: kernel ? kernel.status : 'none', done: code.filter(m => m.executionCount != null).length,
          total: code.length, errors};
}"""
WIDGET_IMAGE = """() => {
  const imgs = [...document.querySelectorAll('.jp-Notebook .widget-vbox .widget-output img')];
  return imgs.length ? imgs[imgs.length - 1].src : null;
}"""


def opened_as(chapter: str) -> str:
    """The file the test opens: the playground as `make lab` shows it (its .md, through jupytext's notebook view),
    every other chapter as the .ipynb of `make notebooks`, in a folder without the book (its setup cell included)."""
    return f"book/{chapter}.md" if chapter == AS_MARKDOWN else f"notebooks/{chapter}.ipynb"


def run_chapter(page, base: str, token: str, chapter: str) -> dict:
    # a workspace of its own, reset: only this chapter is open (a restored tab could take the focus)
    page.goto(f"{base}/lab/workspaces/{chapter}/tree/{opened_as(chapter)}?reset&token={token}")
    page.wait_for_function(NOTEBOOK, timeout=120_000)
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget; const s = w.sessionContext.session;"
        " return s && s.kernel && s.kernel.status === 'idle'; }",
        timeout=120_000,
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    start = time.monotonic()
    while True:
        state = page.evaluate(STATE)
        if state["errors"] or (state["done"] == state["total"] and state["status"] == "idle"):
            return state
        if time.monotonic() - start > RUN_TIMEOUT:
            page.screenshot(path=str(SHOTS / f"{chapter}-timeout.png"))
            raise AssertionError(f"{chapter}: cells still running after {RUN_TIMEOUT:.0f} s: {state}")
        time.sleep(1.0)


def move_main_control(page) -> str:
    """Move the last widget's first control one step (a slider's handle with the arrow key, a dropdown to its next
    option); return what was moved."""
    box = page.locator(".jp-Notebook .widget-vbox").last
    box.scroll_into_view_if_needed()
    control = box.locator(".widget-hbox > .widget-inline-hbox, .widget-hbox > .jupyter-widgets").first
    select = control.locator("select")
    if select.count():
        options = select.locator("option").all_inner_texts()
        current = select.input_value()
        nxt = options[(options.index(current) + 1) % len(options)] if current in options else options[-1]
        select.select_option(label=nxt)
        return f"dropdown -> {nxt}"
    handle = control.locator(".noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    return "slider +1 step"


@pytest.mark.parametrize("chapter", WIDGET_CHAPTERS)
def test_a_chapter_runs_in_jupyterlab_and_its_widget_redraws(lab, browser, chapter):
    base, token = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        state = run_chapter(page, base, token, chapter)
        assert not state["errors"], f"{chapter}: error output in the notebook: {state['errors'][:3]}"
        page.wait_for_function(WIDGET_IMAGE, timeout=60_000)
        before = page.evaluate(WIDGET_IMAGE)
        page.locator(".jp-Notebook .widget-vbox").last.evaluate("e => e.scrollIntoView({block: 'center'})")
        page.wait_for_timeout(300)
        page.screenshot(path=str(SHOTS / f"{chapter}-before.png"))
        moved = move_main_control(page)
        start = time.monotonic()
        page.wait_for_function(
            f"() => {{ const s = ({WIDGET_IMAGE})(); return s && s !== {json.dumps(before)}; }}",
            timeout=REDRAW_BOUND * 1000,
        )
        redraw = time.monotonic() - start
        page.wait_for_timeout(300)
        page.screenshot(path=str(SHOTS / f"{chapter}-after.png"))
        state = page.evaluate(STATE)
        assert not state["errors"], f"{chapter}: the redraw left an error output: {state['errors'][:3]}"
        stderr = page.locator(
            ".jp-Notebook .widget-vbox .widget-output [data-mime-type='application/vnd.jupyter.stderr']"
        )
        assert "Traceback" not in " ".join(stderr.all_inner_texts()), f"{chapter}: the widget printed a traceback"
        print(f"{chapter}: {moved}, redrawn in {redraw:.2f} s")
    finally:
        page.close()
        shut_down_kernels(base, token)


def shut_down_kernels(base: str, token: str) -> None:
    """Every session of the server ended (closing a page leaves its kernel running)."""
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/api/sessions", headers=headers), timeout=30) as r:
        sessions = json.load(r)
    for session in sessions:
        req = urllib.request.Request(f"{base}/api/sessions/{session['id']}", headers=headers, method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()
