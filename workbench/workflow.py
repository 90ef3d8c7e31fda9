"""The interactive workflow both UIs share: load, prune, sweep, export, generate, on one session.

A `Session` holds one user's loaded model plus a snapshot of its dense block weights, so every
run starts from the dense model without reloading it. The functions here are UI-free: they take
plain values, report progress through `progress(fraction, message)`, poll `should_stop()` (or the
session's stop flag) between blocks, and raise `ValueError` subclasses with messages meant for
the user. The Gradio app and the notebook widgets are thin layers over them.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from workbench.arch import describe
from workbench.limits import Deadline, Limits, TimeBudgetExceeded
from workbench.models import LoadedModel, ModelLoadError, _looks_like_hub_id, load_model, model_info
from workbench.patterns import parse_pattern
from workbench.prune import PruneCancelled, PruneConfig, PruneResult, prune

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], message); gr.Progress fits

# transformers' from_pretrained patches torch's module initialisation process-wide while it
# builds a model on the meta device, so two loads in parallel threads break each other.
_LOAD_LOCK = threading.Lock()

# Interactive defaults: small enough to answer in seconds on a laptop CPU.
INTERACTIVE_NSAMPLES = 16
INTERACTIVE_SEQLEN = 256
EVAL_LABELS = {
    "lambada": "lambada_openai",
    "lambada-last-token": "lambada_openai",
    "wikitext2": "wikitext-2-raw-v1 test",
}
SUMMARY_COLUMNS = ["Model", "Method", "Calibration dataset", "Evaluation dataset", "Sparsity pattern",
                   "Over MLP block sparsity", "Element-wise/matmul ratio", "Metric", "Dense",
                   "Sparse", "Relative drop"]


class SettingsError(ValueError):
    """A setting a user gave cannot work; the message names it and says what to give instead."""


class NoModelError(SettingsError):
    """An action needs a loaded model and there is none."""


@dataclass
class Session:
    """One user's workbench state. Holds live objects: never share one between users."""

    loaded: LoadedModel | None = None
    info: dict = field(default_factory=dict)
    dense_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    result: PruneResult | None = None  # the last finished pruning, whose weights the model holds
    dense_eval: dict | None = None
    dense_eval_key: tuple | None = None  # (tasks, limit) that dense_eval was computed for
    pruned_eval: dict | None = None
    sweep: pd.DataFrame | None = None
    last_export: object | None = None  # workbench.export.ExportResult
    stop_requested: bool = False
    busy: str = ""  # what is running now, for a clear 'wait' message
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # separates exports per session
    limits: Limits | None = None  # what one request may ask (workbench.limits); None: unbounded

    @property
    def model(self):
        if self.loaded is None:
            raise NoModelError("no model loaded: load one first (the bundled default, a hub id, "
                               "a local folder or a .gguf file)")
        return self.loaded.model

    @property
    def tokenizer(self):
        self.model  # noqa: B018 - raises the clear error when nothing is loaded
        return self.loaded.tokenizer

    @property
    def is_pruned(self) -> bool:
        return self.result is not None

    def request_stop(self) -> None:
        """Ask the running prune or sweep to stop at the next block; cleared when that job ends."""
        self.stop_requested = True

    def should_stop(self) -> bool:
        return self.stop_requested


def available_methods() -> list[str]:
    """Method names the driver accepts, the structured retrain-free pipeline included once present."""
    from workbench.methods import METHODS

    names = list(METHODS)
    if "retrain-free" not in names:
        try:
            PruneConfig(method="retrain-free", pattern="channel", sparsity=0.1, scope="mlp").validate()
            names.append("retrain-free")
        except ValueError:
            pass
    return names


# --- validation -----------------------------------------------------------------------------


def check_source(source: str, limits: Limits | None = None) -> str:
    """The stripped model source, or a SettingsError naming what is wrong with it."""
    text = str(source or "").strip()
    if not text:
        raise SettingsError("no model given: type 'default', a hub id such as "
                            "'HuggingFaceTB/SmolLM2-135M', a local folder, or a .gguf path")
    if text == "default":
        return text
    path = Path(text).expanduser()
    if limits is not None and limits.public and (path.exists() or not _looks_like_hub_id(text)):
        limits.check_model_path(text)  # before any existence check: say nothing about the server's files
    if path.exists():
        if path.is_file() and path.suffix.lower() != ".gguf":
            raise SettingsError(f"{text} is a file but not a .gguf model; give a .gguf file or a "
                                "folder written by save_pretrained")
        return text
    if text.lower().endswith(".gguf"):
        raise SettingsError(f"GGUF file not found: {text}. Check the path or upload the file.")
    if text.startswith(("/", "./", "../", "~")) or "\\" in text:
        raise SettingsError(f"no such folder or file: {text}. Check the path.")
    if not _looks_like_hub_id(text):
        raise SettingsError(f"{text!r} is neither an existing path nor a valid hub id: a hub id looks "
                            "like 'owner/name' (letters, digits, '-', '_', '.')")
    return text


def make_config(settings: dict | PruneConfig, limits: Limits | None = None) -> PruneConfig:
    """A validated PruneConfig from a config or a dict of its fields (UI values welcome), within `limits`."""
    config = _make_config(settings, limits)
    if limits is not None:
        limits.check("max_nsamples", config.nsamples)
        limits.check("max_seqlen", config.seqlen)
    return config


def _check_calibration_source(calibration, limits: Limits | None) -> None:
    if limits is not None and limits.public and calibration is not None:
        from workbench.data import CALIBRATION_SOURCES

        limits.check_calibration(str(calibration), tuple(CALIBRATION_SOURCES))


def _make_config(settings: dict | PruneConfig, limits: Limits | None) -> PruneConfig:
    calibration = settings.calibration if isinstance(settings, PruneConfig) else dict(settings).get("calibration")
    _check_calibration_source(calibration, limits)  # before validation looks at the file
    if isinstance(settings, PruneConfig):
        config = settings
    else:
        values = {k: v for k, v in dict(settings).items() if v is not None}
        for name in ("nsamples", "seqlen", "seed", "batch_size", "blocksize"):
            if name in values:
                try:
                    values[name] = int(values[name])
                except (TypeError, ValueError):
                    raise SettingsError(f"{name} must be a whole number, got {values[name]!r}") from None
        if "sparsity" in values:
            try:
                values["sparsity"] = float(values["sparsity"])
            except (TypeError, ValueError):
                raise SettingsError(f"sparsity must be a number in [0, 1), got {values['sparsity']!r}") from None
        if values.get("exclude") == "":
            values["exclude"] = None
        try:
            config = PruneConfig.from_dict(values)
        except ValueError as error:
            raise SettingsError(str(error)) from None
    try:
        config.validate()
    except ValueError as error:
        raise SettingsError(str(error)) from None
    return config


def parse_sparsities(text: str | Sequence[float]) -> list[float]:
    """'0.3, 0.5; 0.7' (or a list of numbers) -> [0.3, 0.5, 0.7], each in [0, 1)."""
    parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()] if isinstance(text, str) else text
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise SettingsError(f"sparsities must be numbers separated by commas, e.g. 0.3, 0.5, 0.7 "
                            f"(got {text!r})") from None
    bad = [v for v in values if not 0 <= v < 1]
    if bad:
        raise SettingsError(f"sparsities must lie in [0, 1): {bad} do not")
    return values


def check_eval(tasks: Sequence[str] | None, limit: int | None,
               limits: Limits | None = None) -> tuple[tuple[str, ...], int | None]:
    tasks, limit = _check_eval(tasks, limit)
    if limits is not None and tasks:
        limits.check("max_eval", limit)
    return tasks, limit


def _check_eval(tasks: Sequence[str] | None, limit: int | None) -> tuple[tuple[str, ...], int | None]:
    from workbench.evaluate import check_tasks

    try:  # ours, lm-eval:NAME, or the zero-shot preset (expanded to its tasks)
        tasks = tuple(check_tasks(tasks or ()))
    except ValueError as err:
        raise SettingsError(f"unknown evaluation task: {err}") from None
    if limit is not None:
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise SettingsError(f"evaluation size must be a whole number, got {limit!r}") from None
        if limit < 1:
            raise SettingsError(f"evaluation size must be at least 1, got {limit}")
    return tasks, limit


def validate_settings(source: str | None = None, settings: dict | PruneConfig | None = None,
                      eval_tasks: Sequence[str] | None = None, limit: int | None = None,
                      limits: Limits | None = None) -> list[str]:
    """Every problem with the given inputs (within `limits`, when given), as messages for the user;
    empty when all is well."""
    problems = []
    checks = []
    if source is not None:
        checks.append(lambda: check_source(source, limits))
    if settings is not None:
        checks.append(lambda: make_config(settings, limits))
    if eval_tasks is not None or limit is not None:
        checks.append(lambda: check_eval(eval_tasks, limit, limits))
    for check in checks:
        try:
            check()
        except ValueError as error:
            problems.append(str(error))
    return problems


# --- load and restore -----------------------------------------------------------------------


def _block_parameters(model) -> dict[str, torch.nn.Parameter]:
    prefix = describe(model).blocks_name + "."
    return {name: p for name, p in model.named_parameters() if name.startswith(prefix)}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in _block_parameters(model).items()}


def free(session: Session) -> None:
    """Drop the session's model and everything computed from it."""
    session.loaded = None
    session.info = {}
    session.dense_state = {}
    session.result = None
    session.dense_eval = session.dense_eval_key = session.pruned_eval = None
    session.sweep = None
    session.last_export = None
    gc.collect()


def load(session: Session, source: str = "default", dtype: str = "fp32",
         progress: Progress | None = None, device: str = "cpu") -> dict:
    """Load a model into the session (replacing any other) and return `model_info` plus timing."""
    source = check_source(source, session.limits)
    free(session)
    started = time.perf_counter()
    if progress is not None:
        progress(0.0, f"Loading {source} ...")
    try:
        with _LOAD_LOCK:
            loaded = load_model(source, dtype=dtype, device=device,
                                progress=(lambda message: progress(0.3, message)) if progress else None)
    except (ModelLoadError, ValueError) as error:
        raise SettingsError(str(error)) from None
    except OSError as error:
        raise SettingsError(f"could not load {source!r}: {error}") from None
    session.loaded = loaded
    session.info = model_info(loaded)
    if "prunable" not in session.info:  # model_info marks unsupported architectures only
        session.dense_state = _snapshot(loaded.model)
    session.info["load_s"] = round(time.perf_counter() - started, 2)
    if progress is not None:
        progress(1.0, "Loaded")
    return session.info


def restore_dense(session: Session) -> None:
    """Put the dense block weights back (after a pruning, a sweep, or a cancelled run)."""
    model = session.model
    if not session.dense_state:
        raise SettingsError(f"{session.info.get('class', 'this model')} cannot be pruned: "
                            f"{session.info.get('prunable', 'unsupported architecture')}")
    params = _block_parameters(model)
    reshaped = [n for n, t in session.dense_state.items() if n not in params or params[n].shape != t.shape]
    if reshaped:  # physically slimmed: the dense tensors no longer fit, so reload
        log.info("model was slimmed (%d tensors changed shape); reloading", len(reshaped))
        keep = session.dense_state
        load(session, session.loaded.source, session.loaded.dtype)
        session.dense_state = keep
        return
    with torch.no_grad():
        for name, saved in session.dense_state.items():
            params[name].copy_(saved)
    session.result = None
    session.pruned_eval = None


# --- pruning --------------------------------------------------------------------------------


@dataclass
class PruneOutcome:
    result: PruneResult
    table: pd.DataFrame  # the seed's summary table, dense vs sparse, formatted
    comparison: pd.DataFrame  # workbench.evaluate.compare: numeric metric, dense, sparse, drop
    figures: dict  # "heatmap", "mask_zoom", "error_heatmap": matplotlib figures (or None)
    timings: dict  # seconds: prune, dense_eval, sparse_eval, total
    dense_eval: dict | None
    pruned_eval: dict | None
    zoom_layer: str | None = None


def _stage(progress: Progress | None, start: float, end: float) -> Progress | None:
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)


def _figure(metric: str, value: float) -> str:
    if "perplexity" not in metric.lower():
        return f"{value:.4f}"
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def _pct(value: float) -> str:
    return f"{value:+.2f}%" if value == value else "n/a"


def summary_table(session: Session, result: PruneResult, comparison: pd.DataFrame | None,
                  tasks: Sequence[str] = ()) -> pd.DataFrame:
    """The seed's table: one row per metric, dense vs sparse with the relative drop."""
    config = result.config
    info = session.info
    model = info.get("resolved") if info.get("kind") == "hub" else Path(str(info.get("source"))).name
    if info.get("kind") == "default":
        model = "SmolLM2-135M-Instruct (bundled)"
    calibration = config.calibration if config.uses_calibration else "none (data-free method)"
    if result.calibration:
        calibration = f"{result.calibration.get('source', calibration)} " \
                      f"({result.calibration.get('nsamples')}x{result.calibration.get('seqlen')})"
    pattern = parse_pattern(config.pattern)
    pattern_text = str(pattern) if pattern.kind != "channel" else "channelx1"
    if pattern.kind == "unstructured":
        pattern_text = f"1x1 {config.sparsity:.0%}"
    base = {
        "Model": model,
        "Method": config.method,
        "Calibration dataset": calibration,
        "Sparsity pattern": pattern_text,
        "Over MLP block sparsity": f"{result.summary['mlp']:.4f}",
        "Element-wise/matmul ratio": f"{result.summary['matmul']:.4f}",
    }
    rows = []
    evaluation = ", ".join(dict.fromkeys(EVAL_LABELS.get(t, t) for t in tasks)) or "-"
    if comparison is None or comparison.empty:
        rows.append({**base, "Evaluation dataset": evaluation, "Metric": "-", "Dense": "-",
                     "Sparse": "-", "Relative drop": "-"})
    else:
        for task, row in zip(tasks, comparison.itertuples(index=False)):
            rows.append({**base, "Evaluation dataset": EVAL_LABELS.get(task, task), "Metric": row[0],
                         "Dense": _figure(row[0], row[1]), "Sparse": _figure(row[0], row[2]),
                         "Relative drop": _pct(row[3])})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _compare_in_task_order(dense: dict, sparse: dict, tasks: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """evaluate.compare row by row, with the task each row came from (for the dataset column)."""
    from workbench.evaluate import compare

    frames, row_tasks = [], []
    for task in tasks:
        if task in dense and task in sparse:
            frame = compare({task: dense[task]}, {task: sparse[task]})
            frames.append(frame)
            row_tasks += [task] * len(frame)
    if not frames:
        return pd.DataFrame(columns=["metric", "dense", "sparse", "relative drop (%)"]), []
    return pd.concat(frames, ignore_index=True), row_tasks


def make_figures(result: PruneResult, zoom_layer: str | None = None) -> tuple[dict, str | None]:
    """Heatmap of counted sparsity, one layer's mask, per-layer output error (None where absent)."""
    try:
        from workbench import plots
    except ImportError:  # plots are optional for the core workflow
        return {"heatmap": None, "mask_zoom": None, "error_heatmap": None}, None
    if zoom_layer is None or zoom_layer not in result.masks:
        zoom_layer = next(iter(result.masks), None)
    figures = {
        "heatmap": plots.sparsity_heatmap(result.sparsity),
        "mask_zoom": plots.mask_zoom(result.masks[zoom_layer]) if zoom_layer else None,
        "error_heatmap": plots.error_heatmap(result.errors)
        if not result.errors.empty and result.errors["error"].notna().any() else None,
    }
    return figures, zoom_layer


def evaluate_dense(session: Session, tasks: Sequence[str], limit: int | None,
                   progress: Progress | None = None) -> dict:
    """Dense figures for (tasks, limit), computed once per session and reused."""
    from workbench.evaluate import evaluate

    key = (tuple(tasks), limit)
    if session.dense_eval is not None and session.dense_eval_key == key:
        return session.dense_eval
    if session.is_pruned:
        restore_dense(session)
    session.dense_eval = evaluate(session.model, session.tokenizer, tasks=tasks, limit=limit, progress=progress)
    session.dense_eval_key = key
    return session.dense_eval


def estimate_prune_time(session: Session, settings: dict | PruneConfig):
    """How long pruning the loaded model with `settings` should take on this machine (a
    `workbench.estimate.Estimate`: `.text` reads 'about 40 s'); evaluation not included."""
    from workbench.estimate import estimate_prune

    config = make_config(settings, session.limits)
    return estimate_prune(session.model, config)


def estimate_prune_memory(session: Session, settings: dict | PruneConfig, source: str | None = None):
    """Estimated peak memory of pruning with `settings` and whether it would onload blocks from
    disk (a `workbench.memory.MemoryEstimate`: `.describe()` reads 'estimated peak memory 2.9 GiB
    (onloading blocks from disk) ...'). `source`: a safetensors folder, estimated without loading
    it; default the loaded model."""
    from workbench.memory import estimate_memory

    config = make_config(settings, session.limits)
    return estimate_memory(source if source is not None else session.model, config)


def _estimates_line(session: Session, config: PruneConfig) -> str:
    """'pruning takes about 40 s, estimated peak memory 0.9 GiB (in memory); ...' for the first stage message."""
    from workbench.estimate import estimate_prune
    from workbench.memory import estimate_memory

    return (f"pruning takes {estimate_prune(session.model, config).text}, "
            f"{estimate_memory(session.model, config).describe()}")


def run_prune(session: Session, settings: dict | PruneConfig, eval_tasks: Sequence[str] = (),
              limit: int | None = None, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None, zoom_layer: str | None = None) -> PruneOutcome:
    """Restore the dense weights, (evaluate dense once,) prune, evaluate the pruned model.

    On cancel (`should_stop()` or `session.request_stop()`) the dense weights are restored and
    `PruneCancelled` propagates; on any other error too the model is left dense. Past the
    session's time budget (`session.limits.job_seconds`) the job stops the same way and raises
    `TimeBudgetExceeded`.
    """
    config = make_config(settings, session.limits)
    tasks, limit = check_eval(eval_tasks, limit, session.limits)
    session.model  # noqa: B018 - raises NoModelError
    deadline = _deadline(session)
    try:
        return _prune_and_evaluate(session, config, tasks, limit, progress, should_stop, zoom_layer, deadline)
    except PruneCancelled:
        if deadline.expired():
            raise TimeBudgetExceeded(deadline.message("pruning")) from None
        raise
    finally:
        session.stop_requested = False  # a stop request ends with the job it stopped


def _deadline(session: Session) -> Deadline:
    return session.limits.deadline() if session.limits is not None else Deadline(None)


def _within(deadline: Deadline | None, progress: Progress | None, what: str) -> Progress | None:
    """`progress` that also ends the job once the time budget is spent (evaluation has no other stop)."""
    if deadline is None or deadline.seconds is None:
        return progress

    def report(fraction: float, message: str) -> None:
        if deadline.expired():
            raise TimeBudgetExceeded(deadline.message(what))
        if progress is not None:
            progress(fraction, message)

    return report


def _prune_and_evaluate(session: Session, config: PruneConfig, tasks: tuple[str, ...], limit: int | None,
                        progress: Progress | None, should_stop: Callable[[], bool] | None,
                        zoom_layer: str | None, deadline: Deadline | None = None) -> PruneOutcome:
    def stop() -> bool:
        return (session.stop_requested or (should_stop is not None and should_stop())
                or (deadline is not None and deadline.expired()))

    started = time.perf_counter()
    timings = {}
    restore_dense(session)
    gc.collect()
    dense_eval = None
    prune_share = 0.6 if tasks else 1.0
    eval_share = (1.0 - prune_share) / 2
    if tasks:
        t0 = time.perf_counter()
        cached = session.dense_eval is not None and session.dense_eval_key == (tasks, limit)
        dense_eval = evaluate_dense(session, tasks, limit,
                                    _within(deadline, _stage(progress, 0.0, eval_share), "pruning"))
        timings["dense_eval_s"] = 0.0 if cached else time.perf_counter() - t0
        if stop():
            raise PruneCancelled("stopped before pruning; the model is dense")
    start = eval_share if tasks else 0.0

    def on_block(done: int, total: int, message: str) -> None:
        if progress is not None:
            progress(start + prune_share * done / total, f"Pruning {message}" if done else f"Pruning: {message}")

    if progress is not None:
        stage = (f"Calibrating on {config.nsamples} x {config.seqlen} tokens of {config.calibration}"
                 if config.uses_calibration else f"Pruning with {config.method} (no calibration data needed)")
        progress(start, f"{stage}; {_estimates_line(session, config)}")
    try:
        result = prune(session.model, config, tokenizer=session.tokenizer, progress=on_block, should_stop=stop)
    except BaseException:
        restore_dense(session)
        gc.collect()
        raise
    timings["prune_s"] = result.seconds
    session.result = result
    pruned_eval = None
    comparison, row_tasks = None, []
    if tasks:
        from workbench.evaluate import evaluate

        t0 = time.perf_counter()
        try:
            pruned_eval = evaluate(session.model, session.tokenizer, tasks=tasks, limit=limit,
                                   progress=_within(deadline, _stage(progress, start + prune_share, 1.0),
                                                    "pruning"))
        except TimeBudgetExceeded:
            restore_dense(session)  # a half-evaluated pruning is not kept
            raise
        timings["sparse_eval_s"] = time.perf_counter() - t0
        session.pruned_eval = pruned_eval
        comparison, row_tasks = _compare_in_task_order(dense_eval, pruned_eval, tasks)
    figures, zoom = make_figures(result, zoom_layer)
    timings["total_s"] = time.perf_counter() - started
    if progress is not None:
        progress(1.0, "Done")
    return PruneOutcome(
        result=result,
        table=summary_table(session, result, comparison, row_tasks or tasks),
        comparison=comparison if comparison is not None else pd.DataFrame(),
        figures=figures,
        timings={k: round(v, 2) for k, v in timings.items()},
        dense_eval=dense_eval,
        pruned_eval=pruned_eval,
        zoom_layer=zoom,
    )


def timings_table(outcome: PruneOutcome) -> pd.DataFrame:
    """Stage timings plus the per-block split (stats / solve / re-run) summed over blocks."""
    rows = [{"stage": k.removesuffix("_s").replace("_", " "), "seconds": v} for k, v in outcome.timings.items()]
    blocks = outcome.result.timings
    if not blocks.empty:
        for column in ("stats_s", "solve_s", "rerun_s"):
            rows.append({"stage": f"prune: {column.removesuffix('_s')} (all blocks)",
                         "seconds": round(float(blocks[column].sum()), 2)})
    return pd.DataFrame(rows, columns=["stage", "seconds"])


def record_run(session: Session, outcome: PruneOutcome, root: str | Path | None = None) -> Path:
    """Write a finished pruning into the run store (config, tables, figures, figures' numbers)."""
    from workbench.runs import create_run

    result = outcome.result
    config = {"model": session.info.get("resolved") or session.info.get("source"), **result.config.to_dict()}
    run = create_run(root, "prune", config)
    run.update(data={"calibration": result.calibration}, session=session.id)  # whose run, for public listings
    run.save_table("summary", outcome.table)
    run.save_table("sparsity", result.sparsity)
    run.save_table("errors", result.errors)
    run.save_table("timings", result.timings)
    for name, figure in outcome.figures.items():
        if figure is not None:
            run.save_figure(name, figure)
    summary = {k: v for k, v in result.summary.items() if k != "by_kind"}
    run.mark_done({"sparsity": summary, "dense": outcome.dense_eval or {}, "sparse": outcome.pruned_eval or {},
                   "timings": outcome.timings})
    return run.path


# --- sweep ----------------------------------------------------------------------------------


def run_sweep(session: Session, methods: Sequence[str], sparsities: Sequence[float] = (),
              nm_patterns: Sequence[str] = (), eval_tasks: Sequence[str] = ("lambada",), limit: int | None = 32,
              run_dir: str | Path | None = None, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None,
              on_point: Callable[[pd.DataFrame], None] | None = None, **settings) -> pd.DataFrame:
    """Accuracy vs sparsity: `methods` x (unstructured `sparsities` + `nm_patterns` points),
    each pruned from the dense model and evaluated; the dense row comes first.

    `settings` are further `workbench.sweep.SweepConfig` fields (scope, calibration, nsamples,
    seqlen, mode, ...). `on_point(table_so_far)` is called after each point. A stop returns the
    finished points. The model is dense again afterwards. A sweep stopped by the session's time
    budget returns its finished points too, with the reason in `table.attrs["stopped"]`.
    """
    from workbench.sweep import SweepConfig
    from workbench.sweep import run_sweep as sweep_points

    limits = session.limits
    tasks, limit = check_eval(eval_tasks, limit, limits)
    if not tasks:
        raise SettingsError("choose at least one evaluation task: the sweep plots a metric")
    settings.setdefault("ppl_windows", limit)
    settings.setdefault("nsamples", INTERACTIVE_NSAMPLES)
    settings.setdefault("seqlen", INTERACTIVE_SEQLEN)
    if limits is not None:
        _check_calibration_source(settings.get("calibration"), limits)
        limits.check("max_sweep_points", len(methods) * (len(sparsities) + len(nm_patterns)))
        for name, bound in (("nsamples", "max_nsamples"), ("seqlen", "max_seqlen")):
            try:
                value = int(settings[name])
            except (TypeError, ValueError):
                raise SettingsError(f"{name} must be a whole number, got {settings[name]!r}") from None
            limits.check(bound, value)
    try:
        config = SweepConfig(methods=tuple(methods), sparsities=tuple(float(s) for s in sparsities),
                             extra_patterns=tuple(nm_patterns), tasks=tasks, limit=limit, **settings)
        config.validate()
    except (TypeError, ValueError) as error:
        raise SettingsError(str(error)) from None
    if limits is not None and limits.public and config.backend != "local":
        raise SettingsError("sweeps on a Ray cluster are off on a public workbench: use the local backend")
    session.model  # noqa: B018 - raises NoModelError
    deadline = _deadline(session)

    def stop() -> bool:
        return session.stop_requested or (should_stop is not None and should_stop()) or deadline.expired()

    def step(done: int, total: int, message: str) -> None:
        if progress is not None:
            progress(done / total, f"Sweep: {message}")

    rows: list[dict] = []

    def point(row: dict) -> None:
        rows.append(row)
        if on_point is not None:
            on_point(pd.DataFrame(rows))

    restore_dense(session)
    try:
        if config.backend == "ray":  # every point a Ray task that loads the session's model source itself
            from workbench.ray_sweep import run_ray_sweep

            table = run_ray_sweep(session.loaded.source, config, run_dir, dtype=session.loaded.dtype,
                                  revision=session.loaded.revision, progress=step, should_stop=stop,
                                  on_point=point)
        else:
            table = sweep_points(session.model, session.tokenizer, config, run_dir=run_dir, progress=step,
                                 should_stop=stop, on_point=point,
                                 model_name=str(session.info.get("resolved") or session.info.get("source")))
    finally:
        session.stop_requested = False  # a stop request ends with the job it stopped
        restore_dense(session)
        if run_dir is not None:
            _tag_run(run_dir, session)
    if deadline.expired():
        table.attrs["stopped"] = deadline.message("the sweep", "the finished points are kept")
    session.sweep = table
    return table


def _tag_run(run_dir: str | Path, session: Session) -> None:
    """Record which session made the run (public servers list a session's own runs only)."""
    from workbench.runs import RunError, load_run

    try:
        load_run(run_dir).update(session=session.id)
    except (RunError, OSError) as error:
        log.warning("could not tag run %s with its session: %s", run_dir, error)


def iter_sweep(session: Session, *args, **kwargs) -> Iterator[pd.DataFrame]:
    """`run_sweep` as a generator of the table after each point, then the final table.

    The sweep runs in a worker thread that waits at each point until the consumer asks for the
    next update, so the two never work (or draw figures) at the same time. Closing the generator
    early asks the sweep to stop.
    """
    updates: queue.Queue = queue.Queue()
    resumed, closed = threading.Event(), threading.Event()
    outcome: dict = {}

    def hand_over(table: pd.DataFrame) -> None:
        resumed.clear()
        updates.put(table)
        while not resumed.wait(0.2) and not closed.is_set():
            pass

    def work() -> None:
        try:
            outcome["table"] = run_sweep(session, *args, on_point=hand_over, **kwargs)
        except BaseException as error:  # handed over to the caller's thread
            outcome["error"] = error
        finally:
            updates.put(None)

    worker = threading.Thread(target=work, name="sweep", daemon=True)
    worker.start()
    try:
        while (table := updates.get()) is not None:
            yield table
            resumed.set()
    finally:
        closed.set()
        if worker.is_alive():
            session.request_stop()
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["table"]


# --- export, generation, runs ---------------------------------------------------------------


def export(session: Session, root: str | Path = "exports", name: str | None = None,
           formats: Sequence[str] = ("masked",), overwrite: bool = False, make_zip: bool = True,
           progress: Progress | None = None):
    """Save the pruned model with its recipe, results and model card; returns an ExportResult."""
    from workbench.export import export_model

    if not session.is_pruned:
        raise SettingsError("nothing to export yet: prune the model first")
    if not formats:
        raise SettingsError("choose at least one export format")
    result = session.result
    name = (name or "").strip() or _default_export_name(session)
    heatmap = None
    try:
        from workbench import plots

        heatmap = plots.sparsity_heatmap(result.sparsity)
    except ImportError:
        pass
    evaluation = None
    if session.dense_eval is not None and session.pruned_eval is not None:
        evaluation = {"dense": session.dense_eval, "sparse": session.pruned_eval}
    try:
        exported = export_model(session.model, session.tokenizer, root, name, formats=tuple(formats), result=result,
                                evaluation=evaluation, source=session.info, overwrite=overwrite,
                                make_zip=make_zip, heatmap=heatmap, progress=progress)
    except FileExistsError as error:
        raise SettingsError(f"{error} (tick 'overwrite' or choose another name)") from None
    session.last_export = exported
    return exported


def _default_export_name(session: Session) -> str:
    config = session.result.config
    source = Path(str(session.info.get("resolved") or session.info.get("source") or "model")).name
    if session.info.get("kind") == "default":
        source = "smollm2-135m"
    pattern = str(config.pattern).replace(":", "of")
    sparsity = "" if ":" in str(config.pattern) else f"-{round(config.sparsity * 100)}"
    return f"{source}-{config.method}-{pattern}{sparsity}".lower()


def model_card(exported) -> str:
    """The exported model card's text, for previews."""
    for path in [Path(exported.path) / "README.md", *map(Path, getattr(exported, "files", []) or [])]:
        if path.name == "README.md" and path.is_file():
            return path.read_text(encoding="utf-8")
    return ""


@torch.inference_mode()
def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def generate(session: Session, prompt: str, max_new_tokens: int = 40) -> tuple[str, str | None]:
    """(dense continuation, pruned continuation) for `prompt`, greedy. The pruned text is None
    when nothing has been pruned. The dense text comes from swapping the dense weights in."""
    if not str(prompt or "").strip():
        raise SettingsError("type a prompt first")
    try:
        max_new_tokens = int(max_new_tokens)
    except (TypeError, ValueError):
        raise SettingsError(f"max new tokens must be a whole number, got {max_new_tokens!r}") from None
    if not 1 <= max_new_tokens <= 512:
        raise SettingsError(f"max new tokens must be between 1 and 512, got {max_new_tokens}")
    if session.limits is not None:
        session.limits.check("max_new_tokens", max_new_tokens)
    model, tokenizer = session.model, session.tokenizer
    if not session.is_pruned:
        return _greedy(model, tokenizer, prompt, max_new_tokens), None
    pruned_text = _greedy(model, tokenizer, prompt, max_new_tokens)
    params = _block_parameters(model)
    pruned_state = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, saved in session.dense_state.items():
                params[name].copy_(saved)
        dense_text = _greedy(model, tokenizer, prompt, max_new_tokens)
    finally:
        with torch.no_grad():
            for name, tensor in pruned_state.items():
                params[name].copy_(tensor)
    return dense_text, pruned_text


def runs_table(root: str | Path = "runs", session: Session | None = None) -> pd.DataFrame:
    """The run store's runs, newest first (empty when there are none or no store yet). With a
    `session` in public mode, only the runs that session made."""
    try:
        from workbench.runs import list_runs
    except ImportError:
        return pd.DataFrame()
    if not Path(root).is_dir():
        return pd.DataFrame()
    runs = list_runs(root)
    runs = runs if isinstance(runs, pd.DataFrame) else pd.DataFrame(runs)
    if session is not None and session.limits is not None and session.limits.public:
        owner = runs["session"] if "session" in runs else pd.Series(None, index=runs.index, dtype=object)
        runs = runs[owner == session.id].reset_index(drop=True)
    return runs
