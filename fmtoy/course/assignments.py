"""Course assignments from the book's chapters: the chapter notebook is the solution; student and instructor
(nbgrader "source") notebooks are generated from nbgrader's markers.

A graded exercise in a chapter (MyST notebook) is a ``{exercise}`` directive titled ``... (code, N points)`` with a
``:label:``, followed by code cells whose metadata names it (``exercise: <label>``):

* solution cells hold ``### BEGIN SOLUTION`` / ``### END SOLUTION`` around the lines a student writes;
* test cells carry ``points: <int>``; their plain ``assert``s are visible to students, the lines between
  ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS`` are not.

The stated N must equal the sum of the test cells' points. Graded cells are self-contained (their own imports), so
an exercise can be graded without running the rest of the chapter.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
STUB_LINES = ("# YOUR CODE HERE", "raise NotImplementedError()")
NBGRADER_SCHEMA = 3

# ```{exercise} Title (code, 3 points)\n:label: ex-...   (any fence of 3+ backticks or colons)
EXERCISE = re.compile(
    r"^(?P<fence>`{3,}|:{3,})\{exercise\}[ \t]*(?P<title>[^\n]*)\n(?P<options>(?::[^\n]*\n)*)", re.MULTILINE
)
POINTS_IN_TITLE = re.compile(r"\(code,\s*(\d+)\s*points?\)")
LABEL = re.compile(r"^:label:\s*(\S+)\s*$", re.MULTILINE)
# a {solution} directive block: opening fence, body, the same fence alone on a line
SOLUTION_BLOCK = re.compile(
    r"^(?P<fence>`{3,}|:{3,})\{solution\}[^\n]*\n.*?^(?P=fence)[ \t]*\n?", re.MULTILINE | re.DOTALL
)


class AssignmentError(ValueError):
    """A chapter's graded-exercise markup is inconsistent (what is wrong and where is in the message)."""


@dataclass
class GradedExercise:
    """One graded code exercise: its label, title, stated points and the indices of its cells in the notebook."""

    label: str
    title: str
    points: int
    solution_cells: list[int] = field(default_factory=list)
    test_cells: list[int] = field(default_factory=list)
    test_points: list[int] = field(default_factory=list)


def read_chapter(path: str | Path):
    """The chapter's MyST Markdown source as an nbformat notebook (via jupytext)."""
    import jupytext

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no chapter at {path}")
    nb = jupytext.read(path)
    nb.metadata.setdefault("fmtoy", {})["chapter"] = path.stem
    return nb


def _exercise_directives(nb) -> dict[str, tuple[str, int | None]]:
    """label -> (title, stated points or None) for every {exercise} directive in the markdown cells."""
    found: dict[str, tuple[str, int | None]] = {}
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for m in EXERCISE.finditer(cell.source):
            label = LABEL.search(m.group("options"))
            if label:
                points = POINTS_IN_TITLE.search(m.group("title"))
                found[label.group(1)] = (m.group("title").strip(), int(points.group(1)) if points else None)
    return found


def _check_markers(source: str, begin: str, end: str, where: str) -> None:
    """Markers come in order, begin/end alternating, each on its own line."""
    state = False
    for line in source.splitlines():
        s = line.strip()
        if s in (begin, end):
            if (s == begin) == state:
                raise AssignmentError(f"{where}: {s!r} out of order (expected {end if state else begin!r})")
            state = not state
        elif begin in s or end in s:
            raise AssignmentError(f"{where}: the marker must stand alone on its line, got {line!r}")
    if state:
        raise AssignmentError(f"{where}: {begin!r} without a matching {end!r}")


