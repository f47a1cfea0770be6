"""The code-exercise solutions of a chapter, extracted from its MyST source (one extractor for every chapter test)."""
from __future__ import annotations

import re
from pathlib import Path

BOOK = Path(__file__).resolve().parents[1] / "book"


def solution_namespace(chapter: str | Path, min_blocks: int = 1) -> dict[str, object]:
    """exec() every ```python block of the chapter that holds ### BEGIN SOLUTION into one namespace and return it."""
    path = Path(chapter) if Path(chapter).is_absolute() else BOOK / chapter
    blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)
              if "### BEGIN SOLUTION" in b]
    assert len(blocks) >= min_blocks, f"{path.name}: expected >= {min_blocks} solution blocks, found {len(blocks)}"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    return namespace
