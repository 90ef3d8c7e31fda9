"""The CLI's error contract, and options that a command would silently ignore.

A failure the user can fix prints one `error: ...` line and exits 2. Anything else is a bug: one
line saying so, with the path of a log file that holds the full traceback, and exit 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from workbench.errors import DataError, OptionError, WorkbenchError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

# OS errors that come from the user's files or machine (a path, permissions, a full disk), not
# from a bug: they get the one-line treatment.
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOSPC,
                errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY,
                errno.EXDEV, errno.EMFILE}
_LAMBADA_ONLY = {"lambada", "lambada-last-token"}


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (WorkbenchError, ValueError)):
        return True
    return isinstance(error, OSError) and error.errno in _USER_ERRNOS


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and not isinstance(error, WorkbenchError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        text = f"{error.strerror}{where}"
    return text or type(error).__name__


def log_dir() -> Path:
    """Where internal-error logs go: $WORKBENCH_LOG_DIR, else the cache root's logs/."""
    env = os.environ.get("WORKBENCH_LOG_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "prune-workbench"
    return Path(cache) / "logs"


def write_error_log(error: BaseException, argv: Sequence[str]) -> Path:
    """The full traceback, the command line and the versions, in a new file; its path."""
    from workbench.versions import library_versions

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = (f"command: python -m workbench {' '.join(argv)}\n"
            f"versions: {library_versions()}\n\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "prune-workbench-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"error-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    raise error


def report_failure(error: BaseException, argv: Sequence[str]) -> int:
    """Print the one line for `error` on stderr and return the exit status."""
    if isinstance(error, KeyboardInterrupt):
        print("error: interrupted; nothing more was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    if is_user_error(error):
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    path = write_error_log(error, argv)
    print(f"error: internal error ({type(error).__name__}: {' '.join(str(error).split())[:200]}); "
          f"this is a bug in the workbench. The full traceback is in {path}", file=sys.stderr)
    return EXIT_INTERNAL


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    parser._defaults.clear()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _suppress_defaults(sub)
        elif action.dest != "help":
            action.default = argparse.SUPPRESS


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests that the command line itself set (not filled in from defaults)."""
    _suppress_defaults(parser)
    return set(vars(parser.parse_args(list(argv))))


def _structured(pattern: str) -> bool:
    from workbench.patterns import parse_pattern

    return parse_pattern(pattern).structured


def _reads_calibration(args: argparse.Namespace) -> bool:
    from workbench.prune import PruneConfig

    config = PruneConfig(method=args.method, pattern=args.pattern)
    return bool(getattr(config, "uses_calibration", True))


def _unused(args: argparse.Namespace, given: set[str]) -> list[tuple[str, str]]:
    """(option, what to do instead) for each given option that this command line would ignore."""
    found = []
    command = args.command
    if command == "prune":
        if getattr(args, "recipe", None):
            fixed = [name for name in ("unit_allocation", "no_mask_tuning", "slim", "round_to", "uniform")
                     if name in given]
            found += [(name, "--recipe fixes the prune config: drop it (or edit the recipe)")
                      for name in fixed]
        else:
            structured = _structured(args.pattern)
            for name in ("round_to", "uniform"):
                if name in given and not args.slim:
                    found.append((name, "it sizes the slimmed model: add --slim (with --pattern "
                                  "channel or head), or drop it"))
            for name in ("unit_allocation", "no_mask_tuning"):
                if name in given and not structured:
                    found.append((name, f"it applies to the channel/head patterns, not --pattern "
                                  f"{args.pattern}: drop it"))
            if not _reads_calibration(args):
                found += [(name, f"it picks calibration data, and {args.method} --pattern {args.pattern} "
                           "reads none: drop it") for name in ("calib", "nsamples", "seqlen", "seed")
                          if name in given and not (name == "seqlen" and args.budget == "flops")]
        if "limit" in given and not args.eval:
            found.append(("limit", "it bounds the evaluation: add --eval lambada,wikitext2 or drop it"))
        if "overwrite" in given and not args.out:
            found.append(("overwrite", "it replaces the --out folder: add --out or drop it"))
    elif command == "evaluate":
        from workbench.cli import split_list

        tasks = set(split_list(args.task) or ["lambada", "wikitext2"])
        if "seqlen" in given and tasks <= _LAMBADA_ONLY:
            found.append(("seqlen", "it is the wikitext2 perplexity window; LAMBADA scores whole "
                          "passages: drop it or add --task wikitext2"))
        if "bos_per_window" in given and "wikitext2" not in tasks:
            found.append(("bos_per_window", "it changes the wikitext2 perplexity windows: drop it or "
                          "add --task wikitext2"))
        lm_eval = any(task.startswith("lm-eval:") or task == "zero-shot" for task in tasks)
        found += [(name, "it configures lm-eval tasks (lm-eval:NAME or zero-shot): drop it or add one")
                  for name in ("num_fewshot", "include_path") if name in given and not lm_eval]
    elif command == "sweep":
        from workbench.cli import split_list

        if set(split_list([args.tasks])) <= _LAMBADA_ONLY:
            found += [(name, "it sets the wikitext2 perplexity windows: drop it or add wikitext2 "
                       "to --tasks") for name in ("windows", "eval_seqlen") if name in given]
        if "address" in given and getattr(args, "backend", "local") != "ray":
            found.append(("address", "it names a Ray cluster: add --backend ray or drop it"))
        if "first" in given and not args.budget:
            found.append(("first", "it is the budgeted sweep's first round: add --budget ITEMS or drop it"))
        if "windows" in given and args.budget:
            found.append(("windows", "a budgeted sweep scores the same number of items of every task, up "
                          "to --limit: drop it"))
    elif command == "export":
        from workbench.cli import split_list

        formats = split_list(args.format) or ["masked"]
        found += [(name, "it sizes the slimmed format: add --format slimmed or drop it")
                  for name in ("round_to", "uniform") if name in given and "slimmed" not in formats]
        found += [(name, "it applies to the hub upload: add --push-to OWNER/NAME or drop it")
                  for name in ("public", "token_env") if name in given and not args.push_to]
        if "data_dir" in given and not args.recipe:
            found.append(("data_dir", "only a --recipe export reads calibration data: drop it"))
    elif command == "runs":
        if args.action == "list" and args.runs:
            found.append(("runs", "runs list takes no run names (use runs show NAME or runs "
                          "compare A B)"))
    return found


def check_options(parser: argparse.ArgumentParser, argv: Sequence[str], args: argparse.Namespace) -> None:
    """Refuse options the command would ignore, an absent device and a --data-dir that is not a
    folder, before anything is loaded."""
    given = explicit_options(parser, argv)
    unused = _unused(args, given)
    if unused:
        name, why = unused[0]
        option = "a run name" if name == "runs" else "--" + name.replace("_", "-")
        raise OptionError(f"{option} has no effect here: {why}")
    if getattr(args, "device", None) is not None:
        from workbench.guards import check_device

        check_device(args.device)  # before a model is loaded for nothing
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder: give the folder that holds the "
                        "evaluation and calibration files, or drop --data-dir")
