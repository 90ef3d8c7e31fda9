"""Data-parallel calibration: 1 process vs N gloo processes on one machine, same masks?

    python bench/distributed_bench.py --model ~/.cache/prune-workbench/converted/<folder> \
        --runs wanda:unstructured,sparsegpt:2:4 --nsamples 16 --seqlen 256 --out /tmp/dist_bench.json

For each run and each process count in `--worlds` (default 1,2) the prune is started in fresh
processes (torch.multiprocessing.spawn, gloo on 127.0.0.1), each with `--cores / world` torch
threads, so 1 x 2 threads is compared with 2 x 1 thread on a 2-core machine. Every process loads
the model folder, takes its share of the same calibration windows, and prunes; rank 0 saves the
masks and pruned weights, which are compared with the single-process run's. Reported per run:
seconds per block (statistics, solve, re-run; mean over blocks, rank 0), the prune's total,
identical masks, the largest weight difference, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, model_path: str, method: str,
            pattern: str, nsamples: int, seqlen: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from workbench.data import load_calibration
        from workbench.models import load_model
        from workbench.prune import PruneConfig, prune

        loaded = load_model(model_path)
        calibration = load_calibration(loaded.tokenizer, "wikitext2", nsamples=nsamples, seqlen=seqlen, seed=0)
        dist.barrier()  # time the prune, not the loading
        result = prune(loaded.model, PruneConfig(method=method, pattern=pattern, nsamples=nsamples, seqlen=seqlen),
                       calibration=calibration)
        if rank == 0:
            modules = dict(loaded.model.named_modules())
            weights = {name: modules[name].weight.detach().float().clone() for name in result.masks}
            timings = result.timings
            torch.save({"masks": result.masks, "weights": weights, "seconds": result.seconds,
                        "blocks": len(timings),
                        "per_block": {column: float(timings[column].mean())
                                      for column in ("stats_s", "solve_s", "rerun_s")}}, out)
    finally:
        dist.destroy_process_group()


def run_one(args, method: str, pattern: str, world: int, out: Path) -> dict:
    threads = max(1, args.cores // world)
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    started = time.perf_counter()
    mp.spawn(_worker, args=(world, _free_port(), threads, args.model, method, pattern, args.nsamples,
                            args.seqlen, str(out)), nprocs=world, join=True)
    wall = time.perf_counter() - started
    saved = torch.load(out)
    return {"method": method, "pattern": pattern, "world": world, "threads": threads, "wall_s": wall,
            "prune_s": saved["seconds"], "blocks": saved["blocks"], **saved["per_block"],
            "loadavg_before": loadavg_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}


def compare(reference: Path, other: Path) -> dict:
    a, b = torch.load(reference), torch.load(other)
    same = set(a["masks"]) == set(b["masks"]) and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    differing = sum(int((a["masks"][k] != b["masks"][k]).sum()) for k in a["masks"] if k in b["masks"])
    diff = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])
    return {"identical_masks": same, "mask_entries_differing": differing, "max_weight_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a safetensors model folder (or 'default')")
    parser.add_argument("--runs", default="wanda:unstructured,sparsegpt:2:4", help="method:pattern,...")
    parser.add_argument("--worlds", default="1,2", help="process counts; the first is the reference")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads shared by the processes")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    args.model = str(Path(args.model).expanduser()) if args.model != "default" else args.model
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    try:
        for run in args.runs.split(","):
            method, pattern = run.split(":", 1)
            paths = {}
            for world in worlds:
                paths[world] = scratch / f"{method}-{pattern.replace(':', '_')}-{world}.pt"
                row = run_one(args, method, pattern, world, paths[world])
                if world != worlds[0]:
                    row.update(compare(paths[worlds[0]], paths[world]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| method | pattern | processes x threads | stats s/block | solve s/block | re-run s/block "
          "| prune s | identical masks | max weight diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        same = "reference" if "identical_masks" not in r else ("yes" if r["identical_masks"] else
                                                               f"no ({r['mask_entries_differing']} entries)")
        diff = "" if "max_weight_diff" not in r else f"{r['max_weight_diff']:.2e}"
        print(f"| {r['method']} | {r['pattern']} | {r['world']} x {r['threads']} | {r['stats_s']:.3f} | "
              f"{r['solve_s']:.3f} | {r['rerun_s']:.3f} | {r['prune_s']:.1f} | {same} | {diff} |")


if __name__ == "__main__":
    main()
