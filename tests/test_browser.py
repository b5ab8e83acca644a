"""In headless Chromium: the Server-Timing entries of a page the FastAPI example serves.

Run by ``nox -s browser`` (ALCHEMY_SCOPE_BROWSER=1: nothing may be skipped). It needs Debian's
``chromium`` and ``chromium-driver`` and Selenium; no browser is downloaded. The screenshot it
takes is docs/img/server-timing.png, shown on the docs' "Database insight" page.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from .examples.contract import loaded_example
from .servers import uvicorn_server

SCREENSHOT = Path(__file__).parent.parent / "docs" / "img" / "server-timing.png"
REQUIRED = bool(os.environ.get("ALCHEMY_SCOPE_BROWSER"))

# Reads the navigation's Server-Timing entries, then shows them, with the page's JSON, as a
# page of their own for the screenshot.
READ_ENTRIES = """
return performance.getEntriesByType("navigation")[0].serverTiming.map(
    (entry) => ({name: entry.name, duration: entry.duration, description: entry.description})
);
"""
SHOW_ENTRIES = """
const [entries, url] = arguments;
const body = document.body.innerText;
document.head.innerHTML = "<style>" +
    "html{overflow:hidden}body{font:15px system-ui,sans-serif;margin:24px;color:#222}" +
    "table{border-collapse:collapse;margin:12px 0}" +
    "td,th{border:1px solid #bbb;padding:6px 12px;text-align:left}" +
    "th{background:#eef}pre{background:#f6f6f6;padding:10px;white-space:pre-wrap}</style>";
document.body.innerHTML = "";
const add = (tag, text, parent = document.body) => {
    const element = document.createElement(tag);
    if (text !== undefined) element.textContent = text;
    parent.appendChild(element);
    return element;
};
add("h2", "GET " + url);
add("p", 'performance.getEntriesByType("navigation")[0].serverTiming');
const table = add("table");
const head = add("tr", undefined, table);
for (const title of ["name", "duration (ms)", "description"]) add("th", title, head);
for (const entry of entries) {
    const row = add("tr", undefined, table);
    add("td", entry.name, row);
    add("td", entry.duration.toFixed(1), row);
    add("td", entry.description, row);
}
add("p", "Response body:");
add("pre", body);
"""


def chromium_paths() -> tuple[str, str]:
    """The system Chromium and its driver; skipped (failed under nox -s browser) if missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    problem = None
    if importlib.util.find_spec("selenium") is None:
        problem = "selenium is not installed"
    if browser is None or driver is None:
        problem = "apt-get install -y chromium chromium-driver"
    if problem is not None:
        if REQUIRED:
            pytest.fail(f"nox -s browser needs every part: {problem}")
        pytest.skip(problem)
    assert browser is not None
    assert driver is not None
    return browser, driver


def read_in_chromium(url: str, browser: str, driver: str) -> tuple[list[dict[str, Any]], bytes]:
    """Load ``url`` in headless Chromium: its Server-Timing entries, and a screenshot of them."""
    # Imported by name: mypy checks the tests where selenium is not installed.
    webdriver: Any = importlib.import_module("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--window-size=760,500"):
        options.add_argument(argument)  # as root Chromium exits at once without --no-sandbox
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    try:
        chrome.get(url)
        entries: list[dict[str, Any]] = chrome.execute_script(READ_ENTRIES)
        chrome.execute_script(SHOW_ENTRIES, entries, "/" + url.split("/", 3)[3])
        return entries, chrome.get_screenshot_as_png()
    finally:
        chrome.quit()


async def test_chromium_reads_the_server_timing_of_a_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chromium sees the db entry with the request's statement count, and the pool wait."""
    browser, driver = chromium_paths()
    url = f"sqlite+aiosqlite:///{tmp_path / 'todos.db'}"
    async with (
        loaded_example("fastapi", url, monkeypatch, {"INSIGHT": "1"}) as module,
        uvicorn_server(module.app) as served,
    ):
        async with httpx.AsyncClient(base_url=served) as client:
            for title in ("Buy milk", "Write the docs", "Ship it"):
                assert (await client.post("/todos", json={"title": title})).status_code == 201
        entries, png = await asyncio.to_thread(read_in_chromium, f"{served}/todos", browser, driver)
    by_name = {entry["name"]: entry for entry in entries}
    assert by_name["db"]["description"] == "1 statement"
    assert by_name["db"]["duration"] > 0
    assert by_name["db-pool"]["description"] == "pool wait"
    assert png.startswith(b"\x89PNG")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(png)
