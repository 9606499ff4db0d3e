"""Headless Chromium for browser tests: Debian's `chromium` driven by Playwright's Python client.

Playwright's own browser downloads are not used (`playwright install` needs the internet); the
system binary is launched with flags that keep it off the network it would otherwise call home to.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def chromium_path() -> str | None:
    return (
        os.environ.get("RENDEZVOUS_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


def missing_browser() -> str | None:
    """Why no browser test can run here, or None when one can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -r requirements-dev.txt)"
    if chromium_path() is None:
        return "chromium is not installed (tools/install_system_packages.sh installs it)"
    return None


@contextmanager
def headless_chromium() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), args=list(CHROMIUM_FLAGS), headless=True
        )
        try:
            yield browser
        finally:
            browser.close()
