"""The one training loop under every method (fit), the configs they share, and conditional flow matching on it."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import runcache
from ._checks import check_choice, check_positive, check_positive_int
from .data import Distribution, StandardNormal, get_dataset, list_datasets
from .device import make_generator, resolve_device
from .losses import COUPLINGS, cfm_loss, get_coupling
from .models import VelocityMLP
from .paths import get_path, list_paths
from .threads import check_threads, thread_policy

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adam", "adamw")


def _lr_factor(schedule: str, step: int, steps: int) -> float:
    """Learning-rate multiplier at `step` (0-based) of `steps`: 1, cosine 0.5 (1 + cos(pi s/S)), or 1 - s/S."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule == "linear":
        return 1.0 - step / steps
    return 1.0


def check_distributions(model: nn.Module, target: Distribution, source: Distribution) -> None:
    """target and source are fmtoy Distributions of one dimension, which is also the model's (if it states one)."""
    for name, dist in (("target", target), ("source", source)):
        if not isinstance(dist, Distribution):
            raise TypeError(f"{name} must be a fmtoy.data.Distribution, got {type(dist).__name__}")
    if source.dim != target.dim or getattr(model, "dim", target.dim) != target.dim:
        raise ValueError(
            f"dimensions disagree: target {target.dim}, source {source.dim}, model {getattr(model, 'dim', '?')}"
        )


def check_ema(ema_decay: float | None) -> float | None:
    """None (no EMA) or a number in (0, 1)."""
    if ema_decay is None:
        return None
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be None (no EMA) or a number in (0, 1), e.g. 0.999; got {ema_decay!r}")
    return float(ema_decay)


def check_seed(seed: int) -> int:
    """An integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return seed


# ----------------------------------------------------------------------------------------------- the one loop
@dataclass
class FitConfig:
    """The optimisation settings every method shares: what fit() needs besides the modules and the loss."""

    steps: int
    batch_size: int
    lr: float
    lr_schedule: str = "cosine"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    ema_decay: float | None = None
    seed: int = 0
    device: str | torch.device = "auto"
    threads: str | int | None = None
    log_every: int = 100

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("batch_size", self.batch_size)
        self.lr = check_positive("lr", self.lr)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.weight_decay = check_positive("weight_decay", self.weight_decay, allow_zero=True)
        self.ema_decay = check_ema(self.ema_decay)
        check_seed(self.seed)
        resolve_device(self.device)
        check_threads(self.threads)
        check_positive_int("log_every", self.log_every)


@dataclass
class FitContext:
    """What a loss function sees at every step of fit(): the seeded generator, device, batch size, step, EMA copies."""

    generator: torch.Generator
    device: torch.device
    batch_size: int
    steps: int
    step: int = 0
    ema: list[nn.Module] | None = None


@dataclass
class FitResult:
    """What every training entry point returns: the trained modules (by name), the first one's EMA copy, per-step
    losses and loss parts, timing, and the steps run per CPU thread count. r.name also finds modules and parts."""

    model: nn.Module
    ema_model: nn.Module | None
    losses: list[float]
    seconds: float
    steps_per_second: float
    device: str
    parts: dict[str, list[float]] = field(default_factory=dict)
    modules: dict[str, nn.Module | None] = field(default_factory=dict)
    threads: dict[int, int] = field(default_factory=dict)
    config: object | None = None
    cached: bool = False  # loaded from the run cache (fmtoy.runcache), not trained by this call
    interrupted_at: int | None = None  # steps done when Ctrl-C stopped the run (TrainingInterrupted), else None

    def final(self, part: str = "loss", last: int = 100) -> float:
        """Mean of the last `last` steps of the loss (part="loss") or of a loss part (e.g. "kl"): where training
        ended."""
        values = self.losses if part == "loss" else self.parts.get(part)
        if values is None:
            raise ValueError(f"no loss part {part!r}; this run has: loss{''.join(', ' + k for k in self.parts)}")
        tail = values[-check_positive_int("last", last) :]
        return sum(tail) / len(tail)

    def __getattr__(self, name: str):
        for store in ("parts", "modules"):
            found = self.__dict__.get(store, {})
            if name in found:
                return found[name]
        raise AttributeError(f"{type(self).__name__} has no attribute, loss part or module {name!r}")


LossFn = Callable[[FitContext], "Tensor | tuple[Tensor, dict[str, Tensor]]"]
GROWTH = 100.0  # a logged mean loss this many times the smallest one so far (or the first step's) is reported


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during fit(): training stopped between two steps; .result is the run so far, with
    result.interrupted_at steps done (the CLI saves it as an interrupted run). A second Ctrl-C stops at once."""

    def __init__(self, result: FitResult) -> None:
        super().__init__(f"training interrupted after {result.interrupted_at} steps")
        self.result = result


