"""Report files: `report.json` (figures), `summary.md` (tables and verdicts), `requests.jsonl` (one row per
request, with segserve's receipt), `models.toml` (what was served) and the PNG plots of `loadtest.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path

TITLES = {"segserve": "segserve (planner)", "segserve-fixed": "segserve, best point only", "plain": "plain endpoint"}
PLOTS = ("loadtest-ladder.png", "loadtest-points.png", "loadtest-latency-cdf.png", "loadtest-attainment.png",
         "loadtest-throughput.png")
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
        goal = f" (≥ {100 * s['attainment_target']:g}%)" if s.get("attainment_target") else ""
        rows.append(
            f"| {TITLES.get(name, name)} | {s['label']} | {s['offered_rps']:.1f} | {s['achieved_rps']:.1f} | "
            f"{_fmt(lat['p50'], 0)} / {_fmt(lat['p99'], 0)} | {_pct(s['attainment'])}{goal} | "
            f"{_fmt(s['latency_over_budget_p99'], 2)} | {_fmt(s['mean_quality'], 1)} ({_fmt(s['relative_quality'], 3)})"
            f" | {_fmt(s['mean_gmacs'], 2)} | {s['rejections']['429']} / {s['rejections']['503']} | "
            f"{s['timeouts']['504']} / {s['timeouts']['client']} | {_pct(s['cache_hit_rate'])} | "
            f"{_fmt(server.get('mean_batch_size'), 2)} |")
    return rows


def ladder_lines(report: dict) -> list[str]:
    ladder = report["ladder"]
    lines = ["| point | on ladder | scale | GMACs | calibrated ms, batch 1 / largest | quality (source) |",
             "|---|---|---|---|---|---|"]
    for name, p in sorted(ladder["points"].items(), key=lambda kv: (-kv[1]["quality"], kv[0])):
        ms = list(p["latency_ms"].items())
        timing = f"{ms[0][1]:.1f} / {ms[-1][1]:.1f} (b{ms[-1][0]})" if ms else "–"
        lines.append(f"| {name} | {'yes' if p['on_ladder'] else ''} | {p['scale']:g} | {p['gmacs']:.3f} | {timing} | "
                     f"{p['quality']:.1f} ({p['quality_source']}) |")
    return lines


def verdict_lines(report: dict) -> list[str]:
    v = report["verdicts"]
    lines = []
    for item in v["attainment"]:
        lines.append(f"- Budget attainment at {100 * item['load_fraction']:g}% of capacity: {_pct(item['attainment'])} "
                     f"(target ≥ {100 * item['target']:g}%: **{VERDICT[item['met']]}**).")
    q = v["quality_at_80"]
    lines.append(f"- Mean delivered quality at 80%: {_fmt(q['relative_quality'], 3)} of the best point's (target ≥ "
                 f"{q['target']:g}: **{VERDICT[q['met']]}**).")
    thr = v["throughput_p99_under_budget"]
    parts = []
    for name, best in thr["per_target"].items():
        figure = "at no step" if best is None else (f"{best['achieved_rps']:.1f} req/s at "
                                                    f"{100 * best['load_fraction']:g}% (p99 {best['p99_ms']:.0f} ms)")
        parts.append(f"{TITLES.get(name, name)}: {figure}")
    ratio = "n/a" if thr["ratio"] is None else (("≥ " if thr["ratio_is_lower_bound"] else "") + f"{thr['ratio']:.2f}x")
    lines.append(f"- Throughput with p99 under its budget (highest step with ≥ 99% answered within budget): "
                 f"{'; '.join(parts)}. segserve / plain = {ratio} (target ≥ {thr['target']:g}x: "
                 f"**{VERDICT[thr['met']]}**).")
    if thr.get("note"):
        lines.append(f"  Note: {thr['note']}.")
    return lines


def markdown(report: dict, heading: int = 2) -> str:
    """The summary; sections start at `heading` (2: `##`), so it can be pasted under another title."""
    h = "#" * heading
    cap, scen, serving, ladder = report["capacity"], report["scenario"], report["serving"], report["ladder"]
    configuration = report["configuration"]
    lines = [
        f"{h} Configuration",
        "",
        f"- machine: {report['machine']['cpus']} CPUs, {report['machine']['processor']}, "
        f"{report['machine']['platform']}; code {report.get('code', 'unknown')}",
        f"- configuration `{configuration['name']}` ({configuration['source']}): pool {', '.join(ladder['models'])} "
        f"({ladder['task']}); default model {ladder['default_model']}; weights: "
        f"{serving['checkpoint'] or 'random'} (default model)",
        f"- serving on {serving['device']}: resize scale {serving['resize_scale']}, calibration shape "
        f"{serving['calibration_shape']}, {serving['workers']} worker(s), max batch {serving['max_batch_size']}, "
        f"max queue delay {serving['max_queue_delay_ms']:g} ms, queue bound {serving['max_queue_size']}",
        f"- requests: sizes {scen['sizes']}, repeat share {scen['repeat_share']:g} (hot set {scen['hot_set']}), "
        f"budgets uniform {scen['budget_ms'][0]:.0f}..{scen['budget_ms'][1]:.0f} ms "
        f"({report['budget_factors'][0]:g}x..{report['budget_factors'][1]:g}x the best point's batch-1 latency, "
        f"{cap['best_batch1_ms']:.1f} ms at {cap['best_point']}), burst steps x{scen['bursts']['factor']:g} for "
        f"{scen['bursts']['length_s']:g} s every {scen['bursts']['every_s']:g} s",
        f"- steps: {', '.join(report['config']['steps'])} of capacity, {report['config']['duration_s']:g} s each, "
        f"client timeout {report['config']['client_timeout_s']:g} s; total run {report['elapsed_s']:.0f} s",
        "- machine load (1-min load average after each step, this run's own processes included): "
        + "; ".join(f"{TITLES.get(name, name)} " + " / ".join(_fmt(s.get("loadavg_1m")) for s in target["steps"])
                    for name, target in report["targets"].items()),
        f"- capacity at the best point: {cap['used_rps']:.2f} req/s ({cap.get('used_from') or cap.get('method')}); "
        f"probe {_fmt(cap.get('measured_rps'), 2)} req/s; calibrated estimate {_fmt(cap.get('calibrated_rps'), 2)} "
        "req/s",
        "",
        f"Operating points of the pool at the calibration shape ({len(ladder['ladder'])} on the ladder):",
        "",
        *ladder_lines(report),
        "",
        f"{h} Results",
        "",
        "| target | load | offered req/s | achieved req/s | p50 / p99 ms | within budget | p99 latency/budget | "
        "quality (/ best) | GMACs/req | 429 / 503 | 504 / client t/o | cache hits | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, target in report["targets"].items():
        lines += step_rows(name, target)
    lines += ["", "Points delivered (requests per point; `unserved` = not answered 200):", ""]
    for name, target in report["targets"].items():
        for s in target["steps"]:
            mix = ", ".join(f"{k}: {v}" for k, v in s["point_mix"].items())
            lines.append(f"- {TITLES.get(name, name)} at {s['label']}: {mix}")
    lines += ["", f"{h} Targets", "", *verdict_lines(report)]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write every report file into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "summary.md"]
    written[0].write_text(json.dumps({k: v for k, v in report.items() if k != "requests"}, indent=1) + "\n")
    written[1].write_text("# segserve load test\n\n" + markdown(report))
    if "requests" in report:  # absent when re-rendering from report.json
        # Per-request rows (receipts included) go to their own file: the report stays readable.
        written.append(out_dir / "requests.jsonl")
        written[-1].write_text("".join(json.dumps(row) + "\n" for row in report["requests"]))
    if plots:
        from loadtest.plots import write_plots  # matplotlib only when drawing

        written += write_plots(report, out_dir)
    return written
