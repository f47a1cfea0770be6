"""The rendered book as readers see it. Marked `notebooks`: the session fixture builds the whole book (executing
every chapter, zero Sphinx warnings) into a temporary folder; set FMTOY_SITE=_build/html to check an existing
build instead.

* HTML checks: no error output, every chapter has an animation, every internal link and anchor resolves, nothing
  is loaded from another host, no dead widget placeholder, page weight within budget.
* Browser checks (Debian's chromium driven by playwright, network blocked except the local server): math typeset,
  no JavaScript errors, every image loads, every animation player advances when stepped and when played; a
  full-page screenshot per page under _build/screenshots/ and a report (page weight, first paint) beside them.
"""

from __future__ import annotations

import ast
import functools
import http.server
import json
import os
import re
import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
PAGE_BUDGET_BYTES = 10 * 2**20  # the heaviest page, HTML + everything it loads
pytestmark = pytest.mark.notebooks


def toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for c in toc["chapters"]]


PAGES = toc_pages()
NOTEBOOKS = [p for p in PAGES if "{code-cell}" in (ROOT / f"{p}.md").read_text()]
CHAPTERS = [p for p in NOTEBOOKS if not p.endswith("instructors")]


class _Page(HTMLParser):
    """Collects ids, links and resources of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.resources: list[str] = []
        self.classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if a.get("class"):
            self.classes.append(a["class"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag in ("script", "img", "iframe", "source", "video") and a.get("src"):
            self.resources.append(a["src"])
        if tag == "link" and a.get("href") and "stylesheet" in (a.get("rel") or ""):
            self.resources.append(a["href"])


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def html_path(site: Path, page: str) -> Path:
    return site / ("index.html" if page == PAGES[0] and not (site / f"{page}.html").is_file() else f"{page}.html")


def is_external(url: str) -> bool:
    return bool(urlsplit(url).scheme) or url.startswith("//")


# ----------------------------------------------------------------------------------------------- HTML checks
@pytest.mark.parametrize("page", PAGES)
def test_page_has_no_error_output_and_loads_nothing_external(site, page):
    path = html_path(site, page)
    text = path.read_text(encoding="utf-8")
    parsed = parse(path)
    assert "Traceback (most recent call last)" not in text, f"{page}: a traceback is shown"
    assert not [c for c in parsed.classes if "traceback" in c.split()], f"{page}: an error output is shown"
    stderr = re.findall(r'<div class="output stderr">(.*?)</div>', text, flags=re.S)
    assert not [s for s in stderr if re.search(r"Error|Warning", s)], f"{page}: warnings/errors on stderr: {stderr}"
    external = [r for r in parsed.resources if is_external(r)]
    assert not external, f"{page} loads resources from other hosts (breaks offline reading): {external}"
    assert "application/vnd.jupyter.widget-view+json" not in text, (
        f"{page}: a widget view is embedded; in the static page it would be a dead control"
    )


@pytest.mark.parametrize("page", CHAPTERS)
def test_every_chapter_has_an_animation(site, page):
    assert text_count(html_path(site, page), '<div class="animation">') >= 1, f"{page} has no JS animation player"


def text_count(path: Path, needle: str) -> int:
    return path.read_text(encoding="utf-8").count(needle)


def test_every_internal_link_and_anchor_resolves(site):
    broken = []
    for path in sorted(site.rglob("*.html")):
        if "_static" in path.parts or "_sources" in path.parts:
            continue
        for href in parse(path).links:
            if is_external(href) or href.startswith(("mailto:", "javascript:")):
                continue
            parts = urlsplit(href)
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path.relative_to(site)}: {href} (no file)")
            elif parts.fragment and target.suffix == ".html" and parts.fragment not in parse(target).ids:
                broken.append(f"{path.relative_to(site)}: {href} (no anchor #{parts.fragment})")
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:40])


def page_weight(site: Path, page: str) -> int:
    """Bytes of the page and every local script, stylesheet and image it references (fonts excluded)."""
    path = html_path(site, page)
    total = path.stat().st_size
    for ref in set(parse(path).resources):
        if ref.startswith("data:"):
            continue
        f = (path.parent / unquote(urlsplit(ref).path)).resolve()
        total += f.stat().st_size if f.is_file() else 0
    return total


def test_page_weight_budget(site):
    weights = {page: page_weight(site, page) for page in PAGES}
    heaviest = max(weights, key=weights.get)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "page_weight.json").write_text(json.dumps(weights, indent=2) + "\n")
    assert weights[heaviest] < PAGE_BUDGET_BYTES, (
        f"{heaviest} weighs {weights[heaviest] / 2**20:.1f} MiB, over the {PAGE_BUDGET_BYTES / 2**20:.0f} MiB budget: "
        "use fewer animation frames or a lower dpi"
    )


def test_every_chapter_offers_its_notebook(site):
    missing = [
        p
        for p in CHAPTERS
        if not (site / "_sources" / f"{p}.ipynb").is_file()
        or f"_sources/{p}.ipynb" not in html_path(site, p).read_text(encoding="utf-8")
    ]
    assert not missing, f"no .ipynb download for {missing}"


def test_each_download_is_the_executed_notebook_behind_the_setup_cell(site):
    """The .ipynb of the download menu: the setup cell of `make notebooks` first, then the chapter with its outputs
    (also for a chapter taken from the execution cache, which myst-nb writes without them)."""
    import nbformat

    from fmtoy.course.notebooks import SETUP_TAG

    for p in CHAPTERS:
        nb = nbformat.read(site / "_sources" / f"{p}.ipynb", as_version=4)
        assert SETUP_TAG in nb.cells[0].metadata.get("tags", []), f"{p}: no setup cell first"
        code = [c for c in nb.cells[1:] if c.cell_type == "code"]
        assert sum(bool(c.outputs) for c in code) >= len(code) // 2, f"{p}: the download has lost its outputs"


def test_the_build_reports_every_notebooks_execution_time(site):
    build = site.parent  # _build, next to _build/html (book/_ext/fmbook.py writes it)
    table, js = build / "execution-times.md", build / "execution-times.json"
    assert table.is_file() and js.is_file(), f"the build wrote no {table.name} / {js.name} in {build}"
    data = json.loads(js.read_text())
    seconds = {d["docname"]: d["seconds"] for d in data["documents"]}
    assert not [p for p in NOTEBOOKS if not (seconds.get(p) or 0) > 0], (
        f"{js.name} lacks a positive time for some notebooks of _toc.yml: {seconds}"
    )
    assert [d for d in seconds if d in NOTEBOOKS] == NOTEBOOKS, f"{js.name} is not in toc order"
    text = table.read_text()
    assert all(f"| {p} |" in text for p in NOTEBOOKS) and "| whole book |" in text
    assert [b["limit"] for b in data["budgets"]] == [
        240,
        40,
        40,
        60,
        40,
        480,
    ]  # playground + ch1-7, chapters 8, 9, 10, 11, book


def test_the_book_kernels_train_under_the_thread_policy(site):
    """The playground's training cell, run by a kernel the build started, reports the policy it trained under."""
    nb = json.loads((site.parent / "jupyter_execute" / "book" / "playground.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))  # str or lines
    line = next((x for x in text.splitlines() if x.startswith("CPU threads: ")), None)
    assert line is not None, "the playground's training cell printed no thread policy"
    if "FMTOY_THREADS" not in os.environ and (os.cpu_count() or 1) > 1:  # no explicit setting: auto measures
        assert line.startswith("CPU threads: auto: measures 1 vs"), line
        counts = ast.literal_eval(line.split("steps per thread count: ")[1])
        assert 1 in counts and sum(counts.values()) == 5000, line


def test_mathjax_is_served_locally(site):
    text = html_path(site, "book/ch1_continuity").read_text(encoding="utf-8")
    assert "_static/mathjax/tex-chtml.js" in text
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()


# ----------------------------------------------------------------------------------------------- browser
def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def browser():
    required = os.environ.get("FMTOY_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("playwright is not installed (pip install playwright)")
        pytest.skip("playwright is not installed")
    exe = chromium_path()
    if exe is None:
        if required:
            pytest.fail("no chromium on PATH (Debian: apt-get install chromium)")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=exe,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


@pytest.fixture(scope="session")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


RAW_MATH_JS = """() => {
  const main = document.querySelector('main') || document.body;
  const clone = main.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .highlight, textarea').forEach(e => e.remove());
  const text = clone.textContent;
  const raw = ['$$', '\\\\frac', '\\\\begin{', '\\\\mathbb', '\\\\(']
    .filter(s => text.includes(s));
  return {raw, typeset: document.querySelectorAll('mjx-container').length,
          errors: document.querySelectorAll('mjx-merror').length};
}"""

PLAYER_STATE_JS = """(i) => {
  const a = document.querySelectorAll('div.animation')[i];
  const img = a.querySelector('img'), slider = a.querySelector('input.anim-slider');
  return {value: parseInt(slider.value), src: img.src.length + ':' + img.src.slice(-48)};
}"""


def test_pages_in_a_browser(site, server, browser):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    external: list[str] = []
    context = browser.new_context(viewport={"width": 1200, "height": 900})

    def route(r):
        if r.request.url.startswith(server) or r.request.url.startswith("data:"):
            r.continue_()
        else:
            external.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    problems, report = [], {}
    for page_name in PAGES:
        rel = html_path(site, page_name).relative_to(site).as_posix()
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        page.goto(server + rel, wait_until="load")
        page.evaluate(
            "() => (window.MathJax && MathJax.startup && MathJax.startup.promise) ? MathJax.startup.promise : null"
        )
        math = page.evaluate(RAW_MATH_JS)
        source = (ROOT / f"{page_name}.md").read_text()
        if "$" in source or "{math}" in source:
            if not math["typeset"]:
                problems.append(f"{page_name}: no typeset math (MathJax did not run)")
        if math["raw"] or math["errors"]:
            problems.append(f"{page_name}: raw TeX {math['raw']} or {math['errors']} MathJax errors in the text")
        page.evaluate(
            "async () => { for (let y = 0; y < document.body.scrollHeight; y += 800) {"
            " window.scrollTo(0, y); await new Promise(r => setTimeout(r, 20)); } window.scrollTo(0, 0); }"
        )
        broken = page.evaluate(
            "() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => (i.getAttribute('src') || '(no src)').slice(0, 80))"
        )
        if broken:
            problems.append(f"{page_name}: images that did not load: {broken}")
        n_players = page.evaluate("() => document.querySelectorAll('div.animation').length")
        for i in range(n_players):
            player = page.locator("div.animation").nth(i)
            player.scroll_into_view_if_needed()
            before = page.evaluate(PLAYER_STATE_JS, i)
            player.locator("button[title='Next frame']").click()
            stepped = page.evaluate(PLAYER_STATE_JS, i)
            if stepped["value"] != before["value"] + 1 or stepped["src"] == before["src"]:
                problems.append(f"{page_name}: player {i} did not advance on 'Next frame' ({before} -> {stepped})")
            player.locator("button[title='Play']").click()
            try:  # a frame every 100-700 ms: wait for the first one that moves (not a fixed 1.6 s per player)
                page.wait_for_function(
                    "([i, v]) => parseInt(document.querySelectorAll('div.animation')[i]"
                    ".querySelector('input.anim-slider').value) !== v",
                    arg=[i, stepped["value"]],
                    timeout=5000,
                )
            except PlaywrightTimeout:
                pass  # reported below: the player did not move
            player.locator("button[title='Pause']").click()
            played = page.evaluate(PLAYER_STATE_JS, i)
            if played["value"] == stepped["value"]:
                problems.append(f"{page_name}: player {i} did not move while playing")
        if errors:
            problems.append(f"{page_name}: JavaScript errors: {errors[:5]}")
        timing = page.evaluate("""() => {
            const paint = performance.getEntriesByName('first-contentful-paint')[0];
            const nav = performance.getEntriesByType('navigation')[0];
            const res = performance.getEntriesByType('resource');
            return {first_paint_ms: paint ? Math.round(paint.startTime) : null,
                    bytes: (nav ? nav.encodedBodySize : 0) + res.reduce((s, r) => s + (r.encodedBodySize || 0), 0)};
        }""")
        report[page_name] = {**timing, "players": n_players, "typeset_math": math["typeset"]}
        page.screenshot(path=str(SCREENSHOTS / f"{Path(page_name).name}.png"), full_page=True)
        page.close()
    context.close()
    (SCREENSHOTS / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    assert not external, f"pages tried to reach other hosts (blocked): {sorted(set(external))[:10]}"
    assert not problems, "\n".join(problems)
    for name, r in report.items():
        assert r["bytes"] < PAGE_BUDGET_BYTES, f"{name} loaded {r['bytes'] / 2**20:.1f} MiB in the browser"
    assert sum(r["players"] for r in report.values()) >= len(CHAPTERS)
