"""Sweep benchmark on the bundled model: accuracy-vs-sparsity curve, heatmaps, uniform vs OWL,
and the cost of a 5-point sweep against 5 separate prunes.

    python bench/sweep_bench.py [--out runs/bench-sweep] [--figures docs/figures]
                                [--stages owl,cost,curve] [--minutes 70]

Sizes are flags (defaults: calibration 8 x 256 WikiText-2 windows; per point 16 LAMBADA
passages and 4 WikiText-2 windows of 256 tokens). All sweeps run in fast mode on one set of
dense statistics. Every stage runs into a run folder under --out, so an interrupted benchmark
resumes where it stopped; --minutes stops the curve (last stage) early, resumable. The cost
stage measures each ingredient once and sums them (see stage_cost). Results land in
<out>/bench.json; figures (PNG) in --figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import plots  # noqa: E402
from workbench.allocation import block_weights, outlier_ratios, owl_allocation
from workbench.data import load_calibration
from workbench.models import load_model
from workbench.prune import PruneConfig, collect_dense_stats, prune
from workbench.runs import load_run, write_json
from workbench.sweep import SweepConfig, restore_weights, run_sweep, snapshot_weights, summarize

log = logging.getLogger("sweep_bench")


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=72, bbox_inches="tight")
    log.info("wrote %s", path)


def _config(args, **fields) -> SweepConfig:
    return SweepConfig(nsamples=args.nsamples, seqlen=args.seqlen, tasks=("lambada", "wikitext2"),
                       limit=args.lambada, ppl_windows=args.windows, eval_seqlen=args.eval_seqlen,
                       mode="fast", record_error=False, **fields)


class Context:
    def __init__(self, args):
        self.args = args
        self.lm = load_model("default")
        self.calibration = load_calibration(self.lm.tokenizer, nsamples=args.nsamples,
                                            seqlen=args.seqlen)
        self._cache = None
        self.stats_seconds = float("nan")
        self.deadline = time.monotonic() + 60 * args.minutes

    @property
    def cache(self):
        if self._cache is None:
            started = time.perf_counter()
            self._cache = collect_dense_stats(self.lm.model, PruneConfig(method="sparsegpt"),
                                              calibration=self.calibration, gram=True)
            self.stats_seconds = time.perf_counter() - started
            log.info("dense statistics: %.1f s", self.stats_seconds)
        return self._cache

    def dense_row(self, out: Path):
        for name in ("owl", "curve"):
            if (out / name / "run.json").is_file():
                row = load_run(out / name).points().get("dense")
                if row is not None:
                    return row
        return None

    def sweep(self, name: str, config: SweepConfig, out: Path, **kwargs):
        return run_sweep(self.lm.model, self.lm.tokenizer, config, run_dir=out / name,
                         model_name="default", calibration=self.calibration, cache=self.cache,
                         dense_row=self.dense_row(out),
                         on_point=lambda row: log.info("point %s", row["key"]), **kwargs)


def stage_owl(ctx: Context, out: Path, figures: Path, report: dict) -> None:
    started = time.perf_counter()
    table = ctx.sweep("owl", _config(ctx.args, methods=("wanda",), sparsities=(0.5, 0.6),
                                     extra_patterns=(), allocation="owl"), out)
    report["owl"] = {"seconds": time.perf_counter() - started,
                     "rows": summarize(table).to_dict(orient="records")}
    sparsity = pd.read_csv(out / "owl" / "sparsity-wanda-unstructured-0.6000-owl.csv")
    _save(plots.sparsity_heatmap(sparsity, title="Wanda 60% with OWL allocation"),
          figures / "heatmap_wanda_owl_60.png")
    ratios = outlier_ratios(ctx.lm.model, ctx.cache)
    weights = block_weights(ctx.lm.model)
    view = pd.DataFrame({"block": range(len(ratios)), "outlier ratio (%)": [100 * r for r in ratios],
                         "OWL sparsity @50%": owl_allocation(ratios, 0.5, weights=weights),
                         "OWL sparsity @60%": owl_allocation(ratios, 0.6, weights=weights)})
    report["owl"]["allocation"] = view.to_dict(orient="list")
    _save(plots.sensitivity_heatmap(view, title="OWL: outlier ratio and allocated sparsity per "
                                    "block"), figures / "owl_allocation.png")


def stage_curve(ctx: Context, out: Path, figures: Path, report: dict) -> None:
    # uniform Wanda 50% and 60% first: they are OWL's baselines
    config = _config(ctx.args, methods=("wanda", "sparsegpt", "magnitude"),
                     sparsities=(0.5, 0.6, 0.7, 0.3, 0.1), extra_patterns=("2:4",))
    started = time.perf_counter()
    table = ctx.sweep("curve", config, out, should_stop=lambda: time.monotonic() > ctx.deadline)
    report["curve"] = {"config": config.to_dict(), "seconds": time.perf_counter() - started,
                       "status": load_run(out / "curve").status,
                       "rows": summarize(table).to_dict(orient="records")}
    _save(plots.accuracy_curve(table, title="SmolLM2-135M-Instruct, fast mode"),
          figures / "sweep_curve.png")
    for key in ("sparsegpt-2_4-0.5000-uniform", "wanda-2_4-0.5000-uniform"):
        path = out / "curve" / f"sparsity-{key}.csv"
        if path.is_file():
            _save(plots.sparsity_heatmap(pd.read_csv(path), title=f"{key.split('-')[0]} 2:4, "
                                         "counted sparsity"), figures / "heatmap_2-4.png")
            break


def stage_cost(ctx: Context, out: Path, figures: Path, report: dict) -> None:
    """What a 5-point Wanda sweep costs against 5 separate (load + calibrate + prune) runs.

    Each ingredient is measured once on this machine (a fresh load, a calibration load, one exact
    prune with its per-block timings, the dense statistics pass, one fast-mode point, one weight
    restore); the 5-point totals are sums of these measured parts. Running the five prunes
    three times over was out of reach on the oversubscribed machine (see the section's note).
    """
    args = ctx.args
    model = ctx.lm.model
    n = 5
    parts: dict = {"nsamples": args.nsamples, "seqlen": args.seqlen, "points": n}

    started = time.perf_counter()
    loaded = load_model("default")
    parts["load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    load_calibration(loaded.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    parts["calibrate_s"] = time.perf_counter() - started
    del loaded

    snapshot = snapshot_weights(model)
    config = PruneConfig(method="wanda", sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen,
                         record_error=False)
    exact = prune(model, config, calibration=ctx.calibration)
    timings = exact.timings[["stats_s", "solve_s", "rerun_s"]].sum()
    parts["exact_prune_s"] = exact.seconds
    parts.update({f"exact_{k}": float(v) for k, v in timings.items()})
    parts["capture_s"] = exact.seconds - float(timings.sum())
    started = time.perf_counter()
    restore_weights(model, snapshot)
    parts["restore_s"] = time.perf_counter() - started

    cache = ctx.cache
    parts["dense_stats_s"] = ctx.stats_seconds
    fast = prune(model, config, calibration=ctx.calibration, cache=cache)
    parts["fast_point_s"] = fast.seconds
    restore_weights(model, snapshot)

    load, calib = parts["load_s"], parts["calibrate_s"]
    separate = n * (load + calib + parts["exact_prune_s"])
    exact_sweep = (load + calib + parts["capture_s"]
                   + n * (parts["exact_prune_s"] - parts["capture_s"] + parts["restore_s"]))
    fast_sweep = load + calib + parts["dense_stats_s"] + n * (parts["fast_point_s"] + parts["restore_s"])
    parts.update(separate_s=separate, sweep_exact_s=exact_sweep, sweep_fast_s=fast_sweep,
                 ratio_exact=exact_sweep / separate, ratio_fast=fast_sweep / separate)
    log.info("cost: %s", parts)
    report["cost"] = parts


def stage_cost_fast(ctx: Context, out: Path, figures: Path, report: dict) -> None:
    """Re-measure only the fast-mode point of the cost stage and recompute the totals."""
    parts = report["cost"]
    model = ctx.lm.model
    snapshot = snapshot_weights(model)
    config = PruneConfig(method="wanda", sparsity=0.5, nsamples=ctx.args.nsamples,
                         seqlen=ctx.args.seqlen, record_error=False)
    parts["fast_point_s"] = prune(model, config, calibration=ctx.calibration,
                                  cache=ctx.cache).seconds
    restore_weights(model, snapshot)
    if ctx.stats_seconds == ctx.stats_seconds:  # measured again in this process
        parts["dense_stats_s"] = ctx.stats_seconds
    n, load, calib = parts["points"], parts["load_s"], parts["calibrate_s"]
    parts["sweep_fast_s"] = load + calib + parts["dense_stats_s"] + n * (parts["fast_point_s"]
                                                                         + parts["restore_s"])
    parts["ratio_fast"] = parts["sweep_fast_s"] / parts["separate_s"]
    log.info("cost: %s", parts)


def stage_cost_timed(ctx: Context, out: Path, figures: Path, report: dict) -> None:
    """The whole 5-point cost, run for real three ways in one process, evaluation left out (it
    is the same work whichever way the points are pruned): 5 separate runs (load the model, load
    the calibration, exact prune), then one sweep in exact mode and one in fast mode (each
    including its own model and calibration load)."""
    args = ctx.args
    sparsities = (0.1, 0.3, 0.5, 0.6, 0.7)
    no_eval = lambda _model: {}  # noqa: E731
    timings: dict = {"nsamples": args.nsamples, "seqlen": args.seqlen, "points": len(sparsities)}
    for method in args.cost_methods.split(","):
        row: dict = {}
        started = time.perf_counter()
        for target in sparsities:
            loaded = load_model("default")
            calibration = load_calibration(loaded.tokenizer, nsamples=args.nsamples,
                                           seqlen=args.seqlen)
            prune(loaded.model, PruneConfig(method=method, sparsity=target, nsamples=args.nsamples,
                                            seqlen=args.seqlen, record_error=False),
                  calibration=calibration)
            del loaded
        row["separate_s"] = time.perf_counter() - started
        for mode in ("exact", "fast"):
            started = time.perf_counter()
            loaded = load_model("default")
            calibration = load_calibration(loaded.tokenizer, nsamples=args.nsamples,
                                           seqlen=args.seqlen)
            config = SweepConfig(methods=(method,), sparsities=sparsities, extra_patterns=(),
                                 nsamples=args.nsamples, seqlen=args.seqlen, mode=mode,
                                 record_error=False)
            run_sweep(loaded.model, loaded.tokenizer, config, evaluate_fn=no_eval,
                      calibration=calibration)
            row[f"sweep_{mode}_s"] = time.perf_counter() - started
            row[f"ratio_{mode}"] = row[f"sweep_{mode}_s"] / row["separate_s"]
            del loaded
        log.info("cost (%s): %s", method, row)
        timings[method] = row
    report["cost_timed"] = timings


STAGES = {"owl": stage_owl, "curve": stage_curve, "cost": stage_cost, "cost_fast": stage_cost_fast,
          "cost_timed": stage_cost_timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sweep"))
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument("--stages", default="owl,cost,curve")
    parser.add_argument("--minutes", type=float, default=70.0,
                        help="stop the curve this many minutes after the start")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lambada", type=int, default=16, help="LAMBADA passages per point")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 windows per point")
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--cost-methods", default="wanda",
                        help="methods timed by the cost_timed stage, comma-separated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "bench.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    ctx = Context(args)
    for name in args.stages.split(","):
        log.info("stage %s", name)
        STAGES[name](ctx, args.out, args.figures, report)
        write_json(report_path, report)
    print(json.dumps(report, indent=1, default=str)[:4000])


if __name__ == "__main__":
    main()
