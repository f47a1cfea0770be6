"""fmtoy benchmark: training throughput and exact likelihood against Meta's flow_matching and TorchCFM (CPU),
and sample / likelihood quality against the exact marginal field. Writes bench/results/latest.{md,json}.

Usage: python bench/run.py [--quick] [--threads N] [--out DIR]      (peers: pip install -e '.[bench]', see bench/README.md)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402
from fmtoy.data import GaussianMixture, StandardNormal, get_dataset  # noqa: E402
from fmtoy.marginal import ExactField  # noqa: E402
from fmtoy.metrics import energy_distance, nll_gap  # noqa: E402
from fmtoy.paths import get_path  # noqa: E402
from fmtoy.solvers import integrate, log_likelihood  # noqa: E402
from fmtoy.train import TrainConfig, build_model, fit_cfm, train_flow  # noqa: E402

NFES = (1, 2, 4, 8, 32)
DATASETS = ("eight_gaussians", "two_moons")
ON_PAR = 0.95     # "at least on par": fmtoy's speed >= 95% of the peer's (5% = run-to-run timing noise here)
TARGETS = {"train_seconds": 30.0, "nll_gap_eight_gaussians": 0.03, "nfe8_ratio": 1.2}

FULL = dict(tp_steps=400, tp_warmup=40, tp_repeats=5, ll_points=2000, ll_steps=32, ll_repeats=3,
            nll_points=2000, nll_steps=32, ed_points=4000, empirical_points=4000, train_steps=None)
QUICK = dict(tp_steps=20, tp_warmup=5, tp_repeats=1, ll_points=200, ll_steps=4, ll_repeats=1,
             nll_points=200, nll_steps=4, ed_points=300, empirical_points=300, train_steps=100)


def machine_info() -> dict:
    """CPU count, threads, versions: what the timings depend on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "peers": peers.available()}


