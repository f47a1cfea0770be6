"""A cache of finished training runs: with FMTOY_RUN_CACHE=<folder>, train_<method>(config) loads a run that was
already trained with the same recipe, the same fmtoy source, torch version and device, instead of training it again.

Training is seeded and deterministic on one device (the same seed gives bit-identical weights, whatever the thread
count), so a cached run is the run the call would have produced; its `seconds` are those of the training that made
it and `cached` is True. The book build sets the variable to _build/fmtoy-runs, so that chapters training the same
recipe (the playground's default model in chapters 1 and 2) train it once per build. Unset, nothing is read or
written. A damaged file is reported in one line and trained again; files are written atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from ._files import write_atomically

ENV = "FMTOY_RUN_CACHE"
PACKAGE = Path(__file__).resolve().parent


@functools.cache
def source_digest() -> str:
    """sha256 of every .py file of the fmtoy package (path and content): any change to the code is a new key."""
    h = hashlib.sha256()
    for file in sorted(PACKAGE.rglob("*.py")):
        h.update(file.relative_to(PACKAGE).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def folder() -> Path | None:
    """The cache folder named by FMTOY_RUN_CACHE, or None (no caching)."""
    value = os.environ.get(ENV, "").strip()
    return Path(value) if value else None


def run_key(fit_name: str, config: object, device: str) -> str:
    """The key of one run: the loop's name, the config's class and every field, fmtoy's source, torch and device."""
    recipe = {
        "fit": fit_name,
        "config": f"{type(config).__module__}.{type(config).__qualname__}",
        "fields": dataclasses.asdict(config),
        "fmtoy": source_digest(),
        "torch": torch.__version__,
        "device": device,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def load(key: str):
    """The cached FitResult of `key`, or None when there is none (or it is damaged: one line on stderr)."""
    where = folder()
    file = where / f"{key}.pt" if where is not None else None
    if file is None or not file.is_file():
        return None
    try:
        result = torch.load(file, weights_only=False)  # our own file in the user's build folder
    except Exception as err:  # a truncated or foreign file: train again
        print(
            f"fmtoy: ignoring the damaged cached run {file} ({type(err).__name__}); training it again", file=sys.stderr
        )
        return None
    result.cached = True
    return result


def store(key: str, result) -> None:
    """Write the FitResult under `key` atomically (a temporary file in the folder, then a rename)."""
    where = folder()
    if where is None:
        return
    where.mkdir(parents=True, exist_ok=True)
    write_atomically(where / f"{key}.pt", lambda f: torch.save(result, f))


__all__ = ["ENV", "source_digest", "folder", "run_key", "load", "store"]
