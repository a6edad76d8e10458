"""``capsrun report DIR``: the swept values of a multirun against its final metrics, and its
learning curves.

Reads every run below DIR (a run is a directory with ``metrics.json`` and ``.hydra/overrides.yaml``),
groups runs that differ only in ``seed``, and writes one row per group: the swept values, the
number of seeds, and mean +- standard deviation of each metric (empty for a group of one run).
Printed to the terminal and written as ``report.md``, ``report.csv``, ``report.png`` (each plotted
metric against the first swept parameter, the spread as error bars) and ``curves.png`` (each
plotted metric per epoch from the runs' TensorBoard events: a line per group, the mean over its
seeds with a band of one sample standard deviation) in DIR (or ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

from capsrun.api import load_runs

DEFAULT_METRICS = ("test/accuracy", "best/test/accuracy", "best/val/accuracy", "time/epoch_seconds")


def swept_keys(runs: list[dict]) -> list[str]:
    """The parameters whose value differs between runs, in the order they first appear."""
    keys = list(dict.fromkeys(k for r in runs for k in r["params"]))
    return [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in runs}) > 1]


def summarise(runs: list[dict], metrics: list[str]) -> tuple[list[str], list[dict]]:
    """Group the runs by their swept values other than ``seed``; mean and spread per metric."""
    keys = [k for k in swept_keys(runs) if k != "seed"]
    groups: dict[str, dict] = {}
    for r in runs:
        values = tuple(json.dumps(r["params"].get(k), sort_keys=True) for k in keys)
        g = groups.setdefault(values, {"params": {k: r["params"].get(k) for k in keys}, "runs": []})
        g["runs"].append(r)
    rows = []
    for g in groups.values():
        row = {"params": g["params"], "seeds": len(g["runs"]), "metrics": {}}
        for m in metrics:
            xs = [float(r["metrics"][m]) for r in g["runs"] if isinstance(r["metrics"].get(m), (int, float))]
            if xs:
                row["metrics"][m] = (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs))
        rows.append(row)
    return keys, rows


# papers quote the sample standard deviation over seeds; for 3 seeds the population one is 18 % smaller
SPREAD = "mean ± sample standard deviation over the runs of a row (n - 1 in the denominator)"


def _cell(stat: tuple[float, float, int] | None) -> str:
    if stat is None:
        return "-"
    mean, spread, n = stat
    return f"{mean:.4g}" if n == 1 else f"{mean:.4g} ± {spread:.2g}"


def table(keys: list[str], rows: list[dict], metrics: list[str], markdown: bool = False) -> str:
    header = [*keys, "runs", *metrics]
    body = [
        [*(str(r["params"][k]) for k in keys), str(r["seeds"]), *(_cell(r["metrics"].get(m)) for m in metrics)]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join([*lines, *("| " + " | ".join(b) + " |" for b in body), "", SPREAD]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    return "\n".join([*lines, SPREAD])


def to_csv(keys: list[str], rows: list[dict], metrics: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*keys, "runs", *(f"{m}{s}" for m in metrics for s in ("", " sample std"))])
    for r in rows:
        stats = [r["metrics"].get(m) for m in metrics]
        # a group of one run has no spread: empty, not 0.0
        cells = [x for s in stats for x in (("", "") if s is None else (s[0], s[1] if s[2] > 1 else ""))]
        writer.writerow([*(r["params"][k] for k in keys), r["seeds"], *cells])
    return out.getvalue()


def _draw(ax, keys: list[str], rows: list[dict], x_key: str, metric: str, sweep: str) -> None:
    """``metric`` (mean, sample standard deviation as error bars) against ``x_key`` on ``ax``."""
    from matplotlib.ticker import MaxNLocator

    others = [k for k in keys if k != x_key]
    lines: dict[str, list] = {}
    for r in rows:
        if metric not in r["metrics"]:
            continue
        label = " ".join(f"{k}={r['params'][k]}" for k in others) or metric
        lines.setdefault(label, []).append((r["params"][x_key], *r["metrics"][metric][:2]))
    numeric = all(isinstance(p[0], (int, float)) for pts in lines.values() for p in pts)
    for label, pts in lines.items():
        pts.sort(key=lambda p: p[0] if numeric else str(p[0]))
        xs = [p[0] if numeric else str(p[0]) for p in pts]
        ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=label)
    values = sorted({p[0] for pts in lines.values() for p in pts}) if numeric else []
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if len(values) <= 12:
            ax.set_xticks(values)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    runs = sorted({r["metrics"][metric][2] for r in rows if metric in r["metrics"]})
    if runs == [1]:
        what = "one run a point (no spread)"
    else:
        what = f"mean ± sample std over {runs[0] if len(runs) == 1 else f'{runs[0]}-{runs[-1]}'} runs a point"
    ax.set_title(f"{metric} against {x_key}\n{sweep}: {what}", fontsize="medium")
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def _axes(n: int):
    """A figure with ``n`` plots side by side (up to three a row) and their axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), dpi=120, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def figure(keys: list[str], rows: list[dict], x_key: str, metric: str | list[str], sweep: str):
    """Each of ``metric`` (one tag or several: a plot each) against ``x_key``: mean with the
    sample standard deviation as error bars, one line per value of the other swept parameters, a
    title naming the metric and the sweep; integer settings get integer ticks, at the values that
    were run when they are few."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    fig, axes = _axes(len(metrics))
    for ax, m in zip(axes, metrics):
        _draw(ax, keys, rows, x_key, m, sweep)
    fig.tight_layout()
    return fig


def curves(root: Path, runs: list[dict], keys: list[str], metrics: list[str]):
    """The learning curves of ``runs`` (below ``root``) as a long ``pandas.DataFrame``: ``group``
    (the swept values but ``seed``), ``run``, ``metric``, ``epoch``, ``value``; read from each
    run's TensorBoard events (:func:`capsrun.api.scalars`), the epoch from the bookkeeping tag
    logged at the same step."""
    import pandas as pd

    from capsrun import api
    from capsrun.tblog import tb_tag

    epoch_tags = [tb_tag("epoch"), "epoch"]  # "epoch": runs written before the bookkeeping group
    frame = api.scalars(root, [*metrics, *epoch_tags])
    if frame.empty:
        return pd.DataFrame(columns=["group", "run", "metric", "epoch", "value"])
    epochs = frame[frame.tag.isin(epoch_tags)].drop_duplicates(["run", "step"]).set_index(["run", "step"]).value
    points = frame[frame.tag.isin(metrics)].rename(columns={"tag": "metric"})
    points = points.assign(epoch=[epochs.get((r, s)) for r, s in zip(points.run, points.step)]).dropna(subset="epoch")
    label = {
        api.run_name(r["dir"], root): " ".join(f"{k}={r['params'].get(k)}" for k in keys if k != "seed") or "all runs"
        for r in runs
    }
    points = points[points.run.isin(label)].assign(
        group=lambda f: f.run.map(label), epoch=lambda f: f.epoch.astype(int)
    )
    return points[["group", "run", "metric", "epoch", "value"]].reset_index(drop=True)


def curves_figure(points, metrics: list[str], sweep: str):
    """A plot per metric: per group, the mean over its runs at each epoch, with a band of one
    sample standard deviation where the group has several runs."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _axes(len(metrics))
    for ax, metric in zip(axes, metrics):
        mine = points[points.metric == metric]
        for group, data in mine.groupby("group", sort=True):
            stats = data.groupby("epoch").value.agg(["mean", "std", "count"])
            n = data.run.nunique()
            (line,) = ax.plot(stats.index, stats["mean"], marker="o", markersize=3, label=f"{group} ({n} runs)")
            if n > 1:
                band = stats["std"].fillna(0)
                ax.fill_between(
                    stats.index, stats["mean"] - band, stats["mean"] + band, alpha=0.2, color=line.get_color()
                )
        ax.set_title(f"{metric} per epoch\n{sweep}: mean ± sample std over seeds", fontsize="medium")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if len(mine):
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot(keys: list[str], rows: list[dict], x_key: str, metric: str | list[str], path: Path, sweep: str = "") -> None:
    """:func:`figure`, saved as ``path``."""
    save(figure(keys, rows, x_key, metric, sweep or path.parent.name), path)


