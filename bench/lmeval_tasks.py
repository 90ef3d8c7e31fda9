"""lm-eval tasks in process vs `lm_eval --model hf`, on local tasks built here; dense vs SparseGPT 50%.

The hub is out of reach here, so the zero-shot suite's data is too. This builds three lm-eval
tasks in lm-eval's own YAML format on local files made from the bundled data:

- `lambada_local`: lm-eval's `lambada_openai` definition (loglikelihood), on the local LAMBADA jsonl;
- `lambada_choice`: multiple choice, the true last word of a LAMBADA passage vs 3 last words of
  other passages;
- `wikitext_continuation`: multiple choice, the true second half of a WikiText-2 test line vs
  3 second halves of other lines.

Then (1) scores them on the bundled model with our in-process adapter and with lm-eval's own CLI
on the saved folder (`lm_eval --model hf --model_args pretrained=<folder>`), and checks the
per-item results are identical; (2) prunes with SparseGPT 50% and prints the dense-vs-pruned
table with intervals and paired verdicts, and the seconds per task. Prints one JSON line last.

    python bench/lmeval_tasks.py --limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.cli import emit_json  # noqa: E402
from workbench.data import load_lambada, load_wikitext2_test, resolve_data_dir  # noqa: E402

MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
LAMBADA_YAML = """\
task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
TASKS = ("lambada_local", "lambada_choice", "wikitext_continuation")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _choice_rows(contexts: list[str], answers: list[str], rng: random.Random) -> list[dict]:
    rows = []
    for index, (context, answer) in enumerate(zip(contexts, answers)):
        others = [a for j, a in enumerate(answers) if j != index and a != answer]
        choices = [answer, *rng.sample(others, 3)]
        rng.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return rows


def build_tasks(folder: Path, data_dir: Path, items: int, seed: int = 0) -> Path:
    """Write the three task YAMLs and their jsonl files; returns the include path."""
    rng = random.Random(seed)
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    passages = load_lambada(data_dir, items)
    lambada = _write_jsonl(folder / "lambada.jsonl", [{"text": t} for t in passages])
    (tasks / "lambada_local.yaml").write_text(LAMBADA_YAML.format(data=lambada))
    split = [p.rsplit(" ", 1) for p in passages]
    rows = _choice_rows([c for c, _ in split], [" " + w for _, w in split], rng)
    (tasks / "lambada_choice.yaml").write_text(
        MC_YAML.format(task="lambada_choice", data=_write_jsonl(folder / "lambada_choice.jsonl", rows)))
    lines = [line.strip() for line in load_wikitext2_test(data_dir).split("\n")
             if len(line.split()) >= 16 and not line.strip().startswith("=")][:items]
    halves = [line.split() for line in lines]
    contexts = [" ".join(w[: len(w) // 2]) for w in halves]
    endings = [" " + " ".join(w[len(w) // 2 : len(w) // 2 + 8]) for w in halves]
    rows = _choice_rows(contexts, endings, rng)
    (tasks / "wikitext_continuation.yaml").write_text(
        MC_YAML.format(task="wikitext_continuation",
                       data=_write_jsonl(folder / "wikitext_continuation.jsonl", rows)))
    return tasks


def lm_eval_cli(folder: Path, include: Path, out: Path, limit: int, batch_size: int) -> tuple[dict, float]:
    """lm-eval's own CLI on the saved folder; {task: samples sorted by doc_id}, seconds."""
    command = [str(ROOT / ".venv" / "bin" / "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={folder},dtype=float32", "--tasks", ",".join(TASKS), "--include_path", str(include),
               "--device", "cpu", "--batch_size", str(batch_size), "--limit", str(limit), "--log_samples",
               "--output_path", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lm_eval failed:\n{done.stderr[-3000:]}")
    samples = {}
    for task in TASKS:
        path = next(out.rglob(f"samples_{task}_*.jsonl"))
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return samples, seconds


def identical(ours: dict, samples: list[dict]) -> dict:
    acc_same = ours["items"]["accuracy"] == [float(s["acc"]) for s in samples]
    nll_gap = None
    if "nll" in ours["items"]:
        nll_gap = max(abs(a + float(s["perplexity"])) for a, s in zip(ours["items"]["nll"], samples))
    return {"items": len(samples), "ids_same": ours["item_ids"] == [s["doc_id"] for s in samples],
            "accuracy_same": acc_same, "max_nll_gap": nll_gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="items per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--skip-cli", action="store_true", help="skip lm-eval's own CLI run")
    parser.add_argument("--method", default="sparsegpt", help="pruning method for the dense-vs-pruned table")
    args = parser.parse_args()

    import torch

    from workbench.evaluate import compare, evaluate
    from workbench.models import converted_default, load_model
    from workbench.prune import PruneConfig, prune

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data_dir = resolve_data_dir(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="lmeval-tasks-"))
    include = build_tasks(work, data_dir, args.limit)
    loaded = load_model("default")
    names = tuple("lm-eval:" + t for t in TASKS)

    started = time.perf_counter()
    dense = evaluate(loaded.model, loaded.tokenizer, tasks=names, limit=args.limit, include_path=include,
                     batch_size=args.batch_size)
    dense_s = time.perf_counter() - started
    report = {"limit": args.limit, "tasks": list(TASKS), "seconds_in_process": dense_s,
              "seconds_per_task": {t: dense["lm-eval:" + t]["seconds"] for t in TASKS},
              "loadavg": Path("/proc/loadavg").read_text().split()[:3]}

    if not args.skip_cli:
        folder = converted_default()
        samples, cli_s = lm_eval_cli(folder, include, work / "lm_eval_out", args.limit, args.batch_size)
        report["seconds_lm_eval_cli"] = cli_s
        report["identical"] = {t: identical(dense["lm-eval:" + t], samples[t]) for t in TASKS}
        print("in process vs lm_eval --model hf (per item):")
        for task, check in report["identical"].items():
            print(f"  {task:<24} {check}")

    started = time.perf_counter()
    prune(loaded.model, PruneConfig(method=args.method, sparsity=0.5, nsamples=32, seqlen=256),
          tokenizer=loaded.tokenizer)
    report.update(method=args.method, seconds_prune=time.perf_counter() - started)
    started = time.perf_counter()
    sparse = evaluate(loaded.model, loaded.tokenizer, tasks=names, limit=args.limit, include_path=include,
                      batch_size=args.batch_size)
    report["seconds_sparse"] = time.perf_counter() - started
    report["seconds_per_task_sparse"] = {t: sparse["lm-eval:" + t]["seconds"] for t in TASKS}
    table = compare(dense, sparse)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    report["table"] = table.to_dict(orient="records")
    emit_json(report)


if __name__ == "__main__":
    main()
