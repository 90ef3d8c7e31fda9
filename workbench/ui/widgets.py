"""The notebook face: an ipywidgets panel over `workbench.workflow`, the browser app's workflow.

    from workbench.ui.widgets import Workbench

    wb = Workbench("default")  # shows the panel: pick settings, press Run
    wb.run(wait=True)  # or drive it from code
    wb.result.table, wb.result.figures["heatmap"], wb.model, wb.session

Every action is one call into `workbench.workflow` (the same functions the Gradio app calls);
this module only reads widget values, runs the call, and shows what comes back. Long work runs in
a background thread so the notebook stays responsive; Cancel sets the session's stop flag, which
the driver polls between blocks. `background=False` (or `run(wait=True)`) runs synchronously,
as notebook execution and tests want.

ipywidgets is optional for the rest of the project: importing this module without it raises an
ImportError that says how to install it.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

try:
    import ipywidgets as W
except ImportError as error:  # the core and the Gradio app do not need it
    raise ImportError(
        "the notebook panel needs ipywidgets: pip install ipywidgets (JupyterLab >= 3 and "
        "Notebook >= 7 then show it without further setup)"
    ) from error

import pandas as pd
from IPython.display import display

from workbench import plots, report, workflow
from workbench.limits import Limits
from workbench.patterns import PatternError
from workbench.prune import PruneCancelled
from workbench.ui import choices

log = logging.getLogger(__name__)

FIGURE_DPI = 90


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (for an `ipywidgets.Image`)."""
    return plots.png_bytes(figure, dpi=FIGURE_DPI)


TABLE_STYLES = [{"selector": "th", "props": "text-align: left; padding: 2px 8px; background: #f3f3f3"},
                {"selector": "td", "props": "padding: 2px 8px"}]


def table_html(frame: pd.DataFrame, number_format: str = "{:.4f}") -> str:
    """A DataFrame as a compact styled HTML table (index hidden, floats rounded)."""
    if frame is None or frame.empty:
        return "<i>(empty)</i>"
    floats = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    return _styled_html(frame.style.hide(axis="index").format(number_format, subset=floats, na_rep="-"))


def _styled_html(styler) -> str:
    return styler.set_table_styles(TABLE_STYLES).to_html()


def _message(kind: str, text: str) -> str:
    colours = {"error": "#b00020", "ok": "#1b5e20", "info": "#333"}
    return f'<div style="color: {colours[kind]}; white-space: pre-wrap">{html.escape(text)}</div>'


def _with_installed(listed: list[str], wait: float | None = 0.0) -> list[str]:
    """`listed` plus every installed lm-eval task (as lm-eval:NAME) once lm-eval's task list is ready."""
    from workbench.lmeval import PREFIX, installed_task_names

    names = installed_task_names(wait)
    return list(dict.fromkeys([*listed, *(PREFIX + name for name in names or ())]))


