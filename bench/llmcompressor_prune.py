"""The same pruning with llm-compressor, for a side-by-side with our engine.

Runs in its own virtual environment (llm-compressor pins its own transformers):

    python3 -m venv .bench-venvs/llmc
    .bench-venvs/llmc/bin/pip install torch==2.13.0
    .bench-venvs/llmc/bin/pip install llmcompressor==0.14.0.1
    .venv/bin/python bench/prune_bench.py --runs dense --save-calibration /tmp/calib.pt --out /tmp/x.jsonl
    .bench-venvs/llmc/bin/python bench/llmcompressor_prune.py --model MODEL_FOLDER \
        --calibration /tmp/calib.pt --method sparsegpt --pattern 2:4 --out /tmp/llmc-sparsegpt-2-4.pt

It prunes the safetensors folder with `oneshot` and SparseGPTModifier / WandaPruningModifier on
the very calibration ids our benchmark uses, writes the pruned state dict to `--out` and the
timing to `--out` + `.json`. `bench/prune_bench.py --external NAME=PATH` then evaluates it with
our evaluator on the same subsets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a save_pretrained folder (the converted bundled model)")
    parser.add_argument("--calibration", type=Path, required=True, help=".pt file with input_ids (n, seqlen)")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.load(args.calibration)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    mask_structure = "0:0" if args.pattern == "unstructured" else args.pattern
    common = dict(sparsity=args.sparsity, mask_structure=mask_structure,
                  targets=[r"re:model.layers.\d+$"], ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
    else:
        recipe = WandaPruningModifier(**common)

    cpu_before, started = time.process_time(), time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size,
            pipeline="sequential")
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_before

    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    info = {"tool": f"llmcompressor {llmcompressor.__version__}", "torch": torch.__version__,
            "method": args.method, "pattern": args.pattern, "prune_s": seconds, "cpu_s": cpu_seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0],
            "batch_size": args.batch_size}
    Path(f"{args.out}.json").write_text(json.dumps(info))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
