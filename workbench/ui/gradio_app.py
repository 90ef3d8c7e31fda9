"""The browser face of the workbench: load a model, prune it, sweep, compare, export.

Every callback is a thin layer over `workbench.workflow`; the per-browser state is a
`workflow.Session` held in `gr.State`, so one visitor's model never reaches another's.
Long work goes through Gradio's queue under one shared concurrency limit
(`WORKBENCH_CONCURRENCY`, default 1): a small machine holds one model's work at a time.
Each request is bounded by `workbench.limits` (sizes, jobs per session, a time budget per job);
in public mode (a Hugging Face Space) the app also accepts no server paths, keeps paths out of
its messages, serves each export only to the session that made it and lists a session's own runs.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from workbench import report, workflow
from workbench.limits import Limits, scrub, variable_for
from workbench.lmeval import PREFIX as LM_EVAL_PREFIX
from workbench.lmeval import task_list
from workbench.prune import PruneCancelled
from workbench.ui import choices
from workbench.ui.tabs import TabJobs

log = logging.getLogger(__name__)

SOURCE_CHOICES = ["bundled default", "hub id", "local folder or .gguf path", "upload .gguf"]
# the option lists come from workbench.ui.choices (the core's tables), shared with the notebook panel
PATTERNS = list(choices.PATTERNS)
SCOPES = choices.scopes()
CALIBRATION_SOURCES = choices.calibration_sources()
# zero-shot and lm-eval:NAME run through lm-eval and need its task data; any installed task can be typed
EVAL_TASKS = choices.eval_tasks()
EVAL_INFO = choices.EVAL_HINT
WORK = "work"  # the concurrency group every heavy event shares
TAB_JOBS = TabJobs()  # which session each open tab runs a job on

INTRO = """# Prune workbench
Retrain-free pruning of causal language models: load a model, choose a method and a sparsity
pattern, prune with a small calibration set, and see what it costs in accuracy. Start in
**Model**, then **Prune**.
"""


def _error(message: str, **kwargs) -> gr.Error:
    """An error toast that stays until the user closes it (the status line only says "Error")."""
    return gr.Error(message, duration=None, **kwargs)


def concurrency() -> int:
    return max(1, int(os.environ.get("WORKBENCH_CONCURRENCY", "1")))


def exports_root() -> Path:
    return Path(os.environ.get("WORKBENCH_EXPORTS") or Path(tempfile.gettempdir()) / "prune-workbench-exports")


def runs_root() -> Path:
    from workbench.runs import default_root

    return default_root()


def app_limits() -> Limits:
    """The operator's bounds (environment variables, see workbench.limits); uploads count as the
    user's own files, so public mode accepts paths in Gradio's upload folder."""
    from gradio.utils import get_upload_folder

    limits = Limits.from_env()
    return dataclasses.replace(limits, upload_dirs=(Path(get_upload_folder()).resolve(),))


def _public(session: workflow.Session | None) -> bool:
    return bool(session is not None and session.limits is not None and session.limits.public)


def _say(session: workflow.Session | None, message: str) -> str:
    """`message` as this server may show it: without server paths in public mode."""
    return scrub(message) if _public(session) else message


# --- helpers --------------------------------------------------------------------------------


def _reporter(progress: gr.Progress):
    return lambda fraction, message: progress(fraction, desc=message)


def installed_task_choices(pickers: int, wait: float = 180.0):
    """`load`: the evaluation pickers' choices with every installed lm-eval task, once lm-eval's
    task list is ready (built once per process in the background; waits for it up to `wait` s)."""

    def choices_when_ready():
        names = task_list().names(wait)
        if not names:  # still indexing, or no lm-eval: the preset and typed names stay
            return [gr.update()] * pickers
        listed = list(dict.fromkeys([*EVAL_TASKS, *(LM_EVAL_PREFIX + name for name in names)]))
        return [gr.update(choices=listed)] * pickers

    return choices_when_ready


def close_tab(request: gr.Request) -> None:
    """`unload`: the tab was closed or reloaded, so the job it started stops."""
    TAB_JOBS.close(getattr(request, "session_hash", None))


@contextmanager
def _job(session: workflow.Session, what: str, request: gr.Request | None):
    """One job per session at a time; user errors become a clear message, never a trace. `request` is the
    event's (Gradio passes it to a handler's `gr.Request` parameter); None when called outside an event."""
    if session.busy:
        raise _error(f"{session.busy[0].upper()}{session.busy[1:]} is still running in this tab: wait for it "
                       "or press Cancel.", print_exception=False)
    session.stop_requested = False
    session.busy = what
    try:
        # closing the tab stops the job (workbench.ui.tabs)
        with TAB_JOBS.running(getattr(request, "session_hash", None), session):
            yield
    except gr.Error as error:
        if _public(session):
            raise _error(scrub(error.message), print_exception=False) from None
        raise
    except ValueError as error:  # SettingsError, PatternError, ModelLoadError: meant for the user
        raise _error(_say(session, str(error)), print_exception=False) from None
    except FileNotFoundError as error:
        raise _error(_say(session, str(error)), print_exception=False) from None
    except (MemoryError, torch.OutOfMemoryError):
        raise _error(f"out of memory while {what}: try a smaller model, fewer calibration samples "
                       "or a shorter sequence length") from None
    except Exception as error:
        log.exception("%s failed", what)
        if _public(session):  # the details can hold server paths or file contents: they go to the log
            raise _error(f"{what} failed ({type(error).__name__}); the details are in the server's log",
                           print_exception=False) from None
        raise _error(f"{what} failed: {type(error).__name__}: {error}") from None
    finally:
        session.busy = ""


def _source(choice: str, text: str | None, upload) -> str:
    if choice == "bundled default":
        return "default"
    if choice == "upload .gguf":
        if not upload:
            raise _error("upload a .gguf file first (or pick another source)")
        return str(getattr(upload, "name", upload))
    if not (text or "").strip():
        raise _error("type a hub id such as HuggingFaceTB/SmolLM2-135M" if choice == "hub id"
                       else "type the path of a save_pretrained folder or a .gguf file")
    return text.strip()


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return str(count)


def _origin(info: dict, public: bool = False) -> str:
    """Where the model came from; in public mode a local file shows by name only."""
    resolved = info.get("resolved")
    if public and info.get("kind") not in ("hub", "default") and resolved:
        resolved = Path(str(resolved)).name
    return str(resolved)


def info_table(info: dict, public: bool = False) -> pd.DataFrame:
    rows = [
        ("architecture", info.get("class")),
        ("family", info.get("family")),
        ("parameters", f"{_human(int(info.get('params', 0)))} ({info.get('params', 0):,})"),
        ("decoder blocks", info.get("blocks")),
        ("hidden size", info.get("hidden_size")),
        ("MLP size", info.get("intermediate_size")),
        ("attention heads / KV heads", f"{info.get('heads')} / {info.get('kv_heads')}"),
        ("head dim", info.get("head_dim")),
        ("prunable linears per block", ", ".join(info.get("prunable_linears_per_block", []) or [])
         or (f"none: {info['unsupported']}" if "unsupported" in info else "-")),
        ("dtype", info.get("dtype")),
        ("loaded from", f"{info.get('kind')}: {_origin(info, public)}"),
        ("load time (s)", info.get("load_s")),
    ]
    return pd.DataFrame([(k, "" if v is None else str(v)) for k, v in rows], columns=["property", "value"])


def _model_line(session: workflow.Session) -> str:
    if session.loaded is None:
        return "*No model loaded yet: load one in the **Model** tab.*"
    info = session.info
    state = "pruned" if session.is_pruned else "dense"
    where = "the bundled SmolLM2-135M-Instruct" if info.get("kind") == "default" \
        else f"{info.get('kind')} `{_origin(info, _public(session))}`"
    return (f"**Model:** {info.get('class')} from {where}, "
            f"{_human(int(info.get('params', 0)))} parameters, {info.get('blocks')} blocks ({state})")


def _image(figure):
    """A figure as a PIL image, rendered under the process-wide matplotlib lock."""
    if figure is None:
        return None
    from PIL import Image

    from workbench.plots import png_bytes

    return Image.open(io.BytesIO(png_bytes(figure)))


def card_preview(text: str) -> str:
    """The model card without its YAML front matter and without images that live beside it."""
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            text = text[end + 4:].lstrip()
    return re.sub(r"!\[([^\]]*)\]\((?!https?:)[^)]*\)", r"*(\1: in the download)*", text)


# --- callbacks --------------------------------------------------------------------------------


def new_session(limits: Limits | None = None) -> workflow.Session:
    """A fresh, empty session for each browser tab (and each API client), bounded by `limits`."""
    return workflow.Session(limits=limits)


class FreshSession:
    """The session `gr.State`'s initial value: Gradio gives each tab a deep copy of it, made
    when the tab's first event reads the state, and that copy is a new empty `Session`.

    A callable initial value (`gr.State(new_session)`) is the documented alternative, but Gradio
    sets it from a page-load event, which can run after the tab's first action: a model loaded
    before that event ran was replaced by an empty session, and the next prune said "no model
    loaded" (in 4 of 13 runs of the browser tests on a busy 2-core machine)."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits

    def __deepcopy__(self, memo) -> workflow.Session:
        return new_session(self.limits)