class Workbench:
    """An ipywidgets panel: load a model, prune it, look at the result, sweep, export.

    The last results are plain Python objects: `result` (a `workflow.PruneOutcome`: the
    `PruneResult`, the seed-format `table`, the `figures`), `sweep_table`, `exported`, and the
    `session` with the loaded `model`. `error` holds the last error message ("" when none).
    """

    def __init__(self, model: str = "default", method: str = "sparsegpt", pattern: str = "2:4",
                 sparsity: float = 0.5, scope: str = "all", calibration: str = "wikitext2",
                 nsamples: int = workflow.INTERACTIVE_NSAMPLES, seqlen: int = workflow.INTERACTIVE_SEQLEN,
                 eval_tasks: Sequence[str] = ("lambada",), eval_limit: int | None = 32,
                 background: bool = True, record: bool = False, runs_root: str | Path | None = None,
                 export_root: str | Path = "exports", session: workflow.Session | None = None,
                 show: bool = True):
        # the operator's bounds (WORKBENCH_MAX_* ...); public mode is for servers, not notebooks
        self.session = session or workflow.Session(limits=dataclasses.replace(Limits.from_env(), public=False))
        self.background = background
        self.record = record
        self.runs_root = runs_root
        self.result: workflow.PruneOutcome | None = None
        self.sweep_table: pd.DataFrame | None = None
        self.exported = None
        self.error = ""
        self._thread: threading.Thread | None = None
        self._build(model, method, pattern, sparsity, scope, calibration, nsamples, seqlen, eval_tasks,
                    eval_limit, export_root)
        if show:
            self.show()

    # --- the widgets -----------------------------------------------------------------------

    def _build(self, model, method, pattern, sparsity, scope, calibration, nsamples, seqlen, eval_tasks,
               eval_limit, export_root) -> None:
        self._build_model(model)
        self._build_settings(method, pattern, sparsity, scope, calibration, nsamples, seqlen, eval_tasks, eval_limit)
        self._build_run_bar()
        self._build_results()
        self._build_sweep()
        self._build_export(export_root)
        self._build_layout()
        self._connect()

    def _build_model(self, model) -> None:
        """The model picker, its Load button and what was loaded."""
        label = {"description_width": "110px"}
        self.model_picker = W.Combobox(value=model, options=list(choices.MODEL_SUGGESTIONS), ensure_option=False,
                                       description="model", placeholder="default, hub id, folder or .gguf",
                                       layout=W.Layout(width="460px"), style=label)
        self.load_button = W.Button(description="Load", icon="download", tooltip="load the model now")
        self.model_status = W.HTML(_message("info", "No model loaded yet (Run loads it)."))

    def _build_settings(self, method, pattern, sparsity, scope, calibration, nsamples, seqlen, eval_tasks,
                        eval_limit) -> None:
        """Method, pattern, sparsity, scope, calibration and evaluation."""
        wide = W.Layout(width="340px")
        label = {"description_width": "110px"}
        methods = choices.methods()
        self.method = W.Dropdown(options=methods, value=method if method in methods else methods[0],
                                 description="method", layout=wide, style=label)
        patterns = list(dict.fromkeys([*choices.PATTERNS, pattern]))  # a typed pattern joins the list
        self.pattern = W.Dropdown(options=patterns,
                                  value=pattern, description="pattern", layout=wide, style=label)
        # unbounded text, not a slider: a slider clamps out-of-range values silently; the core refuses them
        self.sparsity = W.FloatText(value=sparsity, step=0.05, description="sparsity", layout=wide, style=label)
        self.scope = W.Dropdown(options=choices.scopes(), value=scope, description="scope", layout=wide, style=label)
        self.calibration = W.Combobox(value=calibration, options=choices.calibration_sources(), ensure_option=False,
                                      description="calibration", layout=wide, style=label)
        self.nsamples = W.IntText(value=nsamples, description="windows", layout=wide, style=label,
                                  tooltip="calibration windows")
        self.seqlen = W.IntText(value=seqlen, description="tokens/window", layout=wide, style=label)
        listed = _with_installed(choices.eval_tasks())  # every installed lm-eval task once its list is ready
        typed = [name for name in eval_tasks if name not in listed]  # any other lm-eval:NAME goes in the text box
        self.eval_tasks = W.SelectMultiple(options=listed, value=tuple(n for n in eval_tasks if n in listed), rows=4,
                                           description="evaluate", layout=wide, style=label)
        if listed == choices.eval_tasks():  # lm-eval's tasks are still being indexed: add them when they are
            threading.Thread(target=self._list_installed_tasks, name="workbench-task-list", daemon=True).start()
        self.eval_more = W.Text(value=", ".join(typed), placeholder="lm-eval:NAME, ... (any installed task)",
                                description="more tasks", layout=wide, style=label)
        self.eval_limit = W.IntText(value=eval_limit or 0, description="eval size", layout=wide, style=label,
                                    tooltip="LAMBADA passages / WikiText-2 windows; 0 = the full sets")

    def _build_run_bar(self) -> None:
        """Run, Cancel, the progress bar and the message line."""
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop", disabled=True)
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=W.Layout(width="300px"))
        self.status = W.Label("")
        self.message = W.HTML("")

    def _build_results(self) -> None:
        """The figures, the mask zoom with its layer picker, the results table."""
        figure_box = W.Layout(max_width="760px")
        self.heatmap = W.Image(format="png", layout=figure_box)
        # every layer, searchable by typing; opens on the most pruned one
        self.zoom_layer = W.Combobox(options=[], value="", ensure_option=True, description="layer",
                                     placeholder="type to search the layers", layout=W.Layout(width="460px"))
        self.zoom = W.Image(format="png", layout=W.Layout(max_width="480px"))
        self.error_heatmap = W.Image(format="png", layout=figure_box)
        self.summary = W.HTML("<i>Run a pruning to see the table.</i>")
        self.timings = W.HTML("")

    def _build_sweep(self) -> None:
        """The sweep's settings, curve and table."""
        label = {"description_width": "110px"}
        self.sweep_methods = W.SelectMultiple(options=choices.sweep_methods(), value=("magnitude", "wanda"),
                                              rows=3, description="methods", style=label)
        self.sweep_sparsities = W.Text(value="0.3, 0.5, 0.7", description="sparsities", style=label)
        self.sweep_nm = W.SelectMultiple(options=list(choices.NM_PATTERNS), value=(), rows=2, description="N:M points",
                                         style=label)
        self.sweep_mode = W.Dropdown(options=choices.sweep_modes(), value="exact", description="mode", style=label)
        self.sweep_backend = W.Dropdown(options=choices.sweep_backends(), value="local", description="run on",
                                        style=label, tooltip="ray: every point a Ray task on the cluster")
        self.sweep_address = W.Text(value=os.environ.get("RAY_ADDRESS", ""), placeholder="auto, ray://host:10001",
                                    description="Ray address", style=label)
        self.sweep_button = W.Button(description="Sweep", button_style="primary", icon="line-chart")
        self.curve = W.Image(format="png", layout=W.Layout(max_width="900px"))
        self.sweep_html = W.HTML("")

    def _build_export(self, export_root) -> None:
        """The export's folder, name, formats and result."""
        label = {"description_width": "110px"}
        self.export_name = W.Text(value="", placeholder="(automatic)", description="name", style=label)
        self.export_root = W.Text(value=str(export_root), description="folder", style=label)
        self.export_formats = W.SelectMultiple(options=choices.export_formats(), value=("masked",), rows=3,
                                               description="formats", style=label)
        self.export_overwrite = W.Checkbox(value=False, description="overwrite")
        self.export_zip = W.Checkbox(value=True, description="zip")
        self.export_button = W.Button(description="Export", icon="save")
        self.export_html = W.HTML("")

    def _build_layout(self) -> None:
        """The result tabs and the whole panel."""
        self.tabs = W.Tab(children=[
            self.heatmap,
            W.VBox([self.zoom_layer, self.zoom]),
            self.error_heatmap,
            W.VBox([self.summary, self.timings]),
            W.VBox([W.HBox([self.sweep_methods, self.sweep_nm]), W.HBox([self.sweep_sparsities, self.sweep_mode]),
                    W.HBox([self.sweep_backend, self.sweep_address]), self.sweep_button, self.curve, self.sweep_html]),
            W.VBox([W.HBox([self.export_root, self.export_name]),
                    W.HBox([self.export_formats, W.VBox([self.export_overwrite, self.export_zip])]),
                    self.export_button, self.export_html]),
        ])
        for index, title in enumerate(["Heatmap", "Mask zoom", "Layer error", "Summary", "Sweep", "Export"]):
            self.tabs.set_title(index, title)

        self.panel = W.VBox([
            W.HTML("<b>prune-workbench</b>: retrain-free pruning of causal language models"),
            W.HBox([self.model_picker, self.load_button]),
            self.model_status,
            W.HBox([W.VBox([self.method, self.pattern, self.sparsity, self.scope]),
                    W.VBox([self.calibration, self.nsamples, self.seqlen]),
                    W.VBox([self.eval_tasks, self.eval_more, self.eval_limit])]),
            W.HBox([self.run_button, self.cancel_button, self.progress, self.status]),
            self.message,
            self.tabs,
        ])

    def _connect(self) -> None:
        """Buttons and reactions."""
        self.load_button.on_click(lambda _: self.load())
        self.run_button.on_click(lambda _: self.run())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.sweep_button.on_click(lambda _: self.sweep())
        self.export_button.on_click(lambda _: self.export())
        self.zoom_layer.observe(self._on_zoom_layer, names="value")
        self.pattern.observe(self._on_pattern, names="value")
        self._on_pattern({"new": self.pattern.value})

    def show(self) -> None:
        """Display the panel in the current notebook cell."""
        display(self.panel)

    def __repr__(self) -> str:
        loaded = self.session.info.get("resolved") or self.session.info.get("source") or "no model"
        pruned = ""
        if self.session.result is not None:
            config = self.session.result.config
            pruned = f", pruned: {config.method} {config.pattern}"
        return f"Workbench({loaded}{pruned})"

    # --- plain Python access ---------------------------------------------------------------

    @property
    def model(self):
        """The session's model (pruned after a run), or None before anything is loaded."""
        return self.session.loaded.model if self.session.loaded is not None else None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def settings(self) -> dict:
        """The pruning settings the widgets hold now, as `workflow.make_config` takes them."""
        return {"method": self.method.value, "pattern": self.pattern.value, "sparsity": self.sparsity.value,
                "scope": self.scope.value, "calibration": self.calibration.value,
                "nsamples": self.nsamples.value, "seqlen": self.seqlen.value}

    def _eval_settings(self) -> tuple[tuple[str, ...], int | None]:
        typed = [name.strip() for name in self.eval_more.value.split(",") if name.strip()]
        return (*self.eval_tasks.value, *typed), (self.eval_limit.value or None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running job ends; False if it is still running after `timeout` s."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    # --- actions ---------------------------------------------------------------------------

    def load(self, source: str | None = None, wait: bool | None = None) -> dict | None:
        """Load `source` (default: the model picker's value); returns `model_info` when waited."""
        if source is not None:
            self.model_picker.value = source
        source = self.model_picker.value
        if not self._check(workflow.validate_settings(source=source)):
            return None
        self._start("loading", lambda progress: self._load(source, progress), wait)
        return self.session.info if not self.busy and self.session.loaded is not None else None

    def run(self, wait: bool | None = None) -> workflow.PruneOutcome | None:
        """Prune with the current settings (loading the picked model first when needed).

        Returns the outcome when the run finished here (`wait=True`, or `background=False`);
        otherwise None at once, with `wb.result` set when the thread finishes. Invalid settings
        show the message in the panel, set `wb.error`, and start nothing.
        """
        settings, (tasks, limit) = self.settings(), self._eval_settings()
        source = self.model_picker.value
        if not self._check(workflow.validate_settings(source=source, settings=settings, eval_tasks=tasks,
                                                      limit=limit, limits=self.session.limits)):
            return None
        self.result = None
        self._start("pruning", lambda progress: self._run(source, settings, tasks, limit, progress), wait)
        return self.result if not self.busy else None

    def sweep(self, wait: bool | None = None):
        """Accuracy vs sparsity for the ticked methods, from the dense model each time."""
        try:
            sparsities = workflow.parse_sparsities(self.sweep_sparsities.value)
        except workflow.SettingsError as error:
            self._check([str(error)])
            return None
        methods, nm = list(self.sweep_methods.value), list(self.sweep_nm.value)
        tasks, limit = self._eval_settings()
        problems = workflow.validate_settings(source=self.model_picker.value, eval_tasks=tasks, limit=limit,
                                              limits=self.session.limits)
        if not methods:
            problems.append("tick at least one method to sweep")
        if not sparsities and not nm:
            problems.append("give sparsities (e.g. 0.3, 0.5) or tick an N:M pattern")
        if not self._check(problems):
            return None
        options = {"scope": self.scope.value, "calibration": self.calibration.value,
                   "nsamples": self.nsamples.value, "seqlen": self.seqlen.value, "mode": self.sweep_mode.value,
                   "backend": self.sweep_backend.value, "address": self.sweep_address.value.strip() or None}
        self.sweep_table = None
        self._start("the sweep", lambda progress: self._sweep(methods, sparsities, nm, tasks, limit, options,
                                                              progress), wait)
        return self.sweep_table if not self.busy else None

    def export(self, wait: bool | None = None):
        """Export the pruned model; returns the `export.ExportResult` when waited."""
        formats = list(self.export_formats.value)
        self.exported = None
        self._start("exporting", lambda progress: self._export(formats, progress), wait)
        return self.exported if not self.busy else None

    def cancel(self) -> None:
        """Ask the running job to stop after the current block (a stopped prune leaves the model dense,
        a stopped sweep leaves it as it was before the sweep)."""
        if not self.busy:
            self.status.value = "Nothing is running."
            return
        self.session.request_stop()
        self.status.value = f"Stopping {self.session.busy or 'the job'} after the current block ..."

    # --- the job runner --------------------------------------------------------------------

    def _check(self, problems: list[str]) -> bool:
        if self.busy:
            problems = [f"{self.session.busy or 'a job'} is running: wait for it or press Cancel"]
        if problems:
            self.error = " ".join(problems)
            self.message.value = _message("error", self.error)
            return False
        return True

    def _progress(self, fraction: float, message: str) -> None:
        self.progress.value = min(max(float(fraction), 0.0), 1.0)
        self.status.value = message

    def _list_installed_tasks(self) -> None:
        """Background: put every installed lm-eval task into the picker once the list is built."""
        options = _with_installed(list(self.eval_tasks.options), wait=None)
        if len(options) > len(self.eval_tasks.options):
            chosen = self.eval_tasks.value
            self.eval_tasks.options = options
            self.eval_tasks.value = tuple(n for n in chosen if n in options)

    def _start(self, what: str, job: Callable[[Callable[[float, str], None]], str], wait: bool | None) -> None:
        """Run `job(progress) -> status text` in a thread (or here), showing errors in the panel."""
        if not self._check([]):
            return
        self.error = ""
        self.message.value = ""
        self.session.busy = what
        self.session.stop_requested = False
        self._set_running(True)
        self._progress(0.0, f"{what[0].upper()}{what[1:]} ...")

        def work() -> None:
            started = time.perf_counter()
            try:
                done = job(self._progress)
                self.message.value = _message("ok", f"{done} ({time.perf_counter() - started:.1f} s)")
                self.progress.value = 1.0
            except PruneCancelled as stopped:
                self.error = f"Cancelled ({stopped}). The model is dense again."
                self.message.value = _message("info", self.error)
                self.status.value = "Cancelled"
            except (ValueError, FileNotFoundError, PatternError) as error:  # the user's to fix
                self.error = str(error)
                self.message.value = _message("error", self.error)
                self.status.value = "Failed"
            except Exception as error:  # shown, not swallowed: the traceback goes to the log
                log.exception("%s failed", what)
                self.error = f"{what} failed: {type(error).__name__}: {error}"
                self.message.value = _message("error", self.error)
                self.status.value = "Failed"
            finally:
                self.session.busy = ""
                self._set_running(False)

        if wait is None:
            wait = not self.background
        if not wait:
            self._thread = threading.Thread(target=work, name=f"workbench-{what}", daemon=True)
            self._thread.start()
            return
        if self.background:  # a worker thread even when waiting, so Cancel works from another thread
            self._thread = threading.Thread(target=work, name=f"workbench-{what}", daemon=True)
            self._thread.start()
            self._thread.join()
        else:
            work()

    def _set_running(self, running: bool) -> None:
        for button in (self.run_button, self.load_button, self.sweep_button, self.export_button):
            button.disabled = running
        self.cancel_button.disabled = not running

    # --- the jobs: one workflow call each, then show the result ------------------------------

    def _ensure_loaded(self, source: str, progress) -> None:
        loaded = self.session.loaded
        if loaded is None or loaded.source != workflow.check_source(source):
            self._load(source, progress)

    def _load(self, source: str, progress) -> str:
        info = workflow.load(self.session, source, progress=progress)
        self.result = None
        facts = [info.get("class", ""), f"{info['params'] / 1e6:.1f}M parameters" if "params" in info else "",
                 f"{info['blocks']} blocks" if "blocks" in info else "",
                 f"not prunable: {info['unsupported']}" if "unsupported" in info else ""]
        name = "bundled SmolLM2-135M-Instruct" if info.get("kind") == "default" else info.get("resolved", source)
        self.model_status.value = _message("info", f"{name}: " + ", ".join(str(f) for f in facts if f))
        return f"Loaded {info.get('resolved', source)} in {info.get('load_s')} s"

    def _run(self, source: str, settings: dict, tasks, limit, progress) -> str:
        self._ensure_loaded(source, progress)
        outcome = workflow.run_prune(self.session, settings, tasks, limit, progress)
        note = ""
        if self.record:
            try:
                note = f" Saved as run {Path(workflow.record_run(self.session, outcome, self.runs_root)).name}."
            except Exception as error:  # the result is on screen; a full disk must not hide it
                note = f" (Not saved to the run store: {error})"
        self.result = outcome
        self._show_outcome(outcome)
        summary, config = outcome.result.summary, outcome.result.config
        return (f"Pruned with {config.method} {config.pattern}: {summary['mlp']:.2%} of MLP weights, "
                f"{summary['attention']:.2%} of attention weights, {summary['matmul']:.2%} of all matmul "
                f"weights are zero (counted from the weights).{note}")

    def _show_outcome(self, outcome: workflow.PruneOutcome) -> None:
        figures = outcome.figures
        self.heatmap.value = figure_png(figures["heatmap"]) if figures.get("heatmap") is not None else b""
        self.error_heatmap.value = (figure_png(figures["error_heatmap"])
                                    if figures.get("error_heatmap") is not None else b"")
        layers = list(outcome.result.masks)
        self.zoom_layer.unobserve(self._on_zoom_layer, names="value")
        self.zoom_layer.options = layers
        self.zoom_layer.value = outcome.zoom_layer if outcome.zoom_layer in layers else ""
        self.zoom_layer.observe(self._on_zoom_layer, names="value")
        self.zoom.value = figure_png(figures["mask_zoom"]) if figures.get("mask_zoom") is not None else b""
        # metric, dense, pruned and change first, rounded; outcome.table keeps the seed's record
        self.summary.value = _styled_html(report.styled(report.results_view(outcome.comparison, outcome.table)))
        self.timings.value = "<b>Timings (s)</b>" + table_html(workflow.timings_table(outcome), "{:.2f}")
        self.tabs.selected_index = 0

    def _sweep(self, methods, sparsities, nm, tasks, limit, options, progress) -> str:
        self._ensure_loaded(self.model_picker.value, progress)
        table = workflow.run_sweep(self.session, methods, sparsities, nm, tasks, limit, progress=progress,
                                   on_point=self._show_sweep, **options)
        self.sweep_table = table
        self._show_sweep(table)
        # a stopped sweep returns the points it finished (the stop request is spent by then)
        stopped = " (stopped early)" if len(table) < workflow.sweep_size(methods, sparsities, nm) + 1 else ""
        kept = ". Your pruned model is unchanged: export it or compare with it" if self.session.is_pruned else ""
        return f"Sweep finished: {len(table)} points, the dense model first{stopped}{kept}"

    def _show_sweep(self, table: pd.DataFrame) -> None:
        from workbench.sweep import summarize

        self.sweep_html.value = table_html(summarize(table))
        try:
            self.curve.value = figure_png(plots.accuracy_curve(table))
        except (ValueError, KeyError):  # no metric column yet
            pass

    def _export(self, formats: list[str], progress) -> str:
        exported = workflow.export(self.session, self.export_root.value, self.export_name.value or None, formats,
                                   overwrite=self.export_overwrite.value, make_zip=self.export_zip.value,
                                   progress=progress)
        self.exported = exported
        sizes = pd.DataFrame([(k, f"{v / 2**20:.1f} MiB") for k, v in (exported.sizes or {}).items()],
                             columns=["format", "size"])
        zip_line = f"<br>zip: <code>{html.escape(str(exported.zip_path))}</code>" if exported.zip_path else ""
        self.export_html.value = (f"Exported to <code>{html.escape(str(exported.path))}</code>{zip_line}"
                                  + table_html(sizes))
        return f"Exported to {exported.path}"

    # --- small reactions -------------------------------------------------------------------

    def _on_zoom_layer(self, change) -> None:
        layer = change["new"]
        if not layer or self.session.result is None or layer not in self.session.result.masks:
            return
        self.zoom.value = figure_png(workflow.zoom_figure(self.session.result, layer, self.session.model))

    def _on_pattern(self, change) -> None:
        """N:M fixes the sparsity; channel/head set the scope and a method that removes whole units
        (`choices.pattern_reaction`, shared with the browser app)."""
        reaction = choices.pattern_reaction(change["new"], self.method.value, list(self.method.options))
        if reaction is None:  # a pattern that does not parse: Run says why
            return
        self.sparsity.disabled = reaction.fixed_sparsity is not None
        if reaction.fixed_sparsity is not None:
            self.sparsity.value = reaction.fixed_sparsity
        if reaction.method is not None:
            self.method.value = reaction.method
        if reaction.scope is not None:
            self.scope.value = reaction.scope
