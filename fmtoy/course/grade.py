"""Autograder: run a student's solution cells against the instructor's (hidden) tests and score each exercise.

The student's notebook only contributes its solution cells (matched by nbgrader ``grade_id``); every test cell
comes from the instructor version, so editing or deleting a test in the student copy changes nothing. Each test
cell is worth its ``points``; a cell that raises, times out or kills the kernel scores 0 and the grader goes on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .assignments import graded_exercises, instructor_notebook, read_chapter

BOOK_DIR = Path(__file__).resolve().parents[2] / "book"  # fmtoy/course/grade.py -> the checkout's book/


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
    """The grade of one notebook: per-exercise scores and totals."""

    notebook: str
    chapter: str
    exercises: list[ExerciseScore]

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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text score table: one row per exercise, then the failing messages."""
        rows = [("exercise", "points", "result"), ("-" * 8, "-" * 6, "-" * 6)]
        notes = []
        for e in self.exercises:
            result = "pass" if e.earned == e.points else ("partial" if e.earned else "fail")
            rows.append((e.label, f"{e.earned}/{e.points}", result))
            if e.solution_error:
                notes.append(f"{e.label}: solution cell: {e.solution_error}")
            notes += [f"{e.label}: {t.grade_id} ({t.points} pt): {t.message}" for t in e.tests if not t.passed]
        rows.append(("total", f"{self.earned}/{self.points}", ""))
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
        return "\n".join([f"{self.chapter}: {self.notebook}", *lines, *(["", "failures:"] + notes if notes else [])])


def _error_message(outputs: list) -> str:
    """'Name: value' of the first error output of a cell ('' when it ran cleanly)."""
    for out in outputs:
        if out.get("output_type") == "error":
            value = str(out.get("evalue", "")).strip().splitlines()
            return f"{out.get('ename', 'Error')}: {value[0] if value else ''}"[:500]
    return ""


def _instructor_source(student, source):
    """The instructor notebook to grade against: `source` (a chapter .md, an instructor .ipynb or a notebook) or,
    by default, the book chapter named in the student's metadata."""
    import nbformat

    if source is None:
        chapter = student.metadata.get("fmtoy", {}).get("chapter")
        if not chapter:
            raise ValueError(
                "this notebook does not name its chapter (metadata fmtoy.chapter); pass source= the "
                "instructor notebook (assignments/source/<chapter>/<chapter>.ipynb) or the chapter .md"
            )
        source = BOOK_DIR / f"{chapter}.md"
        if not source.is_file():
            raise FileNotFoundError(f"chapter {chapter!r} not found at {source}; pass source= the instructor notebook")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".md":
            return instructor_notebook(read_chapter(path))
        if path.suffix == ".ipynb":
            return nbformat.read(path, as_version=4)
        raise ValueError(f"source must be a chapter .md or an instructor .ipynb, got {path.name!r}")
    return source


def grade(
    notebook: str | Path, source: str | Path | None = None, *, timeout: float = 60.0, kernel_name: str = "python3"
) -> GradeReport:
    """Grade a filled-in student notebook: every exercise's solution cells (the student's) then its test cells (the
    instructor's), each exercise in a fresh namespace; `timeout` seconds per cell."""
    import nbformat

    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    path = Path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    student = nbformat.read(path, as_version=4)
    instructor = _instructor_source(student, source)
    chapter = instructor.metadata.get("fmtoy", {}).get("chapter", path.stem)
    answers = {
        c.metadata["nbgrader"]["grade_id"]: c.source
        for c in student.cells
        if c.metadata.get("nbgrader", {}).get("solution")
    }
    exercises = graded_exercises(instructor)

    # One notebook: per exercise, a namespace reset, the student's solution cells, the instructor's test cells.
    cells, plan = [], []
    for ex in exercises:
        cells.append(nbformat.v4.new_code_cell("%reset -f"))
        sol_idx = []
        for i in ex.solution_cells:
            grade_id = instructor.cells[i].metadata["nbgrader"]["grade_id"]
            missing = "raise NotImplementedError('no answer: the solution cell was deleted or renamed')"
            sol_idx.append(len(cells))
            cells.append(nbformat.v4.new_code_cell(answers.get(grade_id, missing)))
        test_idx = []
        for i in ex.test_cells:
            test_idx.append(len(cells))
            cells.append(nbformat.v4.new_code_cell(instructor.cells[i].source))
        plan.append((ex, sol_idx, test_idx))
    run = nbformat.v4.new_notebook(
        cells=cells, metadata={"kernelspec": {"name": kernel_name, "display_name": kernel_name}}
    )
    executed = _execute(run, timeout, kernel_name, cwd=path.parent)

    scores = []
    for ex, sol_idx, test_idx in plan:
        sol_error = next((m for m in (executed.get(i, "not run") for i in sol_idx) if m), "")
        tests = []
        for k, (i, p) in enumerate(zip(test_idx, ex.test_points)):
            message = executed.get(i, "not run: the kernel died in an earlier cell")
            tests.append(TestResult(f"{ex.label}-test{k + 1}", p, message == "", message))
        scores.append(
            ExerciseScore(ex.label, ex.title, ex.points, sum(t.points for t in tests if t.passed), tests, sol_error)
        )
    return GradeReport(str(path), chapter, scores)


def _execute(nb, timeout: float, kernel_name: str, cwd: Path) -> dict[int, str]:
    """Run the cells; return {cell index: error message, '' if clean}. A dead kernel is restarted at the next
    exercise (its first cell is the '%reset -f'); cells lost with it are absent from the result."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    results: dict[int, str] = {}
    start = 0
    while start < len(nb.cells):
        client = NotebookClient(
            nb,
            timeout=timeout,
            allow_errors=True,
            interrupt_on_timeout=True,
            kernel_name=kernel_name,
            resources={"metadata": {"path": str(cwd)}},
        )
        died_at = None
        with client.setup_kernel():
            for i in range(start, len(nb.cells)):
                try:
                    client.execute_cell(nb.cells[i], i)
                except DeadKernelError:
                    died_at = i
                    break
                except Exception as e:  # noqa: BLE001  a timeout the kernel could not interrupt, etc.
                    results[i] = f"{type(e).__name__}: {e}"[:500]
                    continue
                msg = _error_message(nb.cells[i].outputs)
                if msg.startswith("KeyboardInterrupt"):  # interrupt_on_timeout
                    msg = f"timed out after {timeout:g} s (interrupted)"
                if "%reset" not in nb.cells[i].source or msg:
                    results[i] = msg
        if died_at is None:
            break
        results[died_at] = "the kernel died while running this cell"
        later = [i for i in range(died_at + 1, len(nb.cells)) if nb.cells[i].source == "%reset -f"]
        start = later[0] if later else len(nb.cells)
    return results