def session_state(limits: Limits | None) -> gr.State:
    """The per-tab `Session`, created on the tab's first event and freed when Gradio drops it."""
    state = gr.State(delete_callback=workflow.free)
    state.value = FreshSession(limits)  # after __init__, which deep-copies what it is given
    return state


def on_source_kind(choice: str):
    hint = "HuggingFaceTB/SmolLM2-135M" if choice == "hub id" else "/path/to/folder or model.gguf"
    return (gr.update(visible=choice in ("hub id", "local folder or .gguf path"), placeholder=hint),
            gr.update(visible=choice == "upload .gguf"))


def on_load(session: workflow.Session, choice: str, text: str | None, upload, dtype: str,
               request: gr.Request | None = None, progress=gr.Progress()):
    source = _source(choice, text, upload)
    with _job(session, "loading", request):
        info = workflow.load(session, source, dtype, _reporter(progress))
    status = f"Loaded in {info.get('load_s')} s."
    return status, info_table(info, _public(session)), _model_line(session)


def on_pattern(pattern: str, method: str):
    """N:M fixes the sparsity; channel/head are the structured pipeline and its scope
    (`choices.pattern_reaction`, shared with the notebook panel)."""
    reaction = choices.pattern_reaction(pattern, method)
    if reaction is None:  # a typed pattern that does not parse: the run says why
        return gr.update(), gr.update(), gr.update()
    fixed = reaction.fixed_sparsity
    sparsity_update = gr.update(interactive=fixed is None, label=reaction.sparsity_label,
                                **({"value": fixed} if fixed is not None else {}))
    return (gr.update(value=reaction.method) if reaction.method else gr.update(),
            gr.update(value=reaction.scope) if reaction.scope else gr.update(), sparsity_update)


