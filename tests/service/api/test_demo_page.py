"""The demo page in a real headless Chromium against a real server: upload, result shown, overlay pixels equal
the mask the API returns for the same image and point, the legend lists the classes present, and moving the
sliders changes the request the page sends.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.browser import canvas_pixels, chromium, resource_urls, wait_for
from tests.servers import ServerProcess, jpeg_bytes

MAX_LEGEND = 40  # demo.js shows at most this many classes, then "+N more"


@pytest.fixture(scope="module")
def live_server() -> Iterator[ServerProcess]:
    """A server of its own, without the result cache: a cache hit would answer a second run of the same image
    with the better mask computed first (by design), and the sliders' effect on the point would not show."""
    with ServerProcess(env={"SEGSERVE_CACHE_BYTES": "0"}) as server:
        yield server


@pytest.fixture(scope="module")
def page(live_server: ServerProcess) -> Iterator[Any]:
    with chromium() as driver:
        driver.get(f"{live_server.base_url}/")
        yield driver


def state(driver: Any) -> str:
    return driver.execute_script("return document.body.dataset.state")


def runs(driver: Any) -> int:
    return int(driver.execute_script("return document.body.dataset.runs || '0'"))


def wait_for_run(driver: Any, count: int) -> dict:
    """Wait for run number `count` to finish; the page's record of it (request and receipt)."""
    wait_for(lambda: runs(driver) >= count and state(driver) in {"done", "error"}, what=f"run {count}")
    assert state(driver) == "done", driver.find_element("id", "message").text
    return driver.execute_script("return window.segserveDemo.runs[arguments[0] - 1];", count)


def upload(driver: Any, tmp_path: Path, seed: int) -> tuple[Path, int]:
    image = tmp_path / f"scene-{seed}.jpg"
    image.write_bytes(jpeg_bytes(height=120, width=160, seed=seed))
    before = runs(driver)
    driver.find_element("id", "file").send_keys(str(image))
    return image, before + 1


def test_root_redirects_to_the_page_which_loads_only_local_assets(page: Any, live_server: ServerProcess) -> None:
    assert page.current_url == f"{live_server.base_url}/demo"
    wait_for(lambda: state(page) in {"ready", "error"}, what="the model list")
    assert state(page) == "ready", page.find_element("id", "message").text
    options = [o.get_attribute("value") for o in page.find_elements("css selector", "#target option")]
    listing = httpx.get(f"{live_server.base_url}/v1/models").json()
    assert options == [f"task:{t}" for t in listing["tasks"]] + [f"model:{m['name']}" for m in listing["models"]]
    assert all(url.startswith(live_server.base_url) for url in resource_urls(page)), resource_urls(page)
    for asset in ("demo.js", "demo.css"):
        response = httpx.get(f"{live_server.base_url}/demo/static/{asset}")
        assert response.status_code == 200 and response.content
    assert httpx.get(f"{live_server.base_url}/demo/static/..%2Fapp.py").status_code == 404


def test_upload_shows_the_mask_as_an_overlay_of_the_returned_label_map(
    page: Any, live_server: ServerProcess, tmp_path: Path,
) -> None:
    image, count = upload(page, tmp_path, seed=11)
    run = wait_for_run(page, count)
    receipt = run["receipt"]
    assert run["request"]["url"].startswith("/v1/segment?task=")

    # The mask for the same bytes and the point the page was given, fetched by a plain client.
    base = live_server.base_url
    answer = httpx.post(f"{base}/v1/segment", content=image.read_bytes(), headers={"Content-Type": "image/jpeg"},
                        params={"point": receipt["point"]}, timeout=60)
    answer.raise_for_status()
    labels = np.asarray(Image.open(io.BytesIO(answer.content)))
    info = httpx.get(f"{base}/demo/palette/{receipt['model']}").json()
    palette = np.asarray(info["palette"], dtype=np.uint8)

    # The palette the page paints with is the server's own: the colour PNG carries the same table.
    color = httpx.post(f"{base}/v1/segment", content=image.read_bytes(), headers={"Content-Type": "image/jpeg"},
                       params={"point": receipt["point"], "format": "color"}, timeout=60)
    assert Image.open(io.BytesIO(color.content)).getpalette()[: palette.size] == palette.ravel().tolist()

    overlay = canvas_pixels(page, "mask")
    assert overlay.shape == (*labels.shape, 4) == (120, 160, 4)
    assert (overlay[..., 3] == 255).all()
    np.testing.assert_array_equal(overlay[..., :3], palette[labels])
    assert float(page.find_element("id", "mask").value_of_css_property("opacity")) == pytest.approx(0.55)

    # Legend: the classes present, most frequent first.
    ids, counts = np.unique(labels, return_counts=True)
    legend = [int(li.get_attribute("data-class-id"))
              for li in page.find_elements("css selector", "#legend li[data-class-id]")]
    assert len(legend) == min(len(ids), MAX_LEGEND)
    assert set(legend) <= set(ids.tolist()) and legend[0] == int(ids[np.argmax(counts)])
    first = page.find_element("css selector", "#legend li[data-class-id]").text
    assert info["classes"][legend[0]] in first

    # Receipt: the point, the timings and the budget verdict, as the headers said.
    cells = {row.get_attribute("data-key"): row.find_elements("tag name", "td")[1].text
             for row in page.find_elements("css selector", "#receipt tr")}
    assert cells["point chosen"] == receipt["point"] == answer.headers["x-segserve-point"]
    assert cells["budget"] == f"{run['request']['budgetMs']} ms"
    assert cells["budget met"] in {"true", "false"}
    for key in ("queue", "compute", "total"):
        assert cells[key].endswith(" ms") and float(cells[key].split()[0]) >= 0


