"""Accuracy vs sparsity: prune one model at many (method, pattern, sparsity) points.

    table = run_sweep(model, tokenizer, SweepConfig(methods=("wanda",), sparsities=(0.5, 0.6)))

The model is loaded once. The prunable weights are snapshotted once and restored in place before
every point, and calibration work that stays valid across points is done once:

- **exact** mode: each point runs the normal sequential driver (every block's statistics are
  collected on the inputs produced by the already pruned blocks before it); only block 0's
  inputs are shared, since the embeddings are never pruned.
- **fast** mode: every linear's input statistics are collected once on the dense network and
  reused for every point, so a point costs only the per-layer solves. It ignores how pruning
  earlier blocks shifts later blocks' inputs, which matters more as sparsity grows.

With a run folder every finished point is stored as it finishes; running the same sweep into the
same folder again skips those points (a crash or a stop loses at most the point in progress).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import nn

from workbench import snapshot
from workbench.allocation import owl_block_sparsity
from workbench.data import load_calibration
from workbench.evaluate import BUILTIN_TASKS, METRIC_KEYS, check_tasks, evaluate, windowed
from workbench.jsonio import dataclass_from
from workbench.methods import elementwise_methods, method_record
from workbench.patterns import check_sparsity, parse_pattern
from workbench.progress import Progress
from workbench.prune import (
    CalibrationCache,
    PruneCancelled,
    PruneConfig,
    collect_dense_stats,
    prune,
)
from workbench.runs import Run, open_run
from workbench.sparsity import sparsity_summary, sparsity_table
from workbench.sweep_items import keeping_items, paired_row, stored_items

log = logging.getLogger(__name__)

MODES = ("exact", "fast")
ALLOCATIONS = ("uniform", "owl")
BACKENDS = ("local", "ray")
# Where and how a sweep runs, not what it computes: left out of the run folder's identity, so a
# sweep started locally can be resumed on a cluster and the other way round.
EXECUTION_FIELDS = ("backend", "address", "device")


@dataclass
class SweepConfig:
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    sparsities: tuple[float, ...] = (0.1, 0.3, 0.5, 0.6, 0.7)
    extra_patterns: tuple[str, ...] = ("2:4", "4:8")  # N:M points, one per method (fixed 50%)
    scope: str = "all"
    calibration: str = "wikitext2"
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    tasks: tuple[str, ...] = BUILTIN_TASKS
    limit: int | None = 200  # LAMBADA passages (None: all 5153)
    ppl_windows: int | None = 16  # WikiText-2 windows (None: all)
    eval_seqlen: int = 512
    mode: str = "exact"  # exact | fast (see the module docstring)
    allocation: str = "uniform"  # uniform | owl (OWL applies to the unstructured points)
    owl_lam: float = 0.08
    owl_m: float = 5.0
    batch_size: int = 8
    record_error: bool = True
    backend: str = "local"  # local (this process) | ray (one Ray task per point)
    address: str | None = field(default_factory=lambda: os.environ.get("RAY_ADDRESS") or None)
    device: str = "cpu"  # where a Ray task prunes and evaluates (cpu, cuda)

    def __post_init__(self):
        for name in ("methods", "sparsities", "extra_patterns", "tasks"):
            setattr(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        """Check every field; errors name the problem and the fix."""
        sweepable = elementwise_methods()  # a sweep's patterns are unstructured and N:M
        if not self.methods:
            raise ValueError("no methods: give at least one of " + ", ".join(sweepable))
        for method in self.methods:
            if method not in sweepable:
                raise ValueError(f"unknown method {method!r}: choose from {', '.join(sweepable)}")
        if not self.sparsities and not self.extra_patterns:
            raise ValueError("nothing to sweep: give sparsities and/or extra patterns")
        for value in self.sparsities:
            check_sparsity(value)
        for text in self.extra_patterns:
            pattern = parse_pattern(text)
            if pattern.fixed_sparsity is None:
                raise ValueError(f"extra pattern {text!r} is not N:M; the sweep's extra patterns "
                                 "are N:M patterns such as 2:4 or 4:8")
        check_tasks(self.tasks)  # ours, lm-eval:NAME or the zero-shot preset
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose exact or fast")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}: choose uniform or owl")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose local or ray")
        for name in ("limit", "ppl_windows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.prune_config("magnitude", "unstructured", 0.5).validate()

    def points(self) -> list[dict]:
        """Every (method, pattern, target, allocation) point, in the order they run: each
        unstructured target in the order given, across every method (so a sweep stopped
        part-way has every method's line), then the N:M points."""
        points = []
        for target in self.sparsities:
            for method in self.methods:
                points.append({"method": method, "pattern": "unstructured", "target": float(target),
                               "allocation": self.allocation})
        for text in self.extra_patterns:
            for method in self.methods:
                points.append({"method": method, "pattern": text,
                               "target": float(parse_pattern(text).fixed_sparsity),
                               "allocation": "uniform"})
        return points

    def prune_config(self, method: str, pattern: str, target: float,
                     block_sparsity: list[float] | None = None) -> PruneConfig:
        return PruneConfig(method=method, pattern=pattern, sparsity=target, scope=self.scope,
                           calibration=self.calibration, nsamples=self.nsamples,
                           seqlen=self.seqlen, seed=self.seed, batch_size=self.batch_size,
                           block_sparsity=block_sparsity, record_error=self.record_error)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def run_config(self) -> dict:
        """What identifies the sweep in its run folder: `to_dict()` without where it runs."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> SweepConfig:
        return dataclass_from(cls, data)


def point_key(point: dict) -> str:
    return f"{point['method']}|{point['pattern']}|{point['target']:.4f}|{point['allocation']}"


# --- weights ---------------------------------------------------------------------------------

# The names the budgeted sweep, the benchmarks and notebooks use for workbench.snapshot's verbs.
snapshot_weights = snapshot.take
restore_weights = snapshot.put_back


# --- evaluation ------------------------------------------------------------------------------


def flatten_metrics(results: dict) -> dict[str, float]:
    """{"task/metric": value} from `workbench.evaluate.evaluate`'s nested dict (accuracy and
    perplexity only); flat {name: number} dicts pass through."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            for metric in METRIC_KEYS:
                if metric in value:
                    flat[f"{key}/{metric}"] = float(value[metric])
                    if value.get(f"{metric}_ci"):  # the 95% interval, for bands and tables
                        flat[f"{key}/{metric}_lo"], flat[f"{key}/{metric}_hi"] = map(float, value[f"{metric}_ci"])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[str(key)] = float(value)
    return flat