def _settings(method, pattern, sparsity, scope, calibration, nsamples, seqlen) -> dict:
    return {"method": method, "pattern": pattern, "sparsity": sparsity, "scope": scope,
            "calibration": calibration, "nsamples": nsamples, "seqlen": seqlen}


def _limit(value) -> int | None:
    return None if value in (None, "", 0) else value


def on_prune(session: workflow.Session, method: str, pattern: str, sparsity: float, scope: str,
              calibration: str, nsamples: int, seqlen: int, tasks: list[str], limit: int,
              calibration_file=None, request: gr.Request | None = None, progress=gr.Progress()):
    """Prune the dense model; returns status, summary table, figures, timings, layer choices.
    An uploaded calibration file, when given, replaces the named calibration data."""
    if calibration_file:
        calibration = str(getattr(calibration_file, "name", calibration_file))
    problems = workflow.validate_settings(
        settings=_settings(method, pattern, sparsity, scope, calibration, nsamples, seqlen),
        eval_tasks=tasks, limit=_limit(limit), limits=session.limits)
    if problems:
        raise _error(_say(session, " ".join(problems)), print_exception=False)
    with _job(session, "pruning", request):
        try:
            outcome = workflow.run_prune(session, _settings(method, pattern, sparsity, scope, calibration,
                                                            nsamples, seqlen),
                                         tasks, _limit(limit), _reporter(progress))
        except PruneCancelled:
            status = "Cancelled. The model is dense again (a partly pruned model is not kept)."
            return status, None, None, None, None, None, gr.update(choices=[], value=None), _model_line(session)
        try:
            run_path = workflow.record_run(session, outcome, runs_root())
            saved = f" Saved as run `{Path(run_path).name}`."
        except Exception as error:  # the result is on screen; a full disk must not hide it
            log.warning("could not record the run: %s", error)
            saved = _say(session, f" (Not saved to the run store: {error})")
    if _public(session) and calibration_file:  # an upload shows by its name, not where the server keeps it
        outcome.table["Calibration dataset"] = outcome.table["Calibration dataset"].str.replace(
            calibration, Path(calibration).name, regex=False)
    summary = outcome.result.summary
    status = (f"Pruned with {method} {pattern} in {outcome.timings.get('prune_s')} s: "
              f"{summary['mlp']:.2%} of MLP weights, {summary['attention']:.2%} of attention weights, "
              f"{summary['matmul']:.2%} of all matmul weights are zero (counted from the weights)." + saved)
    layers = list(outcome.result.masks)
    # the figures first, in words; the seed table (and the run store) keep the full record
    view = report.styled(report.results_view(outcome.comparison, outcome.table))
    return (status, view, _image(outcome.figures["heatmap"]), _image(outcome.figures["mask_zoom"]),
            _image(outcome.figures["error_heatmap"]), workflow.timings_table(outcome),
            gr.update(choices=layers, value=outcome.zoom_layer), _model_line(session))


