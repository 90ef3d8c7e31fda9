"""Sweeps on a Ray cluster: every (method, pattern, sparsity) point is one Ray task.

    config = SweepConfig(methods=("wanda", "sparsegpt"), backend="ray", address="auto")
    table = run_ray_sweep("HuggingFaceTB/SmolLM2-135M", config, run_dir="runs/curve")

Each task loads the model itself (from a hub id or a path every worker can reach), prunes it at
its point, evaluates it and returns its row and per-layer sparsity table; the dense baseline is
one task too. Results stream back to this process, which alone writes the run folder (atomic
writes, as for a local sweep), so workers need no shared disk.

- A worker that dies during a point (killed, out of memory, node lost) is retried by Ray
  (`max_retries`); so are transient I/O errors. A point that keeps failing is recorded as failed
  with its error while the others finish; the run ends `failed` and running it again into the
  same folder redoes only what is missing, on either backend.
- `should_stop()` or Ctrl-C cancels the outstanding tasks; finished points stay on disk.
- Each task asks Ray for resources sized from the model (parameter count from its config, no
  weights loaded) and the device: see `task_resources`.

Ray is imported only inside these functions: a local sweep never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.data import load_calibration
from workbench.models import load_model
from workbench.progress import Progress
from workbench.prune import PruneCancelled
from workbench.runs import open_run
from workbench.sweep import (
    PointOutcome,
    SweepConfig,
    _save_figures,
    _table,
    default_evaluator,
    keep_point,
    measure_dense,
    measure_point,
    point_key,
    prepare_cache,
    save_point_tables,
)
from workbench.sweep_items import keeping_items, paired_row, stored_items

log = logging.getLogger(__name__)

GIB = 1024**3
BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "fp16": 2}
# Transient errors worth another attempt (a hub download that timed out, a flaky file system);
# any other exception in a point is deterministic and recorded at once. Worker deaths are
# always retried, up to `max_retries`.
RETRYABLE_EXCEPTIONS = [OSError, ConnectionError, TimeoutError]
POLL_SECONDS = 0.5


class RayBackendError(ValueError):
    """The Ray backend cannot start: ray missing, or no cluster at the address given."""


@dataclass(frozen=True)
class ModelSpec:
    """How every worker loads the model: a hub id or a path each worker can reach."""

    source: str
    dtype: str = "fp32"
    revision: str | None = None
    trust_remote_code: bool = False


# --- resources -------------------------------------------------------------------------------


def _model_config(spec: ModelSpec):
    from transformers import AutoConfig

    from workbench.models import DEFAULT_HUB_ID, converted_default

    source = spec.source
    if source == "default":
        folder = converted_default()
        source = str(folder) if folder is not None else DEFAULT_HUB_ID
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        path = ggufs[0] if ggufs else path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(source, revision=spec.revision,
                                      trust_remote_code=spec.trust_remote_code)


def model_parameters(spec: ModelSpec) -> int | None:
    """The model's parameter count, from its config alone (the model is built on the meta
    device: no weights are read or allocated); None when the config cannot be read here."""
    from transformers import AutoModelForCausalLM

    try:
        config = _model_config(spec)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception as error:  # a best-effort size: the tasks then run without a memory request
        log.warning("cannot read the config of %s here (%s); tasks request no memory", spec.source, error)
        return None
    return sum(p.numel() for p in model.parameters())


@dataclass
class TaskResources:
    num_cpus: float
    num_gpus: float
    memory: int  # bytes of host memory; 0: no request

    def options(self) -> dict:
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            options["memory"] = self.memory
        return options


def task_resources(parameters: int | None, dtype: str = "fp32", device: str = "cpu",
                   cpus: float = 1) -> TaskResources:
    """What one point asks Ray for. The weights take parameters x bytes per parameter. On CPU
    the task holds them plus about as much again at peak (loading buffers, the largest layer's
    Hessian and the evaluation logits stay well under that for causal LMs), plus 1 GiB for the
    interpreter and libraries; on a GPU the weights go to the GPU (one GPU per task) and the
    host needs them once, while loading."""
    weights = (parameters or 0) * BYTES_PER_PARAMETER.get(dtype, 4)
    on_gpu = str(device).startswith("cuda")
    if parameters is None:
        memory = 0
    elif on_gpu:
        memory = weights + GIB
    else:
        memory = 2 * weights + GIB
    return TaskResources(num_cpus=cpus, num_gpus=1 if on_gpu else 0, memory=int(memory))


# --- the task --------------------------------------------------------------------------------


def sweep_point(spec: ModelSpec, config: dict, point: dict | None, data_dir: str | None = None) -> dict:
    """One Ray task: load the model, prune it at `point` (None: the dense baseline), evaluate.
    Returns {"row": ..., "sparsity": per-layer table or None, "block_sparsity": ... or None,
    "items": per-item scores}."""
    sweep_config = SweepConfig.from_dict(config)
    loaded = load_model(spec.source, dtype=spec.dtype, device=sweep_config.device,
                        revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    scored: dict = {}  # per-item scores, for the driver's paired comparison with dense
    evaluate_fn = keeping_items(default_evaluator(loaded.tokenizer, sweep_config, data_dir), scored)
    if point is None:
        return {"row": measure_dense(loaded.model, evaluate_fn), "sparsity": None, "block_sparsity": None,
                "items": dict(scored)}
    calibration = load_calibration(loaded.tokenizer, sweep_config.calibration, nsamples=sweep_config.nsamples,
                                   seqlen=sweep_config.seqlen, seed=sweep_config.seed, data_dir=data_dir)
    prepared = prepare_cache(loaded.model, loaded.tokenizer, sweep_config, calibration, None)
    outcome = measure_point(loaded.model, loaded.tokenizer, sweep_config, point, prepared, evaluate_fn)
    return {"row": outcome.row, "sparsity": outcome.sparsity, "block_sparsity": outcome.block_sparsity,
            "items": dict(scored)}


# --- the driver ------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayBackendError("the ray backend needs the ray package: pip install 'ray==2.60.0'") from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ("auto", "ray://host:10001", or None: $RAY_ADDRESS, else a
    new local Ray instance), unless this process already is. True when this call connected, so
    the caller disconnects when done."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    # Workers' evaluation bars would interleave on this console; the driver shows one for the sweep.
    runtime_env: dict = {"env_vars": {"TQDM_DISABLE": "1"}}
    kwargs: dict = {"logging_level": logging.WARNING, "runtime_env": runtime_env}
    if address:
        import workbench

        # Ship this package to the workers, so a cluster needs only the dependencies installed.
        # a path, not the module object: Ray Client (ray://) pickles the runtime env, and modules do not pickle
        runtime_env.update(py_modules=[str(Path(workbench.__file__).parent)], excludes=["__pycache__"])
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayBackendError(f"could not connect to the Ray cluster at {address or '$RAY_ADDRESS'}: {error}. "
                              "Start one with `ray start --head`, then pass --address auto (or "
                              "ray://host:10001)") from None
    return True


def _error_text(error: BaseException) -> str:
    cause = getattr(error, "cause", None)  # RayTaskError wraps the exception raised in the task
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _slots(ray, resources: TaskResources) -> int:
    """How many tasks the cluster can run at once (an upper bound on 'running')."""
    total = ray.cluster_resources()
    wanted = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, "memory": resources.memory}
    fits = [total.get(name, 0) / amount for name, amount in wanted.items() if amount]
    return max(1, int(min(fits))) if fits else 1


def run_ray_sweep(source: str, config: SweepConfig, run_dir: str | Path | None = None, *,
                  dtype: str = "fp32", revision: str | None = None, trust_remote_code: bool = False,
                  data_dir: str | Path | None = None,
                  progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  on_point: Callable[[dict], None] | None = None,
                  model_name: str | None = None, max_retries: int = 2,
                  cpus_per_point: float = 1) -> pd.DataFrame:
    """`workbench.sweep.run_sweep`'s contract, with every point a Ray task on the cluster at
    `config.address`. Returns the finished rows (the dense row first); `table.attrs["failed"]`
    maps each point that kept failing to its error. `source` must be loadable by every worker.
    `data_dir` is passed to the workers as given (None: each worker's own default)."""
    config.validate()
    spec = ModelSpec(str(source), dtype, revision, trust_remote_code)
    run = open_run(run_dir, "sweep", config.run_config()) if run_dir is not None else None
    if run is not None:
        run.update(model=model_name or spec.source, execution={"backend": "ray", "address": config.address})
    done = run.points() if run is not None else {}
    points = config.points()
    jobs = [("dense", None)] + [(point_key(p), p) for p in points]
    total = len(jobs)
    rows: list[dict] = []
    failed: dict[str, str] = {}
    state = {"running": 0}

    def status() -> str:
        return f"done {len(rows)}/{total}, running {state['running']}, failed {len(failed)}"

    def finish(key: str, row: dict, fresh: bool) -> None:
        keep_point(run, rows, on_point, key, row, fresh)
        if progress is not None:
            progress((len(rows) + len(failed)) / total, f"{key} ({status()})")

    def fail(key: str, error: str) -> None:
        failed[key] = error
        log.warning("point %s failed: %s", key, error)
        if run is not None:
            run.log(f"point {key} failed: {error}")
        if progress is not None:
            progress((len(rows) + len(failed)) / total, f"{key} failed ({status()})")

    # Points are paired item by item with dense, so a point that arrives before the dense row
    # waits for it (the dense task is submitted first and is the cheapest).
    paired = {"dense": stored_items(run, "dense") if "dense" in done else None,
              "dense_done": "dense" in done}
    waiting: list[tuple[str, dict]] = []

    def arrive(key: str, point: dict | None, result: dict) -> None:
        if point is not None and run is not None:
            save_point_tables(run, key, PointOutcome(result["row"], result["sparsity"], result["block_sparsity"]))
        if point is not None and not paired["dense_done"]:
            waiting.append((key, result))
            return
        finish(key, paired_row(run, key, result["row"], result.get("items") or {}, paired["dense"]), fresh=True)
        if point is None:
            paired.update(dense=result.get("items") or None, dense_done=True)
            release()

    def release() -> None:  # the dense row has arrived or failed: the waiting points go through
        paired["dense_done"] = True
        while waiting:
            key, result = waiting.pop(0)
            finish(key, paired_row(run, key, result["row"], result.get("items") or {}, paired["dense"]),
                   fresh=True)

    for key, _ in jobs:
        if key in done:
            finish(key, done[key], fresh=False)
    todo = [(key, point) for key, point in jobs if key not in done]
    if not todo:
        return _close(run, rows, points, failed)

    ray = _import_ray()
    connected = connect(config.address)
    pending: dict = {}
    bar = None
    try:
        resources = task_resources(model_parameters(spec), dtype, config.device, cpus_per_point)
        log.info("ray sweep: %d points, each task asks for %s", len(todo), resources.options())
        if run is not None:
            run.update(execution={"task_resources": resources.options()})
        slots = _slots(ray, resources)
        task = ray.remote(sweep_point)
        options = dict(max_retries=max_retries, retry_exceptions=RETRYABLE_EXCEPTIONS, **resources.options())
        config_dict = config.to_dict()
        data = str(data_dir) if data_dir is not None else None
        for key, point in todo:  # the task name titles the worker process while it runs this point
            ref = task.options(name=f"sweep {key}", **options).remote(spec, config_dict, point, data)
            pending[ref] = (key, point)
        bar = tqdm(total=total, initial=len(rows), desc="sweep (ray)", unit="point", disable=None)
        while pending:
            if should_stop is not None and should_stop():
                raise PruneCancelled("stopped on request")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                key, point = pending.pop(ref)
                state["running"] = min(len(pending), slots)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as error:
                    fail(key, _error_text(error))
                    if point is None:
                        release()
                else:
                    arrive(key, point, result)
                bar.update(1)
            state["running"] = min(len(pending), slots)
            bar.set_postfix(done=len(rows), running=state["running"], failed=len(failed), refresh=False)
            bar.refresh()
    except PruneCancelled as err:
        _cancel(ray, pending)
        release()  # finished points are kept, unpaired if the dense row never came
        log.info("ray sweep stopped: %s", err)
        return _close(run, rows, points, failed, stopped=f"stopped after {len(rows)} of {total} points: {err}")
    except KeyboardInterrupt:
        _cancel(ray, pending)
        release()
        _close(run, rows, points, failed, stopped=f"interrupted after {len(rows)} of {total} points")
        raise
    except BaseException as err:
        _cancel(ray, pending)
        if run is not None:
            run.mark_failed(err)
        raise
    finally:
        if bar is not None:
            bar.close()
        if connected:
            ray.shutdown()
    return _close(run, rows, points, failed)


def _cancel(ray, pending: dict) -> None:
    """Cancel every outstanding task (force: a pruning in a worker does not poll for signals)."""
    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception as error:  # already finished or its worker gone: nothing to cancel
            log.debug("cancel: %s", error)
    if pending:
        log.info("cancelled %d outstanding sweep tasks", len(pending))


def _close(run, rows: list[dict], points: list[dict], failed: dict[str, str],
           stopped: str | None = None) -> pd.DataFrame:
    """The table of finished rows; the run folder's results, figures and final status."""
    table = _table(rows, points)
    table.attrs["failed"] = dict(failed)
    if run is None:
        return table
    if not table.empty:
        run.save_table("results", table)
        _save_figures(run, table)
    run.update(failed_points=dict(failed))
    if stopped is not None:
        run.mark_stopped(stopped)
    elif failed:
        first = next(iter(failed.items()))
        run.mark_failed(f"{len(failed)} of {len(points) + 1} points failed (run again into the same folder "
                        f"to retry them); {first[0]}: {first[1]}")
    else:
        run.mark_done({"rows": table.to_dict(orient="records")})
    return table