def _timed(fn):
    """(fn(), wall seconds, process CPU seconds); CPU time is robust to other load when running 1 thread."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------------------------------ throughput
def throughput(cfg: TrainConfig, steps: int, warmup: int, repeats: int) -> dict:
    """Training it/s of fmtoy.train.train vs the same loop on each peer's path sampler: same MLP, batch, data,
    Adam and lr schedule. Implementations alternate inside each repeat so that load drift hits all of them."""
    target, path = get_dataset(cfg.data), get_path(cfg.path)
    names = ["fmtoy"] + [p for p, v in peers.available().items() if v is not None]
    kw = dict(batch_size=cfg.batch_size, lr=cfg.lr)

    def run(name: str, n: int, seed: int) -> tuple[float, float]:
        model = build_model(cfg)
        if name == "fmtoy":
            fn = lambda: fit_cfm(model, path, target, steps=n, device="cpu", seed=seed, progress=False,  # noqa: E731
                               lr_schedule=cfg.lr_schedule, **kw)
        else:
            fn = lambda: peers.train_peer(name, model, target, steps=n, seed=seed,  # noqa: E731
                                          lr_schedule=cfg.lr_schedule, **kw)
        return _timed(fn)[1:]

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name in names:
        run(name, warmup, 0)
    for r in range(repeats):
        for name in names:
            times[name].append(run(name, steps, r))
    out = {}
    for name, ts in times.items():
        wall, cpu = [w for w, _ in ts], [c for _, c in ts]
        out[name] = {"it_per_s_median": steps / statistics.median(wall), "it_per_s_best": steps / min(wall),
                     "it_per_cpu_s_median": steps / statistics.median(cpu), "seconds": wall, "cpu_seconds": cpu}
    return {"steps": steps, "warmup": warmup, "repeats": repeats, "batch_size": cfg.batch_size,
            "hidden": cfg.hidden, "depth": cfg.depth, "results": out}


# ------------------------------------------------------------------------------------------------ likelihood
def likelihood(model, target, n: int, steps: int, repeats: int, method: str = "midpoint") -> dict:
    """fmtoy.solvers.log_likelihood vs flow_matching ODESolver.compute_likelihood: exact divergence, the same
    fixed grid of `steps` explicit-midpoint steps from t=1 to t=0 on both sides; time and agreement of log p."""
    source = StandardNormal(target.dim)
    x = target.sample(n, generator=torch.Generator().manual_seed(123))
    runs = {"fmtoy": lambda: log_likelihood(model, x, source, steps=steps, method=method, divergence="exact")}
    if peers.available()["flow_matching"] is not None:
        runs["flow_matching"] = lambda: peers.meta_log_likelihood(model, x, source.log_prob, steps=steps,
                                                                  method=method)
    values, times = {}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            values[name], *wall_cpu = _timed(fn)
            times[name].append(wall_cpu)
    out = {"points": n, "steps": steps, "method": method, "divergence": "exact",
           "seconds": {k: statistics.median(w for w, _ in v) for k, v in times.items()},
           "cpu_seconds": {k: statistics.median(c for _, c in v) for k, v in times.items()},
           "mean_log_p": {k: float(v.detach().mean()) for k, v in values.items()},
           "true_mean_log_q": float(target.log_prob(x).mean())}
    if "flow_matching" in values:
        diff = (values["fmtoy"].detach().double() - values["flow_matching"].double()).abs()
        out.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    return out


# ------------------------------------------------------------------------------------------------ quality
def _chunked(field, rows: int = 500):
    """v(x, t) evaluated on row blocks: bounds the (rows x components) posterior of a large empirical mixture."""
    return lambda x, t: torch.cat([field(xb, tb) for xb, tb in zip(x.split(rows), t.split(rows))])


def quality(name: str, p: dict) -> dict:
    """Default-config training on `name`: time, NLL gap to the entropy, energy distance of Euler samples at
    several NFE for the learned field and for the exact marginal field of the same path."""
    cfg = TrainConfig(data=name, device="cpu") if p["train_steps"] is None else \
        TrainConfig(data=name, device="cpu", steps=p["train_steps"])
    target = get_dataset(name)
    result, wall, cpu = _timed(lambda: train_flow(cfg, progress=False))
    model = (result.ema_model if result.ema_model is not None else result.model).eval()
    gap = nll_gap(model, target, n=p["nll_points"], generator=torch.Generator().manual_seed(1),
                  steps=p["nll_steps"], method="rk4")
    if isinstance(target, GaussianMixture):
        exact_target, exact_kind = target, "closed form (the data set is a Gaussian mixture)"
    else:
        pts = target.sample(p["empirical_points"], generator=torch.Generator().manual_seed(2))
        exact_target = GaussianMixture.from_points(pts)
        exact_kind = (f"exact field of an empirical sample of {p['empirical_points']} points "
                      "(GaussianMixture.from_points), not of the continuous density")
    exact = _chunked(ExactField(get_path(cfg.path), exact_target))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(p["ed_points"], target.dim, generator=g)
    ref = target.sample(p["ed_points"], generator=g)
    dist = {"learned": {}, "exact": {}}
    for k in NFES:   # same x0 and reference set for both fields: common random numbers sharpen the ratio
        dist["learned"][k] = energy_distance(integrate(model, x0, k, "euler"), ref)
        dist["exact"][k] = energy_distance(integrate(exact, x0, k, "euler"), ref)
    return {"data": name, "config": {k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "hidden", "depth",
                                                                   "lr_schedule", "ema_decay")},
            "train_seconds": result.seconds, "train_wall_seconds": wall, "train_cpu_seconds": cpu, "final_loss": result.losses[-1],
            "nll": gap, "nll_method": f"rk4, {p['nll_steps']} steps, exact divergence, {p['nll_points']} points",
            "energy_distance": dist, "ed_points": p["ed_points"], "exact_field": exact_kind, "_model": model}


# ------------------------------------------------------------------------------------------------ report
def judge(results: dict) -> list[dict]:
    """Pass/fail of each target (None where it could not be measured, e.g. a peer is not installed)."""
    rows = []
    for q in results["quality"]:
        rows.append(dict(target=f"default training <= {TARGETS['train_seconds']:.0f} s ({q['data']})",
                         value=f"{q['train_seconds']:.1f} s", ok=q["train_seconds"] <= TARGETS["train_seconds"]))
        lrn, ext = q["energy_distance"]["learned"][8], q["energy_distance"]["exact"][8]
        rows.append(dict(target=f"energy distance at NFE 8 <= {TARGETS['nfe8_ratio']}x exact field's ({q['data']})",
                         value=f"{lrn:.4f} vs {ext:.4f} ({lrn / ext:.2f}x)" if ext > 0 else f"{lrn:.4f} vs {ext:.4f}",
                         ok=lrn <= TARGETS["nfe8_ratio"] * ext))
        if q["data"] == "eight_gaussians":
            g = q["nll"]
            rows.append(dict(target=f"NLL gap <= {TARGETS['nll_gap_eight_gaussians']} nats (eight_gaussians)",
                             value=f"{g['gap']:.4f} +- {g['gap_stderr']:.4f}",
                             ok=g["gap"] <= TARGETS["nll_gap_eight_gaussians"]))
    tp = results["throughput"]["results"]
    for peer in peers.PEERS:
        ok, value = None, "peer not installed"
        if peer in tp:
            a, b = tp["fmtoy"]["it_per_s_median"], tp[peer]["it_per_s_median"]
            ok, value = a >= ON_PAR * b, f"{a:.0f} vs {b:.0f} it/s ({a / b:.2f}x)"
        rows.append(dict(target=f"training it/s on par with {peer} (>= {ON_PAR:.0%})", value=value, ok=ok))
    ll = results["likelihood"]["seconds"]
    ok, value = None, "peer not installed"
    if "flow_matching" in ll:
        ok = ll["fmtoy"] <= ll["flow_matching"] / ON_PAR
        value = f"{ll['fmtoy']:.2f} vs {ll['flow_matching']:.2f} s ({ll['flow_matching'] / ll['fmtoy']:.2f}x faster)"
    rows.append(dict(target="likelihood time on par with flow_matching", value=value, ok=ok))
    return rows


def markdown(res: dict) -> str:
    """The human-readable report."""
    m, tp, ll = res["machine"], res["throughput"], res["likelihood"]
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = [f"# fmtoy benchmark{' (QUICK smoke run: numbers not meaningful)' if res['quick'] else ''}", "",
             f"Machine: {m['cpu_count']} CPUs ({m['processor']}), torch {m['torch']} with {m['torch_threads']} "
             f"threads, Python {m['python']}, 1-min load {m['load_avg_1min']:.1f} at start; peers: "
             + ", ".join(f"{k} {v or 'not installed'}" for k, v in m["peers"].items()) + ".",
             f"Total bench time {res['total_seconds']:.0f} s."]
    if m["load_avg_1min"] is not None and m["load_avg_1min"] > 0.5 * m["cpu_count"]:
        lines += ["", f"**Warning: the machine was busy (1-min load {m['load_avg_1min']:.1f} on {m['cpu_count']} "
                      "CPUs): wall-clock timings are unreliable; compare the CPU-second columns (1 thread).**"]
    lines += ["", "## Targets", "",
             "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {r['target']} | {r['value']} | {mark[r['ok']]} |" for r in res["targets"]]
    lines += ["", "## Training throughput (CPU)", "",
              f"VelocityMLP(hidden={tp['hidden']}, depth={tp['depth']}), batch {tp['batch_size']}, eight_gaussians, "
              f"fused Adam, same lr and schedule; {tp['steps']} steps after {tp['warmup']} warm-up, "
              f"{tp['repeats']} repeats (implementations interleaved).", "",
              "| implementation | it/s (median) | it/s (best) | it per CPU-second (median) |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['it_per_s_median']:.0f} | {v['it_per_s_best']:.0f} | {v['it_per_cpu_s_median']:.0f} |"
              for k, v in tp["results"].items()]
    lines += ["", "## Exact likelihood", "",
              f"{ll['points']} eight_gaussians points, trained default model, exact divergence, {ll['steps']} "
              f"explicit {ll['method']} steps from t=1 to t=0 on the same uniform grid in both "
              f"(flow_matching through torchdiffeq's fixed-grid '{ll['method']}' with time_grid = that grid).", "",
              "| implementation | seconds (median) | CPU seconds (median) | mean log p |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v:.2f} | {ll['cpu_seconds'][k]:.2f} | {ll['mean_log_p'][k]:.4f} |"
              for k, v in ll["seconds"].items()]
    lines += [f"| true log q (data density) | | | {ll['true_mean_log_q']:.4f} |"]
    if "max_abs_diff" in ll:
        lines += ["", f"Agreement of log p: max |diff| = {ll['max_abs_diff']:.2e}, mean |diff| = "
                      f"{ll['mean_abs_diff']:.2e} nats."]
    for q in res["quality"]:
        c, g = q["config"], q["nll"]
        lines += ["", f"## Quality: {q['data']}", "",
                  f"Default TrainConfig ({c['steps']} steps, batch {c['batch_size']}, lr {c['lr']}, hidden {c['hidden']}, "
                  f"depth {c['depth']}, {c['lr_schedule']} schedule, EMA {c['ema_decay']}): trained in "
                  f"{q['train_seconds']:.1f} s ({q['train_cpu_seconds']:.1f} CPU-s), final loss {q['final_loss']:.3f}.",
                  f"NLL {g['nll']:.4f} vs entropy {g['entropy']:.4f}: gap {g['gap']:.4f} +- {g['gap_stderr']:.4f} "
                  f"nats ({q['nll_method']}).",
                  f"Energy distance to {q['ed_points']} fresh data points, Euler, {q['ed_points']} samples from the "
                  f"same x0; exact field: {q['exact_field']}.", "",
                  "| NFE | " + " | ".join(str(k) for k in NFES) + " |", "| --- |" + " --- |" * len(NFES)]
        for kind in ("learned", "exact"):
            lines.append(f"| {kind} | " + " | ".join(f"{q['energy_distance'][kind][k]:.4f}" for k in NFES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, numbers not meaningful")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder (latest.md, latest.json)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    p = QUICK if args.quick else FULL
    start = time.perf_counter()
    res: dict = {"quick": args.quick, "machine": machine_info(), "params": p}
    res["quality"] = [quality(name, p) for name in DATASETS]
    res["likelihood"] = likelihood(res["quality"][0]["_model"], get_dataset(DATASETS[0]), p["ll_points"],
                                   p["ll_steps"], p["ll_repeats"])
    res["throughput"] = throughput(TrainConfig(device="cpu"), p["tp_steps"], p["tp_warmup"], p["tp_repeats"])
    for q in res["quality"]:
        q.pop("_model")
    res["total_seconds"] = time.perf_counter() - start
    res["targets"] = judge(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(res, indent=1, default=str))
    text = markdown(res)
    (out / "latest.md").write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