def zoom(session: workflow.Session, layer: str | None):
    if not layer or not session.is_pruned or layer not in session.result.masks:
        return None
    return _image(workflow.zoom_figure(session.result, layer, session.model))


def cancel(session: workflow.Session) -> str:
    if not session.busy:
        return "Nothing is running."
    session.request_stop()
    return f"Stopping {session.busy} after the current block ..."


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in str(text).replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise _error(f"sparsities must be numbers separated by commas, e.g. 0.3, 0.5, 0.7 (got {text!r})",
                       print_exception=False) from None
    bad = [v for v in values if not 0 <= v < 1]
    if bad:
        raise _error(f"sparsities must lie in [0, 1): {bad} do not", print_exception=False)
    return values


def _curve(table: pd.DataFrame):
    try:
        from workbench.plots import accuracy_curve

        return _image(accuracy_curve(table))
    except (ImportError, ValueError, KeyError):
        return None


def _points(table: pd.DataFrame):
    """The sweep's points with their figures rounded on screen (the data keeps every digit)."""
    floats = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    return table.style.hide(axis="index").format(lambda v: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}",
                                                 subset=floats, na_rep="-")


def on_sweep(session: workflow.Session, methods: list[str], sparsities: str, nm_patterns: list[str],
              mode: str, scope: str, calibration: str, nsamples: int, seqlen: int, tasks: list[str], limit: int,
              backend: str = "local", address: str = "", request: gr.Request | None = None,
              progress=gr.Progress()) -> Iterator:
    """Stream the sweep: status, table and curve after every finished point."""
    values = _floats(sparsities)
    if not values and not nm_patterns:
        raise _error("give sparsities (e.g. 0.3, 0.5) or tick an N:M pattern", print_exception=False)
    problems = workflow.validate_settings(eval_tasks=tasks, limit=_limit(limit), limits=session.limits)
    if problems:
        raise _error(_say(session, " ".join(problems)), print_exception=False)
    total = workflow.sweep_size(methods, values, nm_patterns) + 1  # the dense model first
    run_dir = runs_root() / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-sweep-{uuid.uuid4().hex[:6]}"
    table = None
    with _job(session, "the sweep", request):
        for table in workflow.iter_sweep(session, methods, values, nm_patterns, tasks, _limit(limit),
                                         run_dir=run_dir, progress=_reporter(progress), mode=mode, scope=scope,
                                         calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                                         backend=backend or "local", address=(address or "").strip() or None):
            yield f"{len(table)} of {total} points done (the dense model first) ...", _points(table), _curve(table), \
                _model_line(session)
    done = f"Sweep stopped after {len(table)} of {total} points" if len(table) < total \
        else f"Sweep finished: {len(table)} points"
    why = f" {table.attrs['stopped']}." if table.attrs.get("stopped") else ""
    kept = " Your pruned model is unchanged: Compare and Export still use it." if session.is_pruned else ""
    yield f"{done}; saved as run `{run_dir.name}`.{why}{kept}", _points(table), _curve(table), _model_line(session)


def generate(session: workflow.Session, prompt: str, max_new_tokens: int, request: gr.Request | None = None):
    with _job(session, "generating", request):
        dense, pruned = workflow.generate(session, prompt, max_new_tokens)
    return dense, pruned if pruned is not None else "(nothing pruned yet: run Prune first)"


def list_runs(session: workflow.Session | None = None):
    """The run store's runs (in public mode, only this session's)."""
    table = workflow.runs_table(runs_root(), session)
    names = list(table["name"]) if "name" in table else []
    shown = table.drop(columns=[c for c in ("path", "updated", "session") if c in table]) if not table.empty \
        else table
    return shown, gr.update(choices=names, value=names[:2])


def compare_runs(session: workflow.Session | None, names: list[str]):
    if not names:
        raise _error("tick one or more runs to compare", print_exception=False)
    from workbench.runs import compare_runs as compare

    root = runs_root()
    if _public(session):  # another session's runs do not exist, as far as this one can tell
        own = set(workflow.runs_table(root, session).get("name", []))
        missing = [n for n in names if n not in own]
        if missing:
            raise _error(f"no such run(s): {missing}; press Refresh", print_exception=False)
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise _error(_say(session, f"no such run(s) in {root}: {missing}; press Refresh"), print_exception=False)
    try:
        return compare([root / n for n in names])
    except ValueError as error:
        raise _error(_say(session, str(error)), print_exception=False) from None