def default_evaluator(tokenizer, config: SweepConfig,
                      data_dir: str | Path | None = None) -> Callable[[nn.Module], dict]:
    """`workbench.evaluate.evaluate` on the config's tasks: `limit` LAMBADA passages and
    `ppl_windows` WikiText-2 windows of `eval_seqlen` tokens."""
    if tokenizer is None:
        raise ValueError("the default evaluator needs a tokenizer; pass one or an evaluate_fn")

    def run(model: nn.Module) -> dict:
        results = {}
        sized_by_items = [t for t in config.tasks if not windowed(t)]
        by_windows = [t for t in config.tasks if windowed(t)]
        if sized_by_items:
            results.update(evaluate(model, tokenizer, tasks=sized_by_items, limit=config.limit,
                                    data_dir=data_dir))
        if by_windows:
            results.update(evaluate(model, tokenizer, tasks=by_windows,
                                    limit=config.ppl_windows, seqlen=config.eval_seqlen,
                                    data_dir=data_dir))
        return results

    return run


# --- the sweep -------------------------------------------------------------------------------


def _measured(model: nn.Module, table: pd.DataFrame, summary: dict | None = None) -> dict:
    summary = summary or sparsity_summary(model, table=table)
    return {f"sparsity_{k}": float(summary[k]) for k in ("blocks", "mlp", "attention", "matmul")}


def _slug(key: str) -> str:
    return key.replace("|", "-").replace(":", "_")


def _calibration(config: SweepConfig, calibration, tokenizer):
    if calibration is not None:
        return calibration
    if tokenizer is None:
        raise ValueError("pass a tokenizer or calibration token ids for the calibration data")
    return load_calibration(tokenizer, config.calibration, nsamples=config.nsamples,
                            seqlen=config.seqlen, seed=config.seed)



def keep_point(run, rows: list[dict], on_point, key: str, row: dict, fresh: bool) -> None:
    """A finished point: saved to the run store when it is new (not resumed), kept, announced."""
    row = {**row, "key": key}
    if fresh and run is not None:
        run.save_point(key, row)
        run.log(f"point {key} done")
    rows.append(row)
    if on_point is not None:
        on_point(row)


