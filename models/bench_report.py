"""Reports of `models.bench`: the model-zoo table (model x knob level), one model's per-level block with its
targets, text for the terminal and Markdown blocks that `update_markdown` rewrites between markers.

A report (`models.bench.run_bench`) holds the machine, the matmul ceiling, the load averages and one entry per
model: its levels (GMACs, published mIoU, int8 agreement, statistics) and its timed cases.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from models.bench_timing import paired_ratio
from models.flops import gmacs_for
from models.registry import get_spec, list_models

MD_START, MD_END = "<!-- models.bench:start -->", "<!-- models.bench:end -->"
MD_HEADING = "## Model: eager torch vs ONNX Runtime, per ISR level"
ZOO_START, ZOO_END = "<!-- models.bench.zoo:start -->", "<!-- models.bench.zoo:end -->"
ZOO_HEADING = "## Model zoo: every model per knob level"
_LABEL = {"eager": "eager", "compiled": "compile", "onnxruntime": "ORT", "int8": "int8"}
_BLOCKS = {"detail": (MD_START, MD_END, MD_HEADING), "zoo": (ZOO_START, ZOO_END, ZOO_HEADING)}


FAMILY_ORDER = ("edaformer", "segformer", "seaformer", "dovit", "lrformer")  # the zoo table's (and --all's) order


def zoo_order(names: Sequence[str]) -> list[str]:
    """Family by family (FAMILY_ORDER, then others), cheapest first (dense GMACs at 512x512)."""
    def key(name: str) -> tuple[int, float, str]:
        spec = get_spec(name)
        rank = FAMILY_ORDER.index(spec.family) if spec.family in FAMILY_ORDER else len(FAMILY_ORDER)
        return rank, gmacs_for(name, 150, 512, 512, spec.training_level()), name

    return sorted(names, key=key)


def _area(r: dict) -> int:
    return r["height"] * r["width"]


def verdicts(model_report: dict) -> dict[str, object]:
    """The ISR issue's two targets for one model, from its measured fp32 cases (None where a case is missing):
    >= 40% of the matmul ceiling at 512x512, and the cheapest level >= 2x faster than full at the largest size."""
    done = [r for r in model_report["results"] if r["ms_per_image"] is not None and r["backend"] != "int8"]
    if not done:
        return {}
    small_area = 512 * 512 if any(_area(r) == 512 * 512 for r in done) else min(_area(r) for r in done)
    small = [r for r in done if _area(r) == small_area]
    best = max(small, key=lambda r: r["pct_of_ceiling"])
    out: dict[str, object] = {"ceiling_pct": {
        "target": 40.0, "size": f"{best['height']}x{best['width']}", "pct_of_ceiling": round(best["pct_of_ceiling"], 1),
        "best_path": f"{best['backend']} {best['level']} batch {best['batch']}", "met": best["pct_of_ceiling"] >= 40.0,
    }}
    big = [r for r in done if _area(r) == max(map(_area, done))]
    speedups: dict[str, float] = {}
    for backend, batch in dict.fromkeys((r["backend"], r["batch"]) for r in big):
        by_rank = {r["rank"]: r for r in big if (r["backend"], r["batch"]) == (backend, batch)}
        if 0 in by_rank and max(by_rank) > 0:
            ratio = by_rank[0]["ms_per_image"] / by_rank[max(by_rank)]["ms_per_image"]
            speedups[f"{backend} batch {batch} ({by_rank[max(by_rank)]['level']})"] = round(ratio, 2)
    if speedups:
        out["isr_speedup"] = {"target": 2.0, "size": f"{big[0]['height']}x{big[0]['width']}",
                              "cheapest_vs_full": speedups, "met_on_all_paths": min(speedups.values()) >= 2.0,
                              "met_on_some_path": max(speedups.values()) >= 2.0}
    return out


# --- one model: every size, batch and backend per level -----------------------------------------------------
def _detail_rows(model_report: dict) -> tuple[list[str], list[list[str]]]:
    results = model_report["results"]
    backends = list(dict.fromkeys(r["backend"] for r in results))
    header = ["size", "batch", "level", "GMAC/img"]
    for b in backends:
        header += [f"{_LABEL[b]} ms/img", f"{_LABEL[b]} GMAC/s", f"{_LABEL[b]} % ceil"]
    header.append("best vs full")
    cell = {(r["backend"], r["height"], r["width"], r["batch"], r["rank"]): r for r in results}
    keys = sorted({(r["height"], r["width"], r["batch"], r["rank"], r["level"], r["gmacs_per_image"]) for r in results})
    rows = []
    for height, width, batch, rank, level, gmacs in keys:
        row = [f"{height}x{width}", str(batch), level, f"{gmacs:.2f}"]
        best: list[float] = []
        for b in backends:
            r = cell.get((b, height, width, batch, rank))
            if r is None or r["ms_per_image"] is None:
                row += ["skipped" if r else "-", "", ""]
                continue
            row += [f"{r['ms_per_image']:.0f}", f"{r['gmac_per_s']:.1f}", f"{r['pct_of_ceiling']:.0f}%"]
            full = cell.get((b, height, width, batch, 0))
            if full and full["ms_per_image"] and b != "int8":
                best.append(full["ms_per_image"] / r["ms_per_image"])
        row.append(f"{max(best):.2f}x" if best else "")
        rows.append(row)
    return header, rows


def _machine_lines(report: dict) -> list[str]:
    m, c = report["machine"], report["ceiling"]
    samples = [la[0] for mr in report["models"] for la in mr.get("load_average", []) if la]
    during = (f", during {statistics.median(samples):.1f} (median of {len(samples)} samples, "
              f"{min(samples):.1f}-{max(samples):.1f})" if samples else "")
    start, end = report.get("load_average_start") or [], report.get("load_average_end") or []
    return [
        f"{report['date']}; {m['cpu']}, {m['logical_cores']} cores, {m['threads']} threads, nice {m.get('nice', 0)}; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}",
        "machine load (1-min load average): " + (f"start {start[0]:.1f}" if start else "n/a") + during
        + (f", end {end[0]:.1f}" if end else ""),
        f"fp32 matmul ceiling: {c['gflops_median']:.1f} GFLOP/s (torch.mm {c['n']}x{c['n']}, median of "
        f"{len(c['gflops_samples'])} across the run, {min(c['gflops_samples']):.0f}-{max(c['gflops_samples']):.0f}, "
        f"90th percentile {idle_ceiling(report):.0f}); GMAC = 2 FLOP, % ceil = 2 x GMAC/s / the ceiling timed "
        "among the case's own calls (given in brackets)",
    ]


def _detail_summary(report: dict, model_report: dict) -> list[str]:
    lines = [f"{model_report['model']} ({model_report['num_classes']} classes), " + _machine_lines(report)[0],
             *_machine_lines(report)[1:]]
    if "eager_variant" in model_report:
        lines.append(f"eager variant: {model_report['eager_variant']} (batch-1 full-compute ms: " + ", ".join(
            f"{k} {t:.0f}" for k, t in model_report["eager_variants_ms_batch1_full"].items()) + ")")
    v = model_report.get("verdicts", {})
    if "ceiling_pct" in v:
        t = v["ceiling_pct"]
        lines.append(f"target >= 40% of ceiling at {t['size']}: {'MET' if t['met'] else 'NOT MET'} "
                     f"({t['pct_of_ceiling']}%, {t['best_path']})")
    if "isr_speedup" in v:
        t = v["isr_speedup"]
        ratios = ", ".join(f"{k} {x:.2f}x" for k, x in t["cheapest_vs_full"].items())
        state = ("MET on all paths" if t["met_on_all_paths"]
                 else "MET on some paths" if t["met_on_some_path"] else "NOT MET")
        lines.append(f"target cheapest level >= 2x faster than full at {t['size']}: {state} ({ratios})")
    return lines


# --- the zoo: model x level ---------------------------------------------------------------------------------
def _ms(cases: dict, backend: str) -> float | None:
    case = cases.get(backend)
    return case["ms_per_image"] if case else None


def _speedup(cases: dict) -> str:
    """int8 over fp32 ORT, paired by round (see `models.bench_timing.paired_ratio`)."""
    if "onnxruntime" not in cases or "int8" not in cases:
        return "-"
    fp32, int8 = (cases[b] for b in ("onnxruntime", "int8"))
    ratio = paired_ratio((fp32["samples_s"], fp32.get("rounds", 1)), (int8["samples_s"], int8.get("rounds", 1)))
    return f"{ratio:.2f}x"


def idle_ceiling(report: dict) -> float:
    """The fp32 matmul GFLOP/s of the machine when the run had it (nearly) alone: the 90th percentile of every
    ceiling sample of the run."""
    samples = sorted(report["ceiling"]["gflops_samples"])
    return samples[min(len(samples) - 1, int(0.9 * len(samples)))]


def scaled_ms(case: dict, idle: float) -> float:
    """A case's ms scaled to the idle machine: x its local ceiling / the idle ceiling. On a shared machine the
    model and the matmul get the same share of the cores, so this cancels the load of the case's moment."""
    local = case.get("ceiling_gflops")
    return case["ms_per_image"] * (local / idle if local else 1.0)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def zoo_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """One row per (model, level): GMACs, published mIoU, batch-1 ms per backend at the first timed size,
    int8 speed-up and agreement, achieved rates, and the larger size's ms where it was timed."""
    size = tuple(report.get("sizes", [[512, 512]])[0])
    extra = tuple((report.get("extra_sizes") or [[1024, 2048]])[0])
    named = f"{size[0]}²" if size[0] == size[1] else f"{size[0]}x{size[1]}"
    header = ["model", "level", "GMAC 512²", "GMAC 1024x2048", "ADE20K mIoU", f"eager ms {named}",
              f"ORT ms {named}", f"int8 ms {named}", "int8 speed-up", "int8 agreement",
              "best fp32 GMAC/s", "% ceil eager / ORT / int8 (of GFLOP/s)",
              f"{extra[0]}x{extra[1]} ms eager / ORT / int8"]
    rows = []
    for mr in report["models"]:
        if "error" in mr:
            rows.append([mr["model"], f"failed: {mr['error'][:80]}", *[""] * (len(header) - 2)])
            continue
        dense = "*" if mr.get("dense_gmacs") else ""
        for info in mr["levels"]:
            at = {(r["height"], r["width"]): {} for r in mr["results"]}
            for r in mr["results"]:
                if r["level"] == info["level"] and r["batch"] == 1 and r["ms_per_image"] is not None:
                    at[(r["height"], r["width"])][r["backend"]] = r
            small, big = at.get(size, {}), at.get(extra, {})
            eager, fp32, int8 = (_ms(small, b) for b in ("eager", "onnxruntime", "int8"))
            agreement = info.get("int8_agreement")
            classes = info.get("fp32_mask_classes") or []
            agree = "-" if not agreement else f"{100 * statistics.mean(agreement):.1f}% ({100 * min(agreement):.1f})"
            if classes and min(classes) < 3:
                agree += " (1-2 classes)"
            rates = [small[b]["gmac_per_s"] for b in ("eager", "onnxruntime") if b in small]
            pcts = " / ".join(_fmt(small[b]["pct_of_ceiling"]) if b in small else "-"
                              for b in ("eager", "onnxruntime", "int8"))
            local = next((c["ceiling_gflops"] for c in small.values() if c.get("ceiling_gflops")), None)
            pcts += f" (of {local:.0f})" if local else ""
            level = info["level"]
            if "kept_fraction" in info.get("stats", {}):
                level += " (kept " + "/".join(f"{v:.2f}" for v in info["stats"]["kept_fraction"]) + ")"
            miou = info.get("published_miou")
            gmacs = info["gmacs"]
            rows.append([
                mr["model"], level, f"{gmacs['512x512']:.2f}{dense}", f"{gmacs['1024x2048']:.1f}{dense}",
                "n/a" if miou is None and info["rank"] == 0 else _fmt(miou, 1) if miou is not None else "",
                _fmt(eager), _fmt(fp32), _fmt(int8), _speedup(small), agree,
                _fmt(max(rates), 1) if rates else "-", pcts,
                " / ".join(_fmt(_ms(big, b)) for b in ("eager", "onnxruntime", "int8")) if big else "",
            ])
    return header, rows