class TrainingDiverging(RuntimeWarning):
    """The training loss grew by orders of magnitude (GROWTH times its smallest logged mean, or its first step's)."""


class _StopAtStep:
    """While fit() runs in the main thread under Python's own SIGINT handler: the first Ctrl-C asks the loop to stop
    before the next step (so the weights are those of whole steps), a second one interrupts at once."""

    def __init__(self) -> None:
        self.asked, self.saved = False, None

    def __enter__(self) -> _StopAtStep:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self.saved = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            signal.signal(signal.SIGINT, self.saved)


def fit_options(options: dict, **defaults) -> FitConfig:
    """FitConfig(**defaults, **options): a method's fit_<method>(..., **options) passes the loop's own options through
    (steps, batch_size, lr, lr_schedule, seed, device, threads, ...); an unknown name is a clear TypeError."""
    known = [f.name for f in dataclasses.fields(FitConfig)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown training option {unknown[0]!r}; allowed: {', '.join(known)}")
    return FitConfig(**{**defaults, **options})


def pair_sampler(model: nn.Module, target: Distribution, source: Distribution | None = None):
    """draw(ctx) -> (x0, x1): x1 ~ target then x0 ~ source (N(0, I) by default) from fit's generator, each step of a
    method's loss; the distributions are checked once, here."""
    source = StandardNormal(target.dim) if source is None and isinstance(target, Distribution) else source
    check_distributions(model, target, source)

    def draw(ctx: FitContext) -> tuple[Tensor, Tensor]:
        x1 = target.sample(ctx.batch_size, generator=ctx.generator, device=ctx.device)
        return source.sample(ctx.batch_size, generator=ctx.generator, device=ctx.device), x1

    return draw


def fit(
    modules: nn.Module | dict[str, nn.Module],
    loss_fn: LossFn,
    config: FitConfig,
    *,
    name: str = "train",
    progress: bool = False,
    callback: Callable[[int], None] | None = None,
) -> FitResult:
    """The training loop under every method: minimise loss_fn(ctx) (a scalar, or (scalar, {part: scalar})) over the
    modules' trainable parameters. It owns the device, the seeded generator, Adam/AdamW (fused where torch has it),
    the learning-rate schedule, EMA (theta_ema <- d theta_ema + (1 - d) theta after every step, one copy per module),
    the NaN/inf check every log_every steps (and a TrainingDiverging warning when the loss grows GROWTH-fold), the
    progress bar, the timing and the CPU thread policy (fmtoy.threads). Ctrl-C stops it between two steps and raises
    TrainingInterrupted carrying the run so far. callback(step) runs before every step and once after the last one
    (step = steps), e.g. to log or snapshot.
    """
    named = {"model": modules} if isinstance(modules, nn.Module) else modules
    if not isinstance(named, dict) or not named or not all(isinstance(m, nn.Module) for m in named.values()):
        raise TypeError(
            "modules must be a torch.nn.Module or a dict of them (e.g. fmtoy.models.VelocityMLP), got "
            f"{type(modules).__name__}"
        )
    if not isinstance(config, FitConfig):
        raise TypeError(f"config must be a fmtoy.train.FitConfig, got {type(config).__name__}")
    c = config
    dev = resolve_device(c.device)
    named = dict(named)
    mods = [m.to(dev).train() for m in named.values()]
    trainable = [[p.requires_grad for p in m.parameters()] for m in mods]
    params = [p for m, keep in zip(mods, trainable) for p, k in zip(m.parameters(), keep) if k]
    if not params:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    fused = {"fused": True} if dev.type in ("cpu", "cuda") else {}
    opt_cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=c.lr, weight_decay=c.weight_decay, **fused)
    ema, ema_params = None, []
    if c.ema_decay is not None:
        ema = [copy.deepcopy(m).requires_grad_(False) for m in mods]
        ema_params = [p for m, keep in zip(ema, trainable) for p, k in zip(m.parameters(), keep) if k]
    ctx = FitContext(make_generator(c.seed, dev), dev, c.batch_size, c.steps, 0, ema)
    losses, parts = torch.empty(c.steps, device=dev), None
    names: list[str] = []
    history: list[float] = []
    smallest = {"loss": math.nan, "warned": False}  # the smallest logged mean loss (first: the first step's)
    done = 0

    def sync(upto: int) -> list[float]:
        """The losses of steps len(history)..upto-1 on the host, checked: non-finite is an error, growth a warning."""
        chunk = losses[len(history) : upto].tolist()
        bad = [i for i, v in enumerate(chunk) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"{name}: the training loss became {chunk[bad[0]]} at step {len(history) + bad[0] + 1} of "
                f"{c.steps} (lr={c.lr:g}); try a lower learning rate (e.g. lr={c.lr / 10:g}), and check "
                "that the data and the path give finite values"
            )
        if chunk:
            mean, low = sum(chunk) / len(chunk), smallest["loss"] if history else chunk[0]
            if low > 0 and mean > GROWTH * low and not smallest["warned"]:
                warnings.warn(
                    TrainingDiverging(
                        f"{name}: the training loss grew from {low:.4g} to {mean:.4g} (mean of steps "
                        f"{len(history) + 1}-{upto} of {c.steps}, lr={c.lr:g}): the run is diverging; try a lower "
                        f"learning rate (e.g. lr={c.lr / 10:g})"
                    ),
                    stacklevel=3,
                )
                smallest["warned"] = True
            smallest["loss"] = min(low, mean)
        history.extend(chunk)
        return chunk

    start = time.perf_counter()
    with (
        thread_policy(c.threads, dev) as tuner,
        tqdm(total=c.steps, desc=name, unit="step", disable=not progress) as bar,
        _StopAtStep() as stop,
    ):
        for step in range(c.steps):
            if stop.asked:
                break
            if callback is not None:
                callback(step)
            tuner.tick()
            ctx.step = step
            out = loss_fn(ctx)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError(
                    f"{name}: the loss function must return a scalar tensor (or (scalar, parts)), "
                    f"got {type(loss).__name__}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.lr_schedule != "constant":
                for group in opt.param_groups:
                    group["lr"] = c.lr * _lr_factor(c.lr_schedule, step, c.steps)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, params, 1.0 - c.ema_decay)
            losses[step] = loss.detach()
            if extra:
                if parts is None:
                    names, parts = list(extra), torch.empty(c.steps, len(extra), device=dev)
                parts[step] = torch.stack([extra[k].detach().reshape(()) for k in names])
            done = step + 1
            if done % c.log_every == 0 or done == c.steps:  # the only host-device sync (besides "ot")
                chunk = sync(done)
                bar.update(len(chunk))
                bar.set_postfix(loss=f"{sum(chunk) / len(chunk):.4f}")
        interrupted = stop.asked and done < c.steps
        if interrupted:
            sync(done)
        elif callback is not None:
            callback(c.steps)
    seconds = time.perf_counter() - start
    for m in mods + (ema or []):
        m.eval()
    columns = parts[:done].T.tolist() if parts is not None else []
    result = FitResult(
        mods[0],
        ema[0] if ema else None,
        history,
        seconds,
        done / seconds,
        str(dev),
        dict(zip(names, columns)),
        dict(zip(named, mods)),
        dict(tuner.counts),
        interrupted_at=done if interrupted else None,
    )
    if interrupted:
        raise TrainingInterrupted(result)
    return result


