"""Any lm-eval task, in process, on the model in memory (lm-eval 0.4's `HFLM` wraps a loaded model).

    results = run_tasks(model, tokenizer, ["hellaswag", "arc_easy"], limit=200, include_path="my_tasks/")

Names here are lm-eval's own (`workbench.evaluate` adds the `lm-eval:` prefix). Each task runs
on its own, zero-shot unless `num_fewshot` says otherwise, with per-item results kept: the
figures carry `items` (per-document 0/1 correctness, or NLL for loglikelihood perplexity) and
`item_ids` (lm-eval's doc ids) so intervals and paired comparisons can be computed.

Offline: lm-eval tasks read their data from the hub. A task YAML with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}` in a folder passed as `include_path` runs on local files;
a task whose data cannot be reached fails at once with an error that says so.

Memory: lm-eval's HFLM builds full-vocabulary logits for whole batches; here log-likelihoods
go through the LM head a few continuation positions at a time (`workbench.evaluate`'s chunked
head), so a batch holds its hidden states, not (batch, sequence, vocabulary) logits.

Task names: `task_list()` indexes lm-eval's installed tasks once, in a background thread, and
keeps the names in a file keyed by lm-eval's version, for the UIs' pickers.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.intervals import accuracy_summary, perplexity_summary
from workbench.progress import Progress

log = logging.getLogger(__name__)

PREFIX = "lm-eval:"
# The zero-shot suite of the SparseGPT and Wanda papers.
ZERO_SHOT = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LOCAL_TASKS_FOLDER = "lm-eval-tasks"  # inside --data-dir: extra task YAMLs, picked up automatically
# lm-eval's per-document metric names -> ours ("perplexity" per item is a loglikelihood).
_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "accuracy_norm", "exact_match": "exact_match"}


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
              progress: Progress | None = None, full_logits: bool = False) -> dict[str, dict]:
    """Evaluate the in-memory model on lm-eval tasks; {leaf task name: figures}.

    Every name is checked (and its data loaded) before any model work starts, so a bad name or
    unreachable data fails at once. `progress(fraction, message)` comes at the start of each task
    ('lm-eval task 2 of 7: hellaswag') and after each batch of its log-likelihood requests; an
    exception raised there stops the evaluation. Log-likelihoods run with bounded memory (the LM
    head on a few positions at a time); `full_logits=True` takes lm-eval's own path instead."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise LMEvalTaskError(f"limit must be positive, got {limit}")
    paths = include_paths(include_path, data_dir)
    manager = task_manager(names, paths)
    check_names(names, manager)
    loaded = {name: _load(manager, name) for name in names}
    lm = (HFLM if full_logits else _bounded_lm_class())(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    leaves = [(leaf, task) for tasks in loaded.values() for leaf, task in tasks.items()]
    results: dict[str, dict] = {}
    for position, (leaf, task) in enumerate(leaves):
        where = f"lm-eval task {position + 1} of {len(leaves)}: {leaf}"
        if progress is not None:
            progress(position / len(leaves), where)

            def on_batch(done: int, total: int, position=position, where=where) -> None:
                progress((position + done / max(total, 1)) / len(leaves), f"{where} ({done}/{total} requests)")

            lm.on_batch = on_batch
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


# --- the installed task list, built once in the background ---------------------------------------

def task_list_file(cache_dir: str | Path | None = None) -> Path:
    """The file that keeps lm-eval's task names between runs, keyed by lm-eval's version."""
    if cache_dir is None:
        from workbench.models import cache_root

        cache_dir = cache_root()
    return Path(cache_dir) / f"lm-eval-tasks-{_lm_eval_version()}.json"


def _read_task_list(path: Path) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("lm_eval") != _lm_eval_version():
        return None
    names = data.get("names")
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _write_task_list(path: Path, names: list[str], seconds: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps({"lm_eval": _lm_eval_version(), "seconds": round(seconds, 2),
                                      "names": names}), encoding="utf-8")
        os.replace(staged, path)
    except OSError as error:  # a read-only cache only costs the next start its indexing time
        log.warning("could not keep the lm-eval task list in %s: %s", path, error)


class TaskList:
    """lm-eval's installed task, group and tag names, built once in a background thread.

    Indexing lm-eval's task YAMLs takes tens of seconds, so the names are also kept in a small
    file under the cache folder, keyed by lm-eval's version: a later start reads them at once.
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = cache_dir
        self.seconds: float | None = None  # how long making the list took
        self.from_file = False  # whether it came from the file
        self._names: list[str] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _build(self) -> None:
        started = time.perf_counter()
        names: list[str] = []
        try:
            path = task_list_file(self.cache_dir)
            found = _read_task_list(path)
            self.from_file = found is not None
            names = found if found is not None else sorted(_manager((), True).all_tasks)
            if found is None:
                _write_task_list(path, names, time.perf_counter() - started)
        except Exception as error:  # the pickers keep the preset and typed names
            log.warning("could not list lm-eval's tasks: %s: %s", type(error).__name__, error)
        self.seconds = time.perf_counter() - started
        with self._lock:
            self._names = names
        log.info("lm-eval task list: %d names in %.1f s%s", len(names), self.seconds,
                 " (from the file cache)" if self.from_file else "")

    def start(self) -> threading.Thread | None:
        """Start the background build (once); None when lm-eval is not installed."""
        try:
            _require_lm_eval()
        except LMEvalTaskError:
            return None
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._build, name="lm-eval-task-list", daemon=True)
                self._thread.start()
            return self._thread

    def names(self, wait: float | None = 0.0) -> list[str] | None:
        """The sorted names (without our `lm-eval:` prefix), or None while the list is being built;
        `wait`: seconds to wait for it (None: until done). Starts the build if nobody has."""
        thread = self.start()
        if thread is None:
            return []
        if wait is None or wait > 0:
            thread.join(wait)
        with self._lock:
            return list(self._names) if self._names is not None else None


_TASK_LIST: TaskList | None = None
_TASK_LIST_LOCK = threading.Lock()


def task_list() -> TaskList:
    """The process's task list (under the workbench cache folder); the UIs start it early."""
    global _TASK_LIST
    with _TASK_LIST_LOCK:
        if _TASK_LIST is None:
            _TASK_LIST = TaskList()
        return _TASK_LIST


def installed_task_names(wait: float | None = 0.0) -> list[str] | None:
    """`task_list().names(wait)`: every installed lm-eval name, or None while still indexing."""
    return task_list().names(wait)


# --- log-likelihoods with bounded memory -----------------------------------------------------------


@lru_cache(maxsize=1)
def _bounded_lm_class():
    """HFLM whose log-likelihoods never hold (batch, seq, vocab) logits: the model runs to its final
    hidden states and the LM head runs on a bounded number of continuation positions at a time
    (workbench.evaluate's chunked head). A family whose head cannot be split off, or a
    sequence-to-sequence model, takes lm-eval's own path."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator

    from workbench import evaluate as ev

    class BoundedHFLM(HFLM):
        on_batch: Callable[[int, int], None] | None = None  # (requests done, requests in all), per batch

        def _report(self, done: int, total: int) -> None:
            if self.on_batch is not None:
                self.on_batch(done, total)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self.backend != "causal" or not requests:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            model = self.model
            pad = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
            _, context, continuation = requests[0]
            probe = (context + continuation)[-(self.max_length + 1):][:-1][:8] or continuation[:1]
            ids, mask = ev._right_padded([probe], pad, self.device)
            if not ev._head_splits(model, ids, mask):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

            def order(request):  # longest first, as lm-eval orders them
                tokens = request[1] + request[2]
                return -len(tokens), tuple(tokens)

            # requests that differ only in their last continuation token share one forward pass
            collator = Collator(requests, sort_fn=order, group_by="contexts" if self.logits_cache else None,
                                group_fn=lambda request: request[-2] + request[-1][:-1])
            batch_size = self.batch_size if self.batch_size != "auto" else (override_bs or 1)
            step = ev._positions_per_chunk(model)
            results: list[tuple[float, bool]] = []
            for batch in collator.get_batched(n=batch_size, batch_fn=None):
                inputs = []
                for _, context, continuation in batch:
                    if not context or not continuation or len(continuation) > self.max_length:
                        raise ValueError("lm-eval request with an empty context or continuation, or a "
                                         "continuation longer than the model's context")
                    inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
                ids, _ = ev._right_padded(inputs, pad, self.device)
                with torch.no_grad():
                    hidden = ev._final_hidden(model, ids, None)  # lm-eval runs right-padded rows unmasked
                    for row, (request, context, continuation) in enumerate(batch):
                        end, count = len(inputs[row]), len(continuation)
                        target = torch.as_tensor(continuation, device=hidden.device)
                        scores, hits = [], []  # per continuation position but the last
                        last = None
                        for start in range(end - count, end, step):
                            stop = min(start + step, end)
                            logprobs = F.log_softmax(ev._head_logits(model, hidden[row, start:stop]), dim=-1)
                            wanted = target[start - (end - count): stop - (end - count)]
                            if stop == end:  # the last position: its row serves every grouped request
                                last = logprobs[-1]
                                logprobs, wanted = logprobs[:-1], wanted[:-1]
                            scores.append(logprobs.gather(-1, wanted[:, None])[:, 0])
                            hits.append(logprobs.argmax(dim=-1) == wanted)
                        scores, hits = torch.cat(scores), torch.cat(hits)
                        best = int(last.argmax())
                        # a grouped request may continue from a later point: it takes the trailing positions
                        for request_str, tokens, last_row in collator.get_cache(
                                req_str=request, cxt_toks=context, cont_toks=continuation, logits=last[None, None]):
                            earlier = len(tokens) - 1
                            logprob = float(scores[len(scores) - earlier:].sum()) if earlier else 0.0
                            greedy = bool(hits[len(hits) - earlier:].all()) if earlier else True
                            answer = (logprob + float(last_row[0, 0, tokens[-1]]), greedy and best == tokens[-1])
                            results.append(answer)
                            if request_str is not None:
                                self.cache_hook.add_partial("loglikelihood", request_str, answer)
                del hidden
                self._report(len(results), len(requests))
            return collator.get_original(results)

    return BoundedHFLM
