"""SparseGPT's solve speed against a plain matmul, before and after, in one run.

    git show HEAD~N:workbench/methods/sparsegpt.py > /tmp/old_sparsegpt.py   # the version to beat
    .venv/bin/python bench/solve_bench.py --old /tmp/old_sparsegpt.py
    .venv/bin/python bench/solve_bench.py --skip-groups --e2e        # the bundled model end to end

For a before/after of everything (the factor included), copy this script into a worktree of the
older commit and run it there: it imports the `workbench` package next to it.

Each group of a bundled SmolLM2-135M block (layers fed one input, solved as one stacked matrix):
q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536 (out x in), lazy blocksize 128, on one
torch thread as the driver's side-by-side solves run, the inverse-Hessian factor included. A
solve's nominal work is 2 x (rows x cols^2 + 2/3 cols^3) FLOPs (the OBS updates, and the
factor as the reference computes it); the matmul rate is a (rows x cols) @ (cols x cols)
product timed in the same run, so the ratio holds on a busy machine even when the absolute
figures do not. A second table times one block's four groups solved one after another on one
thread against side by side on two, as the driver runs them on CPU.

With `--e2e`, SparseGPT prunes the bundled model end to end (16 x 256 WikiText-2 tokens by
default) against one dense forward over the same tokens, timed before and after each prune. For
a before/after pair, run the same command with PYTHONPATH set to a worktree of the older commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.methods.sparsegpt import sparsegpt_joint  # noqa: E402
from workbench.patterns import parse_pattern  # noqa: E402
from workbench.stats import InputStats  # noqa: E402


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("old_sparsegpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="a previous sparsegpt.py to compare against")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--e2e", action="store_true", help="also prune the bundled model end to end")
    parser.add_argument("--nsamples", type=int, default=16, help="end-to-end calibration windows (default 16)")
    parser.add_argument("--seqlen", type=int, default=256, help="end-to-end window length (default 256)")
    parser.add_argument("--skip-groups", action="store_true", help="skip the stacked-solve table")
    args = parser.parse_args()
    old = load_old(args.old) if args.old else None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"loadavg before: {Path('/proc/loadavg').read_text().split()[:3]}")
    if not args.skip_groups:
        joint_table(args, old.sparsegpt_joint if old is not None else None)
        block_table(args)
    if args.e2e:
        end_to_end(args)



# Layers of the bundled model fed one input: (out widths, in width).
GROUPS = {"q/k/v": ([576, 192, 192], 576), "o": ([576], 576), "gate/up": ([1536, 1536], 576),
          "down": ([576], 1536)}


def solve_stacked(joint, weights, stats: InputStats, pattern, blocksize: int) -> None:
    stats.add_batch(torch.zeros(1, stats.in_features))  # changed statistics: a fresh factor
    joint([w.clone() for w in weights], stats, pattern, 0.5, blocksize=blocksize)


def joint_table(args, old_joint) -> None:
    """Each group of a block (layers fed one input) solved as one stacked matrix, the factor
    included, on one torch thread (as the driver's concurrent solves run): this solve against
    `--old`'s, and against a plain matmul of the stacked shape in the same run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\nStacked solves, one torch thread, loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| group (out x in) | pattern | matmul GFLOP/s (cpu) | before ms (cpu) | after ms (cpu) | "
          "after GFLOP/s (cpu) | after / matmul rate | before / after, wall (cpu) |")
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
                after_s, after_cpu = best_of(args.repeat, solve_stacked, sparsegpt_joint, weights, stats,
                                             pattern, args.blocksize)
                before_s, before_cpu = best_of(args.repeat, solve_stacked, old_joint, weights, stats, pattern,
                                               args.blocksize) if old_joint else (float("nan"), float("nan"))
                print(f"| {name} {rows}x{cols} | {pattern_name} | {matmul_rate:.1f} | {before_s * 1e3:.0f} "
                      f"({before_cpu * 1e3:.0f}) | {after_s * 1e3:.0f} ({after_cpu * 1e3:.0f}) | "
                      f"{nominal / after_s / 1e9:.1f} ({nominal / after_cpu / 1e9:.1f}) | "
                      f"{nominal / after_cpu / 1e9 / matmul_rate:.2f} | {before_s / after_s:.2f}x "
                      f"({before_cpu / after_cpu:.2f}x) |", flush=True)
    finally:
        torch.set_num_threads(threads)


