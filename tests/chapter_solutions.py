"""The code-exercise solutions of a chapter, extracted from its MyST source (one extractor for every chapter test)."""

from __future__ import annotations

import re
from pathlib import Path

import jupytext

BOOK = Path(__file__).resolve().parents[1] / "book"
MARKER = "### BEGIN SOLUTION"


def solution_blocks(path: Path) -> list[str]:
    """Every graded code cell (a {code-cell} holding ### BEGIN SOLUTION) and every ```python block inside a
    markdown cell (an ungraded solution shown in a {solution} dropdown) that holds the marker, in page order."""
    blocks: list[str] = []
    for cell in jupytext.read(path).cells:
        if cell.cell_type == "code" and MARKER in cell.source:
            blocks.append(cell.source)
        elif cell.cell_type == "markdown":
            blocks += [b for b in re.findall(r"```python\n(.*?)```", cell.source, flags=re.S) if MARKER in b]
    return blocks


def solution_namespace(chapter: str | Path, min_blocks: int = 1) -> dict[str, object]:
    """exec() every solution block of the chapter into one namespace and return it."""
    path = Path(chapter) if Path(chapter).is_absolute() else BOOK / chapter
    blocks = solution_blocks(path)
    assert len(blocks) >= min_blocks, f"{path.name}: expected >= {min_blocks} solution blocks, found {len(blocks)}"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    return namespace
