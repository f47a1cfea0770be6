"""Course assignments: markup checks, student/instructor notebooks, the student edition's sources, and (marked
`grading`) the autograder on every chapter: solutions pass, stubs fail with NotImplementedError, wrong answers
get exactly the points of the checks they pass, timeouts and crashed student processes cost only their exercise.
Attacks on the grader are in test_grade_adversarial.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from fmtoy.cli import main
from fmtoy.course import assignments as A
from fmtoy.course.grade import grade

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(p for p in BOOK.glob("ch*.md"))
GRADED = A.chapters_with_exercises(BOOK)

# A plausible wrong answer per exercise: passes the first (shape) check, fails the value checks.
WRONG = {
    "ex-ch1-divergence": (
        "import torch\ndef divergence_2d(velocity, x, t):\n    return torch.zeros(x.shape[0], dtype=x.dtype)"
    ),
    "ex-ch1-euler-likelihood": (
        "def log_likelihood_euler(velocity, x1, source, steps):\n"
        "    return source.log_prob(x1)   # forgot to flow back and the divergence"
    ),
    "ex-ch2-mc-field": "def mc_marginal_velocity(x, t, x1):\n    return (x1.mean(0) - x) / (1 - t)   # prior weights",
    "ex-ch2-empirical": (
        "def empirical_marginal_velocity(x, t, y):\n    return (y.mean(0) - x) / (1 - t)   # prior instead of posterior"
    ),
    "ex-ch3-x0-loss": (
        "def cfm_loss_x0(model, x0, x1, t, sigma_min=0.0):\n"
        "    xt = t[:, None] * x1 + (1 - t[:, None]) * x0\n"
        "    return (model(xt, t) - (x1 - x0)).square().mean()   # mean over coordinates too"
    ),
    "ex-ch3-exp-bregman": (
        "def exp_bregman(y, v, scale=1.0):\n    return 0.5 * (y - v).square().sum(1)   # the s -> oo limit"
    ),
    "ex-ch4-vp-field": (
        "def vp_conditional_velocity(x, t, x1, beta_min=0.1, beta_max=20.0):\n    return x1 - x   # the OT field"
    ),
    "ex-ch4-cosine": (
        "import math\ndef cosine_rotated_velocity(x, t, x1, omega):\n"
        "    s, c = math.sin(math.pi * t / 2), math.cos(math.pi * t / 2)\n"
        "    return math.pi / 2 * (x1 - s * x) / c   # no rotation"
    ),
    "ex-ch5-eps-velocity": "def velocity_from_eps(z, t, eps_hat):\n    return z - eps_hat   # forgot the 1/t",
    "ex-ch6-shortcut-target": (
        "import torch\ndef shortcut_target(s, x, t, d):\n    with torch.no_grad():\n"
        "        return s(x, t, d)   # one step at d instead of two half steps"
    ),
    "ex-ch7-gaussian-kl": (
        "def gaussian_kl(mu, logvar):\n"
        "    return 0.5 * (logvar.exp() + mu.square() - 1.0).sum(dim=1)   # forgot -logvar"
    ),
    "ex-ch7-reparam": "def sample_z(mu, logvar, eps):\n    return mu + logvar.exp() * eps   # variance, not std",
    "ex-ch8-score": "def score_from_velocity(u, x, t):\n    return (u - x / t) * t   # forgot b_t's (1 - t)",
    "ex-ch9-em-step": (
        "import math\ndef em_step(x, u, score, g, h, z):\n"
        "    return x + h * (u + g**2 * score) + g * math.sqrt(h) * z   # the reverse-time factor g^2"
    ),
    "ex-ch10-cd-target": (
        "import torch\ndef cd_target(f, field, x, t, dt):\n    with torch.no_grad():\n"
        "        return f(x + dt * field(x, t), t)   # the target read at the start time, not at t + dt"
    ),
    "ex-ch11-euler": (
        "import torch\ndef euler_probs(x, post, t, h):\n"
        "    lam = h   # forgot the 1 / (1 - t) of kappa' / (1 - kappa)\n"
        "    return (1 - lam) * torch.nn.functional.one_hot(x, post.shape[-1]).to(post.dtype) + lam * post"
    ),
    "ex-ch8-classifier": (
        "def classifier(log_px_given_c, log_prior):\n"
        "    p = (log_px_given_c + log_prior).exp()\n"
        "    return p / p.sum(1, keepdim=True)   # underflows to 0/0 in the tails"
    ),
}


def chapter_nb(path: Path):
    return A.read_chapter(path)


# ----------------------------------------------------------------------------------------------- markup (no kernel)
def test_every_chapter_has_a_graded_exercise():
    assert CHAPTERS and [p.name for p in GRADED] == [p.name for p in CHAPTERS], (
        "every chapter needs at least one graded code exercise (an {exercise} with code cells marked exercise: ...)"
    )


def test_every_graded_exercise_has_a_wrong_answer_in_this_file():
    labels = {ex.label for p in GRADED for ex in A.graded_exercises(chapter_nb(p))}
    assert labels <= set(WRONG), f"add a wrong answer for {sorted(labels - set(WRONG))}"


@pytest.mark.parametrize("path", GRADED, ids=lambda p: p.stem)
def test_markup_is_consistent(path):
    nb = chapter_nb(path)
    for ex in A.graded_exercises(nb):  # raises AssignmentError on bad markup
        assert ex.points == sum(ex.test_points) > 0
        assert len(ex.test_cells) >= 2, f"{ex.label}: use >= 2 test cells so that partial credit is possible"
        for i in ex.solution_cells + ex.test_cells:
            assert "hide-input" in nb.cells[i].metadata.get("tags", []), f"{ex.label}: the book hides graded code"


@pytest.mark.parametrize("path", GRADED, ids=lambda p: p.stem)
def test_student_notebook_hides_everything_secret(path):
    nb = chapter_nb(path)
    student = A.student_notebook(nb)
    assert A.leaked_lines(student, nb) == []
    text = "\n".join(c.source for c in student.cells)
    for marker in (A.BEGIN_SOLUTION, A.END_SOLUTION, A.BEGIN_HIDDEN, A.END_HIDDEN, "{solution}"):
        assert marker not in text, f"{marker!r} survived in the student notebook"
    stubs = [c for c in student.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert stubs and all("raise NotImplementedError()" in c.source for c in stubs)
    for c in student.cells:
        if "nbgrader" in c.metadata:
            compile(c.source, path.name, "exec")  # stubs are valid Python
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None
    nbformat.validate(student)
    nbformat.validate(A.instructor_notebook(nb))


def test_replace_solutions_keeps_indentation_and_code_around():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert A.replace_solutions(src) == ("def f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()")


def test_remove_hidden_tests_and_solution_directives():
    src = "assert a\n### BEGIN HIDDEN TESTS\nassert secret\n### END HIDDEN TESTS\nassert b\n"
    assert A.remove_hidden_tests(src) == "assert a\nassert b\n"
    md = "Intro\n\n````{solution} ex-x\n:class: dropdown\n```python\nanswer\n```\n````\nAfter\n"
    assert A.remove_solution_directives(md) == "Intro\n\nAfter\n"
    md2 = "A\n```{solution} ex-y\n:class: dropdown\ntext\n```\nB\n"
    assert A.remove_solution_directives(md2) == "A\nB\n"


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    for kind, src, meta in cells:
        cell = (nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell)(src)
        cell.metadata.update(meta)
        nb.cells.append(cell)
    return nb


EX = ("md", "```{exercise} T (code, 3 points)\n:label: ex-a\n\ntext\n```", {})
SOL = ("code", "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION", {"exercise": "ex-a"})


@pytest.mark.parametrize(
    "cells, match",
    [
        ([EX, SOL, ("code", "assert f() == 1", {"exercise": "ex-a", "points": 2})], "states 3 points"),
        ([SOL, ("code", "assert f() == 1", {"exercise": "ex-a", "points": 3})], "no {exercise} directive"),
        ([EX, ("code", "assert f() == 1", {"exercise": "ex-a", "points": 3}), SOL], "after the exercise's solution"),
        ([EX, SOL, ("code", "assert f()", {"exercise": "ex-a", "points": 0})], "positive integer"),
        ([EX, ("code", "def f():\n    ### BEGIN SOLUTION\n    return 1", {"exercise": "ex-a"})], "without a matching"),
        ([EX, ("code", "x = 1  ### BEGIN SOLUTION", {"exercise": "ex-a"})], "stand alone"),
        ([EX, SOL], "no test cell"),
        ([("md", "```{exercise} T (code)\n:label: ex-a\n```", {}), SOL], "must state"),
        (
            [EX, SOL, ("code", "### BEGIN HIDDEN TESTS\nassert 1", {"exercise": "ex-a", "points": 3})],
            "without a matching",
        ),
    ],
)
def test_bad_markup_is_refused_with_a_clear_message(cells, match):
    with pytest.raises(A.AssignmentError, match=re.escape(match)):
        A.graded_exercises(_nb(*cells))


def test_write_assignments_layout(tmp_path):
    summary = A.write_assignments(BOOK, tmp_path)
    assert set(summary) == {p.stem for p in GRADED}
    for stem in summary:
        for edition in ("source", "release"):
            nb = nbformat.read(tmp_path / edition / stem / f"{stem}.ipynb", as_version=4)
            assert nb.metadata["fmtoy"]["edition"] == ("instructor" if edition == "source" else "student")
    data = json.loads((tmp_path / "assignments.json").read_text())
    assert all(info["points"] == sum(e["points"] for e in info["exercises"].values()) for info in data.values())


def test_student_book_sources(tmp_path):
    out = A.write_student_book(ROOT, tmp_path / "student")
    config = yaml.safe_load((out / "_config.yml").read_text())
    assert config["sphinx"]["config"]["hide_solutions"] is True
    assert "student edition" in config["title"]
    toc = (out / "_toc.yml").read_text()
    assert "instructors" not in toc
    for page in (out / "book").glob("*.md"):
        text = page.read_text()
        for marker in (A.BEGIN_SOLUTION, A.BEGIN_HIDDEN, "{solution}"):
            assert marker not in text, f"{marker!r} survived in the student edition's {page.name}"
    import jupytext

    for path in GRADED:
        nb = jupytext.read(out / "book" / path.name)
        graded = [c for c in nb.cells if c.metadata.get("exercise")]
        assert graded and all("skip-execution" in c.metadata["tags"] for c in graded)
        assert A.leaked_lines(nb, chapter_nb(path)) == []


# --------------------------------------------------------------------------------------- grading (student processes)
def _student_with(path: Path, tmp_path: Path, answers: dict[str, str]) -> Path:
    """The student notebook of a chapter with some solution cells filled in (label -> source)."""
    nb = A.student_notebook(chapter_nb(path))
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        label = grade_id.rsplit("-solution", 1)[0]
        if cell.metadata.get("nbgrader", {}).get("solution") and label in answers:
            cell.source = answers[label]
    out = tmp_path / f"{path.stem}.ipynb"
    nbformat.write(nb, out)
    return out


@pytest.mark.grading
@pytest.mark.parametrize("path", GRADED, ids=lambda p: p.stem)
def test_solution_passes_stub_fails_wrong_answer_gets_partial_credit(path, tmp_path):
    exercises = A.graded_exercises(chapter_nb(path))
    source = tmp_path / "solution.ipynb"
    nbformat.write(A.instructor_notebook(chapter_nb(path)), source)
    report = grade(source, path)
    assert report.earned == report.points == sum(e.points for e in exercises), report.table()

    report = grade(_student_with(path, tmp_path, {}), path)
    assert report.earned == 0, report.table()
    for e in report.exercises:
        assert all(t.message.startswith("NotImplementedError") for t in e.tests), report.table()

    report = grade(_student_with(path, tmp_path, {e.label: WRONG[e.label] for e in exercises}), path)
    for ex, score in zip(exercises, report.exercises):
        assert [t.passed for t in score.tests] == [True] + [False] * (len(ex.test_cells) - 1), report.table()
        assert score.earned == ex.test_points[0], report.table()


@pytest.mark.grading
def test_timeout_and_dead_process_cost_only_their_exercise(tmp_path):
    path = BOOK / "ch2_marginal.md"
    nb = A.instructor_notebook(chapter_nb(path))
    right = {
        c.metadata["nbgrader"]["grade_id"].rsplit("-solution", 1)[0]: c.source
        for c in nb.cells
        if c.metadata.get("nbgrader", {}).get("solution")
    }
    for bad, why in (
        ("import time\ndef mc_marginal_velocity(x, t, x1):\n    time.sleep(60)", "timed out"),
        ("import os\ndef mc_marginal_velocity(x, t, x1):\n    os._exit(1)", "process died"),
    ):
        student = _student_with(path, tmp_path, {**right, "ex-ch2-mc-field": bad})
        report = grade(student, path, timeout=3)
        first, second = report.exercises
        assert first.earned == 0 and why in first.tests[0].message, report.table()
        assert second.earned == second.points, report.table()


@pytest.mark.grading
def test_cli_grade_writes_json_and_ignores_edited_tests(tmp_path, capsys):
    path = BOOK / "ch5_paths.md"
    student = A.student_notebook(chapter_nb(path))
    for cell in student.cells:  # a student "fixes" the test instead
        if cell.metadata.get("nbgrader", {}).get("grade"):
            cell.source = "pass"
    nb_path = tmp_path / "ch5_paths.ipynb"
    nbformat.write(student, nb_path)
    assert main(["grade", str(nb_path), "--json", str(tmp_path / "g.json")]) == 0
    assert "0/3" in capsys.readouterr().out
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["earned"] == 0 and result["points"] == 3 and result["chapter"] == "ch5_paths"


def test_cli_grade_errors(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "missing.ipynb")]) == 2
    assert "no notebook" in capsys.readouterr().err
    nb = nbformat.v4.new_notebook()
    nbformat.write(nb, tmp_path / "anon.ipynb")
    assert main(["grade", str(tmp_path / "anon.ipynb")]) == 2
    assert "does not name its chapter" in capsys.readouterr().err
    assert main(["grade", str(tmp_path / "anon.ipynb"), "--timeout", "0", "--source", "x.md"]) == 2
