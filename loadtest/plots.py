"""The report's PNG plots, from the report dict alone (so `segserve loadtest render` can redraw them).

matplotlib's Agg backend (no display needed); small figures, so they can be committed:

- the ladder: batch-1 latency against quality for every point of the pool, the ladder joined, the best point
  and the budget range marked;
- the points delivered per load step (stacked shares, segserve; one colour per model and input scale, lighter
  for cheaper knob levels) with the mean delivered quality relative to
  the best point's;
- the latency CDF per target and step, budget attainment against load (with the targets), throughput and p99.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, CI, and no window ever opened by a load test
import matplotlib.pyplot as plt
import numpy as np

from loadtest.report import PLOTS, TITLES

COLORS = {"segserve": "tab:blue", "segserve-fixed": "tab:orange", "plain": "tab:red"}
DPI = 90


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)  # figures are never shown; keep pyplot's registry from growing across runs


def point_colors(ladder: dict) -> dict[str, object]:
    """A distinct colour per (model, input scale) group, lighter for cheaper knob levels within the group."""
    colors: dict[str, object] = {"unserved": "lightgrey"}
    groups: dict[tuple[str, float], list[str]] = {}
    for name, p in sorted(ladder["points"].items(), key=lambda kv: -kv[1]["quality"]):
        groups.setdefault((p["model"], p["scale"]), []).append(name)
    order = sorted(groups, key=lambda g: (ladder["models"].index(g[0]) if g[0] in ladder["models"] else 99, -g[1]))
    palette = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    for index, group in enumerate(order):
        base = np.asarray(palette(index % palette.N)[:3])
        names = groups[group]
        for rank, name in enumerate(names):
            towards_white = 0.6 * rank / max(1, len(names) - 1)
            colors[name] = tuple(base + (1 - base) * towards_white)
    return colors


def plot_ladder(report: dict, path: Path) -> None:
    ladder = report["ladder"]
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    colors = point_colors(ladder)  # the colours of the points-delivered plot
    groups: dict[tuple[str, float], list[str]] = {}
    for name, p in ladder["points"].items():
        if "1" in p["latency_ms"]:
            groups.setdefault((p["model"], p["scale"]), []).append(name)
    for (model, scale), names in groups.items():
        points = [ladder["points"][n] for n in names]
        ax.scatter([p["latency_ms"]["1"] for p in points], [p["quality"] for p in points], s=18,
                   color=[colors[n] for n in names], label=f"{model} @{scale:g}")
    on = [ladder["points"][n] for n in ladder["ladder"] if "1" in ladder["points"][n]["latency_ms"]]
    ax.plot([p["latency_ms"]["1"] for p in on], [p["quality"] for p in on], "k-", lw=0.8, label="ladder")
    best = ladder["points"][ladder["best"]["name"]]
    ax.scatter([best["latency_ms"]["1"]], [best["quality"]], s=80, facecolors="none", edgecolors="k",
               label=f"best point ({ladder['best']['name']})")
    low, high = report["scenario"]["budget_ms"]
    ax.axvspan(low, high, color="grey", alpha=0.12, label="budget range")
    ax.set_xscale("log")
    ax.set_xlabel("calibrated batch-1 latency (ms, log)")
    ax.set_ylabel("quality value (mIoU points)")
    ax.set_title(f"operating points of the {ladder['task']} pool", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: points fill the inside
    _save(fig, path)


def plot_points(report: dict, path: Path) -> None:
    steps = report["targets"]["segserve"]["steps"]
    ladder = report["ladder"]
    colors = point_colors(ladder)
    names = sorted({k for s in steps for k in s["point_mix"]},
                   key=lambda k: -ladder["points"].get(k, {"quality": -1e9})["quality"])
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    labels = [s["label"] for s in steps]
    bottom = [0.0] * len(steps)
    for name in names:
        shares = [s["point_mix"].get(name, 0) / max(1, s["requests"]) for s in steps]
        ax.bar(labels, shares, bottom=bottom, label=name, color=colors.get(name, "tab:grey"))
        bottom = [b + v for b, v in zip(bottom, shares, strict=True)]
    twin = ax.twinx()
    twin.plot(labels, [s["relative_quality"] or 0 for s in steps], "k.-", label="mean quality / best point's")
    twin.axhline(0.9, color="k", ls=":", lw=0.8)
    ax.set_ylim(0, 1.05)
    twin.set_ylim(0, 1.05)  # the same scale on both sides: the dotted 0.9 reads on either
    twin.set_ylabel("delivered quality relative to the best point (dotted: 0.9)", fontsize=7)
    ax.set_ylabel("share of requests")
    ax.set_xlabel("offered load (% of capacity at the best point)")
    ax.set_title("segserve: operating points delivered per load step", fontsize=9)
    bars, bar_names = ax.get_legend_handles_labels()
    line, line_name = twin.get_legend_handles_labels()
    # Below the axes: inside, the legend would hide bars; to the right, it would collide with the twin axis.
    ax.legend(bars + line, bar_names + line_name, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18),
              ncol=3)
    _save(fig, path)


def plot_cdf(report: dict, path: Path) -> None:
    names = list(report["latencies_ms"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), sharey=True, squeeze=False)
    low, high = report["scenario"]["budget_ms"]
    for ax, name in zip(axes[0], names, strict=True):
        totals = {s["label"]: s["requests"] for s in report["targets"][name]["steps"]}
        for label, values in report["latencies_ms"][name].items():
            if values:
                # Over all requests sent: a curve ends below 1 by the share that was never answered.
                ordered, total = sorted(values), max(totals.get(label, 0), len(values))
                ax.plot(ordered, [(i + 1) / total for i in range(len(ordered))], label=label, lw=1.2)
        ax.axvspan(low, high, color="grey", alpha=0.15, label="budget range")
        ax.set_xscale("log")
        ax.set_title(TITLES.get(name, name), fontsize=9)
        ax.set_xlabel("latency (ms, answered requests)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests sent")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    _save(fig, path)


def _per_target_lines(ax: plt.Axes, report: dict, value: object) -> None:
    pick = value if callable(value) else (lambda s: s[value])
    for name, target in report["targets"].items():
        plain = [s for s in target["steps"] if not s["burst"]]
        burst = [s for s in target["steps"] if s["burst"]]
        color = COLORS.get(name)
        ax.plot([100 * s["load_fraction"] for s in plain], [pick(s) for s in plain], "o-", color=color,
                label=TITLES.get(name, name))
        if burst:
            ax.plot([100 * s["load_fraction"] for s in burst], [pick(s) for s in burst], "^", color=color,
                    fillstyle="none", label=f"{TITLES.get(name, name)}, bursts")


def plot_attainment(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    _per_target_lines(ax, report, "attainment")
    goals = sorted({(s["load_fraction"], s["attainment_target"]) for s in report["targets"]["segserve"]["steps"]
                    if s["attainment_target"] is not None})
    if goals:
        ax.plot([100 * f for f, _ in goals], [g for _, g in goals], "_", color="k", ms=18, mew=1.5,
                label="target")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("offered load (% of capacity at the best point)")
    ax.set_ylabel("answered within budget, of all sent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_throughput(report: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2))
    _per_target_lines(left, report, "achieved_rps")
    xs = sorted({100 * s["load_fraction"] for s in report["targets"]["segserve"]["steps"]})
    left.plot(xs, [x / 100 * report["capacity"]["used_rps"] for x in xs], ":", color="grey", label="offered")
    left.set_ylabel("answered req/s")
    _per_target_lines(right, report, lambda s: s["latency_ms"]["p99"])
    low, high = report["scenario"]["budget_ms"]
    right.axhspan(low, high, color="grey", alpha=0.12)
    right.set_yscale("log")
    right.set_ylabel("p99 latency (ms, answered)")
    left.set_title("throughput", fontsize=9)
    right.set_title("p99 latency (band: budget range)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("offered load (% of capacity)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=6)
    _save(fig, path)


MAKERS = (plot_ladder, plot_points, plot_cdf, plot_attainment, plot_throughput)  # in the order of PLOTS


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    written = []
    for name, make in zip(PLOTS, MAKERS, strict=True):
        make(report, out_dir / name)
        written.append(out_dir / name)
    return written
