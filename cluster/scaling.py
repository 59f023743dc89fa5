"""Scaling sweeps: run the trainer over a grid (sequence length, item count, mixer, workers) and plot it.

    python -m cluster.scaling --config configs/scaling/cpu-small.yaml --out DIR [--only SUBSTR ...]
                              [--timeout-s S] [--retry-failed] [--plots-only]

Each point runs `python -m trainer.train` in its own process (so an out-of-memory kill or a hang costs only
that point) with output.dir=DIR/points/ID, and records training throughput (events/s), peak memory per
worker, time per phase and the held-out-day metrics (with the oracle fraction on synthetic logs) as one
row of DIR/results.csv. A point that runs out of memory, times out or fails is recorded as such and the
sweep goes on. The sweep is resumable: a point with a record (DIR/points/ID/point.json) is not rerun
(--retry-failed reruns the failed ones); a point whose Ray failed to start is retried twice at once.
Points are identified by their resolved trainer config, so the same point in two sweeps runs once.
With RAY_ADDRESS set, every point joins that cluster instead of starting Ray.

The config (YAML):

    base: configs/smoke.yaml            # the trainer config every point starts from
    overrides: [model.dim=16, ...]      # applied to every point
    metric: hr@10                       # the metric plotted (and divided by the oracle's)
    timeout_s: 600                      # per point; a sweep may set its own
    sweeps:
      seq_len:                          # name: a product over its axes, one plot DIR/seq_len.png
        axes: {mixer: [fft, dwc, attention], seq_len: [32, 128, 512]}
        overrides: ["model.mixer={mixer}", "model.max_seq_len={seq_len}", "model.kernel_size={seq_len}"]
        plot: {x: seq_len, series: mixer}
        derive: {batch: "65536 // seq_len"}  # optional: values computed from the axes, for the overrides
"""

import argparse
import ast
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent
# Ray's start-up gives the raylet a fixed 30 s to register; on a loaded machine that can fail. Retried.
TRANSIENT_SIGNS = ("The current node timed out during startup",)
OOM_SIGNS = ("OutOfMemoryError", "out of memory", "MemoryError", "Cannot allocate memory", "std::bad_alloc")
COLUMNS = [
    "sweep", "point", "status", "mixer", "seq_len", "items", "workers", "events_per_s", "sequences_per_s",
    "peak_mem_mb_max", "peak_mem_mb_mean", "peak_device_mem_mb_max", "metric", "value", "oracle", "oracle_fraction",
    "popularity", "lift_over_popularity", "beats_popularity",
    "train_s", "eval_s", "fit_s", "data_s", "ray_start_s", "build_s", "wall_s", "steps", "error", "overrides",
]
AXIS_COLUMNS = ("mixer", "seq_len", "items", "workers")
MARGIN = 0.2  # a point should beat popularity by 20% wherever the oracle leaves that much room


@dataclass
class Sweep:
    name: str
    axes: dict[str, list]
    overrides: list[str]
    timeout_s: float
    plot: dict[str, str] = field(default_factory=dict)
    derive: dict[str, str] = field(default_factory=dict)  # name -> arithmetic over the axes, for overrides

    def points(self) -> list[dict[str, Any]]:
        names = list(self.axes)
        return [dict(zip(names, values)) for values in itertools.product(*(self.axes[n] for n in names))]


_ARITHMETIC = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, ast.Constant, ast.Call, ast.Add, ast.Sub,
               ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub)
_FUNCTIONS = {"min": min, "max": max, "round": round, "int": int}


def evaluate(expr: str, values: dict[str, Any]) -> Any:
    """A derived value: arithmetic (+ - * / // % **, min, max, round, int) over a point's axis values."""
    tree = ast.parse(str(expr), mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ARITHMETIC) or (
                isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS)):
            raise ValueError(f"derive: {expr!r} may use only arithmetic, min, max, round and int")
        if isinstance(node, ast.Name) and node.id not in values and node.id not in _FUNCTIONS:
            raise ValueError(f"derive: {expr!r} names {node.id!r}, which is not an axis")
    return eval(compile(tree, "<derive>", "eval"), {"__builtins__": {}}, {**_FUNCTIONS, **values})


