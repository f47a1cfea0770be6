"""The autograder against students who want marks without the work (issue 13): each notebook below is an attack;
each must get the score its honest work deserves, the grader must finish within its deadline plus a few seconds, no
file outside the scratch folder may change, no process may outlive the grader, and no hidden test's text may reach
what the student sees.

Most attacks use ch5 (one exercise, two test cells: 1 + 2 points, the second with hidden lines) or, where they need
no torch, the same exercise in plain floats (tests/fixtures/grading_toy.md): the stub deserves 0, the plausible wrong
answer `z - eps_hat` 1 (it passes the type or shape check only), the right answer 3. Under
bubblewrap (Linux) the sandbox must be there: with FMTOY_REQUIRE_SANDBOX=1 (CI) a missing bwrap fails every test
that needs it instead of skipping it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from fmtoy.cli import main
from fmtoy.course import assignments as A
from fmtoy.course.grade import BOOK_DIR, HIDDEN_FAILED, grade
from fmtoy.course.sandbox import find_bwrap

ROOT = Path(__file__).resolve().parents[1]
CH5, CH7, CH1 = (ROOT / "book" / f"{s}.md" for s in ("ch5_paths", "ch7_vrfm", "ch1_continuity"))
# ch5's exercise in plain floats: attacks that need no torch run on it, and their sandboxes start in milliseconds
TOY, TOY_EX = ROOT / "tests" / "fixtures" / "grading_toy.md", "ex-toy-eps-velocity"
TIMEOUT = 8  # seconds per cell in these tests
HANG = 3  # the deadline of the tests that hang on purpose: each of them waits for it
SLACK = 20  # process start-ups (torch import) and the instructor's own test code on a busy 2-core machine

STUB5 = "def velocity_from_eps(z, t, eps_hat):\n    raise NotImplementedError()\n"
WRONG5 = "def velocity_from_eps(z, t, eps_hat):\n    return z - eps_hat   # forgot the 1/t\n"
RIGHT5 = "def velocity_from_eps(z, t, eps_hat):\n    return (z - (1 - t) * eps_hat) / t - eps_hat\n"

BWRAP = find_bwrap()
needs_sandbox = pytest.mark.skipif(
    BWRAP is None and os.environ.get("FMTOY_REQUIRE_SANDBOX") != "1",
    reason="bubblewrap not available (CI sets FMTOY_REQUIRE_SANDBOX=1, which makes this a failure)",
)
pytestmark = pytest.mark.grading


def test_sandbox_present_where_required():
    if os.environ.get("FMTOY_REQUIRE_SANDBOX") == "1":
        assert BWRAP is not None, "FMTOY_REQUIRE_SANDBOX=1 but bubblewrap is missing or cannot create a sandbox"


# ---------------------------------------------------------------------------------------------------------- helpers
def _chapter_nb(path: Path):
    return A.read_chapter(path)


def student(tmp_path: Path, chapter: Path, answers: dict[str, str], *, edit=None, name=None) -> Path:
    """The student notebook of `chapter` with solution cells replaced (label -> source); edit(nb) may change more."""
    nb = A.student_notebook(_chapter_nb(chapter))
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and meta["grade_id"].rsplit("-solution", 1)[0] in answers:
            cell.source = answers[meta["grade_id"].rsplit("-solution", 1)[0]]
    if edit:
        edit(nb)
    folder = tmp_path / "submission"
    folder.mkdir(exist_ok=True)
    out = folder / (name or f"{chapter.stem}.ipynb")
    nbformat.write(nb, out)
    return out


def hidden_texts(chapter: Path) -> list[str]:
    nb = _chapter_nb(chapter)
    lines = []
    for ex in A.graded_exercises(nb):
        for i in ex.test_cells:
            src = nb.cells[i].source
            kept = A.remove_hidden_tests(src).splitlines()
            lines += [s.strip() for s in src.splitlines() if s.strip() and s not in kept and len(s.strip()) > 12]
    return [s for s in lines if not s.startswith("###")]


def survivors(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the attacks put it in every process they start)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if marker.encode() in Path(entry.path, "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def files_with(marker: str, *roots: Path) -> list[str]:
    hits = []
    for root in roots:
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
        else:
            paths = []
        for p in paths:
            try:
                if marker in p.name or marker.encode() in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def check(nb: Path, expected: int, *, source=CH5, marker: str = "", cells: int = 2, tmp_path: Path | None = None,
          **kw):  # fmt: skip
    """Grade `nb`; check the score, the time, survivors, files and hidden tests; return the report."""
    start, timeout = time.monotonic(), kw.pop("timeout", TIMEOUT)
    report = grade(nb, source, timeout=timeout, **kw)
    elapsed = time.monotonic() - start
    seen = report.table() + report.to_json()
    assert report.earned == expected, seen
    n_cells = sum(len(e.tests) for e in report.exercises)
    assert elapsed < (n_cells + len(report.exercises)) * timeout + SLACK, f"took {elapsed:.1f} s\n{seen}"
    chapter = source if isinstance(source, Path) and source.suffix == ".md" else None
    for text in hidden_texts(chapter) if chapter else []:
        assert text not in seen, f"hidden test text {text!r} reached the student"
    if marker:
        assert survivors(marker) == [], f"processes outlived the grader\n{seen}"
        # the attack writes files named after (and holding) the marker; only its own notebook may hold it
        roots = [BOOK_DIR, *(p for p in (tmp_path.iterdir() if tmp_path else []) if p.name != "submission")]
        assert files_with(marker, *roots) == [], seen
        for folder in (Path("/tmp"), Path.home(), ROOT, nb.parent):
            assert [p.name for p in folder.iterdir() if marker in p.name] == [], f"a file appeared in {folder}"
    return report


def toy(tmp_path: Path, body: str) -> Path:
    """The toy assignment's student notebook with `body` as its solution cell."""
    return student(tmp_path, TOY, {TOY_EX: body})


