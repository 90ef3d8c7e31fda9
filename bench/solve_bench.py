"""SparseGPT per-layer solve speed against a plain matmul, before and after, in one run.

    git show HEAD~N:workbench/methods/sparsegpt.py > /tmp/old_sparsegpt.py   # the version to beat
    .venv/bin/python bench/solve_bench.py --old /tmp/old_sparsegpt.py

Shapes are the bundled SmolLM2-135M's linears (out x in): 576x576 (q, o), 1536x576 (gate, up),
576x1536 (down), at lazy blocksize 128. A solve's nominal work is rows*cols^2 FLOPs for the OBS
updates plus 4/3*cols^3 for the inverse-Hessian factor (factor, invert, factor again); "shared"
is a linear whose factor a sibling already computed (k and v after q, up after gate), nominal
work rows*cols^2. The matmul rate is a (rows x cols) @ (cols x cols) product timed in the same
run, so the ratio holds on a busy machine even when the absolute figures do not.
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
from workbench.methods.sparsegpt import inverse_hessian_factor  # noqa: E402
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
    args = parser.parse_args()
    old = load_old(args.old) if args.old else None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"loadavg before: {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| shape (out x in) | pattern | matmul GFLOP/s | before ms (cpu) | before GFLOP/s | after ms (cpu) | "
          "after GFLOP/s | shared factor ms (cpu) | shared GFLOP/s | after / before, wall (cpu) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rows, cols in SHAPES:
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


if __name__ == "__main__":
    main()