def _zoo_summary(report: dict) -> list[str]:
    lines = _machine_lines(report)
    measured = [mr for mr in report["models"] if "error" not in mr]
    weights = {mr["weights"] for mr in measured}
    if measured:
        lines.append("weights: " + "; ".join(sorted(weights)) + f"; {measured[0]['num_classes']} classes")
    recipes = {}
    for mr in report["models"]:
        if "int8_recipe" in mr:
            r = mr["int8_recipe"]
            ops = ", ".join(r["op_types"]) or "every op ORT quantizes"
            scales = "per-channel" if r["per_channel"] else "per-tensor"
            key = (f"{r['quant_format'].upper()}, {scales} {r['weights']} weights, {r['activations']} activations "
                   f"({r['calibration']} over {r['images'] * len(r['sizes'])} photo-like images), ops: {ops}")
            recipes.setdefault(key, []).append(mr["family"])
    for key, families in recipes.items():
        lines.append(f"int8 ({', '.join(dict.fromkeys(families))}): {key}")
    lines += [f"int8 failed for {mr['model']}: {mr['int8_error'][:200]}" for mr in measured if "int8_error" in mr]
    if "wall_s" in report:
        lines.append(f"run time {report['wall_s'] / 60:.0f} min (exports and quantization included where not cached)")
    return lines


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return [fmt.format(*header), *(fmt.format(*r) for r in rows)]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def format_table(report: dict) -> str:
    """The zoo table, and each model's per-level table when one model was run."""
    lines = [*_zoo_summary(report), "", *_text_table(*zoo_rows(report))]
    if len(report["models"]) == 1 and "error" not in report["models"][0]:
        lines += ["", *_text_table(*_detail_rows(report["models"][0]))]
    return "\n".join(lines)