def show_comparison(table: pd.DataFrame | None, kinds: list[str]):
    """The compared runs cut to the chosen metric kinds: a short rounded table and its plot."""
    if table is None or table.empty:
        return None, None
    view = report.compare_view(table, tuple(kinds or report.METRIC_KINDS))
    if view.empty:
        gr.Info("the chosen runs hold no figures of the chosen metrics (prune with an evaluation task)")
        return view, None
    try:
        from workbench.plots import compare_plot

        figure = _image(compare_plot(view))
    except ValueError:
        figure = None
    return report.styled(view), figure


def on_export(session: workflow.Session, formats: list[str], name: str, overwrite: bool, make_zip: bool = True,
           uniform: bool = False, request: gr.Request | None = None, progress=gr.Progress()):
    """Write the export (a zip too when `make_zip`); the zip is served without a second copy."""
    from workbench.ui.downloads import loaders_line, private_link

    report = _reporter(progress)

    def reported(fraction: float, message: str) -> None:
        if session.stop_requested:  # the tab closed: the staged export is dropped, nothing half-written stays
            raise _error("the export was stopped; nothing was written", print_exception=False)
        report(fraction, message)

    with _job(session, "exporting", request):
        progress(0.1, desc="Writing the model ...")
        exported = workflow.export(session, exports_root() / session.id, name, formats, overwrite=overwrite,
                                   make_zip=bool(make_zip), uniform=bool(uniform), progress=reported)
    sizes = getattr(exported, "sizes", {}) or {}
    size_table = pd.DataFrame([(k, f"{v / 1e6:.1f} MB" if isinstance(v, (int, float)) else str(v))
                               for k, v in sizes.items()], columns=["file or format", "size"])
    card = card_preview(workflow.model_card(exported)) or "*No model card was written.*"
    zip_path = None
    if getattr(exported, "zip_path", None):
        # Locally the export root is a static path: the zip is served where it was written. In public
        # mode the export folder is not served: a hard link under an unguessable name in Gradio's
        # cache, handed to this session only (workbench.ui.downloads).
        zip_path = str(private_link(exported.zip_path) if _public(session) else exported.zip_path)
    where = f"as `{Path(exported.path).name}`" if _public(session) else f"to `{exported.path}`"
    return f"Exported {where}. {loaders_line(exported.path)}".strip(), zip_path, card, size_table


def zip_default(session: workflow.Session):
    """The 'zip' box after a load: ticked for models up to 500 MB, where zipping is quick."""
    from workbench.ui.downloads import zip_by_default

    return gr.update(value=zip_by_default(session.loaded.model if session.loaded is not None else None))


def _bound(bound: int, prefix: str = "") -> str:
    """An input's hint: the server's upper bound, when it has one."""
    return f"{prefix}at most {bound} here" if bound else ""


def _sample_and_eval_inputs(page, limits: Limits, size_hint: str = "") -> tuple:
    """Calibration samples, tokens per sample, evaluation tasks and size: the inputs the prune and
    sweep tabs share. `size_hint` says what the evaluation size counts."""
    nsamples = gr.Number(workflow.INTERACTIVE_NSAMPLES, precision=0, minimum=1, label="calibration samples",
                         info=_bound(limits.max_nsamples))
    seqlen = gr.Number(workflow.INTERACTIVE_SEQLEN, precision=0, minimum=8, label="tokens per sample",
                       info=_bound(limits.max_seqlen))
    tasks = gr.Dropdown(EVAL_TASKS, value=["lambada"], multiselect=True, allow_custom_value=True,
                        label="evaluation", info=EVAL_INFO)
    page.task_pickers.append(tasks)
    limit = gr.Number(32, precision=0, minimum=1, label="evaluation size",
                      info=size_hint + _bound(limits.max_eval, ", " if size_hint else ""))
    return nsamples, seqlen, tasks, limit


def _figure_box(label: str, elem_id: str) -> gr.Image:
    # The figures carry their own titles; a label box would cover them.
    return gr.Image(label=label, show_label=False, type="pil", format="png", interactive=False,
                    elem_id=elem_id, buttons=["download", "fullscreen"])


# --- the app --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Page:
    """What every tab's builder shares: the session, the model line, the server's bounds."""

    session: gr.State
    model_line: gr.Markdown
    limits: Limits
    methods: list[str]
    calibration_info: str
    task_pickers: list = dataclasses.field(default_factory=list)  # filled with every lm-eval task on load


