"""SparseGPT per-layer solve speed against a plain matmul, before and after, in one run.

    git show HEAD~N:workbench/methods/sparsegpt.py > /tmp/old_sparsegpt.py   # the version to beat
    .venv/bin/python bench/solve_bench.py --old /tmp/old_sparsegpt.py

Shapes are the bundled SmolLM2-135M's linears (out x in): 576x576 (q, o), 1536x576 (gate, up),
576x1536 (down), at lazy blocksize 128. A solve's nominal work is rows*cols^2 FLOPs for the OBS
updates plus 4/3*cols^3 for the inverse-Hessian factor (factor, invert, factor again); "shared"
is a linear whose factor a sibling already computed (k and v after q, up after gate), nominal
work rows*cols^2. The matmul rate is a (rows x cols) @ (cols x cols) product timed in the same
run, so the ratio holds on a busy machine even when the absolute figures do not.

Then layers fed one input (q/k/v 960x576, gate/up 3072x576) solved per layer against one stacked
solve, on one torch thread; and with `--e2e stacked,per-layer[,old]` SparseGPT on the bundled model
end to end (16 x 256 WikiText-2 tokens by default) against one dense forward over the same tokens,
timed before and after each prune in the same run:

    .venv/bin/python bench/solve_bench.py --skip-layers --e2e stacked,per-layer,old --old /tmp/old_sparsegpt.py
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.methods import sparsegpt as new_sparsegpt  # noqa: E402
from workbench.methods.sparsegpt import inverse_hessian_factor, sparsegpt_joint  # noqa: E402
from workbench.patterns import parse_pattern  # noqa: E402
from workbench.stats import InputStats  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536)]


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("old_sparsegpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sparsegpt


def layer(rows: int, cols: int, tokens: int = 4096) -> tuple[torch.Tensor, InputStats]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5
                                                  + torch.eye(cols))
    stats = InputStats(cols, gram=True)
    stats.add_batch(x)
    return torch.randn(rows, cols, generator=g), stats


def best_of(repeat: int, fn, *args) -> tuple[float, float]:
    """The shortest wall time and the shortest process CPU time of `repeat` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        started, cpu = time.perf_counter(), time.process_time()
        fn(*args)
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def solve(method, weight: torch.Tensor, stats: InputStats, pattern, blocksize: int,
          fresh: bool) -> None:
    if fresh:  # one more (zero) token changes the statistics, so no cached factor applies
        stats.add_batch(torch.zeros(1, stats.in_features))
    method(weight.clone(), stats, pattern, 0.5, blocksize=blocksize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="a previous sparsegpt.py to compare against")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--e2e", default="", help="also prune the bundled model end to end: 'stacked', "
                        "'stacked,per-layer' or 'stacked,per-layer,old' (the last needs --old)")
    parser.add_argument("--nsamples", type=int, default=16, help="end-to-end calibration windows (default 16)")
    parser.add_argument("--seqlen", type=int, default=256, help="end-to-end window length (default 256)")
    parser.add_argument("--skip-layers", action="store_true", help="skip the per-layer table")
    args = parser.parse_args()
    old = load_old(args.old) if args.old else None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"loadavg before: {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| shape (out x in) | pattern | matmul GFLOP/s | before ms (cpu) | before GFLOP/s | after ms (cpu) | "
          "after GFLOP/s | shared factor ms (cpu) | shared GFLOP/s | after / before, wall (cpu) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rows, cols in [] if args.skip_layers else SHAPES:
        weight, stats = layer(rows, cols)
        a, b = torch.randn(rows, cols), torch.randn(cols, cols)
        matmul_s, _ = best_of(max(args.repeat, 5), torch.matmul, a, b)
        matmul_rate = 2 * rows * cols * cols / matmul_s / 1e9
        nominal = rows * cols**2 + 4 / 3 * cols**3
        shared_nominal = rows * cols**2
        for name in args.patterns.split(","):
            pattern = parse_pattern(name)
            after = best_of(args.repeat, solve, new_sparsegpt, weight, stats, pattern, args.blocksize, True)
            inverse_hessian_factor(stats, 0.01)
            shared = best_of(args.repeat, solve, new_sparsegpt, weight, stats, pattern, args.blocksize, False)
            before_s, before_cpu = best_of(args.repeat, solve, old, weight, stats, pattern, args.blocksize, True) \
                if old else (float("nan"), float("nan"))
            (after_s, after_cpu), (shared_s, shared_cpu) = after, shared
            print(f"| {rows}x{cols} | {name} | {matmul_rate:.1f} | {before_s * 1e3:.0f} ({before_cpu * 1e3:.0f}) | "
                  f"{nominal / before_s / 1e9:.1f} | {after_s * 1e3:.0f} ({after_cpu * 1e3:.0f}) | "
                  f"{nominal / after_s / 1e9:.1f} | {shared_s * 1e3:.0f} ({shared_cpu * 1e3:.0f}) | "
                  f"{shared_nominal / shared_s / 1e9:.1f} | {before_s / after_s:.2f}x "
                  f"({before_cpu / after_cpu:.2f}x) |", flush=True)
    print(f"loadavg after: {Path('/proc/loadavg').read_text().split()[:3]}")
    if old is None:
        print("(no --old given: the 'before' columns are empty)")
    joint_table(args)
    if args.e2e:
        end_to_end(args, old)


# Layers of the bundled model fed one input: (out widths, in width).
GROUPS = {"q/k/v": ([576, 192, 192], 576), "gate/up": ([1536, 1536], 576)}


