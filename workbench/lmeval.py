"""Any lm-eval task, in process, on the model in memory (lm-eval 0.4's `HFLM` wraps a loaded model).

    results = run_tasks(model, tokenizer, ["hellaswag", "arc_easy"], limit=200, include_path="my_tasks/")

Names here are lm-eval's own (`workbench.evaluate` adds the `lm-eval:` prefix). Each task runs
on its own, zero-shot unless `num_fewshot` says otherwise, with per-item results kept: the
figures carry `items` (per-document 0/1 correctness, or NLL for loglikelihood perplexity) and
`item_ids` (lm-eval's doc ids) so intervals and paired comparisons can be computed.

Offline: lm-eval tasks read their data from the hub. A task YAML with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}` in a folder passed as `include_path` runs on local files;
a task whose data cannot be reached fails at once with an error that says so.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from workbench.intervals import accuracy_summary, perplexity_summary

log = logging.getLogger(__name__)

PREFIX = "lm-eval:"
# The zero-shot suite of the SparseGPT and Wanda papers.
ZERO_SHOT = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LOCAL_TASKS_FOLDER = "lm-eval-tasks"  # inside --data-dir: extra task YAMLs, picked up automatically
# lm-eval's per-document metric names -> ours ("perplexity" per item is a loglikelihood).
_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "accuracy_norm", "exact_match": "exact_match"}

Progress = Callable[[float, str], None]


class LMEvalTaskError(ValueError):
    """An lm-eval task that cannot run here: unknown name or unreachable data."""


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise LMEvalTaskError("lm-eval tasks need the lm-eval package: pip install lm-eval==0.4.13") from err


def include_paths(include_path: str | Path | Sequence[str | Path] | None = None,
                  data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The folders of extra task YAMLs: `include_path` plus `<data_dir>/lm-eval-tasks` if it exists."""
    if include_path is None:
        paths = []
    elif isinstance(include_path, (str, Path)):
        paths = [include_path]
    else:
        paths = list(include_path)
    for path in paths:
        if not Path(path).exists():
            raise LMEvalTaskError(f"lm-eval include path {str(path)!r} does not exist: give a folder of task YAMLs")
    if data_dir is not None and (Path(data_dir) / LOCAL_TASKS_FOLDER).is_dir():
        paths.append(Path(data_dir) / LOCAL_TASKS_FOLDER)
    return tuple(str(Path(p).resolve()) for p in paths)


@lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    manager = TaskManager(include_path=list(paths) or None, include_defaults=defaults)
    log.info("lm-eval task index (%d names) in %.1f s", len(manager.all_tasks), time.perf_counter() - started)
    return manager


def task_manager(names: Sequence[str], paths: tuple[str, ...] = ()):
    """A TaskManager that knows `names`: the local folders alone when they hold every one (indexing
    lm-eval's thousands of built-in YAMLs takes seconds), else built-ins plus the local folders."""
    _require_lm_eval()
    if paths:
        local = _manager(paths, False)
        if all(name in local.all_tasks for name in names):
            return local
    return _manager(paths, True)


def available_tasks(include_path=None, data_dir=None) -> list[str]:
    """Every task, group and tag name lm-eval knows here (built-ins plus the local folders)."""
    _require_lm_eval()
    return list(_manager(include_paths(include_path, data_dir), True).all_tasks)


def check_names(names: Sequence[str], manager) -> None:
    """Unknown names raise, listing the closest known ones."""
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else ""
            raise LMEvalTaskError(f"unknown lm-eval task {name!r}{hint}. A task of your own: put its YAML "
                                  "in a folder and pass it with --include-path")


def _unreachable(name: str, err: BaseException, dataset: str | None) -> LMEvalTaskError:
    source = f" ({dataset})" if dataset else ""
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return LMEvalTaskError(
        f"lm-eval task {name!r} could not load its data{source}: {type(err).__name__}: {reason}. "
        f"Without the hub, point it at local files: write a task YAML with `dataset_path: json` and "
        f"`dataset_kwargs: {{data_files: ...}}` into a folder and pass it with --include-path "
        f"(Python: include_path=...), or put it in <data-dir>/{LOCAL_TASKS_FOLDER}/")