@dataclass
class SweepConfig:
    base: str
    overrides: list[str]
    metric: str
    timeout_s: float
    sweeps: list[Sweep]


def load_sweep_config(path: str | Path) -> SweepConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - {"base", "overrides", "metric", "timeout_s", "sweeps"}
    if unknown:
        raise ValueError(f"{path}: unknown key {sorted(unknown)[0]}; valid: base, overrides, metric, timeout_s, sweeps")
    if "base" not in raw or not (REPO / raw["base"]).is_file():
        raise ValueError(f"{path}: base must name a trainer config in the repo, got {raw.get('base')!r}")
    timeout = float(raw.get("timeout_s", 1800))
    sweeps = []
    for name, s in (raw.get("sweeps") or {}).items():
        unknown = set(s) - {"axes", "overrides", "timeout_s", "plot", "derive"}
        if unknown:
            raise ValueError(f"{path}: sweeps.{name}: unknown key {sorted(unknown)[0]}")
        axes = s.get("axes") or {}
        if not axes or any(not isinstance(v, list) or not v for v in axes.values()):
            raise ValueError(f"{path}: sweeps.{name}.axes must map names to non-empty lists")
        plot = s.get("plot") or {}
        for role in ("x", "series"):
            if role in plot and plot[role] not in axes:
                raise ValueError(f"{path}: sweeps.{name}.plot.{role}={plot[role]!r} is not one of its axes")
        derive = {str(k): str(v) for k, v in (s.get("derive") or {}).items()}
        sweep = Sweep(name, axes, list(s.get("overrides") or []), float(s.get("timeout_s", timeout)), plot, derive)
        for values in sweep.points():  # a bad expression is refused before anything runs
            for expr in derive.values():
                try:
                    evaluate(expr, values)
                except (ValueError, SyntaxError, ArithmeticError, TypeError) as e:
                    raise ValueError(f"{path}: sweeps.{name}.derive: {e}") from None
        sweeps.append(sweep)
    if not sweeps:
        raise ValueError(f"{path}: no sweeps")
    return SweepConfig(raw["base"], list(raw.get("overrides") or []), raw.get("metric", "hr@10"), timeout, sweeps)


def point_overrides(cfg: SweepConfig, sweep: Sweep, values: dict[str, Any]) -> list[str]:
    values = {**values, **{k: evaluate(e, values) for k, e in sweep.derive.items()}}
    try:
        return [*cfg.overrides, *(o.format(**values) for o in sweep.overrides)]
    except KeyError as e:
        raise ValueError(f"sweeps.{sweep.name}: override names {e} which is not one of its axes") from None


