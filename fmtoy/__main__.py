"""`python -m fmtoy ...`: the same command line as the `fmtoy` console script."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