def run_sweep(model: nn.Module, tokenizer, config: SweepConfig, run_dir: str | Path | None = None,
              progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None,
              on_point: Callable[[dict], None] | None = None,
              evaluate_fn: Callable[[nn.Module], dict] | None = None,
              calibration=None, model_name: str | None = None, dense_row: dict | None = None,
              cache: CalibrationCache | None = None, dense: snapshot.Weights | None = None) -> pd.DataFrame:
    """Evaluate the dense model and every point of `config`; return one row per point (the dense
    row first). The model is back to dense on return, whatever happened.

    `dense`: the model's dense weights from `workbench.snapshot.take` (a session's copy, say);
    they are put in first and restored before every point, and the sweep copies nothing itself.
    Without it the sweep starts from the weights the model holds and keeps one copy of them.

    `run_dir`: a run folder (created, or resumed when it holds this same sweep); finished points
    found there are not redone. `progress(fraction, message)` after each point (fraction: points
    done / points, the dense row counted);
    `should_stop()` is polled between points and inside prunes: the sweep then returns the rows
    it has (the run is marked stopped). `on_point(row)` gets each row as it is ready, including
    rows found in the run folder. `evaluate_fn(model) -> dict` replaces the default evaluator;
    `calibration` (token ids or CalibrationData) replaces loading `config.calibration`.
    `dense_row` (this sweep's dense row from an earlier sweep with the same evaluation) skips the
    dense evaluation; `cache` (fast mode) reuses dense statistics from `collect_dense_stats` on
    this same calibration, with gram=True when a method or record_error needs X^T X.
    """
    config.validate()
    run = open_run(run_dir, "sweep", config.run_config()) if run_dir is not None else None
    if run is not None and model_name:
        run.update(model=model_name)
    done = run.points() if run is not None else {}
    scored: dict = {}  # per-item scores of the latest evaluation (see keeping_items)
    evaluate_fn = keeping_items(evaluate_fn or default_evaluator(tokenizer, config), scored)
    points = config.points()
    total = len(points) + 1
    rows: list[dict] = []
    if dense is None:
        dense = snapshot.take(model)
    else:
        snapshot.put_back(model, dense)
    counter = {"done": 0}

    def finish(key: str, row: dict, fresh: bool) -> None:
        keep_point(run, rows, on_point, key, row, fresh)
        counter["done"] += 1
        if progress is not None:
            progress(counter["done"] / total, f"{key} ({counter['done']}/{total})")

    def stop_requested() -> bool:
        return should_stop is not None and bool(should_stop())

    try:
        if "dense" in done:
            finish("dense", done["dense"], fresh=False)
        elif dense_row is not None:
            finish("dense", {k: v for k, v in dense_row.items() if k != "key"}, fresh=True)
        else:
            finish("dense", paired_row(run, "dense", measure_dense(model, evaluate_fn), scored, None), fresh=True)
        dense_items = dict(scored) or stored_items(run, "dense")

        todo = [p for p in points if point_key(p) not in done]
        for point in points:
            if point_key(point) in done:
                finish(point_key(point), done[point_key(point)], fresh=False)
        prepared: _SweepCache | None = None
        allocations: dict[float, list[float]] = {}
        for point in todo:
            if stop_requested():
                raise PruneCancelled("stopped between points")
            key = point_key(point)
            if prepared is None:  # lazily: a fully resumed sweep needs no calibration at all
                prepared = prepare_cache(model, tokenizer, config, calibration, run,
                                          stats=cache if config.mode == "fast" else None)
            snapshot.put_back(model, dense)
            outcome = measure_point(model, tokenizer, config, point, prepared, evaluate_fn,
                                    should_stop=should_stop, allocations=allocations)
            if run is not None:
                save_point_tables(run, key, outcome)
            finish(key, paired_row(run, key, outcome.row, scored, dense_items), fresh=True)
    except PruneCancelled as err:
        log.info("sweep stopped: %s", err)
        table = _table(rows, points)
        if run is not None:
            snapshot.put_back(model, dense)
            run.save_table("results", table)
            _save_figures(run, table)
            run.mark_stopped(f"stopped after {len(rows)} of {total} points: {err}")
        return table
    except BaseException as err:
        if run is not None:
            run.mark_failed(err)
        raise
    finally:
        snapshot.put_back(model, dense)

    table = _table(rows, points)
    if run is not None:
        run.save_table("results", table)
        _save_figures(run, table)
        run.mark_done({"rows": table.to_dict(orient="records")})
    return table


@dataclass
class PointOutcome:
    """One pruned and evaluated point: its row, its per-layer sparsity table and, for OWL, the
    per-block sparsities it used."""

    row: dict
    sparsity: pd.DataFrame
    block_sparsity: list[float] | None = None


def measure_dense(model: nn.Module, evaluate_fn: Callable[[nn.Module], dict]) -> dict:
    """The dense row: the model's measured sparsity and metrics, unpruned."""
    started = time.perf_counter()
    metrics = flatten_metrics(evaluate_fn(model))
    table = sparsity_table(model)
    return {"method": "dense", "pattern": "", "target": 0.0, "allocation": "",
            **_measured(model, table), **metrics, "prune_s": 0.0,
            "eval_s": time.perf_counter() - started}


