"""`python -m workbench prune` for big models: the memory estimate printed before a prune, and
the out-of-core route (`--offload disk`, or `auto` when the model does not fit; `--resume`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from workbench.prune import PruneConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offload", default="auto", choices=["auto", "none", "disk"],
                        help="disk: prune one block at a time from the checkpoint on disk, writing the result "
                        "to --out (models larger than memory); none: in memory; auto: decide from the "
                        "memory estimate")
    parser.add_argument("--resume", action="store_true",
                        help="with --offload disk: continue the interrupted prune in --out at its first "
                        "unfinished block")


def local_checkpoint(model: str) -> Path | None:
    """The safetensors folder behind --model, or None (a hub id or a GGUF file)."""
    if model == "default":
        from workbench.models import converted_default

        return converted_default()
    path = Path(model).expanduser()
    if path.is_dir() and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
        return path
    return None


def prune_command(args: argparse.Namespace, config: PruneConfig, emit_json) -> int | None:
    """Print the estimate; run the prune out of core when asked or needed and return the exit
    status, or return None to let the in-memory prune go on."""
    from workbench import distributed, workflow
    from workbench.memory import estimate_memory

    mode = getattr(args, "offload", "auto")
    resume = getattr(args, "resume", False)
    if resume and mode == "none":
        raise ValueError("--resume continues an out-of-core prune: use it with --offload disk (or auto)")
    folder = local_checkpoint(args.model)
    if folder is None:
        if mode == "disk" or resume:
            raise ValueError(f"--offload disk reads a local safetensors folder, and {args.model} is not one: "
                             "download it first (huggingface-cli download ID --local-dir DIR) and pass "
                             "--model DIR")
        return None
    estimate = estimate_memory(folder, config, load_dtype=args.dtype)
    offload = mode == "disk" or resume or (mode == "auto" and estimate.offload)
    if distributed.is_main():  # under torchrun every rank computes it; one line is enough
        print(("out of core: " if offload else "in memory: ") + estimate.describe(), file=sys.stderr, flush=True)
    if not offload:
        return None
    if args.out is None:
        raise ValueError("an out-of-core prune writes each block as it is pruned: give --out FOLDER"
                         + ("" if mode == "disk" else f" (the model needs about {estimate.in_memory_bytes / 2**30:.1f}"
                            f" GiB in memory, {estimate.available_bytes / 2**30:.1f} GiB available; or force "
                            "--offload none)"))
    if args.eval:
        raise ValueError("--eval needs the whole model in memory; prune out of core first, then "
                         "evaluate the saved folder (python -m workbench evaluate --model OUT)")
    slim = {"round_to": args.round_to, "uniform": args.uniform} if getattr(args, "slim", False) else None

    def report(fraction: float, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    result, run = workflow.prune_out_of_core(args.model, folder, args.out, config, dtype=args.dtype,
                                             data_dir=args.data_dir, resume=resume, overwrite=args.overwrite,
                                             activations_in_memory=estimate.activations_in_memory,
                                             record=not getattr(args, "no_record", False), progress=report,
                                             slim=slim)
    summary = result.summary
    print(f"{config.method} {config.pattern} on {folder} (out of core): counted sparsity {summary['blocks']:.4f} "
          f"over the pruned blocks (MLP {summary['mlp']:.4f}, attention {summary['attention']:.4f}, "
          f"element-wise over matmul {summary['matmul']:.4f}) in {result.seconds:.1f} s")
    print(f"saved: {args.out}")
    if run is not None:
        print(f"run: {run}")
    if args.json:
        emit_json({"model": args.model, "resolved": str(folder), "config": config.to_dict(), "offload": True,
                   "estimate": estimate.to_dict(), "calibration": result.calibration, "summary": summary,
                   "seconds": {"prune": result.seconds, "total": time.perf_counter() - started},
                   "out": str(args.out), "run": str(run) if run is not None else None})
    return 0
