"""A sweep in the real browser keeps the user's pruned model: prune, sweep, then export it."""

from __future__ import annotations

from test_browser import (  # noqa: F401 - fixtures shared with the other browser tests
    app_url,
    browser,
    choose_method,
    expect_text,
    folders,
    load,
    open_tab,
    page,
    playwright_api,
    shot,
    small_settings,
    start,
)


def test_a_sweep_keeps_the_pruned_model_for_export(page, app_url, folders):  # noqa: F811
    expect = playwright_api.expect
    page.set_default_timeout(120_000)  # a tab's first opening renders it: over 30 s on a busy 2-core machine
    start(page, app_url)
    load(page, folders["llama"])

    open_tab(page, "Prune")
    choose_method(page, "wanda")
    small_settings(page)
    page.locator("#prune-button").click()
    expect_text(page, "#prune-status", "Pruned with wanda 2:4")
    expect(page.locator("#model-line")).to_contain_text("(pruned)")

    open_tab(page, "Sweep")  # magnitude and wanda at 50%: three points, the dense model first
    page.get_by_label("unstructured sparsities").fill("0.5")
    small_settings(page, nth=1)
    page.locator("#sweep-button").click()
    expect_text(page, "#sweep-status", "Sweep finished: 3 points")
    expect(page.locator("#sweep-status")).to_contain_text("pruned model is unchanged")
    expect(page.locator("#model-line")).to_contain_text("(pruned)")
    shot(page, "sweep-kept-1-sweep")

    open_tab(page, "Prune")  # the pruning's results are still on screen
    expect(page.locator("#summary")).to_contain_text("0.5000")
    expect(page.locator("#heatmap img")).to_be_visible()

    open_tab(page, "Export")  # no second prune: the sweep left the pruned model in place
    page.locator("#export-button").click()
    expect_text(page, "#export-status", "Exported")
    expect(page.locator("#download")).to_contain_text(".zip")
    expect(page.locator("#model-card")).to_contain_text("2:4")
    expect(page.locator("#model-card")).to_contain_text("wanda")
    shot(page, "sweep-kept-2-export")
