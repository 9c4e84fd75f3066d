"""Take the README's screenshot of the demo page: docs/img/demo.png.

Starts a real segserve (the demo weights when `models/weights/demo/edaformer-t.safetensors` exists, else
random weights, said in the output), opens `/demo` in headless Chromium, segments an example image with the
default budget, then again with tighter budgets until a cheaper point answers within its budget (or a budget
is missed), and saves the whole page. The result cache is off, so each run shows the planner's choice rather
than the first result.

    python scripts/demo_screenshot.py [--image examples/street.jpg] [--out docs/img/demo.png]
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import chromium, wait_for  # noqa: E402 (after the path set-up)
from tests.servers import ServerProcess  # noqa: E402

DEMO_WEIGHTS = ROOT / "models/weights/demo/edaformer-t.safetensors"
MAX_TRIES = 6


def run_once(driver: object, count: int) -> dict:
    wait_for(lambda: driver.execute_script("return Number(document.body.dataset.runs || 0)") >= count
             and driver.execute_script("return document.body.dataset.state") in {"done", "error"},
             timeout_s=180, what=f"run {count}")
    return driver.execute_script("return window.segserveDemo.runs[arguments[0] - 1];", count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=ROOT / "examples/street.jpg")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/img/demo.png")
    args = parser.parse_args()
    demo = DEMO_WEIGHTS.exists()
    print(f"weights: {'demo' if demo else 'random (no demo weights found)'}")
    env = {"SEGSERVE_RANDOM_WEIGHTS": "false" if demo else "true", "SEGSERVE_RESIZE_SCALE": "",
           "SEGSERVE_CALIBRATION_SHAPE": "256x256", "SEGSERVE_CACHE_BYTES": "0"}
    with ServerProcess(env=env) as server, chromium() as driver:
        driver.set_window_size(1280, 1000)
        driver.get(f"{server.base_url}/demo")
        wait_for(lambda: driver.execute_script("return document.body.dataset.state") == "ready", what="the page")
        driver.find_element("id", "file").send_keys(str(args.image.resolve()))
        first = run_once(driver, 1)
        print(f"budget {first['request']['budgetMs']} ms -> {first['receipt']['point']}")
        position = int(driver.find_element("id", "budget").get_attribute("value"))
        for count in range(2, MAX_TRIES + 2):
            position -= 8  # about 1.7x tighter each time
            driver.execute_script("const s = document.getElementById('budget'); s.value = arguments[0];"
                                  "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));",
                                  position)
            run = run_once(driver, count)
            receipt = run["receipt"] or {}
            print(f"budget {run['request']['budgetMs']} ms -> {receipt.get('point')} plan={receipt.get('plan')} "
                  f"met={receipt.get('budgetMet')}")
            # A cheaper point chosen because it fits (not the fallback of a budget nothing fits).
            if receipt.get("point") != first["receipt"]["point"] and receipt.get("plan") == "budget" \
                    and receipt.get("budgetMet") == "true":
                break
            if receipt.get("budgetMet") != "true":
                break  # tighter than this machine can answer: stop at the first miss
        # The whole page, beyond the window: the receipt and the runs are below the image.
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                      {"format": "png", "captureBeyondViewport": True, "clip": clip})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(base64.b64decode(shot["data"]))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
