"""The same small sweep on the local backend and on Ray with 2 workers, on this machine.

    python bench/ray_sweep_bench.py [--out runs/bench-ray-sweep] [--model default] [--workers 2]

Model: the bundled SmolLM2-135M by default. Points: magnitude and Wanda at 50% and 2:4, plus the
dense baseline (5 evaluations, 4 prunes), exact mode. Sizes are flags (defaults: calibration
8 x 128 WikiText-2 windows; per point 16 LAMBADA passages and 2 WikiText-2 windows of 256 tokens).
Each backend runs into a fresh run folder under --out. The Ray instance is local (loopback,
--workers CPUs, one CPU per task), started here and timed separately. Per-task overhead is the
worker time not spent pruning or evaluating: (wall x workers - sum of prune_s + eval_s) / tasks;
it holds the worker start, the model and calibration loads in every task, scheduling, and any
time a worker waited for the cores. Results land in <out>/bench.json. The load average before
and after each stage is recorded: other work on the machine shows in every figure here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-only local Ray
# Ray's memory monitor kills workers when the node is nearly full, whoever filled it: on a shared
# machine that is other people's programs.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

import pandas as pd  # noqa: E402

from workbench.models import load_model  # noqa: E402
from workbench.runs import run_results  # noqa: E402
from workbench.sweep import SweepConfig, default_evaluator, run_sweep, summarize  # noqa: E402


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def compute_seconds(table) -> float:
    return float((table["prune_s"] + table["eval_s"]).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-ray-sweep")
    parser.add_argument("--model", default="default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lambada", type=int, default=16)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--backends", default="local,ray")
    args = parser.parse_args()

    out = Path(args.out)
    config = SweepConfig(methods=("magnitude", "wanda"), sparsities=(0.5,), extra_patterns=("2:4",),
                         nsamples=args.nsamples, seqlen=args.seqlen, tasks=("lambada", "wikitext2"),
                         limit=args.lambada, ppl_windows=args.windows, eval_seqlen=args.eval_seqlen,
                         record_error=False, address=None)
    report: dict = {"model": args.model, "workers": args.workers, "config": config.to_dict(),
                    "cpu_count": os.cpu_count()}
    tables = {}
    if "local" in args.backends:
        shutil.rmtree(out / "local", ignore_errors=True)
        report["local_loadavg_before"] = loadavg()
        started = time.perf_counter()
        loaded = load_model(args.model)
        load_s = time.perf_counter() - started
        table = run_sweep(loaded.model, loaded.tokenizer, config, run_dir=out / "local",
                          evaluate_fn=default_evaluator(loaded.tokenizer, config))
        wall = time.perf_counter() - started
        tables["local"] = table
        report["local"] = {"wall_s": wall, "load_s": load_s, "compute_s": compute_seconds(table),
                           "tasks": len(table), "loadavg_after": loadavg()}
        del loaded
    elif (out / "local" / "run.json").is_file():  # measured earlier: wall time from the run's own log
        import datetime as dt

        from workbench.runs import load_run

        run = load_run(out / "local")
        table = pd.DataFrame(run_results(run))
        stamps = [dt.datetime.fromisoformat(run.meta[k]) for k in ("created", "finished")]
        tables["local"] = table
        report["local"] = {"wall_s": (stamps[1] - stamps[0]).total_seconds(), "compute_s": compute_seconds(table),
                           "tasks": len(table), "from_run_folder": True}
    if "ray" in args.backends:
        import ray

        from workbench.ray_sweep import run_ray_sweep

        shutil.rmtree(out / "ray", ignore_errors=True)
        report["ray_loadavg_before"] = loadavg()
        started = time.perf_counter()
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False,
                 object_store_memory=200 * 1024**2, log_to_driver=False)
        init_s = time.perf_counter() - started
        started = time.perf_counter()
        table = run_ray_sweep(args.model, dataclasses.replace(config, backend="ray"), out / "ray")
        wall = time.perf_counter() - started
        ray.shutdown()
        tables["ray"] = table
        compute = compute_seconds(table)
        report["ray"] = {"init_s": init_s, "wall_s": wall, "compute_s": compute, "tasks": len(table),
                         "failed": table.attrs.get("failed", {}),
                         "overhead_per_task_s": (wall * args.workers - compute) / max(len(table), 1),
                         "loadavg_after": loadavg()}
    for name, table in tables.items():
        report[name]["rows"] = summarize(table).to_dict(orient="records")
        print(f"--- {name}")
        print(summarize(table).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("config",)}, default=str)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