def graded_exercises(nb) -> list[GradedExercise]:
    """The graded exercises of a chapter notebook, in page order, after checking the markup is consistent."""
    chapter = nb.metadata.get("fmtoy", {}).get("chapter", "notebook")
    directives = _exercise_directives(nb)
    exercises: dict[str, GradedExercise] = {}
    for i, cell in enumerate(nb.cells):
        label = cell.metadata.get("exercise") if cell.cell_type == "code" else None
        if label is None:
            continue
        where = f"{chapter}, cell {i} (exercise {label})"
        if label not in directives:
            raise AssignmentError(f"{where}: no {{exercise}} directive with :label: {label}")
        title, stated = directives[label]
        if stated is None:
            raise AssignmentError(f"{where}: a graded exercise's title must state '(code, N points)', got {title!r}")
        ex = exercises.setdefault(label, GradedExercise(label, title, stated))
        points = cell.metadata.get("points")
        has_solution = BEGIN_SOLUTION in cell.source
        if points is None:
            if not has_solution:
                raise AssignmentError(
                    f"{where}: a graded cell is a solution cell ({BEGIN_SOLUTION}) or a test cell (metadata points: N)"
                )
            _check_markers(cell.source, BEGIN_SOLUTION, END_SOLUTION, where)
            ex.solution_cells.append(i)
        else:
            if isinstance(points, bool) or not isinstance(points, int) or points <= 0:
                raise AssignmentError(f"{where}: points must be a positive integer, got {points!r}")
            if has_solution:
                raise AssignmentError(f"{where}: a test cell must not hold {BEGIN_SOLUTION}")
            if ex.solution_cells == []:
                raise AssignmentError(f"{where}: test cells must come after the exercise's solution cell")
            _check_markers(cell.source, BEGIN_HIDDEN, END_HIDDEN, where)
            ex.test_cells.append(i)
            ex.test_points.append(points)
    for ex in exercises.values():
        if not ex.test_cells:
            raise AssignmentError(f"{chapter}: exercise {ex.label} has a solution cell but no test cell (points: N)")
        if sum(ex.test_points) != ex.points:
            raise AssignmentError(
                f"{chapter}: exercise {ex.label} states {ex.points} points in its title but its "
                f"test cells carry {ex.test_points} (sum {sum(ex.test_points)})"
            )
    return list(exercises.values())


def replace_solutions(source: str) -> str:
    """Each BEGIN/END SOLUTION region (markers included) becomes '# YOUR CODE HERE' + 'raise NotImplementedError()',
    indented like the BEGIN marker."""
    out, inside = [], False
    for line in source.splitlines():
        s = line.strip()
        if s == BEGIN_SOLUTION:
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + stub for stub in STUB_LINES]
            inside = True
        elif s == END_SOLUTION:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def remove_hidden_tests(source: str) -> str:
    """Drop every BEGIN/END HIDDEN TESTS region, markers included."""
    out, inside = [], False
    for line in source.splitlines():
        s = line.strip()
        if s == BEGIN_HIDDEN:
            inside = True
        elif s == END_HIDDEN:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out).rstrip() + "\n" if out else ""


def remove_solution_directives(markdown: str) -> str:
    """Drop every {solution} directive block (worked answers) from a markdown cell."""
    return SOLUTION_BLOCK.sub("", markdown)


def _nbgrader(grade_id: str, *, solution: bool, grade: bool, points: int | None = None) -> dict:
    meta = {
        "grade": grade,
        "grade_id": grade_id,
        "locked": not solution,
        "schema_version": NBGRADER_SCHEMA,
        "solution": solution,
        "task": False,
    }
    if points is not None:
        meta["points"] = points
    return meta


def instructor_notebook(nb):
    """The autograder (nbgrader "source") version: solutions and hidden tests kept, nbgrader metadata on graded
    cells, outputs cleared."""
    nb = copy.deepcopy(nb)
    exercises = graded_exercises(nb)
    for ex in exercises:
        for k, i in enumerate(ex.solution_cells):
            nb.cells[i].metadata["nbgrader"] = _nbgrader(f"{ex.label}-solution{k + 1}", solution=True, grade=False)
        for k, (i, p) in enumerate(zip(ex.test_cells, ex.test_points)):
            nb.cells[i].metadata["nbgrader"] = _nbgrader(
                f"{ex.label}-test{k + 1}", solution=False, grade=True, points=p
            )
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    meta = nb.metadata.setdefault("fmtoy", {})
    meta.update(
        edition="instructor", exercises={ex.label: {"title": ex.title, "points": ex.points} for ex in exercises}
    )
    return nb


def student_notebook(nb):
    """The student version: solution lines replaced by a stub, hidden tests and worked answers removed, outputs
    cleared; graded cells keep their nbgrader metadata so that the grader can match them."""
    nb = instructor_notebook(nb)
    for cell in nb.cells:
        grader = cell.metadata.get("nbgrader", {})
        if grader.get("solution"):
            cell.source = replace_solutions(cell.source)
        elif grader.get("grade"):
            cell.source = remove_hidden_tests(cell.source)
        elif cell.cell_type == "markdown":
            cell.source = remove_solution_directives(cell.source)
        if "hide-input" in cell.metadata.get("tags", []):  # students should see what they fill in
            cell.metadata["tags"] = [t for t in cell.metadata["tags"] if t != "hide-input"]
    nb.metadata["fmtoy"]["edition"] = "student"
    return nb