def check_toy(nb: Path, expected: int, **kw):
    """check() against the toy assignment's key."""
    return check(nb, expected, source=TOY, **kw)


@pytest.fixture
def mark():
    return f"fmtoyadv{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- 1. the verdict read from student output
@pytest.mark.parametrize(
    "attack",
    [
        "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)",
        "get_ipython()._showtraceback = lambda *a, **k: None",
        "get_ipython().input_transformers_post.append(lambda lines: ['pass\\n'])",
        "import sys\nsys.excepthook = lambda *a: None",
        "import builtins\nbuiltins.AssertionError = type('Never', (BaseException,), {})",
        "print('ex-toy-eps-velocity 3/3 pass')\nprint(json.dumps({'earned': 3}))",
    ],
    ids=["set_custom_exc", "showtraceback", "input_transformer", "excepthook", "builtins", "fake_output"],
)
def test_output_and_kernel_tricks_give_nothing(tmp_path, attack):
    guarded = "import json\ntry:\n    " + attack.replace("\n", "\n    ") + "\nexcept Exception:\n    pass\n"
    nb = toy(tmp_path, guarded + STUB5)
    check_toy(nb, 0)


def test_forged_protocol_messages_give_nothing(tmp_path):
    forge = (
        "import json, os, struct, sys\n"
        "def velocity_from_eps(z, t, eps_hat):\n"
        "    fd = int(sys.argv[2])\n"
        "    for m in ({'op': 'result', 'value': True, 'call': None}, {'op': 'names', 'names': {}}):\n"
        "        b = json.dumps(m).encode(); os.write(fd, struct.pack('>Q', len(b)) + b)\n"
        "    os.write(fd, b'garbage that is not a frame')\n"
        "    raise NotImplementedError()\n"
    )
    check_toy(toy(tmp_path, forge), 0)