def test_moving_the_sliders_changes_the_request_and_the_point(page: Any, live_server: ServerProcess,
                                                              tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    _, count = upload(page, tmp_path, seed=12)
    first = wait_for_run(page, count)
    assert first["request"]["budgetMs"] == 1000 and "latency_budget_ms=1000&" in first["request"]["url"]

    # The budget slider all the way left (10 ms), with the keyboard as a person would; release sends again.
    page.find_element("id", "budget").send_keys(Keys.HOME)
    tight = wait_for_run(page, count + 1)
    assert tight["request"]["budgetMs"] == 10 and "latency_budget_ms=10&" in tight["request"]["url"]
    assert page.find_element("id", "budget-value").text == "10 ms"
    assert page.find_element("id", "request").text == f"POST {tight['request']['url']}"
    # A tighter budget never buys a better point.
    assert float(tight["receipt"]["quality"]) <= float(first["receipt"]["quality"])
    assert tight["receipt"]["cache"] == "miss"

    # Quality 0: only the cheapest point of the pool may answer, whatever the machine's speed.
    page.find_element("id", "quality").send_keys(Keys.HOME)
    cheapest = wait_for_run(page, count + 2)
    assert "quality=0.00" in cheapest["request"]["url"]
    listing = httpx.get(f"{live_server.base_url}/v1/models").json()
    # The pool's ladder is what the planner walks: a point that calibration found slower than a better one is
    # off it, so the cheapest quality is the ladder's (on a busy machine the lowest listed point may be off it).
    on_ladder = [p["quality"] for m in listing["models"] for p in m["points"] if p["on_ladder"]]
    assert float(cheapest["receipt"]["quality"]) == pytest.approx(min(on_ladder), abs=0.01)
    rows = page.find_elements("css selector", "#history tbody tr")
    assert [td.text for td in rows[0].find_elements("tag name", "td")][3:6] == [
        cheapest["receipt"]["point"], cheapest["receipt"]["plan"], "miss"]
    assert rows[1].find_elements("tag name", "td")[1].text == "10 ms"

    # One model instead of the pool: the request names it.
    model = listing["models"][0]["name"]
    page.execute_script("const s = document.getElementById('target'); s.value = arguments[0];"
                        "s.dispatchEvent(new Event('change'));", f"model:{model}")
    named = wait_for_run(page, count + 3)
    assert named["request"]["url"].startswith(f"/v1/models/{model}/segment?")
    assert named["receipt"]["model"] == model


def test_a_refused_image_shows_the_servers_message(page: Any, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tiny)  # below the smallest accepted side
    before = runs(page)
    page.find_element("id", "file").send_keys(str(tiny))
    wait_for(lambda: runs(page) > before and state(page) in {"done", "error"}, what="the refusal")
    assert state(page) == "error"
    message = page.find_element("id", "message").text
    assert message.startswith("422") and "smallest accepted side" in message


def test_palette_of_an_unknown_model_is_a_404(live_server: ServerProcess) -> None:
    response = httpx.get(f"{live_server.base_url}/demo/palette/no-such-model")
    assert response.status_code == 404
    assert "no-such-model" in response.json()["error"]["message"]