def format_list() -> str:
    header = ["model", "family", "knob", "levels", "ADE20K mIoU", "GMAC 512² (spec)"]
    rows = []
    for name in zoo_order(list_models()):
        spec = get_spec(name)
        miou = spec.published_miou.get("ade20k")
        rows.append([name, spec.family, spec.knob.name if spec.knob else "-",
                     ", ".join(level.name for level in spec.ladder()), _fmt(miou, 1) if miou else "n/a",
                     _fmt(spec.reference_gmacs_512, 2) if spec.reference_gmacs_512 else "-"])
    return "\n".join(_text_table(header, rows))


def markdown_block(report: dict, kind: str = "zoo", plot: str | None = None) -> str:
    start, end, _ = _BLOCKS[kind]
    if kind == "detail":
        model_report = report["models"][0]
        summary, table = _detail_summary(report, model_report), _md_table(*_detail_rows(model_report))
    else:
        summary, table = _zoo_summary(report), _md_table(*zoo_rows(report))
        if plot:
            table += ["", f"![latency against published mIoU, Pareto front]({plot})"]
    return "\n".join([start, *(f"- {line}" for line in summary), "", *table, end])


def update_markdown(path: Path, report: dict, kind: str = "zoo", plot: Path | None = None) -> None:
    """Replace the generated block of that kind (creating the file or section when missing); text outside the
    markers, including other sections, is kept. kind: "zoo" (every model) or "detail" (the first model)."""
    start, end, heading = _BLOCKS[kind]
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    link = os.path.relpath(plot, path.parent) if plot is not None else None
    block = markdown_block(report, kind, link)
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    elif heading in text:
        text = text.replace(heading, f"{heading}\n\n{block}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
