"""Autograder: run a student's solution cells in a process of its own and the instructor's tests, visible and hidden,
in the grader's; score each exercise.

The trust boundary (details on the instructors page and in :mod:`fmtoy.course.sandbox`):

* the student's notebook contributes only its solution cells (matched by nbgrader ``grade_id``); every test cell and
  the chapter come from the instructor's side (``source``, ``chapter``, or the book chapter whose exercise ids the
  notebook holds; never a path from the student's metadata);
* each exercise's solution runs in a fresh student process (inside bubblewrap where installed: no view of the book,
  the instructor notebook or the grader's files, no network, resource limits, killed with everything it started at
  its deadline); the names it defines become proxies in the test cells' namespace, which lives in the grader;
* the student's process sends back only plain data (JSON; tensors and arrays as raw bytes), so nothing it does can
  change how a test is judged; a test cell passes when it runs to the end without raising;
* a failing hidden test reports "hidden test failed", never its text; results are returned after every student
  process is dead, and the CLI writes the JSON atomically (a rename, which replaces a symlink instead of following
  it).

Malformed notebooks cost the exercise concerned (score 0 and one line saying what is wrong), never a traceback.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .assignments import (
    BEGIN_HIDDEN,
    END_HIDDEN,
    AssignmentError,
    graded_chapters,
    graded_exercises,
    instructor_notebook,
    read_chapter,
)

BOOK_DIR = Path(__file__).resolve().parents[2] / "book"  # fmtoy/course/grade.py -> the checkout's book/
MAX_NOTEBOOK_BYTES = 64 * 2**20
HIDDEN_FAILED = "hidden test failed"
CHAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


@dataclass
class TestResult:
    """One test cell: its nbgrader id, points, whether it passed and the failing message."""

    grade_id: str
    points: int
    passed: bool
    message: str = ""


@dataclass
class ExerciseScore:
    """One exercise: points earned out of its points, and its test cells."""

    label: str
    title: str
    points: int
    earned: int
    tests: list[TestResult] = field(default_factory=list)
    solution_error: str = ""


@dataclass
class GradeReport:
    """The grade of one notebook: per-exercise scores and totals, how student code was isolated, and notes on the
    notebook itself (malformed cells)."""

    notebook: str
    chapter: str
    exercises: list[ExerciseScore]
    sandbox: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def points(self) -> int:
        return sum(e.points for e in self.exercises)

    @property
    def earned(self) -> int:
        return sum(e.earned for e in self.exercises)

    def to_dict(self) -> dict:
        return {
            "notebook": self.notebook,
            "chapter": self.chapter,
            "earned": self.earned,
            "points": self.points,
            "exercises": [asdict(e) for e in self.exercises],
            "notes": list(self.notes),
            "sandbox": self.sandbox,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text score table: one row per exercise, then the failing messages."""
        rows = [("exercise", "points", "result"), ("-" * 8, "-" * 6, "-" * 6)]
        notes = list(self.notes)
        for e in self.exercises:
            result = "pass" if e.earned == e.points else ("partial" if e.earned else "fail")
            rows.append((e.label, f"{e.earned}/{e.points}", result))
            if e.solution_error:
                notes.append(f"{e.label}: solution cell: {e.solution_error}")
            notes += [f"{e.label}: {t.grade_id} ({t.points} pt): {t.message}" for t in e.tests if not t.passed]
        rows.append(("total", f"{self.earned}/{self.points}", ""))
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
        head = [f"{self.chapter}: {self.notebook}"]
        if self.sandbox.startswith("NO SANDBOX"):
            head.append(f"warning: {self.sandbox}")
        return "\n".join([*head, *lines, *(["", "failures:"] + notes if notes else [])])


# ------------------------------------------------------------------------------------------- the student's notebook
@dataclass
class Submission:
    """What a student's notebook holds: its solution cells by grade_id and what is wrong with them."""

    answers: dict[str, list[str]] = field(default_factory=dict)  # grade_id -> sources (more than one: duplicated)
    labels: set[str] = field(default_factory=set)  # exercise labels the notebook's graded cells name
    problems: dict[str, str] = field(default_factory=dict)  # exercise label -> what is wrong with its solution
    notes: list[str] = field(default_factory=list)  # problems not tied to one exercise
    chapter: str | None = None  # what its metadata claims (a name; only a tiebreak)


def _label_of(grade_id: str) -> str:
    return grade_id.rsplit("-solution", 1)[0] if "-solution" in grade_id else grade_id.rsplit("-test", 1)[0]


def _text(source) -> str | None:
    if isinstance(source, str):
        return source
    if isinstance(source, list) and all(isinstance(s, str) for s in source):
        return "".join(source)
    return None