class _Parser(argparse.ArgumentParser):
    """argparse with capsrun's one-line errors (exit 2) in place of its usage block."""

    def error(self, message: str):
        print(f"capsrun: error: capsrun report: {message}; usage: capsrun report DIR [--metrics a,b] "
              "[--x KEY] [--out DIR] (capsrun report --help)", file=sys.stderr)  # fmt: skip
        sys.exit(2)


def main(argv: list[str]) -> int:
    """``capsrun report``'s exit status: 0, or 2 after one line that says what is wrong."""
    parser = _Parser(prog="capsrun report", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("dir", type=Path, help="a multirun dir (or any directory of runs)")
    parser.add_argument(
        "--metrics", help="comma-separated metric tags for the table and the plots (default: the usual accuracies)"
    )
    parser.add_argument("--x", help="the swept parameter on the plot's x axis (default: the first swept one)")
    parser.add_argument(
        "--plot-metric", default=None, help="the one metric to plot (default: each of --metrics, else the first)"
    )
    parser.add_argument("--out", type=Path, help="where to write report.{md,csv,png} (default: DIR)")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"capsrun: error: {message}", file=sys.stderr)
        return 2

    if not args.dir.is_dir():
        return fail(f"{args.dir}: no such directory; give a multirun dir such as outputs/multirun/<date>/<time>")
    skipped: list[tuple[Path, str]] = []
    runs = load_runs(args.dir, skipped)
    for run_dir, why in skipped:
        print(f"capsrun report: warning: skipped {run_dir}: {why}", file=sys.stderr)
    if not runs:
        return fail(f"no finished runs (metrics.json with .hydra/overrides.yaml) under {args.dir}")
    available = sorted({m for r in runs for m in r["metrics"] if isinstance(r["metrics"][m], (int, float))})
    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in available]
        if unknown:
            return fail(f"no run has the metric {unknown[0]!r}; available: {', '.join(available)}")
    else:
        metrics = [m for m in DEFAULT_METRICS if m in available]
    keys, rows = summarise(runs, metrics)
    if args.x and args.x not in keys:
        return fail(f"--x {args.x} was not swept here; swept: {', '.join(keys) or 'nothing but seed'}")
    plotted = [args.plot_metric] if args.plot_metric else metrics if args.metrics else metrics[:1]
    for m in plotted:
        if m not in available:
            return fail(f"no run has the metric {m!r}; available: {', '.join(available)}")
    out = args.out or args.dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(table(keys, rows, metrics, markdown=True))
        (out / "report.csv").write_text(to_csv(keys, rows, metrics))
        written = ["report.md", "report.csv"]
        x_key = args.x or (keys[0] if keys else None)
        if x_key is not None and plotted:
            plot(keys, rows, x_key, plotted, out / "report.png", sweep=str(args.dir))
            written.append("report.png")
        points = curves(args.dir, runs, keys, plotted) if plotted else None
        if points is not None and len(points):
            save(curves_figure(points, plotted, str(args.dir)), out / "curves.png")
            written.append("curves.png")
    except OSError as e:
        return fail(f"cannot write the report into {out} ({e.strerror or type(e).__name__}); choose another --out")
    print(table(keys, rows, metrics))
    left = f" ({len(skipped)} skipped: unfinished or unreadable)" if skipped else ""
    print(f"{len(runs)} finished runs in {len(rows)} groups{left}; wrote {', '.join(written)} in {out}")
    return 0
