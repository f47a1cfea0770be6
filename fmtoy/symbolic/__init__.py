"""SymPy derivations the book displays, one module per topic: core (symbols, checks, is_zero), continuity
(chapters 1-2), paths (chapters 4-5), shortcut (chapter 6), vrfm (chapter 7), guidance (chapter 8), sde (chapter 9),
flowmap (chapter 10), discrete (chapter 11). `import fmtoy.symbolic as S` gives the public names of core, continuity
and paths in one namespace."""

from . import continuity, core, paths
from .continuity import *  # noqa: F403  (the namespace the chapters use as S.<name>)
from .core import *  # noqa: F403
from .paths import *  # noqa: F403

__all__ = [*core.__all__, *continuity.__all__, *paths.__all__]