def read_submission(path: Path) -> Submission:
    """The solution cells of a student's notebook, read as plain JSON (no validation that could raise): whatever is
    malformed becomes a problem of the exercise it belongs to, or a note."""
    sub = Submission()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ValueError(
            f"cannot open {path}: {e.strerror}" + (" (a symbolic link?)" if path.is_symlink() else "")
        ) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        raw = f.read(MAX_NOTEBOOK_BYTES + 1)
    if len(raw) > MAX_NOTEBOOK_BYTES:
        sub.notes.append(f"the notebook is larger than {MAX_NOTEBOOK_BYTES // 2**20} MiB; not graded")
        return sub
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        sub.notes.append(f"the notebook is not valid JSON ({str(e)[:100]}); not graded")
        return sub
    if not isinstance(data, dict):
        sub.notes.append("the notebook is not a JSON object; not graded")
        return sub
    meta = data.get("metadata")
    fm = meta.get("fmtoy") if isinstance(meta, dict) else None
    if isinstance(fm, dict) and isinstance(fm.get("chapter"), str) and CHAPTER_NAME.match(fm["chapter"]):
        sub.chapter = fm["chapter"]
    cells = data.get("cells")
    if not isinstance(cells, list):
        sub.notes.append("the notebook has no list of cells; not graded")
        return sub
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict):
            continue
        cmeta = cell.get("metadata")
        if not isinstance(cmeta, dict):
            continue
        label = cmeta.get("exercise") if isinstance(cmeta.get("exercise"), str) else None
        if label:
            sub.labels.add(label)
        nbg = cmeta.get("nbgrader")
        if nbg is None:
            continue
        if not isinstance(nbg, dict):
            if label:
                sub.problems.setdefault(label, f"exercise {label}: cell {i}'s nbgrader metadata is not an object")
            continue
        grade_id = nbg.get("grade_id")
        if isinstance(grade_id, str):
            sub.labels.add(_label_of(grade_id))
            label = label or _label_of(grade_id)
        if nbg.get("solution") is not True:
            continue
        if not isinstance(grade_id, str):
            if label:
                sub.problems.setdefault(label, f"exercise {label}: solution cell missing its grade_id")
            else:
                sub.notes.append(f"cell {i}: a solution cell without grade_id or exercise label; ignored")
            continue
        source = _text(cell.get("source"))
        if source is None or cell.get("cell_type") != "code":
            sub.problems.setdefault(label, f"exercise {label}: solution cell {grade_id} is not a code cell with text")
            continue
        sub.answers.setdefault(grade_id, []).append(source)
    return sub


# --------------------------------------------------------------------------------------------- the instructor's key
def book_chapters(book_dir: Path = BOOK_DIR) -> dict[str, tuple[Path, set[str]]]:
    """stem -> (chapter .md, its exercise labels) for the book's chapters with graded exercises."""
    return {path.stem: (path, {ex.label for ex in exs}) for path, exs in graded_chapters(book_dir).items()}


def _instructor_source(sub: Submission, source, chapter: str | None):
    """The instructor notebook to grade against. The instructor chooses it: `source` (a chapter .md, an instructor
    .ipynb or a notebook object), or `chapter` (a name checked against the book), or else the one book chapter whose
    exercise ids the notebook holds. Nothing in the student's notebook is ever used as a path."""
    import nbformat

    if source is not None:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.suffix == ".md":
                return instructor_notebook(read_chapter(path))
            if path.suffix == ".ipynb":
                if not path.is_file():
                    raise FileNotFoundError(f"no instructor notebook at {path}")
                return nbformat.read(path, as_version=4)
            raise ValueError(f"source must be a chapter .md or an instructor .ipynb, got {path.name!r}")
        return source
    chapters = book_chapters()
    if chapter is not None:
        if chapter not in chapters:
            raise ValueError(
                f"no chapter {chapter!r} with graded exercises in the book (chapters: {', '.join(chapters)})"
            )
        if sub.labels and not sub.labels & chapters[chapter][1]:
            raise ValueError(f"this notebook holds none of chapter {chapter}'s exercises; is it another chapter's?")
    else:
        matches = [stem for stem, (_, labels) in chapters.items() if labels & sub.labels]
        if len(matches) == 1:
            chapter = matches[0]
        elif sub.chapter in matches:
            chapter = sub.chapter
        else:
            raise ValueError(
                "cannot tell which chapter this notebook is: it does not name its chapter by exercise ids of one book "
                "chapter; pass --chapter NAME or --source (the instructor notebook or the chapter .md)"
            )
    return instructor_notebook(read_chapter(chapters[chapter][0]))