def _model_tab(page: _Page) -> gr.events.Dependency:
    """Model: where the model comes from, its dtype, and what was loaded."""
    session = page.session
    model_line = page.model_line
    with gr.Tab("Model", id="model"):
        with gr.Row():
            with gr.Column(scale=2):
                source_kind = gr.Radio(SOURCE_CHOICES, value="bundled default", label="model source")
                source_text = gr.Textbox(label="hub id, folder or .gguf path", visible=False,
                                         elem_id="source-text")
                upload = gr.File(label=".gguf file", file_types=[".gguf"], visible=False)
                dtype = gr.Dropdown(choices.dtypes(), value="fp32", label="dtype")
                load_button = gr.Button("Load model", variant="primary", elem_id="load-button")
                load_status = gr.Markdown(elem_id="load-status")
            with gr.Column(scale=3):
                info = gr.Dataframe(headers=["property", "value"], label="model", interactive=False,
                                    elem_id="model-info")
        source_kind.change(on_source_kind, source_kind, [source_text, upload], api_visibility="private")
        return load_button.click(on_load, [session, source_kind, source_text, upload, dtype],
                                 [load_status, info, model_line], api_name="load", concurrency_id=WORK,
                                 show_progress_on=load_status)


def _prune_tab(page: _Page) -> None:
    """Prune: method, pattern and data; the results table, the heatmaps and the mask zoom."""
    methods = page.methods
    limits = page.limits
    calibration_info = page.calibration_info
    session = page.session
    model_line = page.model_line
    with gr.Tab("Prune", id="prune"):
        with gr.Row():
            method = gr.Dropdown(methods, value="sparsegpt", label="method")
            pattern = gr.Dropdown(PATTERNS, value="2:4", label="pattern", allow_custom_value=True,
                                  info="unstructured, N:M (e.g. 2:4, 4:8), channel or head")
            # a number box, not a slider: a slider clamps a typed 1.5 to its maximum without a word,
            # while the core refuses it with a message
            sparsity = gr.Number(0.5, step=0.05, label="target sparsity (fixed by N:M)", interactive=False,
                                 info="fraction in [0, 1)")
            scope = gr.Radio(SCOPES, value="all", label="scope")
        with gr.Row():
            with gr.Column(min_width=160):
                calibration = gr.Dropdown(CALIBRATION_SOURCES, value="wikitext2", allow_custom_value=True,
                                          label="calibration data", info=calibration_info)
                calibration_file = gr.File(label="or upload calibration text (.txt/.jsonl)",
                                           file_types=[".txt", ".jsonl"], elem_id="calibration-file")
            nsamples, seqlen, tasks, limit = _sample_and_eval_inputs(page, limits, "LAMBADA passages / "
                                                                     "WikiText-2 windows")
        with gr.Row():
            prune_button = gr.Button("Run", variant="primary", elem_id="prune-button")
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="prune-cancel")
        prune_status = gr.Markdown(elem_id="prune-status")
        # metric, dense, pruned and change lead (rounded on screen; the copy button and the API get
        # every digit); the context columns follow and scroll
        summary = gr.Dataframe(pd.DataFrame(columns=report.RESULTS_COLUMNS), label="dense vs pruned",
                               interactive=False, wrap=True, elem_id="summary",
                               pinned_columns=1, column_widths=["220px", "90px", "90px", "220px", "150px", "110px",
                                                                "120px", "120px", "100px", "170px", "200px"],
                               buttons=["copy", "fullscreen"])
        with gr.Row():
            heatmap = _figure_box("sparsity per block and module (counted)", "heatmap")
            with gr.Column():
                # every layer, searchable by typing; opens on the most pruned one
                layer = gr.Dropdown([], label="mask of layer (type to search)", elem_id="zoom-layer",
                                    filterable=True, num_choices_shown=None)
                mask_plot = _figure_box("mask zoom", "mask-zoom")
        with gr.Row():
            error_plot = _figure_box("relative output error per layer", "error-heatmap")
            timings = gr.Dataframe(label="timings (s)", interactive=False, elem_id="timings")
        pattern.change(on_pattern, [pattern, method], [method, scope, sparsity], api_visibility="private")
        prune_button.click(
            on_prune, [session, method, pattern, sparsity, scope, calibration, nsamples, seqlen, tasks, limit,
                        calibration_file],
            [prune_status, summary, heatmap, mask_plot, error_plot, timings, layer, model_line],
            api_name="prune", concurrency_id=WORK, show_progress_on=prune_status)
        # .input, not .change: a prune sets the dropdown and already sends that layer's mask.
        layer.input(zoom, [session, layer], mask_plot, api_name="zoom", concurrency_limit=None)
        cancel_button.click(cancel, session, prune_status, api_name="cancel", queue=False)


