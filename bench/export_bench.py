"""Export sizes on disk and load times for the bundled model, per format.

    python bench/export_bench.py [--root DIR] [--repeats 3] [--json]

Prunes the bundled SmolLM2-135M with magnitude pruning (cheap, and the same sparsity structure
as SparseGPT or Wanda at the same pattern; only which weights are zero differs), exports each
format without zip, and times loading it back (median of --repeats):

  dense          the unpruned model, save_pretrained             AutoModelForCausalLM.from_pretrained
  masked 50%     unstructured 50% of every block linear          AutoModelForCausalLM.from_pretrained
  compact 50%    the same model in the bitmask layout            workbench.export.load_compact
  compact 2:4    2:4 on every block linear, sparse-24 layout     workbench.export.load_compact
  slimmed 20%    20% of MLP channels removed (uniform per block) workbench.slim.load_slimmed
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.export import COMPACT_WEIGHTS, export_model, load_compact, saveable  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.prune import PruneConfig, prune  # noqa: E402


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _time_load(load, repeats: int) -> tuple[float, torch.nn.Module]:
    times, model = [], None
    for _ in range(repeats):
        del model
        started = time.perf_counter()
        model = load()
        times.append(time.perf_counter() - started)
    return statistics.median(times), model


def _check(reference: torch.Tensor, model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits
    return float((logits - reference).abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where to write the exports (default: a temp dir, removed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from workbench.slim import load_slimmed

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="export-bench-"))
    rows = []
    ids = None

    def record(label, folder, weights, load, export_s, reference):
        seconds, model = _time_load(load, args.repeats)
        rows.append({"export": label, "weights_MiB": round(weights / 2**20, 1),
                     "folder_MiB": round(_folder_bytes(folder) / 2**20, 1),
                     "export_s": round(export_s, 1), "load_s": round(seconds, 2),
                     "max_logit_diff": _check(reference, model, ids)})
        print(rows[-1], flush=True)

    try:
        loaded = load_model("default")
        tokenizer = loaded.tokenizer
        ids = tokenizer("The capital of France is Paris, and the capital of Italy is",
                        return_tensors="pt")["input_ids"]
        model = loaded.model
        with torch.no_grad():
            dense_logits = model(ids).logits
        started = time.perf_counter()
        dense_dir = root / "dense"
        with saveable(model):
            model.save_pretrained(dense_dir)
        tokenizer.save_pretrained(dense_dir)
        record("dense (save_pretrained)", dense_dir, _weights_bytes(dense_dir),
               lambda: AutoModelForCausalLM.from_pretrained(dense_dir), time.perf_counter() - started,
               dense_logits)

        runs = [
            ("unstructured 50%", PruneConfig(method="magnitude", pattern="unstructured", sparsity=0.5,
                                             record_error=False), ("masked", "compact")),
            ("2:4", PruneConfig(method="magnitude", pattern="2:4", record_error=False), ("compact",)),
            ("channel 20%", PruneConfig(method="magnitude", pattern="channel", scope="mlp",
                                        sparsity=0.2, record_error=False), ("slimmed",)),
        ]
        for label, config, formats in runs:
            model = load_model("default").model
            started = time.perf_counter()
            result = prune(model, config)
            print(f"pruned {label} in {time.perf_counter() - started:.1f} s: mlp "
                  f"{result.summary['mlp']:.4f}, matmul {result.summary['matmul']:.4f}", flush=True)
            with torch.no_grad():
                reference = model(ids).logits
            for fmt in formats:
                name = f"{fmt}-{label.replace(' ', '').replace('%', '').replace(':', 'of')}"
                started = time.perf_counter()
                exported = export_model(model, tokenizer, root, name, formats=(fmt,), result=result,
                                        source=loaded, make_zip=False, overwrite=True)
                export_s = time.perf_counter() - started
                path = exported.path
                if fmt == "masked":
                    load = lambda p=path: AutoModelForCausalLM.from_pretrained(p)  # noqa: E731
                    weights = _weights_bytes(path)
                elif fmt == "compact":
                    load = lambda p=path: load_compact(p)  # noqa: E731
                    weights = (path / COMPACT_WEIGHTS).stat().st_size
                else:
                    load = lambda p=path: load_slimmed(p).model  # noqa: E731
                    weights = _weights_bytes(path)
                record(f"{fmt} {label}", path, weights, load, export_s, reference)
            del model, result
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print("| export | weights (MiB) | folder (MiB) | export (s) | load (s) | max logit diff |")
    print("| :--- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['export']} | {row['weights_MiB']} | {row['folder_MiB']} | {row['export_s']} | "
              f"{row['load_s']} | {row['max_logit_diff']:.1e} |")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
