"""Seconds per block with blocks pruned on a CUDA GPU vs on the CPU (the model stays on CPU).

    python bench/gpu_blocks.py --model default --runs wanda:unstructured,sparsegpt:2:4 \
        --nsamples 64 --seqlen 512 --devices cpu,cuda --out /tmp/gpu_blocks.json

For each run and device: a fresh copy of the model on CPU, the same calibration windows
(WikiText-2 validation, seed 0), `prune(..., PruneConfig(device=...))`, which moves one block at
a time to the device for statistics and solves and keeps the activations there when they fit
(else in pinned CPU memory). Reported: seconds per block (the prune's total over the number of
blocks; the per-phase split is also given but, without synchronising, GPU work queued in one
phase can be paid in the next), peak GPU memory, whether every parameter is back on the CPU
afterwards, and how many mask entries differ from the first device's run (GPU and CPU sums
round differently, so near-ties may fall either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.data import load_calibration  # noqa: E402
from workbench.models import load_model  # noqa: E402
from workbench.prune import PruneConfig, prune  # noqa: E402


def run_one(model_path: str, method: str, pattern: str, device: str, nsamples: int, seqlen: int) -> tuple[dict, dict]:
    loaded = load_model(model_path)
    calibration = load_calibration(loaded.tokenizer, "wikitext2", nsamples=nsamples, seqlen=seqlen, seed=0)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = prune(loaded.model, PruneConfig(method=method, pattern=pattern, nsamples=nsamples, seqlen=seqlen,
                                             device=device), calibration=calibration)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    blocks = len(result.timings)
    row = {"method": method, "pattern": pattern, "device": device, "blocks": blocks,
           "s_per_block": seconds / blocks, "prune_s": seconds,
           **{column: float(result.timings[column].mean()) for column in ("stats_s", "solve_s", "rerun_s")},
           "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
           "model_on_cpu": all(p.device.type == "cpu" for p in loaded.model.parameters()),
           "gpu": torch.cuda.get_device_name() if on_gpu else None,
           "torch_threads": torch.get_num_threads()}
    return row, result.masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', a hub id or a model folder")
    parser.add_argument("--runs", default="wanda:unstructured,sparsegpt:2:4", help="method:pattern,...")
    parser.add_argument("--devices", default="cpu,cuda", help="the first is the reference for the masks")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    devices = args.devices.split(",")
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --devices cpu, or on a machine with a GPU")
    rows = []
    for run in args.runs.split(","):
        method, pattern = run.split(":", 1)
        reference = None
        for device in devices:
            row, masks = run_one(args.model, method, pattern, device, args.nsamples, args.seqlen)
            if reference is None:
                reference = masks
            else:
                row["mask_entries_differing"] = sum(int((masks[k] != reference[k]).sum()) for k in reference)
                row["mask_entries"] = sum(m.numel() for m in reference.values())
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| method | pattern | device | s/block | stats | solve | re-run | peak GPU MiB | masks differing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peak = "" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        differing = "reference" if "mask_entries_differing" not in r else \
            f"{r['mask_entries_differing']} of {r['mask_entries']}"
        print(f"| {r['method']} | {r['pattern']} | {r['device']} | {r['s_per_block']:.3f} | {r['stats_s']:.3f} "
              f"| {r['solve_s']:.3f} | {r['rerun_s']:.3f} | {peak} | {differing} |")


if __name__ == "__main__":
    main()