def _sweep_tab(page: _Page) -> None:
    """Sweep: accuracy vs sparsity over methods and patterns, drawn point by point."""
    limits = page.limits
    calibration_info = page.calibration_info
    session = page.session
    model_line = page.model_line
    with gr.Tab("Sweep", id="sweep"):
        with gr.Row():
            sweep_methods = gr.CheckboxGroup(choices.sweep_methods(), value=["magnitude", "wanda"],
                                             label="methods")
            sweep_sparsities = gr.Textbox("0.3, 0.5", label="unstructured sparsities",
                                          info="comma-separated, in [0, 1)")
            sweep_nm = gr.CheckboxGroup(list(choices.NM_PATTERNS), value=[], label="N:M points")
            sweep_mode = gr.Radio(choices.sweep_modes(), value="exact", label="mode",
                                  info="fast: dense statistics once, reused for every point")
            sweep_scope = gr.Radio(SCOPES, value="all", label="scope")
        with gr.Row():
            sweep_calibration = gr.Dropdown(CALIBRATION_SOURCES, value="wikitext2", allow_custom_value=True,
                                            label="calibration data", info=calibration_info)
            sweep_nsamples, sweep_seqlen, sweep_tasks, sweep_limit = _sample_and_eval_inputs(page, limits)
        with gr.Row():
            sweep_backend = gr.Radio(choices.sweep_backends(), value="local", label="run on",
                                     info="ray: every point a Ray task on the cluster at the address",
                                     visible=not limits.public)
            sweep_address = gr.Textbox(os.environ.get("RAY_ADDRESS", ""), label="Ray address",
                                       placeholder="auto, ray://host:10001", visible=not limits.public)
        with gr.Row():
            sweep_button = gr.Button("Run sweep", variant="primary", elem_id="sweep-button")
            sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel")
        sweep_status = gr.Markdown(elem_id="sweep-status")
        curve = _figure_box("accuracy vs sparsity", "curve")
        sweep_table = gr.Dataframe(label="points", interactive=False, elem_id="sweep-table")
        sweep_button.click(
            on_sweep, [session, sweep_methods, sweep_sparsities, sweep_nm, sweep_mode, sweep_scope,
                        sweep_calibration, sweep_nsamples, sweep_seqlen, sweep_tasks, sweep_limit,
                        sweep_backend, sweep_address],
            [sweep_status, sweep_table, curve, model_line], api_name="sweep", concurrency_id=WORK,
            show_progress_on=sweep_status)
        sweep_cancel.click(cancel, session, sweep_status, api_name="cancel_sweep", queue=False)


def _compare_tab(page: _Page) -> None:
    """Compare: dense and pruned side by side on a prompt, and stored runs against each other."""
    limits = page.limits
    session = page.session
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            prompt = gr.Textbox("The capital of France is", label="prompt", lines=2, scale=4)
            max_new = gr.Slider(1, limits.max_new_tokens or 512, value=min(32, limits.max_new_tokens or 32),
                                step=1, label="new tokens", scale=1)
        generate_button = gr.Button("Generate with both", variant="primary", elem_id="generate-button")
        with gr.Row():
            dense_text = gr.Textbox(label="dense", lines=5, interactive=False, elem_id="dense-text")
            pruned_text = gr.Textbox(label="pruned", lines=5, interactive=False, elem_id="pruned-text")
        generate_button.click(generate, [session, prompt, max_new], [dense_text, pruned_text],
                              api_name="generate", concurrency_id=WORK, show_progress_on=pruned_text)
        gr.Markdown("### Runs in the store")
        refresh = gr.Button("Refresh")
        runs = gr.Dataframe(label="runs", interactive=False, elem_id="runs")
        chosen = gr.CheckboxGroup([], label="runs to compare")
        with gr.Row():
            kinds = gr.CheckboxGroup(list(report.METRIC_KINDS), value=list(report.METRIC_KINDS),
                                     label="metrics to compare", elem_id="compare-metrics")
            compare_button = gr.Button("Compare runs")
        compared = gr.Dataframe(label="chosen metrics by run and point", interactive=False, elem_id="compared")
        compared_plot = _figure_box("chosen metrics by run", "compared-plot")
        with gr.Accordion("every column, full precision", open=False):
            compared_all = gr.Dataframe(label="side by side", interactive=False, elem_id="compared-all",
                                        buttons=["copy", "fullscreen"])
        refresh.click(list_runs, session, [runs, chosen], api_name="runs", concurrency_limit=None)
        compare_button.click(compare_runs, [session, chosen], compared_all, api_name="compare_runs",
                             concurrency_limit=None, show_progress_on=compared).success(
            show_comparison, [compared_all, kinds], [compared, compared_plot], api_visibility="private",
            concurrency_limit=None)


