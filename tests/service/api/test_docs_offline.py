"""`/docs` and `/redoc` work without internet: every asset comes from segserve itself (the installed
`fastapi-offline` package's copy of Swagger UI and ReDoc), the pages render in a real headless Chromium, and
the try-it form of `POST /v1/segment` uploads an image and gets a mask.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.browser import chromium, wait_for
from tests.servers import ServerProcess, jpeg_bytes


class AssetLinks(HTMLParser):
    """The src/href of every <script>, <link> and <img> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"script", "link", "img"}:
            self.urls += [value for name, value in attrs if name in {"src", "href"} and value]


def asset_urls(html: str) -> list[str]:
    parser = AssetLinks()
    parser.feed(html)
    # Swagger UI's and ReDoc's inline scripts name the spec and the OAuth redirect too.
    return parser.urls + re.findall(r"""(?:url|spec-url)\s*[:=]\s*['"]([^'"]+)['"]""", html)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def offsite_loads(driver: Any, base_url: str) -> list[tuple[str, int, int]]:
    """Resources the page fetched from anywhere but segserve (a CSP-blocked attempt has status 0, 0 bytes)."""
    entries = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus, e.transferSize]);")
    return [tuple(e) for e in entries if not e[0].startswith(base_url) and (e[1] != 0 or e[2] != 0)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_assets_are_local_and_load(live_server: ServerProcess, page: str) -> None:
    response = httpx.get(f"{live_server.base_url}{page}")
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    urls = asset_urls(response.text)
    assert any(url.endswith(".js") for url in urls) and "/openapi.json" in urls, urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), f"{url} is not served by segserve"
        if url.endswith("oauth2-redirect"):
            continue
        asset = httpx.get(f"{live_server.base_url}{url}")
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert httpx.get(f"{live_server.base_url}/docs/static/app.py").status_code == 404


def test_openapi_declares_the_image_body(live_server: ServerProcess) -> None:
    spec = httpx.get(f"{live_server.base_url}/openapi.json").json()
    for path in ("/v1/segment", "/v1/models/{model}/segment"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert {"image/jpeg", "image/png", "image/webp"} <= set(content)


def test_swagger_ui_renders_and_its_try_it_form_uploads_an_image(
    browser: Any, live_server: ServerProcess, tmp_path: Path,
) -> None:
    base = live_server.base_url
    browser.get(f"{base}/docs")
    wait_for(lambda: browser.find_elements("css selector", "#swagger-ui .opblock"), what="Swagger UI's operations")
    assert "segserve" in browser.find_element("css selector", "#swagger-ui .info .title").text
    assert offsite_loads(browser, base) == []

    image = tmp_path / "scene.jpg"
    image.write_bytes(jpeg_bytes(seed=21))
    operation = browser.find_element("css selector", "#operations-default-segment_v1_segment_post")
    operation.find_element("css selector", ".opblock-summary").click()
    wait_for(lambda: operation.find_elements("css selector", ".try-out__btn"), what="the Try it out button")
    operation.find_element("css selector", ".try-out__btn").click()
    wait_for(lambda: operation.find_elements("css selector", "input[type=file]"), what="the file picker")
    operation.find_element("css selector", "input[type=file]").send_keys(str(image))
    operation.find_element("css selector", "button.execute").click()
    status = wait_for(lambda: [e.text for e in operation.find_elements(
        "css selector", ".live-responses-table .response .response-col_status")], what="the live response")
    assert status == ["200"]
    shown = operation.find_element("css selector", ".live-responses-table tbody").text.lower()
    assert "x-segserve-point" in shown and "image/png" in shown


def test_redoc_renders_offline(browser: Any, live_server: ServerProcess) -> None:
    base = live_server.base_url
    browser.get(f"{base}/redoc")
    wait_for(lambda: browser.find_elements("css selector", ".api-content h1"), what="ReDoc's content")
    assert browser.find_element("css selector", ".api-content h1").text.startswith("segserve")
    assert browser.find_elements("css selector", "[data-section-id^='operation/']")
    assert offsite_loads(browser, base) == []
