"""What the app's views show in a real browser at a laptop's width: the results table's key
columns, a refused out-of-range setting, the layer picker. A tiny model keeps it to seconds."""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer
from test_browser import (  # noqa: F401 - the browser fixture and page helpers
    browser,
    choose_method,
    expect_text,
    playwright_api,
    shot,
    small_settings,
    start,
)
from test_browser import new_page as browser_page
from test_gradio_app import serve_app
from tiny_models import tiny_model

WIDTH = 1280
ZEROED = "model.layers.1.mlp.up_proj"  # all zero before pruning: the most pruned layer afterwards


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with serve_app(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_submodule(ZEROED).weight.zero_()
    path = tmp_path_factory.mktemp("zeroed-llama")
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def open_tab(page, name: str) -> None:
    tab = page.get_by_role("tab", name=name, exact=True)
    tab.click(no_wait_after=True)  # Gradio notes the tab in the address; nothing to wait for
    playwright_api.expect(tab).to_have_attribute("aria-selected", "true")


def new_page(browser):  # noqa: F811
    return browser_page(browser, width=WIDTH, height=900)


@pytest.fixture(scope="module")
def pruned_page(browser, app_url, folder):  # noqa: F811
    """One page with the zeroed tiny model pruned by Wanda at 2:4, evaluated on two passages."""
    context, page = new_page(browser)
    start(page, app_url)
    page.get_by_label("local folder or .gguf path", exact=True).check()
    page.get_by_label("hub id, folder or .gguf path").fill(folder)
    page.locator("#load-button").click()
    expect_text(page, "#load-status", "Loaded")
    open_tab(page, "Prune")
    choose_method(page, "wanda")
    small_settings(page)
    page.locator("#prune-button").click()
    expect_text(page, "#prune-status", "Pruned with wanda 2:4")
    yield page
    context.close()


def test_results_table_key_columns_are_visible_at_1280px(pruned_page):
    page = pruned_page
    summary = page.locator("#summary")
    summary.scroll_into_view_if_needed()
    for header in ("Metric", "Dense", "Pruned", "Change"):
        cell = summary.locator(f'th[title="{header}"]')
        playwright_api.expect(cell).to_be_visible()
        box = cell.bounding_box()
        assert box is not None and 0 <= box["x"] and box["x"] + box["width"] <= WIDTH, (header, box)
    playwright_api.expect(summary).to_contain_text("LAMBADA last-word accuracy")
    playwright_api.expect(summary).to_contain_text(" points")  # the change in words
    playwright_api.expect(summary).to_contain_text("perplexity x")
    shot(page, "views-results-1280")


def test_layer_picker_lists_every_layer_and_opens_on_the_most_pruned(pruned_page):
    page = pruned_page
    picker = page.locator("#zoom-layer input")
    playwright_api.expect(picker).to_have_value(ZEROED)
    playwright_api.expect(page.locator("#mask-zoom img")).to_be_visible()
    picker.click()
    options = page.get_by_role("option")
    playwright_api.expect(options).to_have_count(14)  # 2 blocks x 7 linears, all listed
    picker.fill("")
    picker.press_sequentially("o_proj")  # typing filters the list
    playwright_api.expect(options).to_have_count(2)
    options.filter(has_text="layers.0").click()
    playwright_api.expect(picker).to_have_value("model.layers.0.self_attn.o_proj")
    shot(page, "views-layer-picker")


def test_out_of_range_sparsity_is_refused_with_a_message(browser, app_url):  # noqa: F811
    context, page = new_page(browser)
    try:
        start(page, app_url)
        open_tab(page, "Prune")
        pattern = page.get_by_label("pattern").first
        pattern.click()
        page.get_by_role("option", name="unstructured", exact=True).click()
        box = page.get_by_label("target sparsity", exact=True)
        playwright_api.expect(box).to_be_editable()
        box.fill("1.5")
        box.press("Tab")
        page.locator("#prune-button").click()
        message = page.get_by_text("1.5 is outside [0, 1)")
        playwright_api.expect(message.first).to_be_visible()
        playwright_api.expect(box).to_have_value("1.5")  # refused, not clamped
        assert "Pruned with" not in page.locator("#prune-status").inner_text()
        marked = page.get_by_test_id("status-tracker").filter(has_text="Error")  # the error shows once,
        playwright_api.expect(marked).to_have_count(1)  # on the status line, not on every output
        playwright_api.expect(page.locator("#prune-status").get_by_test_id("status-tracker")).to_contain_text("Error")
        shot(page, "views-refused-sparsity")
    finally:
        context.close()


def test_compared_runs_show_a_short_table_and_a_plot(pruned_page):
    page = pruned_page
    open_tab(page, "Compare")
    page.get_by_role("button", name="Refresh").click()
    playwright_api.expect(page.locator("#runs")).to_contain_text("prune")
    page.get_by_role("button", name="Compare runs").click()
    compared = page.locator("#compared")
    playwright_api.expect(compared).to_contain_text("LAMBADA last-word accuracy")
    playwright_api.expect(compared).to_contain_text("pruned")
    assert compared.locator("th").count() <= 6  # run, point, sparsity and the chosen metrics only
    playwright_api.expect(page.locator("#compared-plot img")).to_be_visible()
    shot(page, "views-compare")
    open_tab(page, "Prune")
