"""The zoo's Pareto plot: batch-1 latency (log scale) against published ADE20K mIoU, one marker per family.

Each model's training setting is a filled marker at its published mIoU and its fastest fp32 latency (eager or
ONNX Runtime, scaled to the idle machine by the matmul ceiling timed among the case's calls); its cheaper knob
levels are hollow markers on the same row, drawn at the planner's prior (`KNOB_STEP_PENALTY` mIoU per step down
the ladder, as `service/points.py` assumes: no paper publishes them). The non-dominated points (nothing both
faster and better) are joined: the front the planner walks. Models with no published figure (DoViT) have no
place on the quality axis and are listed under the plot instead. matplotlib (the `dev` or `loadtest` extra) is
imported only here.
"""

from __future__ import annotations

from pathlib import Path

from models.bench_report import idle_ceiling, scaled_ms

KNOB_STEP_PENALTY = 0.5  # mIoU per ladder step: the planner's prior (service/points.py; models never imports it)
_MARKERS = {"edaformer": "o", "segformer": "s", "seaformer": "^", "lrformer": "D", "dovit": "P"}


def zoo_points(report: dict) -> tuple[list[dict], list[str]]:
    """(points with model, family, level, rank, ms, miou; names of models without a published mIoU). ms: the
    faster fp32 path at 512x512, batch 1, scaled to the idle machine (`bench_report.scaled_ms`)."""
    idle = idle_ceiling(report)
    points, unplaced = [], []
    for mr in report["models"]:
        if "error" in mr:
            continue
        published = next((i["published_miou"] for i in mr["levels"] if i["rank"] == 0), None)
        if published is None:
            unplaced.append(mr["model"])
            continue
        for info in mr["levels"]:
            times = [scaled_ms(r, idle) for r in mr["results"]
                     if r["level"] == info["level"] and r["batch"] == 1 and r["ms_per_image"] is not None
                     and (r["height"], r["width"]) == (512, 512) and r["backend"] in ("eager", "onnxruntime")]
            if times:
                points.append({"model": mr["model"], "family": mr["family"], "level": info["level"],
                               "rank": info["rank"], "ms": min(times),
                               "miou": published - KNOB_STEP_PENALTY * info["rank"]})
    return points, unplaced


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both latency (lower) and mIoU (higher), fastest first."""
    front: list[dict] = []
    for p in sorted(points, key=lambda p: (p["ms"], -p["miou"])):
        if not front or p["miou"] > front[-1]["miou"]:
            front.append(p)
    return front


def write_pareto_plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install 'segserve[dev]')") from None
    matplotlib.use("Agg")  # headless: never opens a window
    import matplotlib.pyplot as plt

    points, unplaced = zoo_points(report)
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, family in enumerate(dict.fromkeys(p["family"] for p in points)):
        colour, marker = colours[index % len(colours)], _MARKERS.get(family, "o")
        mine = [p for p in points if p["family"] == family]
        trained = [p for p in mine if p["rank"] == 0]
        cheaper = [p for p in mine if p["rank"] > 0]
        ax.scatter([p["ms"] for p in trained], [p["miou"] for p in trained], marker=marker, color=colour, s=55,
                   label=family, zorder=3)
        ax.scatter([p["ms"] for p in cheaper], [p["miou"] for p in cheaper], marker=marker, s=30, zorder=3,
                   facecolors="none", edgecolors=colour, linewidths=1)
        for p in trained:
            ax.annotate(p["model"], (p["ms"], p["miou"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.plot([p["ms"] for p in front], [p["miou"] for p in front], color="black", linewidth=1, drawstyle="steps-post",
            zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per 512x512 image, batch 1, fastest fp32 path (eager or ONNX Runtime), scaled to the idle "
                  f"machine ({idle_ceiling(report):.0f} GFLOP/s matmul)", fontsize=9)
    ax.set_ylabel("ADE20K mIoU (published; hollow: cheaper knob levels at the planner's prior)")
    machine = report["machine"]
    ax.set_title(f"Model zoo on {machine['logical_cores']} cores ({machine['cpu']}), {report['date'][:10]}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if unplaced:
        fig.text(0.01, 0.01, f"not placed (no published mIoU): {', '.join(unplaced)}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