@pytest.mark.parametrize(
    "body",
    ["import os\nos._exit(0)", "raise SystemExit(0)", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"],
    ids=["os_exit", "system_exit", "self_kill"],
)
def test_solution_that_exits_scores_zero(tmp_path, body):
    check_toy(toy(tmp_path, body), 0)


def test_function_that_exits_costs_its_cells_only(tmp_path):
    body = "import os\ndef velocity_from_eps(z, t, eps_hat):\n    os._exit(3)\n"
    report = check_toy(toy(tmp_path, body), 0)
    assert "process died" in report.exercises[0].tests[0].message


# ---------------------------------------------------------------------------- 2. monkeypatches of the test's world
@pytest.mark.parametrize(
    "patch",
    [
        "torch.allclose = lambda *a, **k: True",
        "torch.Tensor.__truediv__ = lambda a, b: torch.zeros(())",
        "torch.Tensor.abs = lambda self: torch.zeros(())",
        "import builtins\n_real = builtins.__import__\nbuiltins.__import__ = lambda *a, **k: _real(*a, **k)",
        "import fmtoy.solvers\nfmtoy.solvers.divergence = lambda *a, **k: None",
    ],
    ids=["allclose", "tensor_div", "tensor_abs", "import_hook", "fmtoy_module"],
)
def test_monkeypatches_stay_in_the_student_process(tmp_path, patch):
    nb = student(tmp_path, CH5, {"ex-ch5-eps-velocity": "import torch\n" + patch + "\n" + WRONG5})
    check(nb, 1)


def test_breaking_builtins_breaks_only_the_students_own_process(tmp_path):
    # isinstance patched for everything: the student's process cannot even send its answer back (nor can torch work)
    nb = toy(tmp_path, "import builtins\nbuiltins.isinstance = lambda *a: True\n" + WRONG5)
    report = check_toy(nb, 0)
    assert "process died" in report.exercises[0].solution_error, report.table()


def test_monkeypatched_divergence_keeps_honest_partial_credit(tmp_path):
    patch = (
        "import torch\nimport fmtoy.solvers\n"
        "torch.allclose = lambda *a, **k: True\n"
        "fmtoy.solvers.divergence = lambda velocity, x, t: torch.zeros(x.shape[0], dtype=x.dtype)\n"
        "def divergence_2d(velocity, x, t):\n    return torch.zeros(x.shape[0], dtype=x.dtype)\n"
    )
    check(student(tmp_path, CH1, {"ex-ch1-divergence": patch}), 1, source=CH1)


def test_lying_tensor_subclass_is_just_its_numbers(tmp_path):
    liar = (
        "import torch\n"
        "class Liar(torch.Tensor):\n"
        "    @classmethod\n"
        "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
        "        if func is torch.allclose:\n            return True\n"
        "        return super().__torch_function__(func, types, args, kwargs or {})\n"
        "    def __eq__(self, other):\n        return True\n"
        "def velocity_from_eps(z, t, eps_hat):\n    return (z - eps_hat).as_subclass(Liar)\n"
    )
    check(student(tmp_path, CH5, {"ex-ch5-eps-velocity": liar}), 1)


def test_objects_that_compare_equal_to_anything_get_nothing(tmp_path):
    body = (
        "class Yes:\n    def __eq__(self, o): return True\n    def __bool__(self): return True\n"
        "    shape = (8, 2)\n    dtype = None\n"
        "def velocity_from_eps(z, t, eps_hat):\n    return Yes()\n"
    )
    check_toy(toy(tmp_path, body), 0)


def test_exceptions_named_like_passing_do_not_pass(tmp_path):
    body = (
        "class StopIteration(Exception): pass\n"
        "def velocity_from_eps(z, t, eps_hat):\n    raise StopIteration('passed')\n"
    )
    check_toy(toy(tmp_path, body), 0)


# -------------------------------------------------------------------------------------------- 3. hangs and floods
@pytest.mark.parametrize(
    "body",
    [
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "while True:\n    pass",
        "import time\ntime.sleep(10_000)",
        "import threading\nthreading.Event().wait()",
    ],
    ids=["sigint_ignoring_loop", "sleep", "blocked_thread"],
)
def test_hanging_solution_is_killed_at_its_deadline(tmp_path, body):
    report = check_toy(toy(tmp_path, body), 0, timeout=HANG)
    assert "timed out" in report.exercises[0].solution_error


def test_hanging_function_is_killed_and_the_rest_still_graded(tmp_path):
    answers = {
        "ex-ch7-gaussian-kl": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "def gaussian_kl(mu, logvar):\n    while True:\n        pass\n",
        "ex-ch7-reparam": "def sample_z(mu, logvar, eps):\n    return mu + (0.5 * logvar).exp() * eps\n",
    }
    report = check(student(tmp_path, CH7, answers), 2, source=CH7, timeout=HANG)
    assert "timed out" in report.exercises[0].tests[0].message, report.table()


@needs_sandbox
def test_fork_bomb_is_contained(tmp_path, mark):
    body = (
        "import os, subprocess, time\n"
        "for _ in range(500):\n"
        "    try:\n"
        f"        subprocess.Popen(['sleep', '1000', '{mark}'], start_new_session=True)\n"
        "    except OSError:\n        break\n" + WRONG5
    )
    check_toy(toy(tmp_path, body), 1, marker=mark, tmp_path=tmp_path)


def test_memory_hog_fails_its_exercise_only(tmp_path):
    answers = {
        "ex-ch7-gaussian-kl": "def gaussian_kl(mu, logvar):\n    x = bytearray(64 * 2**30)\n    return x\n",
        "ex-ch7-reparam": "def sample_z(mu, logvar, eps):\n    return mu + (0.5 * logvar).exp() * eps\n",
    }
    check(student(tmp_path, CH7, answers), 2, source=CH7)


def test_huge_or_deep_replies_are_refused(tmp_path):
    answers = {
        "ex-ch7-gaussian-kl": "import torch\ndef gaussian_kl(mu, logvar):\n    return torch.zeros(40_000_000)\n",
        "ex-ch7-reparam": "def sample_z(mu, logvar, eps):\n    x = []\n    for _ in range(100_000):\n        x = [x]\n"
        "    return x\n",
    }
    check(student(tmp_path, CH7, answers), 0, source=CH7)


def test_cpu_burning_threads_are_killed(tmp_path, mark):
    body = (
        "import threading\n"
        "def burn():\n    while True:\n        pass\n"
        "for _ in range(4):\n    threading.Thread(target=burn, daemon=True).start()\n" + WRONG5
    )
    check_toy(toy(tmp_path, body), 1)


# ------------------------------------------------------------------------------------------------ 4. the answer key
@needs_sandbox
def test_answer_key_cannot_be_read(tmp_path):
    steal = (
        "import json, re\nfrom pathlib import Path\n"
        f"src = Path({str(BOOK_DIR / 'ch5_paths.md')!r}).read_text()\n"
        "code = re.search(r'def velocity_from_eps.*?### END SOLUTION', src, re.S).group(0)\n"
        "exec(code.replace('### BEGIN SOLUTION', '').replace('### END SOLUTION', ''))\n"
    )
    report = check(student(tmp_path, CH5, {"ex-ch5-eps-velocity": f"try:\n    exec({steal!r})\nexcept Exception:\n"
                                            f"    pass\n" + STUB5}), 0)  # fmt: skip
    assert report.exercises[0].solution_error == ""


@needs_sandbox
def test_answer_key_cannot_be_rewritten(tmp_path, mark):
    vandal = (
        "from pathlib import Path\nimport fmtoy.course.grade as g\n"
        f"for p in [Path({str(BOOK_DIR)!r}), g.BOOK_DIR, Path({str(tmp_path / 'source')!r})]:\n"
        "    for f in list(p.glob('*.md')) + list(p.glob('*.ipynb')):\n"
        "        try:\n"
        f"            f.write_text(f.read_text() + '\\n# {mark}\\n')\n"
        "        except OSError:\n            pass\n" + WRONG5
    )
    key = tmp_path / "source" / "ch5_paths.md"
    key.parent.mkdir()
    key.write_text(CH5.read_text())
    check(student(tmp_path, CH5, {"ex-ch5-eps-velocity": vandal}), 1, source=key, marker=mark, tmp_path=tmp_path)
    assert key.read_text() == CH5.read_text()


@needs_sandbox
def test_filesystem_hunt_finds_no_hidden_tests(tmp_path):
    hunt = (
        "import os\n"
        "def velocity_from_eps(z, t, eps_hat):\n"
        "    found = []\n"
        "    for top in ('/work', '/root', '/home', '/tmp', '/etc', '/srv', '/opt', '/mnt'):\n"
        "        for d, _, files in os.walk(top):\n"
        "            for f in files:\n"
        "                if f.endswith(('.md', '.ipynb')):\n"
        "                    try:\n"
        "                        if 'BEGIN ' + 'HIDDEN' in open(os.path.join(d, f), errors='ignore').read():\n"
        "                            found.append(os.path.join(d, f))\n"
        "                    except OSError:\n                        pass\n"
        "    raise NotImplementedError(repr(found))\n"
    )
    report = check(student(tmp_path, CH5, {"ex-ch5-eps-velocity": hunt}), 0)
    assert "NotImplementedError: []" in report.exercises[0].tests[0].message, report.table()


@needs_sandbox
def test_proc_shows_no_grader(tmp_path):
    spy = (
        "import os\n"
        "def velocity_from_eps(z, t, eps_hat):\n"
        "    seen = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "    envs = ' '.join(open(f'/proc/{p}/environ', errors='ignore').read() for p in ['self'])\n"
        '    raise NotImplementedError(f\'{seen} {os.getppid()} {"PYTEST" in envs} {"VIRTUAL_ENV" in envs}\')\n'
    )
    report = check_toy(toy(tmp_path, spy), 0)
    message = report.exercises[0].tests[0].message
    assert str(os.getpid()) not in message.split("]")[0] and "False False" in message, message


@needs_sandbox
def test_grader_process_cannot_be_signalled(tmp_path):
    body = (
        "import os, signal\n"
        f"for pid in ({os.getpid()}, {os.getppid()}, 1):\n"
        "    for sig in (signal.SIGSTOP, signal.SIGKILL):\n"
        "        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n" + WRONG5
    )
    check_toy(toy(tmp_path, body), 1)


def test_caller_frames_hold_no_tests(tmp_path):
    peek = (
        "import sys, gc\n"
        "def velocity_from_eps(z, t, eps_hat):\n"
        "    f, text = sys._getframe(), ''\n"
        "    while f is not None:\n        text += repr(f.f_locals)[:5000]\n        f = f.f_back\n"
        "    hits = [o for o in gc.get_objects() if isinstance(o, str) and 'assert ' in o and 'eps_hat' in o]\n"
        "    hits += ['frame'] if 'assert ' in text else []\n"
        "    raise NotImplementedError(str(len(hits)))\n"
    )
    report = check_toy(toy(tmp_path, peek), 0)
    assert report.exercises[0].tests[0].message == "NotImplementedError: 0", report.table()


# -------------------------------------------------------------------------------------------- 5. forged results
@needs_sandbox
def test_detached_process_cannot_rewrite_the_json(tmp_path, mark, capsys):
    out = tmp_path / "submission" / "ch5_paths.grade.json"
    forge = (
        "import os, time, json\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execvp('sh', ['sh', '-c', 'sleep 3; echo \\'{{\"earned\": 3}}\\' > {out}; sleep 1000 # {mark}'])\n"
        "    os._exit(0)\n" + STUB5
    )
    nb = student(tmp_path, CH5, {"ex-ch5-eps-velocity": forge})
    assert main(["grade", str(nb), "--json", str(out), "--timeout", str(TIMEOUT)]) == 0
    assert survivors(mark) == []
    time.sleep(4)
    assert json.loads(out.read_text())["earned"] == 0
    assert "0/3" in capsys.readouterr().out


def test_symlink_at_the_json_path_is_replaced_not_followed(tmp_path, capsys):
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    out = tmp_path / "grade.json"
    out.symlink_to(canary)
    nb = student(tmp_path, CH5, {"ex-ch5-eps-velocity": WRONG5})
    assert main(["grade", str(nb), "--json", str(out), "--timeout", str(TIMEOUT)]) == 0
    assert canary.read_text() == "keep me"
    assert not out.is_symlink() and json.loads(out.read_text())["earned"] == 1
    assert "symbolic link" in capsys.readouterr().err


@needs_sandbox
def test_writes_outside_scratch_fail(tmp_path, mark):
    body = (
        "import os\nfrom pathlib import Path\n"
        f"for p in [{str(tmp_path)!r}, {str(tmp_path / 'submission')!r}, '/tmp', os.path.expanduser('~'), '.',"
        f" {str(Path.home())!r}, {str(ROOT)!r}]:\n"
        "    try:\n"
        f"        Path(p, '{mark}.txt').write_text('{mark}')\n"
        "    except OSError:\n        pass\n" + WRONG5
    )
    check_toy(toy(tmp_path, body), 1, marker=mark, tmp_path=tmp_path)
    assert not (ROOT / f"{mark}.txt").exists()


def test_notebook_that_is_a_symlink_is_refused(tmp_path, capsys):
    key = tmp_path / "key.ipynb"
    nbformat.write(A.instructor_notebook(_chapter_nb(CH5)), key)
    nb = tmp_path / "ch5_paths.ipynb"
    nb.symlink_to(key)
    assert main(["grade", str(nb)]) == 2
    assert "symbolic link" in capsys.readouterr().err


def test_scratch_is_fresh_for_every_exercise(tmp_path):
    answers = {  # the first exercise leaves a torch.py and a marker behind; the second must not see them
        "ex-ch7-gaussian-kl": "open('torch.py', 'w').write('raise ImportError')\nopen('left', 'w').write('x')\n"
        "def gaussian_kl(mu, logvar):\n    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(dim=1)\n",
        "ex-ch7-reparam": "import os\nassert not os.path.exists('left')\n"
        "def sample_z(mu, logvar, eps):\n    return mu + (0.5 * logvar).exp() * eps\n",
    }
    check(student(tmp_path, CH7, answers), 5, source=CH7)


# -------------------------------------------------------------------------------- 6. the notebook choosing its key
def _set_chapter(value):
    def edit(nb):
        nb.metadata["fmtoy"]["chapter"] = value

    return edit


@pytest.mark.parametrize(
    "claimed",
    ["ch5_paths", "intro", "/etc/passwd", "../../book/ch5_paths", None, ["ch5_paths"]],
    ids=["other_chapter", "intro", "abs_path", "relative_path", "none", "list"],
)
def test_metadata_cannot_choose_the_answer_key(tmp_path, claimed):
    nb = student(tmp_path, CH1, {}, edit=_set_chapter(claimed))
    report = check(nb, 0, source=None)
    assert report.chapter == "ch1_continuity" and report.points == 6


def test_own_answer_key_in_metadata_is_ignored(tmp_path):
    fake = tmp_path / "mykey.md"
    text = CH5.read_text()
    fake.write_text(text.replace("assert ", "assert True or "))
    nb = student(tmp_path, CH5, {}, edit=_set_chapter(str(fake.with_suffix(""))))
    report = check(nb, 0, source=None)
    assert report.points == 3


def test_chapter_option_is_checked(tmp_path, capsys):
    nb = student(tmp_path, CH5, {})
    assert main(["grade", str(nb), "--chapter", "intro"]) == 2
    assert "no chapter 'intro'" in capsys.readouterr().err
    assert main(["grade", str(nb), "--chapter", "ch7_vrfm"]) == 2
    assert "none of chapter ch7_vrfm's exercises" in capsys.readouterr().err
    assert main(["grade", str(nb), "--chapter", "ch5_paths", "--timeout", str(TIMEOUT)]) == 0
    assert "0/3" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ 7. hidden tests
def _mini_key(tmp_path: Path, first: str, second: str) -> Path:
    """A one-exercise instructor notebook whose first test cell has hidden lines and whose second is visible."""
    cells = [
        nbformat.v4.new_markdown_cell("```{exercise} Double (code, 2 points)\n:label: ex-mini\n\nx\n```"),
        nbformat.v4.new_code_cell("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"),
        nbformat.v4.new_code_cell(first),
        nbformat.v4.new_code_cell(second),
    ]
    cells[1].metadata["exercise"] = "ex-mini"
    for c in cells[2:]:
        c.metadata.update(exercise="ex-mini", points=1)
    key = A.instructor_notebook(nbformat.v4.new_notebook(cells=cells, metadata={"fmtoy": {"chapter": "mini"}}))
    path = tmp_path / "key" / "mini.ipynb"
    path.parent.mkdir(exist_ok=True)
    nbformat.write(key, path)
    return path


def _mini_student(tmp_path: Path, key: Path, answer: str) -> Path:
    nb = A.student_notebook(nbformat.read(key, as_version=4))
    for c in nb.cells:
        if c.metadata.get("nbgrader", {}).get("solution"):
            c.source = answer
    path = tmp_path / "submission" / "mini.ipynb"
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


SECRET = "the_secret_value_4711"


def test_hidden_values_cannot_be_carried_into_a_visible_message(tmp_path):
    key = _mini_key(
        tmp_path,
        f"assert double(1) == 2\n### BEGIN HIDDEN TESTS\nassert double('{SECRET}') == '{SECRET}' * 2, '{SECRET}'\n"
        "### END HIDDEN TESTS",
        "assert double(3) == 6, 'visible'",
    )
    stash = (
        "import os, tempfile\nfrom pathlib import Path\n"
        "SEEN = []\n"
        "def double(x):\n"
        "    for p in ('stash', '/tmp/stash'):\n"
        "        if os.path.exists(p):\n"
        "            raise ValueError(Path(p).read_text())\n"
        "    if SEEN:\n        raise ValueError(repr(SEEN))\n"
        "    if isinstance(x, str):\n"
        "        SEEN.append(x)\n"
        "        for p in ('stash', '/tmp/stash'):\n"
        "            Path(p).write_text(x)\n"
        "        return 'wrong'\n"
        "    return 2 * x\n"
    )
    report = check(_mini_student(tmp_path, key, stash), 1, source=key)
    seen = report.table() + report.to_json()
    assert SECRET not in seen and HIDDEN_FAILED in seen, seen


def test_hidden_failures_say_only_hidden_test_failed(tmp_path):
    key = _mini_key(
        tmp_path,
        f"assert double(1) == 2\n### BEGIN HIDDEN TESTS\nassert double(-1) == -2, '{SECRET} in a message'\n"
        "### END HIDDEN TESTS",
        f"### BEGIN HIDDEN TESTS\nassert double(0.5) == 1.0, '{SECRET}'\n### END HIDDEN TESTS",
    )
    echo = "def double(x):\n    if x < 0 or x == 0.5:\n        raise ValueError(repr(x))\n    return 2 * x\n"
    nb = _mini_student(tmp_path, key, echo)
    report = check(nb, 0, source=key)
    assert [t.message for t in report.exercises[0].tests] == [HIDDEN_FAILED, HIDDEN_FAILED]
    table = report.table().replace(str(nb), "NOTEBOOK")  # the path may hold '-1' (pytest-1)
    assert SECRET not in report.to_json() and "-1" not in table and "0.5" not in table


def test_grade_paths_are_not_leaked_to_the_student(tmp_path):
    key = _mini_key(tmp_path, "assert double(1) == 2", "assert double(3) == 6")
    spy = (
        "import os, sys\n"
        "def double(x):\n"
        "    raise ValueError(' '.join(sys.argv) + ' ' + open('/proc/self/cmdline').read() + str(dict(os.environ)))\n"
    )
    report = check(_mini_student(tmp_path, key, spy), 0, source=key)
    assert str(key.parent) not in report.to_json()


def test_messages_are_truncated(tmp_path):
    body = "def velocity_from_eps(z, t, eps_hat):\n    raise ValueError('x' * 100_000)\n"
    report = check_toy(toy(tmp_path, body), 0)
    assert all(len(t.message) <= 500 for t in report.exercises[0].tests)


# --------------------------------------------------------------------------------------------- 8. malformed notebooks
def _meta_edit(fn):
    def edit(nb):
        for c in nb.cells:
            if c.metadata.get("nbgrader", {}).get("solution"):
                fn(c)
                break

    return edit


@pytest.mark.parametrize(
    "edit, line",
    [
        (_meta_edit(lambda c: c.metadata["nbgrader"].pop("grade_id")), "solution cell missing its grade_id"),
        (_meta_edit(lambda c: c.metadata.__setitem__("nbgrader", "solution")), "nbgrader metadata is not an object"),
        (_meta_edit(lambda c: c.metadata.__setitem__("nbgrader", ["solution"])), "nbgrader metadata is not an object"),
        (
            lambda nb: nb.cells.insert(0, nbformat.v4.new_code_cell("x", metadata=next(
                c.metadata for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")))),
            "appears 2 times",
        ),
        (_meta_edit(lambda c: c.metadata["nbgrader"].__setitem__("grade_id", "other")), "no solution cell"),
    ],
    ids=["no_grade_id", "nbgrader_string", "nbgrader_list", "duplicate", "renamed"],
)  # fmt: skip
def test_malformed_solution_cells_give_one_line_and_zero(tmp_path, edit, line):
    answers = {
        "ex-ch7-gaussian-kl": "def gaussian_kl(mu, logvar):\n    return 0.5 * (logvar.exp() + mu.square() - 1.0"
        " - logvar).sum(dim=1)\n",
        "ex-ch7-reparam": "def sample_z(mu, logvar, eps):\n    return mu + (0.5 * logvar).exp() * eps\n",
    }
    report = check(student(tmp_path, CH7, answers, edit=edit), 2, source=CH7)
    first = report.exercises[0]
    assert first.earned == 0 and line in first.solution_error and first.label in first.solution_error, report.table()


@pytest.mark.parametrize(
    "mangle, note",
    [
        (lambda d: d.pop("cells"), "no list of cells"),
        (lambda d: d["cells"][0].pop("metadata"), None),
        (lambda d: d["metadata"].__setitem__("fmtoy", "ch5_paths"), None),
        (lambda d: d.__setitem__("cells", "nope"), "no list of cells"),
    ],
    ids=["no_cells", "cell_without_metadata", "fmtoy_string", "cells_string"],
)
def test_malformed_notebooks_never_raise(tmp_path, mangle, note):
    nb = student(tmp_path, CH5, {"ex-ch5-eps-velocity": WRONG5})
    data = json.loads(nb.read_text())
    mangle(data)
    nb.write_text(json.dumps(data))
    report = check(nb, 0 if note else 1, source=CH5)
    if note:
        assert any(note in n for n in report.notes) or note in report.exercises[0].solution_error, report.table()


def test_not_json_is_one_line(tmp_path, capsys):
    nb = tmp_path / "ch5_paths.ipynb"
    nb.write_text("{ this is not json")
    report = grade(nb, CH5, timeout=TIMEOUT)
    assert report.earned == 0 and "not valid JSON" in report.table()
    assert main(["grade", str(nb)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot tell which chapter" in err


def test_percent_reset_in_a_comment_is_fine_and_source_lists_work(tmp_path):
    nb = student(tmp_path, CH5, {"ex-ch5-eps-velocity": "# %reset -f would have broken the old grader\n" + RIGHT5})
    data = json.loads(nb.read_text())
    for c in data["cells"]:
        c["source"] = c["source"].splitlines(keepends=True) if isinstance(c["source"], str) else c["source"]
    nb.write_text(json.dumps(data))
    check(nb, 3)


# ------------------------------------------------------------------------------------------- without the sandbox
def test_without_bubblewrap_it_still_grades_and_says_so(tmp_path):
    report = check(student(tmp_path, CH5, {"ex-ch5-eps-velocity": "import torch\ntorch.allclose = None\n" + WRONG5}),
                   1, sandbox="off")  # fmt: skip
    assert report.sandbox.startswith("NO SANDBOX") and "warning: NO SANDBOX" in report.table()


def test_the_students_process_preloads_what_the_answer_key_imports():
    from fmtoy.course.grade import _preload

    for chapter, expected in ((CH5, ("torch",)), (CH1, ("torch",)), (TOY, ())):
        key = _chapter_nb(chapter)
        assert {_preload(key, ex) for ex in A.graded_exercises(key)} == {expected}, chapter.name


def test_a_checkout_under_tmp_stays_visible_in_the_sandbox(tmp_path):
    # the private /tmp is mounted first: a venv or checkout under /tmp (a fresh clone there) is bound on top of it
    from fmtoy.course.sandbox import bwrap_command

    cmd, _ = bwrap_command("bwrap", tmp_path, [])
    tmpfs = [i for i in range(len(cmd) - 1) if cmd[i : i + 2] == ["--tmpfs", "/tmp"]]
    binds = [i for i in range(len(cmd)) if cmd[i] in ("--bind", "--ro-bind")]
    assert len(tmpfs) == 1 and tmpfs[0] < min(binds[1:]), cmd  # after /usr, before every other bind
