"""Report files: `report.json` (figures), `summary.md` (tables and verdicts), `requests.jsonl` (one row per
request, with segserve's receipt) and PNG plots.

Plots use matplotlib's Agg backend (no display needed) and are kept small so they can be committed:
latency CDF per target, level mix against offered load, attainment against offered load, and
achieved throughput / p99 against offered load.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines, CI, and no window ever opened by a load test
import matplotlib.pyplot as plt

TITLES = {"segserve": "segserve (planner)", "segserve-fixed": "segserve, full level only", "plain": "plain endpoint"}
COLORS = {"segserve": "tab:blue", "segserve-fixed": "tab:orange", "plain": "tab:red"}
PLOTS = ("loadtest-latency-cdf.png", "loadtest-level-mix.png", "loadtest-attainment.png", "loadtest-throughput.png")
DPI = 90
VERDICT = {True: "met", False: "not met", None: "not measured"}


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def step_rows(name: str, target: dict) -> list[str]:
    rows = []
    for s in target["steps"]:
        lat = s["latency_ms"]
        server = s.get("server") or {}
        batches = ", ".join(f"{k}:{v}" for k, v in (server.get("batch_sizes") or {}).items()) or "–"
        rows.append(
            f"| {TITLES.get(name, name)} | {s['label']} | {s['offered_rps']:.1f} | {s['achieved_rps']:.1f} | "
            f"{_fmt(lat['p50'], 0)} / {_fmt(lat['p95'], 0)} / {_fmt(lat['p99'], 0)} | {_pct(s['attainment'])} | "
            f"{_fmt(s['mean_gmacs'], 2)} | {s['rejections']['429']} / {s['rejections']['503']} | "
            f"{s['timeouts']['504']} / {s['timeouts']['client']} | {_pct(s['cache_hit_rate'])} | "
            f"{_fmt(server.get('mean_batch_size'), 2)} ({batches}) |")
    return rows


def markdown(report: dict, heading: int = 2) -> str:
    """The summary; sections start at `heading` (2: `##`), so it can be pasted under another title."""
    h = "#" * heading
    cap, scen, serving = report["capacity"], report["scenario"], report["serving"]
    lines = [
        f"{h} Configuration",
        "",
        f"- machine: {report['machine']['cpus']} CPUs, {report['machine']['processor']}, "
        f"{report['machine']['platform']}; code {report.get('code', 'unknown')}",
        f"- serving: {serving['model']} ({'random weights' if not serving['checkpoint'] else serving['checkpoint']}) "
        f"on {serving.get('device', 'cpu')},"
        f" resize scale {serving['resize_scale']}, calibration shape {serving['calibration_shape']}, "
        f"{serving['workers']} worker(s), max batch {serving['max_batch_size']}, max queue delay "
        f"{serving['max_queue_delay_ms']:g} ms, queue bound {serving['max_queue_size']}",
        f"- requests: sizes {scen['sizes']}, repeat share {scen['repeat_share']:g} (hot set {scen['hot_set']}), "
        f"budgets uniform {scen['budget_ms'][0]:.0f}..{scen['budget_ms'][1]:.0f} ms "
        f"({report['budget_factors'][0]:g}x..{report['budget_factors'][1]:g}x the cheapest level's batch-1 "
        f"latency of {cap['cheapest_batch1_ms']:.1f} ms), burst steps x{scen['bursts']['factor']:g} for "
        f"{scen['bursts']['length_s']:g} s every {scen['bursts']['every_s']:g} s",
        f"- steps: {', '.join(report['config']['steps'])} of capacity, {report['config']['duration_s']:g} s each, "
        f"client timeout {report['config']['client_timeout_s']:g} s; total run {report['elapsed_s']:.0f} s",
        "- machine load (1-min load average after each step, this run's own processes included): "
        + "; ".join(f"{TITLES.get(name, name)} " + " / ".join(_fmt(s.get("loadavg_1m")) for s in target["steps"])
                    for name, target in report["targets"].items()),
        f"- capacity: {cap['used_rps']:.2f} req/s ({cap['method']}); calibrated estimate "
        f"{_fmt(cap.get('calibrated_rps'), 2)} req/s",
        "- levels at the calibration shape (GMACs; calibrated ms per batch of 1 / 2 / 4 ...): " + "; ".join(
            f"{lv['name']} {lv['gmacs']:.2f} ({' / '.join(f'{ms:.0f}' for ms in lv['latency_ms'].values())})"
            for lv in report["models"]["levels"]),
        "",
        f"{h} Results",
        "",
        "| target | load | offered req/s | achieved req/s | p50 / p95 / p99 ms | met budget | GMACs/req | "
        "429 / 503 | 504 / client t/o | cache hits | mean batch (sizes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, target in report["targets"].items():
        lines += step_rows(name, target)
    lines += ["", "Level mix (requests per level delivered; `unserved` = not answered 200):", ""]
    for name, target in report["targets"].items():
        for s in target["steps"]:
            mix = ", ".join(f"{k}: {v}" for k, v in s["level_mix"].items())
            lines.append(f"- {TITLES.get(name, name)} at {s['label']}: {mix}")
    lines += ["", f"{h} Targets", ""]
    att = report["verdicts"]["attainment_at_80"]
    lines.append(f"- At 80% of capacity, {_pct(att['segserve'])} of requests met their budget with segserve "
                 f"(target >= 99%: **{VERDICT[att['met']]}**), against {_pct(att['fixed_level'])} "
                 "with the full level only.")
    thr = report["verdicts"]["throughput_p99_under_1s"]
    parts = []
    for name, best in thr["per_target"].items():
        parts.append(f"{TITLES.get(name, name)}: " + ("never" if best is None else
                     f"{best['achieved_rps']:.1f} req/s at {100 * best['load_fraction']:g}% "
                     f"(p99 {best['p99_ms']:.0f} ms)"))
    ratio = "n/a" if thr["ratio_segserve_to_plain"] is None else f"{thr['ratio_segserve_to_plain']:.2f}x"
    lines.append(f"- Throughput with p99 under 1 s (highest step with p99 < 1 s and >= 99% answered): "
                 f"{'; '.join(parts)}. segserve / plain = {ratio} (target >= 1.5x: **{VERDICT[thr['met']]}**).")
    if thr.get("note"):
        lines.append(f"  Note: {thr['note']}.")
    return "\n".join(lines) + "\n"


def _x(target: dict) -> tuple[list[dict], list[dict]]:
    steps = target["steps"]
    return [s for s in steps if not s["burst"]], [s for s in steps if s["burst"]]


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)  # figures are never shown; keep pyplot's registry from growing across runs


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


def plot_level_mix(report: dict, path: Path) -> None:
    target = report["targets"]["segserve"]
    steps = target["steps"]
    ranks = {lv["name"]: lv["rank"] for lv in report["models"]["levels"]}
    names = sorted({k for s in steps for k in s["level_mix"]}, key=lambda k: ranks.get(k, 99))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    labels = [s["label"] for s in steps]
    bottom = [0.0] * len(steps)
    cmap = plt.get_cmap("viridis")
    for i, level in enumerate(names):
        shares = [s["level_mix"].get(level, 0) / max(1, s["requests"]) for s in steps]
        color = "lightgrey" if level == "unserved" else cmap(i / max(1, len(names) - 1))
        ax.bar(labels, shares, bottom=bottom, label=level, color=color)
        bottom = [b + v for b, v in zip(bottom, shares, strict=True)]
    ax2 = ax.twinx()
    ax2.plot(labels, [s["mean_gmacs"] or 0 for s in steps], "k.-", label="GMACs/request")
    ax2.set_ylabel("mean GMACs per answered request", fontsize=8)
    ax.set_ylabel("share of requests")
    ax.set_xlabel("offered load (% of segserve's capacity)")
    ax.set_title("segserve: level delivered vs offered load", fontsize=9)
    bars, names_ = ax.get_legend_handles_labels()
    line, line_name = ax2.get_legend_handles_labels()
    # Below the axes: inside, the legend would hide bars; to the right, it would collide with the twin axis.
    ax.legend(bars + line, names_ + line_name, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4)
    _save(fig, path)


def _per_target_lines(ax: plt.Axes, report: dict, value: str) -> None:
    for name, target in report["targets"].items():
        plain, burst = _x(target)
        color = COLORS.get(name)
        ax.plot([100 * s["load_fraction"] for s in plain], [s[value] for s in plain], "o-", color=color,
                label=TITLES.get(name, name))
        if burst:
            ax.plot([100 * s["load_fraction"] for s in burst], [s[value] for s in burst], "^", color=color,
                    fillstyle="none", label=f"{TITLES.get(name, name)}, bursts")


def plot_attainment(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    _per_target_lines(ax, report, "attainment")
    ax.axhline(0.99, color="grey", ls="--", lw=1, label="99% target")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("offered load (% of segserve's capacity)")
    ax.set_ylabel("requests within their budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_throughput(report: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2))
    _per_target_lines(left, report, "achieved_rps")
    steps = report["targets"]["segserve"]["steps"]
    xs = sorted({100 * s["load_fraction"] for s in steps})
    left.plot(xs, [x / 100 * report["capacity"]["used_rps"] for x in xs], ":", color="grey", label="offered")
    left.set_ylabel("answered req/s")
    for name, target in report["targets"].items():
        plain, _ = _x(target)
        right.plot([100 * s["load_fraction"] for s in plain], [s["latency_ms"]["p99"] for s in plain], "o-",
                   color=COLORS.get(name), label=TITLES.get(name, name))
    right.axhline(1000, color="grey", ls="--", lw=1)
    right.set_yscale("log")
    right.set_ylabel("p99 latency (ms, answered)")
    left.set_title("throughput", fontsize=9)
    right.set_title("p99 latency (dashed: 1 s)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("offered load (% of capacity)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=6)
    _save(fig, path)


def write(report: dict, out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write every report file into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "summary.md"]
    written[0].write_text(json.dumps({k: v for k, v in report.items() if k != "requests"}, indent=1) + "\n")
    written[1].write_text("# segserve load test\n\n" + markdown(report))
    if "requests" in report:  # absent when re-rendering from report.json
        # Per-request rows (receipt headers included) go to their own file: the report stays readable.
        written.append(out_dir / "requests.jsonl")
        written[-1].write_text("".join(json.dumps(row) + "\n" for row in report["requests"]))
    if plots:
        makers = (plot_cdf, plot_level_mix, plot_attainment, plot_throughput)
        for name, make in zip(PLOTS, makers, strict=True):
            make(report, out_dir / name)
            written.append(out_dir / name)
    return written
