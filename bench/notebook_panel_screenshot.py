"""Screenshot the notebook panel in a real JupyterLab after a 2:4 run on the bundled model (offline).

    .venv/bin/python bench/notebook_panel_screenshot.py                 # -> docs/screenshots/notebook-panel.png
    .venv/bin/python bench/notebook_panel_screenshot.py --method wanda --out /tmp/panel.png

JupyterLab is a documentation tool here, not a dependency: it lives in its own virtualenv
(default `.bench-venvs/jupyterlab`, created on first use from PyPI with the same
jupyterlab_widgets as this environment). The JupyterLab wheel ships its front-end and
jupyterlab_widgets ships the widget manager, so nothing is fetched from a CDN. The server runs on
loopback with a random token and throwaway Jupyter config/data/runtime folders; its kernel is this
interpreter (so `workbench`, torch and ipywidgets come from here). Playwright drives the system
Chromium: it runs the notebook, which shows `Workbench("default")` with a small calibration, clicks
Run, waits for the heatmap and screenshots the panel's output area.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JUPYTERLAB_VERSION = "4.6.6"
KERNEL_NAME = "prune-workbench"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STEP_TIMEOUT_MS = 300_000  # a loaded 2-core machine can take minutes to start the kernel and import torch
MARGIN = 8  # pixels of notebook background left, right and below the panel on the screenshot
# JupyterLab's news prompt and update check would show toasts (and try the network)
PAGE_CONFIG = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}


def ensure_venv(venv: Path) -> Path:
    """The virtualenv's `jupyter-lab`, installing JupyterLab and the widget manager on first use."""
    widgets = f"jupyterlab_widgets=={metadata.version('jupyterlab_widgets')}"  # the front-end our ipywidgets speaks
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import jupyterlab, jupyterlab_widgets"]
    if not (python.exists() and subprocess.run(probe, capture_output=True).returncode == 0):
        print(f"creating {venv} with jupyterlab=={JUPYTERLAB_VERSION} (a minute, once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"jupyterlab=={JUPYTERLAB_VERSION}", widgets],
                       check=True)
    return venv / "bin" / "jupyter-lab"


def notebook(nbformat_cells: list[str]) -> dict:
    cells = [{"id": f"cell-{index}", "cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
              "source": source} for index, source in enumerate(nbformat_cells)]
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": KERNEL_NAME, "display_name": "prune-workbench", "language": "python"},
                         "language_info": {"name": "python"}}}


def panel_notebook(args: argparse.Namespace, exports: Path) -> dict:
    setup = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n%matplotlib inline"
    panel = (f"from workbench.ui.widgets import Workbench\n\n"
             f"wb = Workbench({args.model!r}, method={args.method!r}, pattern={args.pattern!r},\n"
             f"               nsamples={args.nsamples}, seqlen={args.seqlen}, eval_limit={args.eval_limit},\n"
             f"               export_root={str(exports)!r})")
    return notebook([setup, panel])