def solve_serially(groups, pattern, blocksize: int) -> None:
    for weights, stats in groups:
        solve_stacked(sparsegpt_joint, weights, stats, pattern, blocksize)


def solve_side_by_side(groups, pattern, blocksize: int) -> None:
    with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = [pool.submit(solve_stacked, sparsegpt_joint, weights, stats, pattern, blocksize)
                   for weights, stats in groups]
        for future in futures:
            future.result()


def block_table(args) -> None:
    """A block's four groups solved one after another on one thread, and side by side on two
    threads of one torch thread each, largest first, as the driver solves them on CPU. With
    work that releases the GIL the ratio approaches 2; Python-dispatched small ops queue on it."""
    groups = []
    g = torch.Generator().manual_seed(2)
    for widths, cols in GROUPS.values():
        _, stats = layer(8, cols)
        groups.append(([torch.randn(rows, cols, generator=g) for rows in widths], stats))
    groups.sort(key=lambda group: -(group[1].in_features ** 3 + sum(w.shape[0] for w in group[0])
                                    * group[1].in_features ** 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\nOne block's groups, serial (1 thread) vs side by side (2 threads), loadavg "
          f"{Path('/proc/loadavg').read_text().split()[:3]}")
    print("| pattern | serial ms | side by side ms | serial / side by side |")
    print("|---|---:|---:|---:|")
    try:
        for pattern_name in args.patterns.split(","):
            pattern = parse_pattern(pattern_name)

            serial_s, _ = best_of(args.repeat, solve_serially, groups, pattern, args.blocksize)
            side_s, _ = best_of(args.repeat, solve_side_by_side, groups, pattern, args.blocksize)
            print(f"| {pattern_name} | {serial_s * 1e3:.0f} | {side_s * 1e3:.0f} | {serial_s / side_s:.2f}x |",
                  flush=True)
    finally:
        torch.set_num_threads(threads)


def end_to_end(args) -> None:
    """SparseGPT on the bundled model from a 16 x 256 WikiText-2 calibration, against one dense
    forward (logits included) over the same tokens, timed before and after each prune."""
    import logging

    from workbench.data import load_calibration
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

    print(f"\nEnd to end, {args.nsamples} x {args.seqlen} WikiText-2 tokens, threads {torch.get_num_threads()}, "
          f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| pattern | prune s | stats / solve / re-run s | dense forward s (before, after) | prune / forward | "
          "loadavg |")
    print("|---|---:|---|---|---:|---:|")
    forwards = [forward()]
    for pattern_name in args.patterns.split(","):
        config = PruneConfig(method="sparsegpt", pattern=pattern_name, sparsity=0.5,
                             nsamples=args.nsamples, seqlen=args.seqlen)
        started = time.perf_counter()
        result = prune(model, config, calibration=data)
        seconds = time.perf_counter() - started
        model.load_state_dict(dense)
        split = result.timings[["stats_s", "solve_s", "rerun_s"]].sum()
        forwards.append(forward())
        print(f"| {pattern_name} | {seconds:.1f} | {split.stats_s:.1f} / {split.solve_s:.1f} / "
              f"{split.rerun_s:.1f} | {forwards[-2]:.1f}, {forwards[-1]:.1f} | "
              f"{seconds / ((forwards[-2] + forwards[-1]) / 2):.2f}x | "
              f"{Path('/proc/loadavg').read_text().split()[0]} |", flush=True)


if __name__ == "__main__":
    main()
