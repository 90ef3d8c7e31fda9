"""The Ray backend for sweeps, on a local Ray instance (loopback only, 2 CPUs, small object store).

Worker deaths here are real: a watcher thread SIGKILLs the worker process whose title names the
point (Ray titles a worker `ray::<task name>` while it runs a task).
"""

import json
import os
import signal
import threading
import time

# Ray binds to the loopback address only when it believes it cannot form a cluster; must be set
# before ray is imported (the driver reads it at import, the raylet and GCS inherit it).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# The only worker deaths here are the ones a test causes: Ray's own memory monitor would kill
# workers whenever other programs fill this shared machine's memory.
os.environ["RAY_memory_monitor_refresh_ms"] = "0"

import pandas as pd
import psutil
import pytest
from conftest import char_tokenizer
from tiny_models import tiny_model

from workbench.models import load_model
from workbench.ray_sweep import ModelSpec, model_parameters, run_ray_sweep, task_resources
from workbench.runs import load_run
from workbench.sweep import SweepConfig, default_evaluator, point_key, run_sweep

TIMING = ["prune_s", "eval_s"]


@pytest.fixture(scope="module")
def ray_instance():
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False, configure_logging=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def small_config(**overrides) -> SweepConfig:
    fields = dict(methods=("magnitude", "wanda"), sparsities=(0.5,), extra_patterns=(),
                  tasks=("wikitext2",), limit=4, ppl_windows=2, eval_seqlen=32,
                  nsamples=4, seqlen=16, batch_size=4, backend="ray", address=None)
    fields.update(overrides)
    return SweepConfig(**fields)


def local_table(model_folder, data_dir, config: SweepConfig, **kwargs) -> pd.DataFrame:
    loaded = load_model(str(model_folder))
    return run_sweep(loaded.model, loaded.tokenizer, config,
                     evaluate_fn=default_evaluator(loaded.tokenizer, config, data_dir), **kwargs)


def fresh_points(run_path) -> list[str]:
    """Points computed (not found on disk) since the run was last started or resumed."""
    lines = (run_path / "log.txt").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith((" resumed", " created sweep run"))]
    return [line.split("point ", 1)[1].removesuffix(" done") for line in lines[starts[-1]:]
            if " point " in line and line.endswith(" done")]