def write_jupyter_dirs(base: Path) -> dict[str, str]:
    """Throwaway Jupyter folders: our kernel spec, the page config; no user settings or workspaces."""
    folders = {name: base / name for name in ("config", "data", "runtime")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    kernel = folders["data"] / "kernels" / KERNEL_NAME
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "prune-workbench", "language": "python"}))
    (folders["config"] / "labconfig").mkdir()
    (folders["config"] / "labconfig" / "page_config.json").write_text(json.dumps(PAGE_CONFIG))
    return {"JUPYTER_CONFIG_DIR": str(folders["config"]), "JUPYTER_DATA_DIR": str(folders["data"]),
            "JUPYTER_RUNTIME_DIR": str(folders["runtime"])}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, token: str, server: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5):
                return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(url: str, token: str, server: subprocess.Popen) -> None:
    """Ask the server to shut down (it stops its kernels), then make sure it has exited."""
    try:
        request = urllib.request.Request(f"{url}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=10).close()
        server.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        server.terminate()
        server.wait(timeout=30)


def screenshot_panel(url: str, args: argparse.Namespace) -> tuple[float, list[str]]:
    """Run the notebook, click Run in the panel, wait for the heatmap, save the panel.

    Returns the run's seconds and the URLs the page tried to fetch from anywhere but the server
    (refused: the screenshot shows what an offline JupyterLab shows).
    """
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            page.set_default_timeout(STEP_TIMEOUT_MS)
            server, outside = url.split("/lab/")[0] + "/", []

            def local_only(route) -> None:
                if route.request.url.startswith(server):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", local_only)
            page.goto(url)
            expect(page.locator(".jp-Notebook")).to_be_visible(timeout=STEP_TIMEOUT_MS)
            if page.locator("#jp-left-stack").is_visible():  # the file browser would narrow the notebook
                page.locator(".jp-Notebook").click()
                page.keyboard.press("Control+b")
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            output = page.locator(".jp-OutputArea-output").filter(has_text="retrain-free pruning")
            run_button = output.locator("button", has_text="Run").first
            expect(run_button).to_be_visible(timeout=STEP_TIMEOUT_MS)  # kernel start + imports
            started = time.monotonic()
            run_button.click()
            message = output.locator(".widget-html-content", has_text="Pruned with")
            failure = output.locator(".widget-html-content div[style*='#b00020']")
            expect(message.or_(failure)).to_be_visible(timeout=args.timeout * 1000)
            if failure.count():
                raise RuntimeError(f"the panel reported an error: {failure.first.inner_text()}")
            seconds = time.monotonic() - started
            heatmap = output.locator(".widget-tab img").first
            expect(heatmap).to_be_visible(timeout=STEP_TIMEOUT_MS)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle())
            page.mouse.move(0, 0)  # no hover highlight on the screenshot
            args.out.parent.mkdir(parents=True, exist_ok=True)
            box = output.bounding_box()
            height = min(box["height"], args.max_height) if args.max_height else box["height"]
            page.set_viewport_size({"width": args.width, "height": int(box["y"] + box["height"]) + 2 * MARGIN})
            box = output.bounding_box()  # the taller viewport may move the notebook
            # no margin on top: the notebook's input cell sits right above the output
            clip = {"x": max(box["x"] - MARGIN, 0), "y": box["y"], "width": box["width"] + 2 * MARGIN,
                    "height": height + MARGIN}
            page.screenshot(path=str(args.out), clip=clip)
            return seconds, outside
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots" / "notebook-panel.png")
    parser.add_argument("--model", default="default", help="the panel's model (default: the bundled one)")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=4, help="calibration windows (small: a quick run)")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--eval-limit", type=int, default=16, help="LAMBADA passages for the dense/sparse table")
    parser.add_argument("--width", type=int, default=1280, help="browser width in pixels")
    parser.add_argument("--max-height", type=int, default=900, help="crop the panel to this height (0: all of it)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run")
    parser.add_argument("--venv", type=Path, default=ROOT / ".bench-venvs" / "jupyterlab")
    parser.add_argument("--chromium", default=os.environ.get("WORKBENCH_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    if not Path(args.chromium).exists():
        parser.error(f"no Chromium at {args.chromium}: apt-get install -y chromium, or pass --chromium PATH")

    jupyter_lab = ensure_venv(args.venv)
    token, port = secrets.token_hex(16), free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="notebook-panel-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, **write_jupyter_dirs(tmp / "jupyter")}
        (tmp / "notebooks").mkdir()
        (tmp / "notebooks" / "panel.ipynb").write_text(json.dumps(panel_notebook(args, tmp / "exports"), indent=1))
        log = tmp / "jupyterlab.log"
        command = [str(jupyter_lab), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                   f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp / 'notebooks'}",
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly"]
        if os.geteuid() == 0:  # containers often run as root; Jupyter refuses that unless told
            command.append("--allow-root")
        with open(log, "w") as log_file:
            server = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            wait_for_server(base_url, token, server, log)
            seconds, outside = screenshot_panel(f"{base_url}/lab/tree/panel.ipynb?token={token}&reset", args)
        except Exception:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            stop_server(base_url, token, server)
    print(json.dumps({"out": str(args.out), "method": args.method, "pattern": args.pattern,
                      "calibration": f"{args.nsamples} x {args.seqlen}", "run_s": round(seconds, 1),
                      "refused_outside_requests": outside}))


if __name__ == "__main__":
    main()