def solve_per_layer(weights, stats: InputStats, pattern, blocksize: int) -> None:
    stats.add_batch(torch.zeros(1, stats.in_features))  # a fresh factor for the first layer only
    for w in weights:
        new_sparsegpt(w.clone(), stats, pattern, 0.5, blocksize=blocksize)


def solve_stacked(weights, stats: InputStats, pattern, blocksize: int) -> None:
    stats.add_batch(torch.zeros(1, stats.in_features))
    sparsegpt_joint([w.clone() for w in weights], stats, pattern, 0.5, blocksize=blocksize)


def joint_table(args) -> None:
    """Per-layer solves (the first computes the factor, its siblings reuse it: the previous
    driver) against one stacked solve of the group, and both against a plain matmul of the
    stacked shape, all on one torch thread (as the driver's concurrent solves run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\nStacked vs per-layer solve, one torch thread, loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| group (out x in) | pattern | matmul GFLOP/s | per-layer ms (cpu) | stacked ms (cpu) | "
          "stacked GFLOP/s (cpu) | stacked / matmul rate | per-layer / stacked, wall (cpu) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    try:
        for name, (widths, cols) in GROUPS.items():
            _, stats = layer(8, cols)
            g = torch.Generator().manual_seed(1)
            weights = [torch.randn(rows, cols, generator=g) for rows in widths]
            rows = sum(widths)
            a, b = torch.randn(rows, cols), torch.randn(cols, cols)
            matmul_s, matmul_cpu = best_of(max(args.repeat, 5), torch.matmul, a, b)
            matmul_rate = 2 * rows * cols * cols / matmul_cpu / 1e9
            nominal = 2 * (rows * cols**2 + 2 / 3 * cols**3)  # multiply-adds x 2, as the matmul's
            for pattern_name in args.patterns.split(","):
                pattern = parse_pattern(pattern_name)
                per_s, per_cpu = best_of(args.repeat, solve_per_layer, weights, stats, pattern, args.blocksize)
                joint_s, joint_cpu = best_of(args.repeat, solve_stacked, weights, stats, pattern, args.blocksize)
                print(f"| {name} {rows}x{cols} | {pattern_name} | {matmul_rate:.1f} | {per_s * 1e3:.0f} "
                      f"({per_cpu * 1e3:.0f}) | {joint_s * 1e3:.0f} ({joint_cpu * 1e3:.0f}) | "
                      f"{nominal / joint_s / 1e9:.1f} ({nominal / joint_cpu / 1e9:.1f}) | "
                      f"{nominal / joint_cpu / 1e9 / matmul_rate:.2f} | {per_s / joint_s:.2f}x "
                      f"({per_cpu / joint_cpu:.2f}x) |", flush=True)
    finally:
        torch.set_num_threads(threads)
    print("(GFLOP/s: 2 x (rows x cols^2 + 2/3 cols^3) per stacked solve; matmul: the stacked rows x "
          "cols @ cols x cols, in CPU time)")


def end_to_end(args, old) -> None:
    """SparseGPT on the bundled model from a 16 x 256 WikiText-2 calibration, against one dense
    forward (logits included) over the same tokens, timed before and after the prunes."""
    import dataclasses
    import logging

    from workbench.data import load_calibration
    from workbench.methods import METHODS
    from workbench.models import load_model
    from workbench.prune import PruneConfig, prune

    logging.disable(logging.WARNING)
    loaded = load_model("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    data = load_calibration(tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    def forward() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, data.ids.shape[0], 8):
                model(input_ids=data.ids[start:start + 8], use_cache=False)
        return time.perf_counter() - started

    record = METHODS["sparsegpt"]
    modes = {"stacked + concurrent": record}
    if "per-layer" in args.e2e:
        modes["per-layer (this solve, sequential)"] = dataclasses.replace(
            record, prune=lambda *a, **k: new_sparsegpt(*a, **k))  # no solve_joint: one layer at a time
    if old is not None and "old" in args.e2e:
        modes["previous solve (--old), per-layer"] = dataclasses.replace(record, prune=old)
    print(f"\nEnd to end, {args.nsamples} x {args.seqlen} WikiText-2 tokens, threads {torch.get_num_threads()}, "
          f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
    forwards = [forward()]
    print(f"dense forward: {forwards[0]:.1f} s", flush=True)
    rows = []
    for pattern_name in args.patterns.split(","):
        for mode, replacement in modes.items():
            METHODS["sparsegpt"] = replacement
            try:
                config = PruneConfig(method="sparsegpt", pattern=pattern_name, sparsity=0.5,
                                     nsamples=args.nsamples, seqlen=args.seqlen)
                started = time.perf_counter()
                result = prune(model, config, calibration=data)
                seconds = time.perf_counter() - started
            finally:
                METHODS["sparsegpt"] = record
                model.load_state_dict(dense)
            split = result.timings[["stats_s", "solve_s", "rerun_s"]].sum()
            forwards.append(forward())
            rows.append((pattern_name, mode, seconds, split, forwards[-2], forwards[-1]))
            print(f"| {pattern_name} | {mode} | {seconds:.1f} | {split.stats_s:.1f} / {split.solve_s:.1f} / "
                  f"{split.rerun_s:.1f} | {forwards[-2]:.1f}, {forwards[-1]:.1f} | "
                  f"{seconds / ((forwards[-2] + forwards[-1]) / 2):.2f}x | "
                  f"{Path('/proc/loadavg').read_text().split()[0]} |", flush=True)
    print("(columns: pattern | solve | prune s | stats / solve / re-run s | dense forward s before, after "
          "| prune / mean dense forward | loadavg)")


if __name__ == "__main__":
    main()
