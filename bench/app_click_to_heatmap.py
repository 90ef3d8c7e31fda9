"""Seconds from clicking Run in the Prune tab to the sparsity heatmap on screen, in a real browser.

    .venv/bin/python bench/app_click_to_heatmap.py                # defaults: 2:4 SparseGPT, 16 x 256
    .venv/bin/python bench/app_click_to_heatmap.py --no-eval      # pruning only, no LAMBADA subset

The app runs in-process on a loopback port; Playwright drives the system Chromium. The model is
the bundled SmolLM2-135M-Instruct; the Prune tab keeps its defaults (SparseGPT, 2:4, wikitext2
calibration 16 x 256, LAMBADA last-word on 32 passages) unless told otherwise. The first click
also evaluates the dense model; later clicks reuse that, so both are reported. `server_cpu_s` is
the CPU time the app process spent meanwhile: on a shared machine it shows how much of the wall
time was waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path from a checkout

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-eval", action="store_true", help="untick the LAMBADA evaluation")
    parser.add_argument("--repeat", type=int, default=2, help="clicks on Run (default 2)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshots", type=Path, help="save the Model and Prune tabs here as PNG")
    args = parser.parse_args()

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import expect, sync_playwright

    from workbench.ui.gradio_app import build_app, launch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_app()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    figures = {"no_eval": args.no_eval, "clicks": []}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#model-line")).to_contain_text("No model loaded", timeout=60_000)
            started = time.perf_counter()
            page.locator("#load-button").click()
            expect(page.locator("#load-status")).to_contain_text("Loaded", timeout=600_000)
            figures["load_s"] = round(time.perf_counter() - started, 1)
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshots / "model.png"), full_page=True)
            page.get_by_role("tab", name="Prune", exact=True).click()
            if args.no_eval:
                picker = page.get_by_label("evaluation", exact=True).first
                picker.click()
                picker.press("Backspace")  # drops the one selected task (lambada)
                picker.press("Escape")
            for _ in range(args.repeat):
                started, cpu_started = time.perf_counter(), time.process_time()
                page.locator("#prune-button").click()
                expect(page.locator("#prune-status")).to_contain_text("Pruned with", timeout=3_600_000)
                expect(page.locator("#heatmap img")).to_be_visible(timeout=60_000)
                seconds = time.perf_counter() - started
                cpu_seconds = time.process_time() - cpu_started
                timings = page.locator("#timings").inner_text()
                figures["clicks"].append({"click_to_heatmap_s": round(seconds, 1),
                                          "server_cpu_s": round(cpu_seconds, 1),
                                          "load_average": os.getloadavg()[0],
                                          "timings": timings.split("\n")})
                print(f"click to heatmap: {seconds:.1f} s", flush=True)
            if args.screenshots:
                page.screenshot(path=str(args.screenshots / "prune.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