# ----------------------------------------------------------------------------------------------- CFM
def fit_cfm(
    model: nn.Module,
    path,
    target: Distribution,
    source: Distribution | None = None,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: str | torch.device = "auto",
    seed: int = 0,
    ema_decay: float | None = None,
    coupling: str = "independent",
    lr_schedule: str = "cosine",
    progress: bool = True,
    log_every: int = 100,
    threads: str | int | None = None,
) -> FitResult:
    """Minimise the CFM loss, FM paper Eq. (9)/(14), with fit(); t ~ U[path.t_min, path.t_max], (x_0, x_1) ~
    coupling."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. fmtoy.models.VelocityMLP), got {type(model).__name__}")
    if not callable(getattr(path, "schedule", None)):
        raise TypeError(f"path must be a GaussianPath (fmtoy.paths.get_path), got {type(path).__name__}")
    t_min, t_max = float(path.t_min), float(path.t_max)
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"path.t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
    draw = pair_sampler(model, target, source)
    couple = get_coupling(coupling)
    config = FitConfig(
        steps,
        batch_size,
        lr,
        lr_schedule,
        ema_decay=ema_decay,
        seed=seed,
        device=device,
        threads=threads,
        log_every=log_every,
    )

    def loss_fn(ctx: FitContext) -> Tensor:
        x0, x1 = couple(*draw(ctx))
        t = torch.rand(ctx.batch_size, generator=ctx.generator, device=ctx.device).mul_(t_max - t_min).add_(t_min)
        return cfm_loss(model, x0, x1, t, path)

    return fit(model, loss_fn, config, name="train", progress=progress)


@dataclass
class RecipeConfig:
    """The fields every method's config shares: data set, network size, optimisation, seed, device and threads."""

    data: str = "eight_gaussians"
    steps: int = 5000
    batch_size: int = 1024
    lr: float = 3e-3
    hidden: int = 128
    depth: int = 3
    seed: int = 0
    device: str = "auto"
    lr_schedule: str = "cosine"
    threads: str | int | None = None

    def __post_init__(self) -> None:
        check_choice("dataset", self.data, list_datasets())
        for name in ("steps", "batch_size", "hidden", "depth"):
            check_positive_int(name, getattr(self, name))
        check_positive("lr", self.lr)
        check_seed(self.seed)
        resolve_device(self.device)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_threads(self.threads)

    def fit_config(self, **changes) -> FitConfig:
        """The FitConfig of this recipe (fit's share of the fields), with `changes` (e.g. ema_decay, optimizer)."""
        return FitConfig(
            self.steps,
            self.batch_size,
            self.lr,
            self.lr_schedule,
            seed=self.seed,
            device=self.device,
            threads=self.threads,
            **changes,
        )


