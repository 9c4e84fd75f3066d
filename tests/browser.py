"""A real headless Chromium for the page tests: Debian's `chromium` driven by Selenium through `chromedriver`.

Selenium is pointed at both binaries, so Selenium Manager never looks for (or downloads) a browser or a driver;
the flags keep Chromium from reaching the network on its own (updates, sync, safe browsing lists). A missing
binary fails in CI (`.ci/run` installs both) and skips elsewhere, like every external tool (`tests/tools.py`).
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image

from tests.tools import missing, require_tool

INSTALL_HINT = "apt-get install chromium chromium-driver (as .ci/run does)"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,900",
)


@contextmanager
def chromium() -> Iterator[Any]:
    """A Selenium WebDriver on headless Chromium, quit on exit."""
    browser = require_tool("chromium", INSTALL_HINT)
    driver_path = require_tool("chromedriver", INSTALL_HINT)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed: pip install -e '.[dev]'")
    os.environ["SE_OFFLINE"] = "true"  # should Selenium Manager run at all, it must not go online
    options = Options()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout_s: float = 120.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; its value, or AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def canvas_pixels(driver: Any, element_id: str) -> np.ndarray:
    """The RGBA pixels of a canvas (H, W, 4), exactly as painted (toDataURL is lossless PNG)."""
    url = driver.execute_script(f"return document.getElementById({element_id!r}).toDataURL('image/png');")
    assert url.startswith("data:image/png;base64,"), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def resource_urls(driver: Any) -> list[str]:
    """Every URL the page loaded (scripts, styles, fetches), from the Resource Timing API."""
    return driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
