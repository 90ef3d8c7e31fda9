"""Prune the bundled model with every method x pattern and measure quality, time and memory.

    python bench/prune_bench.py --out /tmp/prune_bench.jsonl           # all runs, then the table
    python bench/prune_bench.py --runs sparsegpt:2:4 --nsamples 8 --windows 8 --lambada 0
    python bench/prune_bench.py --report /tmp/prune_bench.jsonl        # the markdown table only

Calibration: `load_calibration(tok, "wikitext2", nsamples, seqlen, seed=0)` (WikiText-2
validation; default 64 x 512). Evaluation: the first `--windows` non-overlapping 512-token windows
of WikiText-2 test (perplexity; default 40) and the first `--lambada` LAMBADA (OpenAI) passages
(last-word accuracy; default 500, 0 skips it). Each result is appended to the JSONL file as soon as
it exists, so an interrupted run keeps what it finished. `--save-calibration PATH` writes the
calibration ids for `bench/llmcompressor_prune.py`; `--external NAME=STATE_DICT` evaluates a
model pruned elsewhere on the same subsets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.data import load_calibration, load_lambada, load_wikitext2_test
from workbench.evaluate import lambada_last_word, perplexity
from workbench.models import load_model
from workbench.prune import PruneConfig, prune

log = logging.getLogger("prune_bench")

RUNS = ["dense", "magnitude:unstructured", "wanda:unstructured", "sparsegpt:unstructured",
        "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4"]


class PeakRSS:
    """Highest resident set size of this process while the block runs, sampled every 20 ms."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process(os.getpid())

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def matmul_gflops(size: int = 2048, seconds: float = 3.0) -> float:
    """Plain fp32 matmul rate of this machine right now (a baseline for the solve's FLOP rate)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - start) / 1e9


def sparsegpt_solve_flops(shapes: list[tuple[int, int]], blocksize: int, record_error: bool) -> float:
    """Multiply-adds x 2 of SparseGPT's per-layer solve for (rows, cols) weights.

    Inverse-Hessian Cholesky chain ~ (1/3 + 1 + 1/3) c^3; lazy-block updates ~ r c^2 (across
    blocks) + r c B (inside blocks); the driver's output-error check adds 2 r c^2 x 2.
    """
    total = 0.0
    for rows, cols in shapes:
        total += (5 / 3) * cols**3 + 2 * rows * cols * (cols + blocksize) / 2
        if record_error:
            total += 4 * rows * cols**2
    return total


def evaluate_subsets(model, tokenizer, wikitext: str, lambada: list[str], windows: int) -> dict:
    row: dict = {"eval_s": 0.0}
    if windows:  # --windows 0 skips it
        ppl = perplexity(model, tokenizer, wikitext, seqlen=512, batch_size=8, limit=windows)
        row.update(wikitext2_ppl=ppl["perplexity"], wikitext2_windows=ppl["windows"], eval_s=ppl["seconds"])
    if lambada:  # --lambada 0 skips it
        lam = lambada_last_word(model, tokenizer, lambada, batch_size=16)
        row.update(lambada_acc=lam["accuracy"], lambada_n=lam["n"], eval_s=row["eval_s"] + lam["seconds"])
    return row


def run_one(run: str, calibration, wikitext: str, lambada: list[str], model_source: str,
            record_error: bool, windows: int, batch_size: int = 8) -> dict:
    loaded = load_model(model_source)
    model, tokenizer = loaded.model, loaded.tokenizer
    label = run if batch_size == 8 else f"{run} (calibration batch {batch_size})"
    row: dict = {"run": label, "threads": torch.get_num_threads(), "batch_size": batch_size}
    if run != "dense":
        method, pattern = run.split(":", 1)
        config = PruneConfig(method=method, pattern=pattern, sparsity=0.5, record_error=record_error,
                             batch_size=batch_size)
        cpu_before = time.process_time()
        with PeakRSS() as rss:
            result = prune(model, config, calibration=calibration)
        row["cpu_s"] = time.process_time() - cpu_before
        row["loadavg"] = os.getloadavg()[0]
        timings = result.timings
        shapes = [(int(r.rows), int(r.cols)) for r in result.sparsity.itertuples()]
        row.update({
            "method": method, "pattern": pattern, "record_error": record_error,
            "prune_s": result.seconds, "peak_rss_gib": rss.peak / 2**30,
            "stats_s": float(timings["stats_s"].sum()), "solve_s": float(timings["solve_s"].sum()),
            "rerun_s": float(timings["rerun_s"].sum()),
            "capture_s": result.seconds - float(timings[["stats_s", "solve_s", "rerun_s"]].sum().sum()),
            "sparsity_blocks": result.summary["blocks"], "sparsity_mlp": result.summary["mlp"],
            "sparsity_matmul": result.summary["matmul"],
            "mean_layer_error": float(result.errors["error"].mean()),
        })
        if method == "sparsegpt":
            row["solve_gflop"] = sparsegpt_solve_flops(shapes, config.blocksize, record_error) / 1e9
            row["solve_gflops_rate"] = row["solve_gflop"] / row["solve_s"]
        del result
    row.update(evaluate_subsets(model, tokenizer, wikitext, lambada, windows))
    return row


def run_external(name: str, state_dict_path: Path, wikitext: str, lambada: list[str],
                 model_source: str, windows: int) -> dict:
    """Evaluate a state dict pruned elsewhere (bench/llmcompressor_prune.py) exactly like ours."""
    from workbench.sparsity import sparsity_summary

    loaded = load_model(model_source)
    state = torch.load(state_dict_path)
    missing, unexpected = loaded.model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(f"{state_dict_path}: missing {missing}, unexpected {unexpected}")
    summary = sparsity_summary(loaded.model)
    row = {"run": name, "sparsity_blocks": summary["blocks"], "sparsity_mlp": summary["mlp"],
           "sparsity_matmul": summary["matmul"]}
    sidecar = Path(f"{state_dict_path}.json")
    if sidecar.is_file():
        row.update(json.loads(sidecar.read_text()))
    row.update(evaluate_subsets(loaded.model, loaded.tokenizer, wikitext, lambada, windows))
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| run | WikiText-2 ppl | LAMBADA acc | counted sparsity (blocks) | "
            "prune s (wall) | prune s (CPU) | stats s | solve s | re-run s | peak RSS GiB | load avg |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]

    def fmt(row, key, spec):
        return format(row[key], spec) if key in row and row[key] is not None else "-"

    for row in rows:
        lines.append("| " + " | ".join([
            row["run"], fmt(row, "wikitext2_ppl", ".2f"), fmt(row, "lambada_acc", ".3f"),
            fmt(row, "sparsity_blocks", ".4f"), fmt(row, "prune_s", ".0f"), fmt(row, "cpu_s", ".0f"),
            fmt(row, "stats_s", ".0f"), fmt(row, "solve_s", ".1f"), fmt(row, "rerun_s", ".0f"),
            fmt(row, "peak_rss_gib", ".2f"), fmt(row, "loadavg", ".1f"),
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--out", type=Path, default=Path("/tmp/prune_bench.jsonl"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--no-record-error", action="store_true",
                        help="skip the per-layer output error (Wanda/magnitude then skip the Gram matrix)")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows of 512")
    parser.add_argument("--lambada", type=int, default=500, help="first N LAMBADA passages")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    parser.add_argument("--save-calibration", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="calibration windows per block forward (PruneConfig.batch_size)")
    parser.add_argument("--external", action="append", default=[],
                        help="NAME=STATE_DICT.pt pruned elsewhere, evaluated on the same subsets")
    parser.add_argument("--report", type=Path, default=None, help="print the table of a JSONL file and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.report:
        rows = [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
        print(markdown(rows))
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    calibration = load_calibration(loaded.tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen,
                                   seed=0)
    if args.save_calibration:
        torch.save({"input_ids": calibration.ids, "sha256": calibration.sha256}, args.save_calibration)
    wikitext, lambada = load_wikitext2_test(), (load_lambada(limit=args.lambada) if args.lambada else [])
    del loaded
    rate = matmul_gflops()
    log.info("fp32 2048x2048 matmul: %.1f GFLOP/s on %d threads", rate, torch.get_num_threads())
    jobs = [(run, None) for run in args.runs.split(",") if run]
    jobs += [tuple(item.split("=", 1)) for item in args.external]
    for run, external in jobs:
        started = time.perf_counter()
        if external:
            row = run_external(run, Path(external), wikitext, lambada, args.model, args.windows)
        else:
            row = run_one(run, calibration, wikitext, lambada, args.model, not args.no_record_error,
                          args.windows, args.batch_size)
        row["matmul_gflops_rate"] = rate
        row.update(calibration_sha256=calibration.sha256, nsamples=args.nsamples, seqlen=args.seqlen,
                   windows=args.windows, lambada_passages=args.lambada)
        row["total_s"] = time.perf_counter() - started
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info("%s", row)
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(markdown(rows))


if __name__ == "__main__":
    main()
