"""Checkpoints of every method in one format: save_checkpoint writes a run (config, weights, EMA weights) atomically,
load_checkpoint rebuilds the sampling network of a CFM, shortcut, MeanFlow or VRFM/RFM run from it (so does the CLI).
save_run writes a run folder (model.pt, config.json, losses.csv) as one unit: the old run or the new, never a mix.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ._files import default_mode, replace_folder, write_atomically
from ._version import __version__
from .device import resolve_device
from .methods.consistency import ConsistencyConfig, ConsistencyMLP
from .methods.meanflow import MeanFlowConfig, MeanFlowMLP
from .methods.reflow import ReflowConfig
from .methods.shortcut import ShortcutConfig, ShortcutMLP
from .methods.vrfm import VRFMConfig, build_vrfm
from .train import FitResult, TrainConfig, build_model

FORMAT = "fmtoy-checkpoint-v2"
V1 = "fmtoy-checkpoint-v1"  # CFM-only checkpoints written before v2 (still read)

# method -> (config class, builder of the sampling network from (config, dim))
METHODS: dict[str, tuple[type, Callable[[object, int], nn.Module]]] = {
    "cfm": (TrainConfig, lambda c, dim: build_model(c, dim)),
    "shortcut": (ShortcutConfig, lambda c, dim: build_model(c, dim, ShortcutMLP, max_steps=c.max_steps)),
    "meanflow": (MeanFlowConfig, lambda c, dim: build_model(c, dim, MeanFlowMLP)),
    "vrfm": (VRFMConfig, lambda c, dim: build_vrfm(c, dim)[0]),
    "reflow": (ReflowConfig, lambda c, dim: build_model(c, dim)),
    "consistency": (ConsistencyConfig, lambda c, dim: build_model(c, dim, ConsistencyMLP)),
}


def method_of(config: object) -> str:
    """The method name of a config ("cfm", "shortcut", "meanflow", "vrfm", "reflow", "consistency"); TypeError for
    anything else."""
    for name, (cls, _) in METHODS.items():
        if type(config) is cls:
            return name
    allowed = ", ".join(cls.__name__ for cls, _ in METHODS.values())
    raise TypeError(f"config must be one of {allowed}, got {type(config).__name__}")


def data_dim(config: object) -> int:
    """The dimension of the run's data: its data set's (CFM, shortcut, MeanFlow) or its setting's (VRFM)."""
    from .data import get_dataset
    from .methods.vrfm import get_setting

    return get_setting(config.setting).target.dim if method_of(config) == "vrfm" else get_dataset(config.data).dim


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """ValueError unless every floating-point weight is finite."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{where}: the weights {bad[0]!r} are not finite (NaN or inf): the training diverged; a lower lr helps"
        )


def check_dim(dim: object, config: object, where: str) -> None:
    """ValueError unless the network's dimension is its data's."""
    want = data_dim(config)
    if dim != want:
        raise ValueError(f"{where}: the network is {dim}-dimensional but its data ({_data_name(config)}) are {want}D")


def _data_name(config: object) -> str:
    return config.setting if method_of(config) == "vrfm" else config.data


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(file: str | os.PathLike, result: FitResult | nn.Module, config: object | None = None) -> None:
    """Save the run's weights (online and EMA), config, fmtoy version and format tag; written to a temporary file in
    the same folder and renamed, so the file is always the old run or the new one, never half of either."""
    model, ema = (result.model, result.ema_model) if isinstance(result, FitResult) else (result, None)
    config = result.config if config is None and isinstance(result, FitResult) else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_checkpoint needs a FitResult or a torch.nn.Module, got {type(result).__name__}")
    method = method_of(config)
    dim = getattr(model, "dim", None)
    fresh = METHODS[method][1](config, dim)
    if type(fresh) is not type(model) or {k: v.shape for k, v in fresh.state_dict().items()} != {
        k: v.shape for k, v in model.state_dict().items()
    }:
        raise ValueError(
            f"the model ({type(model).__name__}, hidden={getattr(model, 'hidden', '?')}, depth="
            f"{getattr(model, 'depth', '?')}) does not match the config (hidden={config.hidden}, depth={config.depth})"
        )
    state, ema_state = _cpu_state(model), _cpu_state(ema) if ema is not None else None
    check_dim(dim, config, "save_checkpoint")
    for part in (state, ema_state or {}):
        check_finite(part, "save_checkpoint")
    payload = {
        "format": FORMAT,
        "fmtoy_version": __version__,
        "method": method,
        "config": dataclasses.asdict(config),
        "dim": dim,
        "state_dict": state,
        "ema_state_dict": ema_state,
        "interrupted_at": getattr(result, "interrupted_at", None),
    }
    write_atomically(file, lambda f: torch.save(payload, f))


def load_checkpoint(
    file: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, object]:
    """(model, config) of a run saved by save_checkpoint, for any method; the EMA weights when stored and use_ema.

    The returned config has device set to `device`. A damaged, foreign or inconsistent file raises ValueError.
    """
    dev = resolve_device(device)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise ValueError(
            f"{file!s} is not a readable fmtoy checkpoint: the file is damaged (corrupt or truncated) or was not "
            "written by fmtoy's save_checkpoint"
        ) from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if fmt not in (FORMAT, V1):
        raise ValueError(f"{file!s} is not an fmtoy checkpoint: expected format {FORMAT!r}, got {fmt!r}")
    if fmt == V1:  # CFM only: the network's size was stored beside the config
        ckpt = {**ckpt, "method": "cfm", "dim": ckpt.get("model_kwargs", {}).get("dim")}
    missing = [k for k in ("method", "config", "dim", "state_dict", "ema_state_dict") if k not in ckpt]
    if missing:
        raise ValueError(f"{file!s}: checkpoint is missing the entries {missing}")
    if ckpt["method"] not in METHODS:
        raise ValueError(f"{file!s}: unknown method {ckpt['method']!r}; allowed: {', '.join(METHODS)}")
    cls, build = METHODS[ckpt["method"]]
    try:
        config = cls(**{**ckpt["config"], "device": str(dev)})
        size = (ckpt["model_kwargs"]["hidden"], ckpt["model_kwargs"]["depth"]) if fmt == V1 else None
        if size is not None and size != (config.hidden, config.depth):
            raise ValueError("the model size disagrees with the config")
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{file!s}: inconsistent fmtoy checkpoint: {type(e).__name__}: {e}") from e
    check_dim(ckpt["dim"], config, str(file))
    try:
        model = build(config, ckpt["dim"])
        state = ckpt["ema_state_dict"] if use_ema and ckpt["ema_state_dict"] is not None else ckpt["state_dict"]
        model.load_state_dict(state)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{file!s}: inconsistent fmtoy checkpoint: {type(e).__name__}: {e}") from e
    check_finite(state, str(file))
    return model.to(dev).eval(), config


RUN_FILES = ("model.pt", "config.json", "losses.csv", "INTERRUPTED")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RunWriter:
    """A run folder written as one unit. Made before training, it checks at once that the folder can be written (a
    staging folder beside it); write(result) fills the staging folder and swaps it in (fmtoy._files.replace_folder),
    so a crash or SIGKILL at any moment leaves the old run or the new one. Other files in the folder are kept."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"run folder {str(self.folder)!r} exists and is not a folder")
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self._recover()
            self.stage = Path(
                tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}.new-{os.getpid()}-")
            )
            os.chmod(self.stage, default_mode(folder=True))
        except OSError as e:
            raise OSError(f"cannot write the run folder {str(self.folder)!r}: {e.strerror or e}") from None

    def _recover(self) -> None:
        """Tidy what a killed writer left beside the folder: its staging folder, or (where the platform has no
        atomic swap) the old run moved aside, which is put back if the folder itself is missing."""
        pattern = re.compile(rf"\.{re.escape(self.folder.name)}\.(new|old)-(\d+)-")
        for entry in sorted(self.folder.parent.iterdir()):
            m = pattern.match(entry.name)
            if not m or _pid_alive(int(m.group(2))):
                continue
            if m.group(1) == "old" and not self.folder.exists():
                os.rename(entry, self.folder)
            else:
                shutil.rmtree(entry, ignore_errors=True)

    def write(self, result: FitResult, config: object | None = None) -> Path:
        """Write model.pt, config.json, losses.csv (and INTERRUPTED for a run stopped early) and swap them in; on an
        OSError (full disk, read-only folder) the weights are saved to a file in the temporary folder, named in the
        error."""
        config = result.config if config is None else config
        try:
            save_checkpoint(self.stage / "model.pt", result, config)
            text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
            (self.stage / "config.json").write_text(text, encoding="utf-8")
            rows = io.StringIO()
            writer = csv.writer(rows, lineterminator="\n")
            writer.writerow(["step", "loss"])
            writer.writerows((i + 1, repr(loss)) for i, loss in enumerate(result.losses))
            (self.stage / "losses.csv").write_text(rows.getvalue(), encoding="utf-8")
            if result.interrupted_at is not None:
                (self.stage / "INTERRUPTED").write_text(
                    f"training was interrupted after step {result.interrupted_at} of {config.steps}; model.pt holds "
                    f"the weights of step {result.interrupted_at}\n",
                    encoding="utf-8",
                )
            replace_folder(self.stage, self.folder, keep=lambda name: name not in RUN_FILES)
        except OSError as e:
            self.discard()
            raise OSError(
                f"could not write the run folder {str(self.folder)!r}: {e.strerror or e}; {_rescue(result, config)}"
            ) from None
        except BaseException:
            self.discard()
            raise
        return self.folder

    def discard(self) -> None:
        """Remove the staging folder (training failed or was abandoned); the folder keeps its old run."""
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def _rescue(result: FitResult, config: object) -> str:
    """Save the weights where they can still go (the temporary folder) and say where, or say that this failed too."""
    file = Path(tempfile.gettempdir()) / f"fmtoy-rescued-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}.pt"
    try:
        save_checkpoint(file, result, config)
    except OSError as e:
        return f"saving the weights to {file} failed too ({e.strerror or e}): they are lost"
    return f"the trained weights are kept in {file} (sample them with `fmtoy sample --run {file}`)"


def save_run(folder: str | os.PathLike, result: FitResult, config: object | None = None) -> Path:
    """Write a run folder (model.pt, config.json, losses.csv) as one unit with RunWriter; returns the folder."""
    return RunWriter(folder).write(result, config)


def interrupted_at(file: str | os.PathLike) -> int | None:
    """The step at which a run folder's training was interrupted (its INTERRUPTED note), else None."""
    path = Path(file)
    note = (path if path.is_dir() else path.parent) / "INTERRUPTED"
    if not note.is_file():
        return None
    m = re.search(r"after step (\d+)", note.read_text(encoding="utf-8", errors="replace"))
    return int(m.group(1)) if m else 0


__all__ = [
    "FORMAT",
    "METHODS",
    "method_of",
    "data_dim",
    "check_finite",
    "check_dim",
    "save_checkpoint",
    "load_checkpoint",
    "RUN_FILES",
    "RunWriter",
    "save_run",
    "interrupted_at",
]