def measure_point(model: nn.Module, tokenizer, config: SweepConfig, point: dict, prepared: _SweepCache,
                  evaluate_fn: Callable[[nn.Module], dict], should_stop: Callable[[], bool] | None = None,
                  allocations: dict[float, list[float]] | None = None) -> PointOutcome:
    """Prune the (dense) model in place at `point` and evaluate it. `allocations` caches OWL's
    per-block sparsities by target across points."""
    allocations = {} if allocations is None else allocations
    block_sparsity = None
    if point["allocation"] == "owl":
        if point["target"] not in allocations:
            allocations[point["target"]] = _owl(model, config, point["target"], prepared)
        block_sparsity = allocations[point["target"]]
    pcfg = config.prune_config(point["method"], point["pattern"], point["target"], block_sparsity)
    started = time.perf_counter()
    result = prune(model, pcfg, calibration=prepared.calibration, tokenizer=tokenizer,
                   should_stop=should_stop, cache=prepared.prune_cache)
    prune_s = time.perf_counter() - started
    started = time.perf_counter()
    metrics = flatten_metrics(evaluate_fn(model))
    eval_s = time.perf_counter() - started
    row = {**point, **_measured(model, result.sparsity, result.summary), **metrics,
           "prune_s": prune_s, "eval_s": eval_s}
    return PointOutcome(row, result.sparsity, block_sparsity)


def save_point_tables(run: Run, key: str, outcome: PointOutcome) -> None:
    """A point's per-layer sparsity table (and OWL allocation) beside its row."""
    run.save_table(f"sparsity-{_slug(key)}", outcome.sparsity)
    if outcome.block_sparsity is not None:
        run.save_json(f"allocation-{_slug(key)}", outcome.block_sparsity)


@dataclass
class _SweepCache:
    calibration: object
    prune_cache: CalibrationCache
    stats_cache: CalibrationCache | None = None  # dense statistics, when some point needs them


def prepare_cache(model, tokenizer, config: SweepConfig, calibration, run: Run | None,
                   stats: CalibrationCache | None = None) -> _SweepCache:
    calibration = _calibration(config, calibration, tokenizer)
    if run is not None and hasattr(calibration, "sha256"):
        run.update(data={"calibration_sha256": calibration.sha256,
                         "calibration_source": calibration.source})
    base = config.prune_config(config.methods[0], "unstructured", 0.5)
    if config.mode == "fast":
        gram = config.record_error or any(method_record(m).stats == "gram" for m in config.methods)
        if stats is not None and stats.dense_stats is not None:
            if gram and not stats.gram:
                raise ValueError("the given cache lacks X^T X, which this sweep needs: collect it "
                                 "with collect_dense_stats(..., gram=True)")
            return _SweepCache(calibration, stats, stats)
        started = time.perf_counter()
        stats = collect_dense_stats(model, base, calibration=calibration, tokenizer=tokenizer,
                                    gram=gram)
        log.info("fast mode: dense statistics in %.1f s", time.perf_counter() - started)
        return _SweepCache(calibration, stats, stats)
    return _SweepCache(calibration, CalibrationCache())


def _owl(model, config: SweepConfig, target: float, cache: _SweepCache) -> list[float]:
    if cache.stats_cache is None:  # exact mode: one extra dense pass, shared by every target
        base = config.prune_config(config.methods[0], "unstructured", 0.5)
        shared = cache.prune_cache
        cache.stats_cache = collect_dense_stats(
            model, base, calibration=cache.calibration, gram=False,
            cache=CalibrationCache(info=dict(shared.info), batch_size=shared.batch_size,
                                   block_inputs=shared.block_inputs))
    return owl_block_sparsity(model, None, target, lam=config.owl_lam, m=config.owl_m,
                              scope=config.scope, cache=cache.stats_cache)


def _table(rows: list[dict], points: list[dict]) -> pd.DataFrame:
    order = {"dense": -1, **{point_key(p): i for i, p in enumerate(points)}}
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["_order"] = frame["key"].map(order)
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True)


def _save_figures(run: Run, table: pd.DataFrame) -> None:
    from workbench import plots  # matplotlib: ~1.3 s of start-up that only figures need

    if table.empty:
        return
    try:
        run.save_figure("curve", plots.accuracy_curve(table))
    except ValueError as err:
        run.log(f"no curve: {err}")
    for key in table["key"]:
        if key == "dense":
            continue
        path = run.path / f"sparsity-{_slug(key)}.csv"
        if path.is_file():
            run.save_figure(f"heatmap-{_slug(key)}",
                            plots.sparsity_heatmap(pd.read_csv(path), title=key.replace("|", " ")))


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """The sweep as a compact table: one row per point, the measured sparsity and the metrics."""
    metrics = [c for c in table.columns if "/" in str(c)]
    columns = ["method", "pattern", "allocation", "target", "sparsity_blocks", "sparsity_matmul",
               *metrics, "prune_s", "eval_s"]
    return table[[c for c in columns if c in table.columns]]
