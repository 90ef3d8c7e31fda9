"""`python -m workbench <command>`: one `_add_<command>` and one `cmd_<command>` per command.

Every command with `--json` prints one JSON object as the last line of stdout. Expected errors
(a model that cannot be loaded, bad input) print one `error: ...` line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from workbench import jsonio

log = logging.getLogger("workbench")

EXIT_USAGE = 2


def emit_json(obj) -> None:
    """Print `obj` as one compact JSON line on stdout (NaN/inf become null)."""
    print(jsonio.dumps(obj), flush=True)


def split_list(values: Sequence[str] | None) -> list[str]:
    """`--task a --task b,c` -> ["a", "b", "c"], keeping order and dropping repeats."""
    out: list[str] = []
    for value in values or []:
        for item in value.split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return out


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--dtype/--revision/--trust-remote-code, shared by every command that loads a model."""
    parser.add_argument("--model", default="default",
                        help="'default' (bundled SmolLM2-135M), a hub id, a save_pretrained folder or a .gguf file")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run modelling code shipped with the model")
    parser.add_argument("--data-dir", default=None,
                        help="evaluation data folder (default: $WORKBENCH_DATA_DIR or ../shared/data)")


def load_from_args(args: argparse.Namespace):
    from workbench.models import load_model

    return load_model(args.model, dtype=args.dtype, revision=args.revision, trust_remote_code=args.trust_remote_code)


def open_session_from_args(args: argparse.Namespace):
    """A one-shot workflow session on --model (with --dtype, --revision, --data-dir ...)."""
    from workbench.workflow import one_shot_session

    return one_shot_session(load_from_args(args), data_dir=args.data_dir)


def format_results(results: dict) -> str:
    """A small fixed-width table: task, metric, value, 95% interval (per-item scores left out)."""
    from workbench.intervals import format_interval

    lines = [f"{'task':<24} {'metric':<16} {'value':>12}  95% interval"]
    for task, figures in results.items():
        for metric, value in figures.items():
            if isinstance(value, (list, dict)):
                continue
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            interval = format_interval(figures.get(metric + "_ci"))
            lines.append(f"{task:<24} {metric:<16} {shown:>12}  {interval}".rstrip())
    return "\n".join(lines)


def _add_evaluate(subparsers) -> None:
    from workbench.evaluate import task_names

    parser = subparsers.add_parser("evaluate", help="LAMBADA accuracy and WikiText-2 perplexity of a model")
    add_model_arguments(parser)
    parser.add_argument("--task", action="append", default=None,
                        help=f"{', '.join(task_names())} or any lm-eval task as "
                        "lm-eval:NAME (repeat or comma-separate; default: lambada,wikitext2)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N LAMBADA passages / N WikiText-2 windows / N documents per lm-eval task")
    parser.add_argument("--include-path", action="append", default=None,
                        help="folder of lm-eval task YAMLs (local data; repeatable)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for lm-eval tasks")
    parser.add_argument("--bos-per-window", action="store_true",
                        help="BOS at the start of every perplexity window (Gemma-style models)")
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--seqlen", type=positive_int, default=512, help="perplexity window length")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    from workbench import cli_offload_eval

    cli_offload_eval.add_arguments(parser)
    parser.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from workbench import cli_offload_eval, workflow
    from workbench.evaluate import check_tasks

    tasks = check_tasks(split_list(args.task) or ["lambada", "wikitext2"])
    status = cli_offload_eval.evaluate_command(args, tasks, emit_json, format_results)
    if status is not None:  # evaluated out of core
        return status
    session = open_session_from_args(args)
    loaded = session.loaded
    results = workflow.evaluate_job(session, tasks, args.limit, seqlen=args.seqlen, batch_size=args.batch_size,
                                    include_path=args.include_path, num_fewshot=args.num_fewshot,
                                    bos_per_window=args.bos_per_window)
    if args.json:
        emit_json({"model": loaded.source, "resolved": loaded.resolved, "dtype": loaded.dtype,
                   "limit": args.limit, "results": results})
    else:
        print(format_results(results))
    return 0