@dataclass
class TrainConfig(RecipeConfig):
    """Everything train_flow needs to rebuild a CFM run.

    The defaults train eight_gaussians in ~13 s on 2 CPU cores to an NLL gap of ~0.02 nats (exact divergence) and
    Euler-8 samples as close (energy distance) as the exact marginal field's; EMA is off because the cosine lr
    decay already averages out the SGD noise (plain EMA 0.999 was worse at this length).
    """

    path: str = "ot"
    sigma_min: float = 0.0
    ema_decay: float | None = None
    coupling: str = "independent"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("path", self.path, list_paths())
        check_positive("sigma_min", self.sigma_min, allow_zero=True)
        if self.sigma_min > 0 and self.path not in ("ot", "ve"):
            raise ValueError(
                f"sigma_min applies to the 'ot' and 've' paths only (0 leaves the 've' default); "
                f"path {self.path!r} got sigma_min={self.sigma_min}"
            )
        check_ema(self.ema_decay)
        check_choice("coupling", self.coupling, COUPLINGS)


def build_path(config: TrainConfig):
    """get_path(config.path) with sigma_min for the paths that have one (ve: 0 means the path's default)."""
    if config.path == "ot" or (config.path == "ve" and config.sigma_min > 0):
        return get_path(config.path, sigma_min=config.sigma_min)
    return get_path(config.path)


def build_model(config: RecipeConfig, dim: int = 2, cls: type[nn.Module] = VelocityMLP, **kwargs) -> nn.Module:
    """cls(dim=dim, hidden=config.hidden, depth=config.depth, **kwargs), initialised from torch.manual_seed(config.seed)
    (the global RNG is left untouched); VelocityMLP by default."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return cls(dim=dim, hidden=config.hidden, depth=config.depth, **kwargs)


def check_config(config: object, cls: type) -> None:
    """TypeError unless config is a `cls` (the first check of every train_<method>(config))."""
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")


def run_config(fit_fn: Callable[..., FitResult], config: object, *args, **extra) -> FitResult:
    """fit_fn(*args, **the config fields fit_fn takes, **extra) with the config attached to the result: how each
    train_<method>(config) hands its recipe to its fit_<method> loop. args must be built from the config alone (the
    model, the data): with FMTOY_RUN_CACHE set, a run of the same config is loaded instead (fmtoy.runcache)."""
    key = None
    if runcache.folder() is not None and set(extra) <= {"progress"}:
        key = runcache.run_key(f"{fit_fn.__module__}.{fit_fn.__qualname__}", config, str(resolve_device(config.device)))
        hit = runcache.load(key)
        if isinstance(hit, FitResult):
            return hit
    params = inspect.signature(fit_fn).parameters
    takes = list(params)[len(args) :]  # not those given positionally (model, path, ...)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # fit_<method>(..., **options): FitConfig's fields too
        takes += [f.name for f in dataclasses.fields(FitConfig)]
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in takes}
    try:
        result = fit_fn(*args, **fields, **extra)
    except TrainingInterrupted as e:  # the run so far, with its recipe, and never into the cache
        e.result.config = copy.deepcopy(config)
        raise
    result.config = copy.deepcopy(config)
    if key is not None:
        runcache.store(key, result)
    return result


def train_flow(config: TrainConfig, progress: bool = True) -> FitResult:
    """Train a VelocityMLP on config.data along config.path from N(0, I): the whole recipe in one call."""
    check_config(config, TrainConfig)
    target = get_dataset(config.data)
    return run_config(fit_cfm, config, build_model(config, target.dim), build_path(config), target, progress=progress)