def point_id(resolved: dict[str, Any]) -> str:
    """Stable name of a point: its resolved trainer config without output.dir, hashed (so the same point
    reached by two sweeps runs once; a trainer config change, new defaults included, makes new points)."""
    resolved = {**resolved, "output": {k: v for k, v in resolved["output"].items() if k != "dir"}}
    return hashlib.sha1(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- running one point


def run_point(base: str, overrides: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """Train one point in a child process group; return its record (status ok/oom/timeout/failed)."""
    out.mkdir(parents=True, exist_ok=True)
    train_dir = out / "run"
    if train_dir.exists():  # an interrupted attempt: start the point afresh
        shutil.rmtree(train_dir)
    cmd = [sys.executable, "-m", "trainer.train", "--config", base, *overrides, f"output.dir={train_dir}"]
    env = dict(os.environ)
    t0 = time.perf_counter()
    with open(out / "log.txt", "wb") as log:
        # its own session: on a time-out the whole group goes (the point's driver and the Ray it started)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = None
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, status = proc.returncode, "timeout"
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {"overrides": overrides, "returncode": rc, "wall_s": wall}
    tail = (out / "log.txt").read_text(errors="replace")[-20000:]
    if status is None:
        if rc == 0 and (train_dir / "results.json").is_file():
            status = "ok"
            record["results"] = json.loads((train_dir / "results.json").read_text())
        elif rc in (-signal.SIGKILL, 137) or any(s in tail for s in OOM_SIGNS):
            status = "oom"
        else:
            status = "failed"
    record["status"] = status
    if status == "failed" and any(sign in tail for sign in TRANSIENT_SIGNS):
        record["transient"] = True
    if status != "ok":
        lines = tail.splitlines()
        # the last raised exception's line, else any line that mentions an error
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)] or [
            ln for ln in lines if "Error" in ln or "error" in ln]
        record["error"] = (errors[-1] if errors else f"exit {rc}" if status != "timeout" else f"> {timeout_s:g}s")[:300]
    # keep the record and the log, drop the bulky outputs (data, checkpoints)
    if train_dir.exists():
        shutil.rmtree(train_dir, ignore_errors=True)
    (out / "point.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the point's process group (its driver and the Ray processes it started), then SIGKILL what is left
    (also benchmarks/long_sequence.py's)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if sig == signal.SIGTERM:
            time.sleep(2)  # let the group's other processes exit before the SIGKILL sweep


def row(sweep: Sweep, values: dict[str, Any], pid: str, record: dict[str, Any], metric: str) -> dict[str, Any]:
    r: dict[str, Any] = {c: "" for c in COLUMNS}
    r.update({"sweep": sweep.name, "point": pid, "status": record["status"], "error": record.get("error", ""),
              "wall_s": round(record["wall_s"], 1), "overrides": " ".join(record["overrides"]), "metric": metric})
    res = record.get("results")
    if res:
        c = res["config"]
        r.update(mixer=c["model"]["mixer"], seq_len=c["model"]["max_seq_len"], items=c["model"]["num_items"],
                 workers=c["distributed"]["num_workers"])
        tp, phases, mem = res["throughput"], res["phases_s"], res["peak_memory_bytes_per_worker"]
        r.update(events_per_s=round(tp["events_per_s"], 1), sequences_per_s=round(tp["sequences_per_s"], 2),
                 steps=tp.get("steps", ""), peak_mem_mb_max=round(max(mem) / 2**20, 1),
                 peak_mem_mb_mean=round(sum(mem) / len(mem) / 2**20, 1))
        device_mem = res.get("peak_device_memory_bytes_per_worker")  # CUDA runs only
        if device_mem:
            r["peak_device_mem_mb_max"] = round(max(device_mem) / 2**20, 1)
        for key in ("train", "eval", "fit", "data", "ray_start", "build"):
            if key in phases:
                r[f"{key}_s"] = round(phases[key], 2)
        r["value"] = res["metrics"].get(metric, "")
        oracle = res.get("baselines", {}).get("oracle", {}).get(metric)
        pop = res.get("baselines", {}).get("popularity", {}).get(metric)
        r["oracle"] = "" if oracle is None else oracle
        r["popularity"] = "" if pop is None else pop
        if oracle and r["value"] != "":
            r["oracle_fraction"] = round(r["value"] / oracle, 4)
        r.update(beats(r["value"], pop, oracle))
    else:  # a failed point still names where it was on the grid
        for k in AXIS_COLUMNS:
            if k in values:
                r[k] = values[k]
    return r


def beats(value: Any, popularity: Optional[float], oracle: Optional[float]) -> dict[str, Any]:
    """The model's lift over the popularity baseline, and whether it reaches MARGIN: yes / no, or "no room"
    when even the oracle is not MARGIN above popularity (the data leaves nothing to learn past it)."""
    if value in ("", None) or not popularity:
        return {}
    lift = float(value) / popularity - 1
    if oracle is not None and oracle < (1 + MARGIN) * popularity:
        verdict = "no room"
    else:
        verdict = "yes" if lift >= MARGIN else "no"
    return {"lift_over_popularity": round(lift, 4), "beats_popularity": verdict}


# ---------------------------------------------------------------- the sweep


def run_sweep(cfg: SweepConfig, out: Path, only: Sequence[str] = (), timeout_s: Optional[float] = None,
              retry_failed: bool = False, log=print) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sweep in cfg.sweeps:
        for values in sweep.points():
            overrides = point_overrides(cfg, sweep, values)
            label = f"{sweep.name}/" + ",".join(f"{k}={v}" for k, v in values.items())
            pid = point_id(load_config(REPO / cfg.base, overrides).to_dict())  # refuses an invalid point
            path = out / "points" / pid / "point.json"
            record = json.loads(path.read_text()) if path.is_file() else None
            if only and not any(s in label for s in only):
                if record is not None:  # not selected, but recorded earlier: it stays in results.csv
                    rows.append(row(sweep, values, pid, record, cfg.metric))
                continue
            if record is None or (retry_failed and record["status"] != "ok"):
                for attempt in range(1, 4):
                    log(f"[{label}] running ({pid})" + (f", attempt {attempt}" if attempt > 1 else ""), flush=True)
                    record = run_point(cfg.base, overrides, path.parent, timeout_s or sweep.timeout_s)
                    if not record.get("transient"):
                        break
                log(f"[{label}] {record['status']} in {record['wall_s']:.0f}s"
                    + (f": {record['error']}" if record.get("error") else ""), flush=True)
            else:
                log(f"[{label}] done before: {record['status']}", flush=True)
            rows.append(row(sweep, values, pid, record, cfg.metric))
            write_csv(rows, out / "results.csv")
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- plots


PANELS = [("events_per_s", "training throughput (events/s)", True),
          ("peak_mem_mb_max", "peak memory per worker (MB)", True),
          ("value", "{metric} (held-out day)", False)]
DEVICE_PANEL = ("peak_device_mem_mb_max", "peak device memory per worker (MB)", True)  # when a point ran on CUDA


def plot(cfg: SweepConfig, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per sweep with a plot.x: throughput, memory and the metric against x, a line per series.
    Points that did not finish are labelled on the x axis with their status (oom, timeout, failed)."""
    import matplotlib  # only for plots: the sweep itself runs without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for sweep in cfg.sweeps:
        x = sweep.plot.get("x")
        if not x:
            continue
        mine = [r for r in rows if r["sweep"] == sweep.name]
        if not mine:
            continue
        series_key = sweep.plot.get("series")
        groups: dict[str, list] = {}
        for r in mine:
            groups.setdefault(str(r[series_key]) if series_key else sweep.name, []).append(r)
        panels = PANELS[:2] + [DEVICE_PANEL] + PANELS[2:] if any(r.get(DEVICE_PANEL[0]) for r in mine) else PANELS
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
        for ax, (col, label, logy) in zip(axes, panels):
            plotted = False
            for i, (name, rs) in enumerate(groups.items()):
                ok = sorted((float(r[x]), float(r[col])) for r in rs if r["status"] == "ok" and r.get(col, "") != "")
                color = f"C{i}"
                ax.plot([p[0] for p in ok], [p[1] for p in ok], "o-", color=color, label=name)
                plotted |= bool(ok)
                for r in rs:  # failed points: a label on the x axis (text does not move the data limits)
                    if r["status"] != "ok":
                        ax.text(float(r[x]), 0.03 + 0.07 * i, r["status"], color=color, fontsize=7, ha="center",
                                transform=ax.get_xaxis_transform())
            if col == "value":
                oracle = sorted((float(r[x]), float(r["oracle"])) for r in mine if r["oracle"] not in ("", None))
                if oracle:
                    ax.plot([p[0] for p in oracle], [p[1] for p in oracle], "k--", lw=1, label="oracle")
                pop = sorted((float(r[x]), float(r["popularity"])) for r in mine if r["popularity"] not in ("", None))
                if pop:
                    ax.plot([p[0] for p in pop], [p[1] for p in pop], ":", color="gray", lw=1, label="popularity")
                ax.legend(fontsize=7)
            xs = sorted({float(r[x]) for r in mine})
            ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
            if logy and plotted:
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(label.format(metric=cfg.metric))
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(title=series_key, fontsize=8)
        fig.suptitle(f"{sweep.name}: {', '.join(f'{k} {v}' for k, v in sweep.axes.items())}", fontsize=9)
        fig.tight_layout()
        path = out / f"{sweep.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def cost_exponents(cfg: SweepConfig, rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per sweep with a plot.x, per series: the least-squares slope of log(training seconds per event) against
    log(x) over its finished points (0: cost per event independent of x; 1: it grows linearly with x)."""
    fits: dict[str, dict[str, dict[str, Any]]] = {}
    for sweep in cfg.sweeps:
        x = sweep.plot.get("x")
        if not x:
            continue
        series_key = sweep.plot.get("series")
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["sweep"] == sweep.name and r["status"] == "ok" and r.get("events_per_s", "") not in ("", None):
                name = str(r[series_key]) if series_key else sweep.name
                groups.setdefault(name, []).append((math.log(float(r[x])), -math.log(float(r["events_per_s"]))))
        for name, pts in groups.items():
            xs = {p[0] for p in pts}
            if len(xs) < 2:
                continue
            mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
            slope = sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)
            fits.setdefault(sweep.name, {})[name] = {
                "exponent": round(slope, 3), "points": len(pts),
                x: [round(math.exp(min(xs))), round(math.exp(max(xs)))]}
    return fits


TABLE_COLUMNS = ["status", "events_per_s", "peak_mem_mb_max", "value", "popularity", "oracle", "oracle_fraction",
                 "lift_over_popularity", "beats_popularity", "train_s", "eval_s", "wall_s"]


def _cell(value: Any) -> str:
    """A number as a table shows it: 4 significant digits, thousands grouped and whole from 1000 up."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def write_table(cfg: SweepConfig, rows: list[dict[str, Any]], fits: dict, path: Path) -> None:
    """DIR/README.md: a markdown table per sweep (its axes, then TABLE_COLUMNS) and the fitted exponents."""
    lines = [f"# Scaling sweep: {cfg.base} with {' '.join(cfg.overrides) or 'no overrides'}", "",
             f"Metric: {cfg.metric} on the held-out day. Written by `python -m cluster.scaling` from results.csv.", ""]
    for sweep in cfg.sweeps:
        mine = [r for r in rows if r["sweep"] == sweep.name]
        if not mine:
            continue
        axes = list(sweep.axes)
        lines += [f"## {sweep.name}", "", "| " + " | ".join(axes + TABLE_COLUMNS) + " |",
                  "|" + "---|" * (len(axes) + len(TABLE_COLUMNS))]
        for r in mine:
            lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in axes + TABLE_COLUMNS) + " |")
        for name, fit in fits.get(sweep.name, {}).items():
            x = sweep.plot["x"]
            lines.append(f"\nTime per training event ~ {x}^{fit['exponent']} for {name} "
                         f"({fit['points']} points, {x} {fit[x][0]}-{fit[x][1]}).")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="sweep config, e.g. configs/scaling/cpu-small.yaml")
    p.add_argument("--out", required=True, help="directory for results.csv, plots and per-point records")
    p.add_argument("--only", nargs="*", default=(), help="run only points whose label contains one of these")
    p.add_argument("--timeout-s", type=float, default=None, help="per-point time limit (overrides the config)")
    p.add_argument("--retry-failed", action="store_true", help="rerun points recorded as oom/timeout/failed")
    p.add_argument("--plots-only", action="store_true", help="redraw the plots from DIR/results.csv")
    args = p.parse_args(argv)
    try:
        cfg = load_sweep_config(args.config)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    rows = read_csv(out / "results.csv") if args.plots_only else run_sweep(
        cfg, out, args.only, args.timeout_s, args.retry_failed)
    for path in plot(cfg, rows, out):
        print(f"plot: {path}")
    fits = cost_exponents(cfg, rows)
    (out / "exponents.json").write_text(json.dumps(fits, indent=1) + "\n")
    write_table(cfg, rows, fits, out / "README.md")
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows)} points, {failed} not ok; {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
