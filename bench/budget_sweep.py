"""Budgeted sweep vs full sweep on the bundled model: items scored, seconds, and verdicts.

The full sweep scores every point on `--max-items` LAMBADA passages; the budgeted one starts at
`--first` and doubles only the points whose neighbours are not yet told apart, within
`--budget` items. Prints both tables, the items each used and whether any neighbour verdict
differs; one JSON line last.

    python bench/budget_sweep.py --max-items 200 --first 25 --budget 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.cli import emit_json  # noqa: E402


def _verdicts(outcome, lines):
    from workbench.intervals import paired_accuracy, paired_perplexity

    task, metric = outcome.metric.split("/")
    kind, paired = ("accuracy", paired_accuracy) if metric == "accuracy" else ("nll", paired_perplexity)
    verdicts = {}
    for line in lines:
        for a, b in zip(line, line[1:]):
            left, right = outcome.scores[a][task]["items"][kind], outcome.scores[b][task]["items"][kind]
            n = min(len(left), len(right))
            verdicts[f"{a} -> {b}"] = paired(left[:n], right[:n]).significant
    return verdicts


def _tiny_setup(args):
    """A random tiny Llama with the character tokenizer of the tests, scored on WikiText-2 windows."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer
    from tiny_models import tiny_model, token_batch

    from workbench.data import load_wikitext2_test, resolve_data_dir
    from workbench.evaluate import perplexity

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    text = load_wikitext2_test(resolve_data_dir(None))[: 64 * (args.max_items + 1) * 2]

    def evaluate_at(m, n):
        return {"wikitext2": perplexity(m, tokenizer, text, seqlen=64, limit=n)}

    return model, tokenizer, evaluate_at, token_batch(8, 16), ("wikitext2",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-items", type=int, default=200)
    parser.add_argument("--first", type=int, default=25)
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--sparsities", default="0.3,0.5,0.7")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model on WikiText-2 windows (seconds)")
    args = parser.parse_args()

    from workbench.budget import _lines, run_budgeted_sweep
    from workbench.data import load_calibration
    from workbench.models import load_model
    from workbench.sweep import SweepConfig

    sparsities = tuple(float(s) for s in args.sparsities.split(","))
    if args.tiny:
        model, tokenizer, evaluate_at, calibration, tasks = _tiny_setup(args)
        config = SweepConfig(methods=("magnitude",), sparsities=sparsities, extra_patterns=(), tasks=tasks,
                             limit=args.max_items, nsamples=8, seqlen=16, batch_size=4)
    else:
        loaded = load_model("default")
        model, tokenizer, evaluate_at = loaded.model, loaded.tokenizer, None
        config = SweepConfig(methods=("magnitude",), sparsities=sparsities, extra_patterns=(), tasks=("lambada",),
                             limit=args.max_items, nsamples=8, seqlen=128)
        calibration = load_calibration(tokenizer, "wikitext2", nsamples=8, seqlen=128)
    lines = _lines(config.points())
    report = {"loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    for name, first, budget in (("full", args.max_items, args.max_items * (len(config.points()) + 1)),
                                ("budgeted", args.first, args.budget)):
        started = time.perf_counter()
        outcome = run_budgeted_sweep(model, tokenizer, config, budget=budget, first=first,
                                     max_items=args.max_items, calibration=calibration, evaluate_at=evaluate_at)
        seconds = time.perf_counter() - started
        print(f"== {name}: {outcome.items_used} items, {seconds:.0f} s")
        shown = ["key", outcome.metric, outcome.metric + "_lo", outcome.metric + "_hi", "items", "resolved"]
        print(outcome.table[shown].to_string(index=False))
        report[name] = {"items_used": outcome.items_used, "items": outcome.items, "seconds": seconds,
                        "resolved": outcome.resolved, "verdicts": _verdicts(outcome, lines)}
    report["verdicts_changed"] = [pair for pair, verdict in report["full"]["verdicts"].items()
                                  if report["budgeted"]["verdicts"][pair] != verdict]
    print("neighbour verdicts that differ:", report["verdicts_changed"] or "none")
    emit_json(report)


if __name__ == "__main__":
    main()