# ------------------------------------------------------------------------------------------------------ grading
def _hidden_lines(source: str) -> set[int]:
    lines, inside = set(), False
    for n, line in enumerate(source.splitlines(), start=1):
        s = line.strip()
        if s in (BEGIN_HIDDEN, END_HIDDEN):
            inside = s == BEGIN_HIDDEN
            lines.add(n)
        elif inside:
            lines.add(n)
    return lines


def _message(exc: BaseException) -> str:
    from .sandbox import StudentError

    kind = exc.kind if isinstance(exc, StudentError) else type(exc).__name__
    text = str(exc).strip().splitlines()
    if kind in ("Timeout", "ProcessDied"):
        return (text[0] if text else kind)[:500]
    return f"{kind}: {text[0] if text else ''}"[:500]


def _failing_line(exc: BaseException, filename: str) -> int | None:
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def sandbox_mode(sandbox: str) -> str | None:
    """The bwrap executable to use ('auto': if available; 'require': error without it; 'off': none)."""
    from .sandbox import find_bwrap

    if sandbox not in ("auto", "require", "off"):
        raise ValueError(f"sandbox must be 'auto', 'require' or 'off', got {sandbox!r}")
    if os.environ.get("FMTOY_REQUIRE_SANDBOX") == "1" and sandbox == "auto":
        sandbox = "require"
    if sandbox == "off":
        return None
    bwrap = find_bwrap()
    if bwrap is None and sandbox == "require":
        raise RuntimeError(
            "bubblewrap (bwrap) is required (FMTOY_REQUIRE_SANDBOX=1 or sandbox='require') but not available; "
            "install Debian's bubblewrap package"
        )
    return bwrap


def _preload(instructor, ex) -> tuple[str, ...]:
    """The heavy modules (sandbox.PRELOADABLE) that the answer key's cells of exercise `ex` import: the student's
    process imports them before the student's code runs, so that their import time is not billed to the student."""
    from .sandbox import PRELOADABLE

    found: set[str] = set()
    for i in [*ex.solution_cells, *ex.test_cells]:
        source = _text(instructor.cells[i].source) or ""
        try:
            tree = ast.parse(source)
        except SyntaxError:
            found.update(m for m in PRELOADABLE if re.search(rf"\b(import|from)\s+{m}\b", source))
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return tuple(m for m in PRELOADABLE if m in found)


class _Exercise:
    """Grades one exercise: solution in a fresh student process, test cells here."""

    def __init__(self, ex, instructor, sources: list[str], *, notebook: Path, workdir: Path, timeout, limits, bwrap,
                 hide):  # fmt: skip
        self.ex, self.instructor, self.sources = ex, instructor, sources
        self.notebook, self.workdir, self.timeout = notebook, workdir, timeout
        self.limits, self.bwrap, self.hide = limits, bwrap, hide
        self.proc = None
        self.fatal = ""  # the solution itself timed out or killed its process: no test can run

    def start(self) -> tuple[dict, str]:
        from .sandbox import StudentError, StudentGone, StudentProcess

        scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=self.workdir))
        try:
            shutil.copyfile(self.notebook, scratch / self.notebook.name, follow_symlinks=False)
        except OSError:
            pass
        self.proc = StudentProcess(scratch, limits=self.limits, bwrap=self.bwrap, hide=self.hide,
                                   preload=_preload(self.instructor, self.ex))  # fmt: skip
        names, error = {}, ""
        for k, source in enumerate(self.sources):
            self.proc.deadline, self.proc.timeout_s = time.monotonic() + self.timeout, self.timeout
            try:
                got, err = self.proc.run_solution(source, f"<solution {self.ex.label} {k + 1}>")
            except StudentGone as e:
                self.fatal = f"not run: the solution cell {_message(e)}"
                return names, self.fatal.removeprefix("not run: the solution cell ")
            except StudentError as e:
                got, err = {}, _message(e)
            names.update(got)
            error = error or err
        return names, error

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.close()
            self.proc = None

    def run(self) -> ExerciseScore:
        from .sandbox import StudentError

        ex = self.ex
        tests: list[TestResult] = []
        namespace = {"__name__": "__fmtoy_test__", "__builtins__": builtins}
        solution_error, fresh_needed = "", True
        try:
            for k, (i, points) in enumerate(zip(ex.test_cells, ex.test_points)):
                grade_id = f"{ex.label}-test{k + 1}"
                if fresh_needed and not self.fatal:
                    self.stop()
                    try:
                        names, err = self.start()
                    except StudentError as e:  # the process did not start
                        names, err = {}, _message(e)
                        self.fatal = f"not run: {err}"
                    solution_error = solution_error or err
                    namespace.update(names)
                    fresh_needed = False
                if self.fatal:
                    tests.append(TestResult(grade_id, points, False, self.fatal))
                    continue
                source = self.instructor.cells[i].source
                hidden = _hidden_lines(source)
                filename = f"<test {grade_id}>"
                self.proc.deadline, self.proc.timeout_s = time.monotonic() + self.timeout, self.timeout
                before = self.proc.dead
                message = ""
                try:
                    exec(compile(source, filename, "exec"), namespace)
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # noqa: BLE001  a failing test: any exception, SystemExit included
                    message = _message(e)
                    line = _failing_line(e, filename)
                    if hidden and (line is None or line in hidden):
                        message = HIDDEN_FAILED
                if self.proc.dead != before and self.proc.dead not in (None, "closed"):
                    message = message or self.proc.dead  # the test caught the error; the process is gone all the same
                    if hidden and message != self.proc.dead:
                        message = HIDDEN_FAILED
                tests.append(TestResult(grade_id, points, message == "", message))
                # a process that saw hidden tests could echo them in a later visible message: start afresh
                fresh_needed = bool(hidden) or bool(self.proc.dead)
        finally:
            self.stop()
        earned = sum(t.points for t in tests if t.passed)
        return ExerciseScore(ex.label, ex.title, ex.points, earned, tests, solution_error)