def _dataset_of(manager, name: str) -> str | None:
    entry = manager.task_index.get(name)
    config = getattr(entry, "cfg", None) or {}
    return config.get("dataset_path") if isinstance(config, dict) else None


def _load(manager, name: str) -> dict:
    """{leaf task name: Task} for one name (a group or tag expands to its tasks); data is loaded here."""
    try:
        return manager.load([name])["tasks"]
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # datasets raises many kinds (ConnectionError, offline mode, file not found)
        raise _unreachable(name, err, _dataset_of(manager, name)) from err


def _figures(samples: list[dict], aggregated: dict) -> dict:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    items: dict[str, list[float]] = {}
    for key in samples[0]["metrics"] if samples else []:
        values = [s.get(key) for s in samples]
        if not all(isinstance(v, (int, float)) for v in values):
            continue  # corpus-level metrics (tuples) are lm-eval's own business
        if key == "perplexity":  # loglikelihood tasks: the per-document value is the loglikelihood
            items["nll"] = [-float(v) for v in values]
        else:
            items[_METRIC_NAMES.get(key, key)] = [float(v) for v in values]
    figures: dict = {}
    for metric, values in items.items():
        if metric == "nll":
            figures.update(perplexity_summary(values))
        elif set(values) <= {0.0, 1.0}:
            summary = accuracy_summary(values)
            figures.update({k.replace("accuracy", metric, 1): v for k, v in summary.items()})
        else:
            figures[metric] = sum(values) / len(values)
    lm_eval_figures = {k.split(",")[0]: v for k, v in aggregated.items()
                       if "," in k and isinstance(v, (int, float)) and "stderr" not in k}
    return {**figures, "n": len(samples), "items": items, "item_ids": [int(s["doc_id"]) for s in samples],
            "lm_eval": lm_eval_figures}


def run_tasks(model, tokenizer, names: Sequence[str], limit: int | None = None,
              include_path=None, data_dir=None, batch_size: int = 8, num_fewshot: int | None = None,
              progress: Progress | None = None) -> dict[str, dict]:
    """Evaluate the in-memory model on lm-eval tasks; {leaf task name: figures}.

    Every name is checked (and its data loaded) before any model work starts, so a bad name or
    unreachable data fails at once."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise LMEvalTaskError(f"limit must be positive, got {limit}")
    paths = include_paths(include_path, data_dir)
    manager = task_manager(names, paths)
    check_names(names, manager)
    loaded = {name: _load(manager, name) for name in names}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    leaves = [(leaf, task) for tasks in loaded.values() for leaf, task in tasks.items()]
    results: dict[str, dict] = {}
    for position, (leaf, task) in enumerate(leaves):
        if progress is not None:
            progress(position / len(leaves), f"lm-eval {leaf} ({position + 1}/{len(leaves)})")
        started = time.perf_counter()
        try:
            # no global reseeding: the caller's random/numpy/torch state is left alone
            out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=True,
                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        except (KeyboardInterrupt, SystemExit):
            raise
        except (ConnectionError, OSError) as err:
            raise _unreachable(leaf, err, _dataset_of(manager, leaf)) from err
        figures = _figures(out["samples"][leaf], out["results"].get(leaf, {}))
        figures.update(seconds=time.perf_counter() - started, source=f"lm-eval {_lm_eval_version()}",
                       num_fewshot=num_fewshot or 0, dataset=_dataset_of(manager, leaf))
        results[leaf] = figures
        log.info("lm-eval %s: %s", leaf, {k: v for k, v in figures.items() if k not in ("items", "item_ids")})
    if progress is not None:
        progress(1.0, "lm-eval done")
    return results


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