def _export_tab(page: _Page, loaded: gr.events.Dependency) -> None:
    """Export: the pruned model as files and a zip, with its model card."""
    session = page.session
    with gr.Tab("Export", id="export"):
        with gr.Row():
            formats = gr.CheckboxGroup(choices.export_formats(), value=["masked"], label="formats")
            export_name = gr.Textbox(label="name", placeholder="derived from model, method and pattern")
            overwrite = gr.Checkbox(False, label="overwrite an existing export")
            make_zip = gr.Checkbox(True, label="also write a zip download", elem_id="export-zip",
                                   info="ticked for models up to 500 MB; the folder is always written")
            uniform = gr.Checkbox(False, label="uniform slimming", elem_id="export-uniform",
                                  info="'slimmed': every block the same width, so stock transformers load it")
        export_button = gr.Button("Export", variant="primary", elem_id="export-button")
        export_status = gr.Markdown(elem_id="export-status")
        with gr.Row():
            with gr.Column(scale=1):
                download = gr.File(label="download (zip)", elem_id="download")
                sizes = gr.Dataframe(label="sizes", interactive=False)
            with gr.Column(scale=2):
                card = gr.Markdown(label="model card", elem_id="model-card")
        export_button.click(on_export, [session, formats, export_name, overwrite, make_zip, uniform],
                            [export_status, download, card, sizes], api_name="export", concurrency_id=WORK,
                            show_progress_on=export_status)
        loaded.success(zip_default, session, make_zip, api_visibility="private")


def build_app() -> gr.Blocks:
    """The Blocks; nothing heavy happens until a user loads a model."""
    methods = choices.methods()
    limits = app_limits()
    calibration_info = "a name" if limits.public else "a name, or a .txt/.jsonl path"
    with gr.Blocks(title="Prune workbench") as demo:
        session = session_state(limits)
        gr.Markdown(INTRO)
        model_line = gr.Markdown(_model_line(workflow.Session()), elem_id="model-line")
        page = _Page(session, model_line, limits, methods, calibration_info)
        loaded = _model_tab(page)
        _prune_tab(page)
        _sweep_tab(page)
        _compare_tab(page)
        _export_tab(page, loaded)
        demo.unload(close_tab)
        # lm-eval's task list is indexed in the background from now; each page gets it when ready
        task_list().start()
        demo.load(installed_task_choices(len(page.task_pickers)), None, page.task_pickers, concurrency_limit=None,
                  show_progress="hidden", api_visibility="private")
    demo.queue(default_concurrency_limit=concurrency())
    if limits.session_jobs:
        limit_jobs_per_session(demo, limits.session_jobs)
    demo.workbench_limits = limits
    return demo


def limit_jobs_per_session(demo: gr.Blocks, limit: int) -> None:
    """Refuse a heavy job from a browser session that already has `limit` jobs waiting or running.

    Gradio has a queue-wide size limit only, and an event handler runs when its job leaves the
    queue, too late to count; so the check wraps the queue's entry point, where it can see every
    waiting and running job and its session.
    """
    queue = demo._queue
    enter = queue.push

    def mine(event, session_hash: str) -> bool:
        return event.session_hash == session_hash and event.concurrency_id == WORK

    async def push(body, request, username):
        session_hash = getattr(body, "session_hash", None)
        fn_index = getattr(body, "fn_index", None)
        fn = demo.fns.get(fn_index) if fn_index is not None else None
        if session_hash and fn is not None and fn.concurrency_id == WORK:
            waiting = sum(mine(e, session_hash) for q in queue.event_queue_per_concurrency_id.values()
                          for e in q.queue)
            running = sum(mine(e, session_hash) for job in queue.active_jobs if job for e in job)
            if waiting + running >= limit:
                return (False, f"this session already has {waiting + running} job(s) waiting or running, the "
                        f"limit on this server: wait for one to finish (the operator can raise this with "
                        f"{variable_for('session_jobs')})", "error")
        return await enter(body, request, username)

    queue.push = push


def launch(demo: gr.Blocks | None = None, **kwargs):
    """Start the server; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens.

    Locally the export folder is served directly, in place; in public mode it is not (another
    session could fetch an export by its path): each zip is linked into Gradio's cache under an
    unguessable name instead (workbench.ui.downloads)."""
    demo = demo or build_app()
    kwargs.setdefault("server_name", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    kwargs.setdefault("server_port", int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    limits = getattr(demo, "workbench_limits", None) or app_limits()
    if not limits.public:
        from workbench.ui.downloads import serve_from_static

        kwargs.setdefault("allowed_paths", [str(exports_root())])
        serve_from_static(exports_root())  # a zip of gigabytes is not copied into Gradio's cache
    kwargs.setdefault("theme", gr.themes.Soft())
    kwargs.setdefault("footer_links", ["api", "gradio"])
    return demo.launch(**kwargs)