def same_rows(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(left.drop(columns=TIMING), right.drop(columns=TIMING),
                                  check_exact=False, rtol=1e-4, atol=1e-6)


def our_ray_processes() -> list[tuple[int, str]]:
    """(pid, title) of the processes this test session started (its Ray instance's workers), so
    that other Ray instances on a shared machine are never touched."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            found.append((proc.pid, " ".join(proc.cmdline())))
        except psutil.Error:  # exited meanwhile
            continue
    return found


class WorkerKiller:
    """SIGKILLs the worker running the point `key`, for its first `times` attempts."""

    def __init__(self, key: str, times: int):
        self.title, self.times, self.killed = f"ray::sweep {key}", times, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        while not self.done.is_set() and len(self.killed) < self.times:
            for pid, title in our_ray_processes():
                if title.startswith(self.title) and pid not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def test_resources_come_from_the_config(model_folder):
    parameters = model_parameters(ModelSpec(str(model_folder)))
    loaded = load_model(str(model_folder))
    assert parameters == sum(p.numel() for p in loaded.model.parameters())
    cpu = task_resources(7_000_000_000, "bf16", "cpu")
    assert cpu.options() == {"num_cpus": 1, "num_gpus": 0, "memory": 2 * 14_000_000_000 + 1024**3}
    gpu = task_resources(7_000_000_000, "bf16", "cuda")
    assert gpu.num_gpus == 1 and gpu.memory == 14_000_000_000 + 1024**3
    assert "memory" not in task_resources(None).options()


def test_ray_table_equals_local_and_resumes_a_local_sweep(ray_instance, model_folder, data_dir, tmp_path):
    config = small_config()
    expected = local_table(model_folder, data_dir, config, run_dir=tmp_path / "local")
    assert len(expected) == 3

    ray_table = run_ray_sweep(str(model_folder), config, tmp_path / "ray", data_dir=data_dir)
    same_rows(ray_table, expected)
    run = load_run(tmp_path / "ray")
    assert run.status == "done" and len(run.points()) == 3 and ray_table.attrs["failed"] == {}
    assert (run.path / "curve.png").is_file()
    assert (run.path / "sparsity-wanda-unstructured-0.5000-uniform.csv").is_file()
    assert run.meta["execution"]["task_resources"]["num_cpus"] == 1

    # a local sweep that lost a point, finished on Ray: only the missing point runs there
    missing = [point_key(config.points()[1])]
    for path in (tmp_path / "local" / "points").glob("*.json"):
        if json.loads(path.read_text())["key"] in missing:
            path.unlink()
    arrived = []
    resumed = run_ray_sweep(str(model_folder), config, tmp_path / "local", data_dir=data_dir,
                            on_point=arrived.append)
    assert fresh_points(tmp_path / "local") == missing
    assert len(arrived) == 3 and load_run(tmp_path / "local").status == "done"
    same_rows(resumed, expected)


def test_a_killed_worker_is_retried_and_a_failing_point_recorded(ray_instance, model_folder, data_dir, tmp_path):
    config = small_config()
    points = config.points()
    retried, doomed = point_key(points[0]), point_key(points[1])
    with WorkerKiller(retried, times=1) as once, WorkerKiller(doomed, times=2) as always:
        table = run_ray_sweep(str(model_folder), config, tmp_path / "run", data_dir=data_dir, max_retries=1)
    assert len(once.killed) == 1 and len(always.killed) == 2  # real deaths: first attempt; both attempts
    assert sorted(table["key"]) == sorted(["dense", *(point_key(p) for p in points if point_key(p) != doomed)])
    assert list(table.attrs["failed"]) == [doomed]
    run = load_run(tmp_path / "run")
    assert run.status == "failed" and doomed in run.meta["error"]
    assert "died" in run.meta["failed_points"][doomed].lower() or "crash" in run.meta["failed_points"][doomed].lower()
    assert len(run.points()) == 2

    table = run_ray_sweep(str(model_folder), config, tmp_path / "run", data_dir=data_dir)
    assert fresh_points(tmp_path / "run") == [doomed]
    assert len(table) == 3 and load_run(tmp_path / "run").status == "done"


def test_stop_cancels_outstanding_tasks(ray_instance, model_folder, data_dir, tmp_path):
    rows = []
    table = run_ray_sweep(str(model_folder), small_config(sparsities=(0.3, 0.7)), tmp_path / "run",
                          data_dir=data_dir, on_point=rows.append, should_stop=lambda: len(rows) >= 1)
    run = load_run(tmp_path / "run")
    assert run.status == "stopped" and 1 <= len(table) < 5 and len(run.points()) == len(table)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _sweep_workers():
        time.sleep(0.2)
    assert _sweep_workers() == []


def _sweep_workers() -> list[int]:
    return [pid for pid, title in our_ray_processes() if title.startswith("ray::sweep ")]



def test_cli_and_workflow_run_on_ray(ray_instance, model_folder, data_dir, tmp_path, capsys):
    from workbench import workflow
    from workbench.cli import main as cli_main

    code = cli_main(["sweep", "--model", str(model_folder), "--backend", "ray", "--methods", "magnitude",
                     "--sparsities", "0.5", "--patterns", "", "--tasks", "wikitext2", "--windows", "2",
                     "--eval-seqlen", "32", "--nsamples", "4", "--seqlen", "16", "--data-dir", str(data_dir),
                     "--out", str(tmp_path / "cli"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "done" and len(result["rows"]) == 2 and result["failed"] == {}

    session = workflow.Session()
    workflow.load(session, str(model_folder))
    tables = []
    table = workflow.run_sweep(session, ["wanda"], [0.5], eval_tasks=("wikitext2",), limit=2,
                               run_dir=tmp_path / "app", on_point=tables.append, backend="ray",
                               eval_seqlen=32, nsamples=4, seqlen=16)
    assert [len(t) for t in tables] == [1, 2] and len(table) == 2
    assert load_run(tmp_path / "app").meta["execution"]["backend"] == "ray"


def test_notebook_panel_sweeps_on_ray(ray_instance, model_folder):
    pytest.importorskip("ipywidgets")
    from workbench.ui.widgets import Workbench

    wb = Workbench(str(model_folder), method="magnitude", pattern="unstructured", nsamples=4, seqlen=16,
                   eval_tasks=("wikitext2",), eval_limit=2, background=False, show=False)
    wb.sweep_methods.value = ("magnitude",)
    wb.sweep_sparsities.value = "0.5"
    wb.sweep_backend.value = "ray"
    table = wb.sweep(wait=True)
    assert wb.error == "", wb.error
    assert list(table["method"]) == ["dense", "magnitude"]
    assert table.attrs["failed"] == {}  # set by the Ray backend only