def leaked_lines(student, solution) -> list[str]:
    """Solution and hidden-test lines of `solution` (a chapter notebook) that still appear in `student`."""
    secret: set[str] = set()
    for cell in solution.cells:
        if cell.cell_type != "code":
            continue
        for begin, end in ((BEGIN_SOLUTION, END_SOLUTION), (BEGIN_HIDDEN, END_HIDDEN)):
            inside = False
            for line in cell.source.splitlines():
                s = line.strip()
                if s in (begin, end):
                    inside = s == begin
                    secret.add(s)
                elif inside and s and not s.startswith("#"):
                    secret.add(s)
    student_lines = {line.strip() for cell in student.cells for line in cell.source.splitlines()}
    return sorted(secret & student_lines)


def graded_chapters(book_dir: str | Path) -> dict[Path, list[GradedExercise]]:
    """{chapter: its graded exercises} for the chapters (book/*.md with code cells) that have at least one."""
    out = {}
    for path in sorted(Path(book_dir).glob("*.md")):
        text = path.read_text(encoding="utf-8")
        if "{code-cell}" in text and "exercise:" in text:
            exercises = graded_exercises(read_chapter(path))
            if exercises:
                out[path] = exercises
    return out


def chapters_with_exercises(book_dir: str | Path) -> list[Path]:
    """The chapters (book/*.md with code cells) that have at least one graded exercise."""
    return list(graded_chapters(book_dir))


def write_assignments(book_dir: str | Path, out_dir: str | Path) -> dict[str, dict]:
    """For every chapter with graded exercises write out_dir/source/<ch>/<ch>.ipynb (instructor, nbgrader source
    layout) and out_dir/release/<ch>/<ch>.ipynb (student); return and write out_dir/assignments.json (points)."""
    import nbformat

    out_dir, book = Path(out_dir), Path(book_dir)
    if not book.is_dir():
        raise ValueError(f"book folder {str(book)!r} {'is not a folder' if book.exists() else 'does not exist'}")
    chapters = chapters_with_exercises(book)
    if not chapters:
        raise ValueError(f"book folder {str(book)!r} holds no chapter .md with graded exercises")
    summary: dict[str, dict] = {}
    for path in chapters:
        nb = read_chapter(path)
        for edition, make in (("source", instructor_notebook), ("release", student_notebook)):
            target = out_dir / edition / path.stem / f"{path.stem}.ipynb"
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(make(nb), target)
        exercises = graded_exercises(nb)
        summary[path.stem] = {
            "exercises": {
                ex.label: {"title": ex.title, "points": ex.points, "tests": ex.test_points} for ex in exercises
            },
            "points": sum(ex.points for ex in exercises),
        }
    (out_dir / "assignments.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def student_chapter_source(path: str | Path) -> str:
    """A chapter's MyST source for the student edition of the site: worked answers removed, solution lines stubbed,
    hidden tests removed, and the graded cells not executed (their stubs would raise)."""
    import jupytext

    nb = read_chapter(path)
    graded = {i for ex in graded_exercises(nb) for i in ex.solution_cells + ex.test_cells}
    student = student_notebook(nb)
    for i, cell in enumerate(student.cells):
        cell.metadata.pop("nbgrader", None)
        if i in graded:
            cell.metadata["tags"] = [*cell.metadata.get("tags", []), "skip-execution"]
    student.metadata.pop("fmtoy", None)
    return jupytext.writes(student, fmt="md:myst")


def write_student_book(root: str | Path, out: str | Path) -> Path:
    """Write the sources of the student edition (same book, no solutions, no instructor page) to `out`."""
    import shutil

    import yaml

    root, out = Path(root), Path(out)
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    config["title"] = f"{config['title']} (student edition)"
    config.setdefault("sphinx", {}).setdefault("config", {})["hide_solutions"] = True
    toc["chapters"] = [c for c in toc.get("chapters", []) if not c.get("file", "").endswith("instructors")]
    if out.exists():
        shutil.rmtree(out)
    (out / "book").mkdir(parents=True)
    (out / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (out / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    for path in sorted((root / "book").iterdir()):
        if path.is_dir():
            if not path.name.startswith((".", "__")):  # e.g. book/_ext, the local Sphinx hooks
                shutil.copytree(path, out / "book" / path.name, ignore=shutil.ignore_patterns("__pycache__"))
            continue
        if path.stem == "instructors":  # not part of the student edition
            continue
        if path.suffix == ".md":
            text = path.read_text(encoding="utf-8")
            text = student_chapter_source(path) if "{code-cell}" in text else remove_solution_directives(text)
            (out / "book" / path.name).write_text(text, encoding="utf-8")
        else:
            shutil.copy2(path, out / "book" / path.name)
    return out