def grade(
    notebook: str | Path,
    source=None,
    *,
    chapter: str | None = None,
    timeout: float = 60.0,
    limits=None,
    sandbox: str = "auto",
    book_dir: Path | None = None,
) -> GradeReport:
    """Grade a filled-in student notebook: each exercise's solution cells (the student's) in a fresh student process,
    then its test cells (the instructor's) here; `timeout` seconds per cell (the solution and each test cell).

    `source`/`chapter` choose the answer key (see _instructor_source); `limits` (sandbox.Limits) the student
    process's memory, CPU time, processes and file size; `sandbox` 'auto' | 'require' | 'off' (bubblewrap)."""
    from .sandbox import Limits, protections

    started = time.monotonic()
    if os.name != "posix":
        raise RuntimeError("fmtoy grade needs Linux (with bubblewrap) or macOS: Windows is not supported yet")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    path = Path(notebook)
    if not path.is_file() and not path.is_symlink():
        raise FileNotFoundError(f"no notebook at {path}")
    bwrap = sandbox_mode(sandbox)
    limits = limits or Limits.for_timeout(timeout)
    sub = read_submission(path)
    instructor = _instructor_source(sub, source, chapter)
    try:
        exercises = graded_exercises(instructor)
    except AssignmentError as e:
        raise ValueError(f"the instructor notebook's markup is inconsistent: {e}") from None
    name = instructor.metadata.get("fmtoy", {}).get("chapter", path.stem)
    hide = [book_dir or BOOK_DIR, path.resolve().parent]
    if isinstance(source, (str, Path)):
        hide.append(Path(source).resolve().parent)
    scores: list[ExerciseScore] = []
    with tempfile.TemporaryDirectory(prefix="fmtoy-grade-") as workdir:
        for ex in exercises:
            ids = [instructor.cells[i].metadata.get("nbgrader", {}).get("grade_id") for i in ex.solution_cells]
            problem = sub.problems.get(ex.label)
            if problem is None:
                if not sub.answers and sub.notes:
                    problem = f"exercise {ex.label}: not graded ({sub.notes[0]})"
                else:
                    missing = [g for g in ids if g not in sub.answers]
                    twice = [g for g in ids if len(sub.answers.get(g, [])) > 1]
                    if twice:
                        problem = (
                            f"exercise {ex.label}: solution cell {twice[0]} appears {len(sub.answers[twice[0]])} times"
                        )
                    elif missing:
                        problem = (
                            f"exercise {ex.label}: no solution cell {missing[0]} (deleted, or its grade_id changed)"
                        )
            if problem is not None:
                tests = [
                    TestResult(f"{ex.label}-test{k + 1}", p, False, "not run: see the solution cell")
                    for k, p in enumerate(ex.test_points)
                ]
                scores.append(ExerciseScore(ex.label, ex.title, ex.points, 0, tests, problem))
                continue
            sources = [sub.answers[g][0] for g in ids]
            runner = _Exercise(
                ex, instructor, sources, notebook=path, workdir=Path(workdir), timeout=timeout, limits=limits,
                bwrap=bwrap, hide=hide,
            )  # fmt: skip
            scores.append(runner.run())
        _chmod_tree(Path(workdir))
    notes = [n for n in sub.notes if sub.answers or not n.endswith("not graded")] if sub.answers else sub.notes[:1]
    return GradeReport(str(path), name, scores, protections(bwrap), notes, round(time.monotonic() - started, 2))


def _chmod_tree(root: Path) -> None:
    """Make the scratch folders removable (a student may have made its files read-only)."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass
