"""The interactive workflow both UIs share: prune, sweep, export, evaluate and record runs on one session.

The per-user state (`Session`, load, the dense snapshot, generate) lives in `workbench.session` and
is re-exported here under its old names. The functions here are UI-free: they take
plain values, report progress through `progress(fraction, message)`, poll `should_stop()` (or the
session's stop flag) between blocks, and raise `ValueError` subclasses with messages meant for
the user. The Gradio app and the notebook widgets are thin layers over them.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workbench import snapshot
from workbench.budget import run_budgeted_sweep
from workbench.data import CALIBRATION_SOURCES, load_calibration
from workbench.estimate import estimate_prune
from workbench.evaluate import check_tasks, compare, dataset_name, evaluate, windowed
from workbench.guards import check_seqlen
from workbench.limits import Deadline, Limits, TimeBudgetExceeded
from workbench.memory import estimate_memory
from workbench.methods import METHODS
from workbench.models import LoadedModel, load_model, model_info, strip_quantizer
from workbench.offload import prune_from_disk
from workbench.patterns import parse_pattern
from workbench.progress import Progress, within
from workbench.prune import PruneCancelled, PruneConfig, PruneResult, prune
from workbench.ray_sweep import run_ray_sweep
from workbench.recipe import RECIPE_FILE, make_recipe, masks_match, read_recipe, reproduce, write_recipe
from workbench.report import layer_weight, most_pruned_layer
from workbench.runs import RunError, create_run, list_runs, load_run, write_json
from workbench.saving import save_folder
from workbench.session import (  # noqa: F401  (re-exported: callers use workflow.Session, workflow.load, ...)
    NoModelError,
    Session,
    SettingsError,
    check_source,
    dense_weights_in,
    free,
    generate,
    load,
    restore_dense,
)
from workbench.slim import slim_model
from workbench.sweep import SweepConfig, default_evaluator
from workbench.sweep import run_sweep as sweep_points

log = logging.getLogger(__name__)

# Interactive defaults: small enough to answer in seconds on a laptop CPU.
INTERACTIVE_NSAMPLES = 16
INTERACTIVE_SEQLEN = 256
SUMMARY_COLUMNS = ["Model", "Method", "Calibration dataset", "Evaluation dataset", "Sparsity pattern",
                   "Over MLP block sparsity", "Element-wise/matmul ratio", "Metric", "Dense",
                   "Sparse", "Relative drop"]


def available_methods() -> list[str]:
    """Method names the driver accepts (`workbench.methods.METHODS`), structured ones included."""
    return list(METHODS)


# --- validation -----------------------------------------------------------------------------


def make_config(settings: dict | PruneConfig, limits: Limits | None = None) -> PruneConfig:
    """A validated PruneConfig from a config or a dict of its fields (UI values welcome), within `limits`."""
    config = _make_config(settings, limits)
    if limits is not None:
        limits.check("max_nsamples", config.nsamples)
        limits.check("max_seqlen", config.seqlen)
    return config


def _check_calibration_source(calibration, limits: Limits | None) -> None:
    if limits is not None and limits.public and calibration is not None:
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
    return within(progress, start, end)


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
    evaluation = ", ".join(dict.fromkeys(dataset_name(t) for t in tasks)) or "-"
    if comparison is None or comparison.empty:
        rows.append({**base, "Evaluation dataset": evaluation, "Metric": "-", "Dense": "-",
                     "Sparse": "-", "Relative drop": "-"})
    else:
        for task, row in zip(tasks, comparison.itertuples(index=False)):
            rows.append({**base, "Evaluation dataset": dataset_name(task), "Metric": row[0],
                         "Dense": _figure(row[0], row[1]), "Sparse": _figure(row[0], row[2]),
                         "Relative drop": _pct(row[3])})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _compare_in_task_order(dense: dict, sparse: dict, tasks: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """evaluate.compare row by row, with the task each row came from (for the dataset column)."""
    frames, row_tasks = [], []
    for task in tasks:
        if task in dense and task in sparse:
            frame = compare({task: dense[task]}, {task: sparse[task]})
            frames.append(frame)
            row_tasks += [task] * len(frame)
    if not frames:
        return pd.DataFrame(columns=["metric", "dense", "sparse", "relative drop (%)"]), []
    return pd.concat(frames, ignore_index=True), row_tasks


def zoom_figure(result: PruneResult, layer: str, model=None):
    """The mask zoom of `layer`: its picture and pruned share are the zeros of the layer's weight
    in `model` (the pruned model), as the heatmap counts them; the method's mask without a model."""
    from workbench import plots  # matplotlib: ~1.3 s of start-up that only figures need

    return plots.mask_zoom(result.masks[layer], layer=layer, weight=layer_weight(model, layer))


def make_figures(result: PruneResult, zoom_layer: str | None = None, model=None) -> tuple[dict, str | None]:
    """Heatmap of counted sparsity, one layer's mask zoom (counted from its weight in `model`, the
    pruned model, when given), per-layer output error (None where absent)."""
    from workbench import plots  # matplotlib: ~1.3 s of start-up that only figures need
    if zoom_layer is None or zoom_layer not in result.masks:
        zoom_layer = most_pruned_layer(result)
    figures = {
        "heatmap": plots.sparsity_heatmap(result.sparsity),
        "mask_zoom": zoom_figure(result, zoom_layer, model) if zoom_layer else None,
        "error_heatmap": plots.error_heatmap(result.errors)
        if not result.errors.empty and result.errors["error"].notna().any() else None,
    }
    return figures, zoom_layer


def evaluate_dense(session: Session, tasks: Sequence[str], limit: int | None,
                   progress: Progress | None = None) -> dict:
    """Dense figures for (tasks, limit), computed once per session and reused."""
    key = (tuple(tasks), limit)
    if session.dense_eval is not None and session.dense_eval_key == key:
        return session.dense_eval
    if session.is_pruned and snapshot.mismatches(session.model, session.dense_state):
        restore_dense(session)  # slimmed: the dense weights no longer fit, so the model is reloaded
    # a pruned session scores the dense weights, then gets its pruned ones back
    with dense_weights_in(session) if session.is_pruned else contextlib.nullcontext():
        session.dense_eval = evaluate(session.model, session.tokenizer, tasks=tasks, limit=limit,
                                      progress=progress, data_dir=session.data_dir)
    session.dense_eval_key = key
    return session.dense_eval


def estimate_prune_time(session: Session, settings: dict | PruneConfig):
    """How long pruning the loaded model with `settings` should take on this machine (a
    `workbench.estimate.Estimate`: `.text` reads 'about 40 s'); evaluation not included."""
    config = make_config(settings, session.limits)
    return estimate_prune(session.model, config)


def estimate_prune_memory(session: Session, settings: dict | PruneConfig, source: str | None = None):
    """Estimated peak memory of pruning with `settings` and whether it would onload blocks from
    disk (a `workbench.memory.MemoryEstimate`: `.describe()` reads 'estimated peak memory 2.9 GiB
    (onloading blocks from disk) ...'). `source`: a safetensors folder, estimated without loading
    it; default the loaded model."""
    config = make_config(settings, session.limits)
    return estimate_memory(source if source is not None else session.model, config)


def _estimates_line(session: Session, config: PruneConfig) -> str:
    """'pruning takes about 40 s, estimated peak memory 0.9 GiB (in memory); ...' for the first stage message."""
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
    session.require_model()
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


def _within(deadline: Deadline | None, progress: Progress | None, what: str,
            stop: Callable[[], bool] | None = None) -> Progress | None:
    """`progress` that also ends the job once the time budget is spent or `stop()` says so
    (evaluation has no other stop): the evaluation raises at its next batch."""
    if (deadline is None or deadline.seconds is None) and stop is None:
        return progress

    def report(fraction: float, message: str) -> None:
        if deadline is not None and deadline.expired():
            raise TimeBudgetExceeded(deadline.message(what))
        if stop is not None and stop():
            raise PruneCancelled("stopped during the evaluation; the model is dense again")
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
                                    _within(deadline, _stage(progress, 0.0, eval_share), "pruning", stop))
        timings["dense_eval_s"] = 0.0 if cached else time.perf_counter() - t0
        if stop():
            raise PruneCancelled("stopped before pruning; the model is dense")
    start = eval_share if tasks else 0.0

    def on_block(fraction: float, message: str) -> None:
        if progress is not None:
            progress(start + prune_share * fraction, f"Pruning {message}" if fraction else f"Pruning: {message}")

    if progress is not None:
        stage = (f"Calibrating on {config.nsamples} x {config.seqlen} tokens of {config.calibration}"
                 if config.uses_calibration else f"Pruning with {config.method} (no calibration data needed)")
        progress(start, f"{stage}; {_estimates_line(session, config)}")
    try:
        result = prune(session.model, config, calibration=session_calibration(session, config),
                       tokenizer=session.tokenizer, progress=on_block, should_stop=stop)
    except BaseException:
        restore_dense(session)
        gc.collect()
        raise
    timings["prune_s"] = result.seconds
    session.result = result
    pruned_eval = None
    comparison, row_tasks = None, []
    if tasks:
        t0 = time.perf_counter()
        try:
            pruned_eval = evaluate(session.model, session.tokenizer, tasks=tasks, limit=limit,
                                   data_dir=session.data_dir,
                                   progress=_within(deadline, _stage(progress, start + prune_share, 1.0),
                                                    "pruning", stop))
        except (TimeBudgetExceeded, PruneCancelled):
            restore_dense(session)  # a half-evaluated pruning is not kept
            raise
        timings["sparse_eval_s"] = time.perf_counter() - t0
        session.pruned_eval = pruned_eval
        comparison, row_tasks = _compare_in_task_order(dense_eval, pruned_eval, tasks)
    figures, zoom = make_figures(result, zoom_layer, session.model)
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
    result = outcome.result
    config = {"model": session.info.get("resolved") or session.info.get("source"), **result.config.to_dict()}
    run = create_run(root, "prune", config)
    run.update(data={"calibration": result.calibration}, session=session.id)  # whose run, for public listings
    run.save_table("summary", outcome.table)
    if not outcome.comparison.empty:  # the summary's figures with every digit (the summary is rounded)
        run.save_table("comparison", outcome.comparison)
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


def sweep_size(methods: Sequence[str], sparsities: Sequence[float] = (), nm_patterns: Sequence[str] = ()) -> int:
    """How many pruned points a sweep of `methods` x (`sparsities` + `nm_patterns`) measures; its
    table has one more row, the dense model's."""
    return len(methods) * (len(sparsities) + len(nm_patterns))


def run_sweep(session: Session, methods: Sequence[str], sparsities: Sequence[float] = (),
              nm_patterns: Sequence[str] = (), eval_tasks: Sequence[str] = ("lambada",), limit: int | None = 32,
              run_dir: str | Path | None = None, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None,
              on_point: Callable[[pd.DataFrame], None] | None = None, **settings) -> pd.DataFrame:
    """Accuracy vs sparsity: `methods` x (unstructured `sparsities` + `nm_patterns` points),
    each pruned from the dense model and evaluated; the dense row comes first.

    `settings` are further `workbench.sweep.SweepConfig` fields (scope, calibration, nsamples,
    seqlen, mode, ...). `on_point(table_so_far)` is called after each point. A stop returns the
    finished points. The model holds what it held before afterwards, also after a failure or a
    stop: a pruned model stays pruned, with its `session.result` and evaluation, ready to export.
    A sweep stopped by the session's time budget returns its finished points too, with the reason
    in `table.attrs["stopped"]`.
    """
    limits = session.limits
    tasks, limit = check_eval(eval_tasks, limit, limits)
    if not tasks:
        raise SettingsError("choose at least one evaluation task: the sweep plots a metric")
    settings.setdefault("ppl_windows", limit)
    settings.setdefault("nsamples", INTERACTIVE_NSAMPLES)
    settings.setdefault("seqlen", INTERACTIVE_SEQLEN)
    if limits is not None:
        _check_calibration_source(settings.get("calibration"), limits)
        limits.check("max_sweep_points", sweep_size(methods, sparsities, nm_patterns))
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
    session.require_model()
    deadline = _deadline(session)

    def stop() -> bool:
        return session.stop_requested or (should_stop is not None and should_stop()) or deadline.expired()

    def step(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, f"Sweep: {message}")

    rows: list[dict] = []

    def point(row: dict) -> None:
        rows.append(row)
        if on_point is not None:
            on_point(pd.DataFrame(rows))

    try:
        if config.backend == "ray":  # every point a Ray task that loads the session's model source itself
            table = run_ray_sweep(session.loaded.source, config, run_dir, dtype=session.loaded.dtype,
                                  revision=session.loaded.revision, progress=step, should_stop=stop,
                                  on_point=point)
        else:  # on the session's dense copy (the sweep copies nothing more); a pruned model comes back after
            with dense_weights_in(session) as dense:
                table = sweep_points(session.model, session.tokenizer, config, run_dir=run_dir, progress=step,
                                     should_stop=stop, on_point=point, dense=dense,
                                     model_name=str(session.info.get("resolved") or session.info.get("source")))
    finally:
        session.stop_requested = False  # a stop request ends with the job it stopped
        if run_dir is not None:
            _tag_run(run_dir, session)
    if deadline.expired():
        table.attrs["stopped"] = deadline.message("the sweep", "the finished points are kept")
    session.sweep = table
    return table


def _tag_run(run_dir: str | Path, session: Session) -> None:
    """Record which session made the run (public servers list a session's own runs only)."""
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
        while not resumed.wait(0.2) and not closed.is_set() and not session.stop_requested:
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
           progress: Progress | None = None, uniform: bool = False):
    """Save the pruned model with its recipe, results and model card; returns an ExportResult.
    `uniform`: slim every block to the same width, so the 'slimmed' folder loads in stock transformers."""
    from workbench.export import export_model  # lazy: it imports plots (matplotlib)

    if not session.is_pruned:
        raise SettingsError("nothing to export yet: prune the model first")
    if not formats:
        raise SettingsError("choose at least one export format")
    result = session.result
    name = (name or "").strip() or _default_export_name(session)
    from workbench import plots  # matplotlib: ~1.3 s of start-up that only figures need

    heatmap = plots.sparsity_heatmap(result.sparsity)
    evaluation = None
    if session.dense_eval is not None and session.pruned_eval is not None:
        evaluation = {"dense": session.dense_eval, "sparse": session.pruned_eval}
    try:
        exported = export_model(session.model, session.tokenizer, root, name, formats=tuple(formats), result=result,
                                evaluation=evaluation, source=session.info, overwrite=overwrite,
                                make_zip=make_zip, heatmap=heatmap, progress=progress, uniform=uniform)
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


def runs_table(root: str | Path = "runs", session: Session | None = None) -> pd.DataFrame:
    """The run store's runs, newest first (empty when there are none or no store yet). With a
    `session` in public mode, only the runs that session made."""
    if not Path(root).is_dir():
        return pd.DataFrame()
    runs = list_runs(root)
    runs = runs if isinstance(runs, pd.DataFrame) else pd.DataFrame(runs)
    if session is not None and session.limits is not None and session.limits.public:
        owner = runs["session"] if "session" in runs else pd.Series(None, index=runs.index, dtype=object)
        runs = runs[owner == session.id].reset_index(drop=True)
    return runs


# --- one-shot jobs: the command line --------------------------------------------------------


@dataclass
class PruneJob:
    """What a one-shot prune did: the outcome, and where it was saved and recorded."""

    outcome: PruneOutcome
    seconds: dict  # evaluate_dense, prune, evaluate_sparse, save, total (whichever ran)
    slimmed: object | None = None  # workbench.slim's result, when the pruned units were removed
    out: Path | None = None
    run: Path | None = None
    masks_match: bool | None = None  # recipe jobs: the masks against the recipe's digest


def open_session(source: str = "default", dtype: str = "fp32", revision: str | None = None,
                 trust_remote_code: bool = False, data_dir: str | Path | None = None) -> Session:
    """A session for one job on a model loaded once (the command line). It keeps no dense copy
    of the weights, so its model is pruned at most once and never restored."""
    loaded = load_model(source, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    return one_shot_session(loaded, data_dir)


def one_shot_session(loaded: LoadedModel, data_dir: str | Path | None = None) -> Session:
    """`open_session` on a model already loaded."""
    return Session(loaded=loaded, info=model_info(loaded), data_dir=data_dir, keep_dense=False)


def session_calibration(session: Session, config: PruneConfig):
    """Calibration windows read from the session's data folder, or None to let the driver load
    `config.calibration` from the default one."""
    if session.data_dir is None or not config.uses_calibration:
        return None
    check_seqlen(session.model, config.seqlen, "--seqlen")
    return load_calibration(session.tokenizer, config.calibration, nsamples=config.nsamples,
                            seqlen=config.seqlen, seed=config.seed, data_dir=session.data_dir)


def evaluate_job(session: Session, tasks: Sequence[str], limit: int | None = None, seqlen: int = 512,
                 **options) -> dict:
    """`workbench.evaluate.evaluate` on the session's model and data folder; `options` are its
    further keywords (batch_size, include_path, num_fewshot, bos_per_window)."""
    if any(windowed(task) for task in tasks):
        check_seqlen(session.model, seqlen, "--seqlen")
    return evaluate(session.model, session.tokenizer, tasks=list(tasks), limit=limit, seqlen=seqlen,
                    data_dir=session.data_dir, **options)


def save_pruned(session: Session, out: str | Path, overwrite: bool = False) -> Path:
    """The model as a model folder of ours (workbench.saving), with the recipe of its pruning, so
    a later `export --model OUT` or `prune --recipe OUT/recipe.json` knows how it was made."""
    recipe = make_recipe(session.result, source=session.loaded) if session.result is not None else None

    def write(folder: Path) -> None:
        strip_quantizer(session.model).save_pretrained(folder, safe_serialization=True)
        if session.tokenizer is not None:
            session.tokenizer.save_pretrained(folder)
        if recipe is not None:
            write_recipe(folder / RECIPE_FILE, recipe)

    return save_folder(out, write, "model", overwrite)


def _finish_job(session: Session, job: PruneJob, started: float, slim: dict | None, out: str | Path | None,
                overwrite: bool, record: bool, runs_root: str | Path | None) -> PruneJob:
    """Slim, save and record a finished prune: the steps after pruning that every face shares."""
    if slim is not None:
        job.slimmed = slim_model(session.model, session.result, **slim)
    if out is not None:
        t0 = time.perf_counter()
        job.out = save_pruned(session, out, overwrite)
        job.seconds["save"] = time.perf_counter() - t0
    job.seconds["total"] = time.perf_counter() - started
    if record:
        job.run = record_run(session, job.outcome, runs_root)
        if job.out is not None:
            load_run(job.run).update(out=str(job.out))
    return job


def prune_job(session: Session, config: PruneConfig, tasks: Sequence[str] = (), limit: int | None = None, *,
              slim: dict | None = None, out: str | Path | None = None, overwrite: bool = False,
              record: bool = True, runs_root: str | Path | None = None,
              progress: Progress | None = None) -> PruneJob:
    """`run_prune` (evaluate dense, prune, evaluate), then slim (`slim`: slim_model's keywords),
    save to `out` with the recipe, and record the run in the run store as the UIs do."""
    started = time.perf_counter()
    outcome = run_prune(session, config, tasks, limit, progress=progress)
    timings = outcome.timings
    seconds = {"evaluate_dense": timings.get("dense_eval_s"), "prune": outcome.result.seconds,
               "evaluate_sparse": timings.get("sparse_eval_s")}
    job = PruneJob(outcome, {k: v for k, v in seconds.items() if v is not None})
    return _finish_job(session, job, started, slim, out, overwrite, record, runs_root)


def reproduce_job(session: Session, recipe, tasks: Sequence[str] = (), limit: int | None = None, *,
                  device: str | None = None, out: str | Path | None = None, overwrite: bool = False,
                  record: bool = True, runs_root: str | Path | None = None) -> PruneJob:
    """Prune the session's model as a recipe (workbench.recipe.Recipe) says, checking the masks
    against its digest; evaluated, saved and recorded like `prune_job`."""
    started = time.perf_counter()
    tasks = tuple(tasks)
    seconds, dense_eval, pruned_eval = {}, None, None
    if tasks:
        t0 = time.perf_counter()
        dense_eval = evaluate_dense(session, tasks, limit)
        seconds["evaluate_dense"] = time.perf_counter() - t0
    _, _, result = reproduce(recipe, model=session.model, tokenizer=session.tokenizer,
                             data_dir=session.data_dir, device=device)
    session.result = result
    seconds["prune"] = result.seconds
    comparison, row_tasks = None, []
    if tasks:
        t0 = time.perf_counter()
        pruned_eval = session.pruned_eval = evaluate(session.model, session.tokenizer, tasks=tasks, limit=limit,
                                                     data_dir=session.data_dir)
        seconds["evaluate_sparse"] = time.perf_counter() - t0
        comparison, row_tasks = _compare_in_task_order(dense_eval, pruned_eval, tasks)
    figures, zoom = make_figures(result, model=session.model) if record else ({}, None)
    outcome = PruneOutcome(result=result, table=summary_table(session, result, comparison, row_tasks or tasks),
                           comparison=comparison if comparison is not None else pd.DataFrame(), figures=figures,
                           timings={f"{k}_s": round(v, 2) for k, v in seconds.items()},
                           dense_eval=dense_eval, pruned_eval=pruned_eval, zoom_layer=zoom)
    job = PruneJob(outcome, seconds, masks_match=masks_match(recipe, result))
    return _finish_job(session, job, started, None, out, overwrite, record, runs_root)


def export_job(session: Session, root: str | Path, name: str, formats: Sequence[str] = ("masked",), *,
               recipe=None, overwrite: bool = False, make_zip: bool = True, **options):
    """Export the session's model (pruned first as `recipe` says, when given); a folder that
    carries its own recipe (an earlier export or `prune --out`) keeps it. `options` are
    export_model's further keywords (push_to, token, private, round_to, uniform).
    Returns (ExportResult, masks match the recipe: True/False, or None when not checked)."""
    from workbench.export import export_model  # lazy: it imports plots (matplotlib)
    result = carried = matched = None
    if recipe is not None:
        _, _, result = reproduce(recipe, model=session.model, tokenizer=session.tokenizer,
                                 data_dir=session.data_dir)
        session.result = result
        matched = masks_match(recipe, result)
    elif Path(str(session.loaded.source), RECIPE_FILE).is_file():
        carried = read_recipe(Path(str(session.loaded.source))).raw
    exported = export_model(session.model, session.tokenizer, root, name, formats=tuple(formats), result=result,
                            source=session.loaded, overwrite=overwrite, make_zip=make_zip, recipe=carried,
                            **options)
    session.last_export = exported
    return exported, matched


def sweep_job(config, run_dir: str | Path, source: str = "default", dtype: str = "fp32",
              revision: str | None = None, trust_remote_code: bool = False, data_dir: str | Path | None = None,
              budget: int | None = None, first: int = 50):
    """A sweep (a `workbench.sweep.SweepConfig`) into the run folder `run_dir`: a table, or with
    `budget` (items per point per task, workbench.budget) a BudgetedOutcome. On the Ray backend the
    workers load `source` themselves; otherwise it is loaded here once."""
    if config.backend == "ray":
        if budget is not None:
            raise SettingsError("a budgeted sweep runs in this process: drop --backend ray")
        return run_ray_sweep(source, config, run_dir=run_dir, dtype=dtype, revision=revision,
                             trust_remote_code=trust_remote_code, data_dir=data_dir)
    session = open_session(source, dtype, revision, trust_remote_code, data_dir)
    calibration = None
    if data_dir is not None:  # calibration files come from the data folder too
        calibration = load_calibration(session.tokenizer, config.calibration, nsamples=config.nsamples,
                                       seqlen=config.seqlen, seed=config.seed, data_dir=data_dir)
    if budget is not None:
        return run_budgeted_sweep(session.model, session.tokenizer, config, budget=budget, first=first,
                                  run_dir=run_dir, calibration=calibration, data_dir=data_dir)
    return sweep_points(session.model, session.tokenizer, config, run_dir=run_dir,
                        evaluate_fn=default_evaluator(session.tokenizer, config, data_dir),
                        calibration=calibration, model_name=session.loaded.resolved)


def prune_out_of_core(source: str, folder: str | Path, out: str | Path, config: PruneConfig, *,
                      dtype: str = "fp32", data_dir: str | Path | None = None, resume: bool = False,
                      overwrite: bool = False, activations_in_memory: bool | None = None,
                      record: bool = True, runs_root: str | Path | None = None,
                      progress: Progress | None = None, slim: dict | None = None) -> tuple[PruneResult, Path | None]:
    """Prune the safetensors checkpoint `folder` (the model `source` names) block by block into
    `out` (workbench.offload), write its recipe there, and record the run. Returns (result, run).
    `slim`: write a channel/head prune slimmed (see `workbench.offload.prune_from_disk`)."""
    calibration = tokenizer = None
    if data_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        calibration = load_calibration(tokenizer, config.calibration, nsamples=config.nsamples,
                                       seqlen=config.seqlen, seed=config.seed, data_dir=data_dir)
    result = prune_from_disk(folder, out, config, calibration=calibration, tokenizer=tokenizer, resume=resume,
                             overwrite=overwrite, activations_in_memory=activations_in_memory,
                             progress=progress, slim=slim)
    info = {"source": source, "resolved": str(folder), "kind": "default" if source == "default" else "local",
            "dtype": dtype}
    recipe = make_recipe(result, source=info)
    if not result.masks:  # the masks are the zeros of the written weights: no digest to check against
        recipe["result"] = {k: v for k, v in recipe["result"].items() if k not in ("masks", "masks_sha256")}
    write_json(Path(out) / RECIPE_FILE, recipe)  # atomic: the folder is complete already
    run_path = None
    if record:
        run = create_run(runs_root, "prune", {"model": str(folder), **config.to_dict()})
        run.update(data={"calibration": result.calibration}, out=str(out), offload=True)
        run.save_table("sparsity", result.sparsity)
        run.save_table("errors", result.errors)
        run.save_table("timings", result.timings)
        summary = {k: v for k, v in result.summary.items() if k != "by_kind"}
        run.mark_done({"sparsity": summary, "dense": {}, "sparse": {}, "timings": {"prune_s": result.seconds}})
        run_path = run.path
    return result, run_path