def _add_sweep(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="accuracy vs sparsity: many methods x sparsities, "
                                   "one run folder")
    add_model_arguments(parser)
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.1,0.3,0.5,0.6,0.7")
    parser.add_argument("--patterns", default="2:4,4:8",
                        help="extra N:M points per method ('' for none)")
    parser.add_argument("--mode", default="exact", choices=["exact", "fast"],
                        help="exact: the sequential driver per point; fast: dense statistics once")
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "owl"])
    parser.add_argument("--scope", default="all", choices=["all", "mlp", "attention"])
    parser.add_argument("--tasks", default="lambada,lambada-last-token,wikitext2")
    parser.add_argument("--limit", type=positive_int, default=200, help="LAMBADA passages per point")
    parser.add_argument("--windows", type=positive_int, default=16,
                        help="WikiText-2 windows per point")
    parser.add_argument("--eval-seqlen", type=positive_int, default=512)
    parser.add_argument("--calibration", default="wikitext2")
    parser.add_argument("--nsamples", type=positive_int, default=32)
    parser.add_argument("--seqlen", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="run folder (resumed if it holds this sweep; default: a new folder "
                        "under $WORKBENCH_RUNS or ./runs)")
    parser.add_argument("--backend", default="local", choices=["local", "ray"],
                        help="local: this process; ray: one Ray task per point (--model must be loadable by "
                        "every worker)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster: auto, ray://host:10001 (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--device", default="cpu", help="where each Ray task prunes and evaluates (cpu, cuda)")
    parser.add_argument("--budget", type=positive_int, default=None, metavar="ITEMS",
                        help="budgeted sweep: score every point on --first items per task, then spend the rest "
                        "of ITEMS (items per task, over all points) doubling the items of neighbouring points "
                        "whose difference is not yet significant, up to --limit each")
    parser.add_argument("--first", type=positive_int, default=50,
                        help="with --budget: items per task every point is scored on first (default 50)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from workbench import workflow
    from workbench.runs import default_root
    from workbench.sweep import SweepConfig, summarize

    try:
        sparsities = tuple(float(s) for s in split_list([args.sparsities]))
    except ValueError:
        raise ValueError(f"--sparsities must be numbers such as 0.3,0.5, got {args.sparsities!r}") from None
    config = SweepConfig(methods=tuple(split_list([args.methods])), sparsities=sparsities,
                         extra_patterns=tuple(split_list([args.patterns])), scope=args.scope,
                         calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                         seed=args.seed, tasks=tuple(split_list([args.tasks])), limit=args.limit,
                         ppl_windows=args.windows, eval_seqlen=args.eval_seqlen, mode=args.mode,
                         allocation=args.allocation, backend=args.backend, device=args.device,
                         **({"address": args.address} if args.address else {}))
    config.validate()  # before the model loads: bad input fails in a second
    if args.out is None:
        import datetime as dt

        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out = str(default_root() / f"{stamp}-{'budgeted-' if args.budget else ''}sweep")
    done = workflow.sweep_job(config, args.out, args.model, dtype=args.dtype, revision=args.revision,
                              trust_remote_code=args.trust_remote_code, data_dir=args.data_dir,
                              budget=args.budget, first=args.first)
    from workbench.runs import load_run

    run = load_run(args.out)
    if args.budget:
        return _print_budgeted(args, done, run)
    table = done
    failed = table.attrs.get("failed", {})
    if args.json:
        emit_json({"run": str(run.path), "status": run.status,
                   "rows": summarize(table).to_dict(orient="records"), "failed": failed})
    else:
        print(summarize(table).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for key, error in failed.items():
            print(f"failed: {key}: {error}")
        print(f"run: {run.path} ({run.status})")
    return 1 if failed else 0


def _print_budgeted(args: argparse.Namespace, outcome, run) -> int:
    """The table of a budgeted sweep: each point's metrics, items scored and whether it is resolved."""
    from workbench.sweep import summarize

    columns = [c for c in ("items", "resolved") if c in outcome.table.columns]
    rows = summarize(outcome.table).join(outcome.table[columns])
    if args.json:
        emit_json({"run": str(run.path), "status": run.status, "rows": rows.to_dict(orient="records"),
                   "budget": args.budget, "items_used": outcome.items_used, "metric": outcome.metric,
                   "resolved": outcome.resolved, "rounds": outcome.rounds})
    else:
        print(rows.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"items used: {outcome.items_used} of {args.budget} per task; resolved on {outcome.metric} "
              f"after {outcome.rounds} rounds")
        print(f"run: {run.path} ({run.status})")
    return 0


def _add_runs(subparsers) -> None:
    parser = subparsers.add_parser("runs", help="list, show or compare run folders")
    parser.add_argument("action", nargs="?", default="list", choices=["list", "show", "compare"])
    parser.add_argument("runs", nargs="*", help="run folders or names under --root")
    parser.add_argument("--root", default=None, help="runs folder (default: $WORKBENCH_RUNS or ./runs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.set_defaults(func=cmd_runs)


def cmd_runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workbench.runs import compare_runs, default_root, list_runs, load_run, run_results

    root = Path(args.root) if args.root else default_root()

    def locate(name: str) -> Path:
        path = Path(name)
        return path if path.is_dir() or path.is_absolute() else root / name

    if args.action == "list":
        frame = list_runs(root)
        if args.json:
            emit_json({"root": str(root), "runs": frame.to_dict(orient="records")})
        else:
            print(frame.drop(columns=["path"]).to_string(index=False) if len(frame) else f"no runs in {root}")
        return 0
    if args.action == "show":
        if len(args.runs) != 1:
            raise ValueError("runs show takes one run folder or name")
        run = load_run(locate(args.runs[0]))
        results = run_results(run)
        if args.json:
            emit_json({**run.meta, "path": str(run.path), "results": results.to_dict(orient="records")})
        else:
            print(json.dumps(run.meta, indent=2, default=str))
            if len(results):
                print(results.to_string(index=False))
        return 0
    if len(args.runs) < 2:
        raise ValueError("runs compare takes two or more run folders or names")
    frame = compare_runs([locate(name) for name in args.runs])
    if args.json:
        emit_json({"rows": frame.to_dict(orient="records")})
    else:
        print(frame.to_string(index=False))
    return 0


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="save a model (pruned from a recipe, or as loaded) with recipe, model card and zip")
    add_model_arguments(parser)
    parser.set_defaults(model=None, dtype=None)  # None: the recipe's, else default / fp32
    parser.add_argument("--recipe", default=None,
                        help="recipe.json to prune with first (reproduces its masks)")
    parser.add_argument("--name", required=True, help="export folder name (created inside --root)")
    parser.add_argument("--root", default="exports", help="export root folder (default: ./exports)")
    parser.add_argument("--format", action="append", default=None,
                        help="masked, compact, slimmed (repeat or comma-separate; default: masked)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export of that name")
    parser.add_argument("--no-zip", action="store_true", help="skip the single-file zip")
    parser.add_argument("--round-to", type=positive_int, default=None,
                        help="slimmed: round kept channels per block up to a multiple of this")
    parser.add_argument("--uniform", action="store_true",
                        help="slimmed: same width in every block (stock-loadable)")
    parser.add_argument("--push-to", default=None, metavar="OWNER/NAME",
                        help="also upload the export to this hub model repo")
    parser.add_argument("--token-env", default="HF_TOKEN",
                        help="environment variable holding the hub token for --push-to (default: HF_TOKEN)")
    parser.add_argument("--public", action="store_true", help="with --push-to: create a public repo")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    import os

    from workbench import workflow
    from workbench.export import FORMATS, export_destination
    from workbench.recipe import read_recipe

    formats = split_list(args.format) or ["masked"]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    token = None
    if args.push_to:
        token = os.environ.get(args.token_env)  # never a command-line argument: shells keep history
        if not token:
            raise ValueError(f"--push-to needs a hub token in the environment variable {args.token_env}")
    export_destination(args.root, args.name, args.overwrite, not args.no_zip, create=False)  # before any work
    recipe = read_recipe(args.recipe) if args.recipe else None
    if recipe is not None:
        args.model = args.model or recipe.model.get("source")
        args.dtype = args.dtype or recipe.model.get("dtype")
    args.model = args.model or "default"
    args.dtype = args.dtype or "fp32"
    session = open_session_from_args(args)
    exported, matched = workflow.export_job(session, args.root, args.name, formats, recipe=recipe,
                                            overwrite=args.overwrite, make_zip=not args.no_zip,
                                            push_to=args.push_to, token=token, private=not args.public,
                                            round_to=args.round_to, uniform=args.uniform)
    summary = {"path": str(exported.path), "zip": str(exported.zip_path) if exported.zip_path else None,
               "formats": formats, "sizes": exported.sizes, "hub_url": exported.hub_url,
               "masks_match_recipe": matched}
    if args.json:
        emit_json(summary)
    else:
        for key, value in exported.sizes.items():
            print(f"{key:<10} {value / 2**20:10.1f} MiB")
        print(f"export: {exported.path}" + (f"\nzip:    {exported.zip_path}" if exported.zip_path else ""))
        if matched is not None:
            print("masks match the recipe" if matched else "masks DIFFER from the recipe")
        if exported.hub_url:
            print(f"hub:    {exported.hub_url}")
    return 0 if matched is not False else 1


_PRUNE_DEFAULTS = {"method": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5, "scope": "all",
                   "exclude": None, "calib": "wikitext2", "nsamples": 64, "seqlen": 512, "seed": 0,
                   "budget": "units"}


def prune_from_recipe(args: argparse.Namespace) -> int:
    """`prune --recipe`: the recipe's model (unless --model names another), config and
    calibration; exits 1 when the masks differ from the ones the recipe recorded."""
    from workbench import workflow
    from workbench.evaluate import check_tasks, compare
    from workbench.recipe import read_recipe

    changed = [f"--{k}" for k, v in _PRUNE_DEFAULTS.items() if getattr(args, k, v) != v]
    if changed:
        raise ValueError(f"--recipe fixes the prune config; drop {', '.join(changed)} (or edit the recipe)")
    recipe = read_recipe(args.recipe)
    tasks = check_tasks(split_list([args.eval])) if args.eval else []
    out = _check_out_folder(args.out, args.overwrite)
    if args.model == "default" and recipe.model.get("source"):
        args.model = recipe.model["source"]
        args.dtype = recipe.model.get("dtype") or args.dtype
        args.revision = args.revision or recipe.model.get("revision")
    session = open_session_from_args(args)
    loaded = session.loaded
    job = workflow.reproduce_job(session, recipe, tasks, args.limit, device=args.device, out=out,
                                 overwrite=args.overwrite, record=not args.no_record)
    result, matched = job.outcome.result, job.masks_match
    dense, sparse = job.outcome.dense_eval, job.outcome.pruned_eval
    summary = result.summary
    print(f"{recipe.config.method} {recipe.config.pattern} on {loaded.resolved} from {args.recipe}: "
          f"MLP {summary['mlp']:.4f}, element-wise over matmul {summary['matmul']:.4f}")
    print({True: "masks match the recipe", False: "masks DIFFER from the recipe",
           None: "the recipe records no masks to compare"}[matched])
    if tasks:
        print(compare(dense, sparse).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if job.run is not None:
        print(f"run: {job.run}")
    if args.json:
        emit_json({"model": loaded.source, "resolved": loaded.resolved, "recipe": str(args.recipe),
                   "config": recipe.config.to_dict(), "calibration": result.calibration,
                   "summary": summary, "masks_match_recipe": matched,
                   "evaluation": {"dense": dense, "sparse": sparse},
                   "out": str(out) if out is not None else None,
                   "run": str(job.run) if job.run is not None else None})
    return 0 if matched is not False else 1


def _add_prune(subparsers) -> None:
    parser = subparsers.add_parser("prune", help="prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M)")
    add_model_arguments(parser)
    parser.add_argument("--method", default="sparsegpt", help="magnitude, wanda, sparsegpt or retrain-free")
    parser.add_argument("--pattern", default="unstructured",
                        help="unstructured, N:M (e.g. 2:4), channel (MLP, --scope mlp) or head (--scope attention)")
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="fraction removed (N:M patterns fix it); with --budget flops, of the forward FLOPs")
    parser.add_argument("--scope", default="all", help="all, mlp or attention")
    parser.add_argument("--exclude", default=None, help=r"regex over linear names left dense, e.g. 'layers\.0\.'")
    parser.add_argument("--calib", default="wikitext2", help="calibration: a name (wikitext2, pile10k, c4) or a file")
    parser.add_argument("--nsamples", type=positive_int, default=64, help="calibration windows")
    parser.add_argument("--seqlen", type=positive_int, default=512, help="calibration window length in tokens")
    parser.add_argument("--seed", type=int, default=0, help="calibration window sampling seed")
    parser.add_argument("--device", default="cpu", help="where blocks are pruned: cpu or cuda")
    parser.add_argument("--eval", default=None, help="evaluate dense then pruned: lambada,wikitext2 (comma-separated)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="first N LAMBADA passages / WikiText-2 windows")
    parser.add_argument("--out", default=None, help="save the pruned model here (safetensors + tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--no-record", action="store_true",
                        help="do not record the run in the run store ($WORKBENCH_RUNS or ./runs)")
    parser.add_argument("--unit-allocation", "--allocation", dest="unit_allocation", default="auto",
                        choices=["auto", "global", "uniform"],
                        help="channel/head patterns: units removed across blocks (global, retrain-free's "
                        "default) or the same count per block (uniform)")
    parser.add_argument("--budget", default="units", choices=["units", "flops"],
                        help="channel/head patterns: --sparsity is the fraction of units (channels, heads) "
                        "to remove (units), or of the dense model's forward FLOPs per token at --seqlen "
                        "(flops), turned into the unit count that removes at least that much")
    parser.add_argument("--no-mask-tuning", action="store_true",
                        help="retrain-free: skip the least-squares refit of down/o (as INC)")
    from workbench import cli_offload

    cli_offload.add_arguments(parser)
    parser.add_argument("--slim", action="store_true",
                        help="channel/head patterns: physically remove the pruned units (smaller, faster)")
    parser.add_argument("--round-to", type=positive_int, default=None,
                        help="with --slim: round kept channels per block up to a multiple, e.g. 32")
    parser.add_argument("--uniform", action="store_true",
                        help="with --slim: one size for every block, so stock from_pretrained reloads it")
    parser.add_argument("--recipe", default=None,
                        help="recipe.json of an export: prune as it says (model, config, calibration) "
                        "and check the masks against it")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.set_defaults(func=cmd_prune)


def _check_out_folder(out: str | None, overwrite: bool):
    """The preflight, before any loading or pruning: `--out` may be written (workbench.saving)."""
    from workbench.saving import check_writable

    return None if out is None else check_writable(out, overwrite)


def save_model_folder(model, tokenizer, path, overwrite: bool = False):
    """A model folder of ours, swapped in atomically (workbench.saving.save_model_folder)."""
    from workbench import saving

    return saving.save_model_folder(model, tokenizer, path, overwrite)


def cmd_prune(args: argparse.Namespace) -> int:
    import time

    from workbench import distributed, workflow
    from workbench.evaluate import check_tasks
    from workbench.prune import PruneConfig

    if args.recipe:
        if distributed.launched_by_torchrun():
            raise ValueError("--recipe reproduces a prune in one process: run it without torchrun")
        return prune_from_recipe(args)
    started = time.perf_counter()
    config = PruneConfig(method=args.method, pattern=args.pattern, sparsity=args.sparsity, scope=args.scope,
                         exclude=args.exclude, calibration=args.calib, nsamples=args.nsamples,
                         seqlen=args.seqlen, seed=args.seed, device=args.device,
                         unit_allocation=getattr(args, "unit_allocation", "auto"),
                         budget=getattr(args, "budget", "units"),
                         mask_tuning=False if getattr(args, "no_mask_tuning", False) else None,
                         offload=getattr(args, "offload", "auto"))
    if not config.validate().structured and getattr(args, "slim", False):  # fails before the model loads
        raise ValueError("--slim removes whole channels or heads: use --pattern channel (scope mlp) or "
                         "--pattern head (scope attention)")
    from workbench import cli_offload

    ranks = distributed.join_for_command(args.device)  # under torchrun: rank 0 evaluates and writes
    status = cli_offload.prune_command(args, config, emit_json)  # prints the memory estimate
    if status is not None:  # pruned out of core
        return status
    tasks = check_tasks(split_list([args.eval])) if args.eval else []
    out = _check_out_folder(args.out, args.overwrite) if ranks.is_main else None
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    if not ranks.is_main:
        tasks = []

    session = open_session_from_args(args)
    slim = {"round_to": args.round_to, "uniform": args.uniform} if getattr(args, "slim", False) else None
    job = workflow.prune_job(session, config, tasks, args.limit, slim=slim, out=out, overwrite=args.overwrite,
                             record=ranks.is_main and not args.no_record)
    job.seconds["total"] = time.perf_counter() - started
    _print_prune(args, config, session.loaded, job)
    return 0


def _print_prune(args: argparse.Namespace, config, loaded, job) -> None:
    """What `prune` prints: slimming, counted sparsity, dense vs pruned, where it went; --json last."""
    from workbench.evaluate import compare

    result, slimmed, slim_info, out = job.outcome.result, job.slimmed, None, job.out
    if slimmed is not None:
        slim_info = {"sizes": slimmed.sizes, "stock_loadable": slimmed.stock_loadable,
                     "parameters_before": slimmed.parameters_before,
                     "parameters_after": slimmed.parameters_after}
        print(f"slimmed: {slimmed.parameters_before:,} -> {slimmed.parameters_after:,} parameters, "
              f"{slimmed.kind} sizes per block {sorted(set(slimmed.sizes))}"
              + ("" if slimmed.stock_loadable else " (reload with workbench.slim.load_slimmed)"))
    summary = result.summary
    print(f"{config.method} {config.pattern} on {loaded.resolved}: counted sparsity "
          f"{summary['blocks']:.4f} over the pruned blocks (MLP {summary['mlp']:.4f}, attention "
          f"{summary['attention']:.4f}, element-wise over matmul {summary['matmul']:.4f}) "
          f"in {result.seconds:.1f} s")
    dense, sparse = job.outcome.dense_eval, job.outcome.pruned_eval
    if dense is not None and sparse is not None:
        print(compare(dense, sparse).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if out is not None:
        print(f"saved: {out}")
    if job.run is not None:
        print(f"run: {job.run}")
    if args.json:
        emit_json({"model": loaded.source, "resolved": loaded.resolved, "dtype": loaded.dtype,
                   "config": config.to_dict(), "calibration": result.calibration, "summary": summary,
                   "evaluation": {"dense": dense, "sparse": sparse}, "seconds": job.seconds,
                   "out": str(out) if out is not None else None, "slim": slim_info,
                   "run": str(job.run) if job.run is not None else None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="Retrain-free pruning workbench")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_evaluate(subparsers)
    _add_sweep(subparsers)
    _add_runs(subparsers)
    _add_export(subparsers)
    _add_prune(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from workbench.cli_checks import check_options, report_failure

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        check_options(build_parser(), argv, args)  # options this command would ignore
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as error:  # user errors: one line, exit 2; bugs: a log, exit 1
        return report_failure(error, argv)
