"""`python -m workbench evaluate` for big models: WikiText-2 perplexity with one decoder block in
memory at a time (`--offload disk`, or `auto` when the model does not fit in memory)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offload", default="auto", choices=["auto", "none", "disk"],
                        help="disk: run one block at a time from the checkpoint on disk (wikitext2 only; "
                        "models larger than memory); none: in memory; auto: disk when the model does not fit")


def evaluate_command(args: argparse.Namespace, tasks: Sequence[str], emit_json: Callable[[object], None],
                     format_results: Callable[[dict], str]) -> int | None:
    """Evaluate out of core when asked or needed and return the exit status, or return None to
    let the in-memory evaluation go on."""
    from workbench.cli_offload import local_checkpoint

    mode = getattr(args, "offload", "auto")
    if mode == "none":
        return None
    folder = local_checkpoint(args.model) if mode == "disk" or args.model != "default" else None
    if folder is None:
        if mode == "disk":
            raise ValueError(f"--offload disk reads a local safetensors folder, and {args.model} is not one: "
                             "download it first (huggingface-cli download ID --local-dir DIR) and pass "
                             "--model DIR")
        return None
    from workbench.models import dtype_of
    from workbench.offload_eval import check_offload_tasks, in_memory_need, perplexity_from_disk

    if mode == "auto":
        need, room = in_memory_need(folder, dtype_of(args.dtype))
        if need <= room:
            return None
        print(f"out of core: the model needs about {need / 2**30:.1f} GiB in memory, {room / 2**30:.1f} GiB "
              "available; onloading one block at a time from disk (force --offload none to load it whole)",
              file=sys.stderr, flush=True)
    check_offload_tasks(tasks)
    from transformers import AutoConfig

    from workbench.data import load_wikitext2_test
    from workbench.guards import check_seqlen

    results = {}
    if "wikitext2" in tasks:
        check_seqlen(AutoConfig.from_pretrained(folder), args.seqlen, "--seqlen")
        results["wikitext2"] = perplexity_from_disk(folder, load_wikitext2_test(args.data_dir), seqlen=args.seqlen,
                                                    batch_size=args.batch_size or 8, limit=args.limit,
                                                    bos_per_window=args.bos_per_window)
    if "lambada" in tasks or "lambada-last-token" in tasks:
        from workbench.data import load_lambada
        from workbench.offload_eval import lambada_from_disk

        results.update(lambada_from_disk(folder, load_lambada(args.data_dir), batch_size=args.batch_size or 16,
                                         limit=args.limit, last_word="lambada" in tasks,
                                         last_token="lambada-last-token" in tasks))
    if args.json:
        emit_json({"model": args.model, "resolved": str(folder), "dtype": "fp32", "limit": args.limit,
                   "offload": True, "results": results})
    else:
        print(format_results(results))
    return 0
