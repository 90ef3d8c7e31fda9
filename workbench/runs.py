"""A run on disk: one folder per prune or sweep, written so that nothing is lost.

    runs/20261129-101500-sweep-3fa2c1/
      run.json        kind, status (running | done | failed | stopped), config, library versions,
                      data hashes, error; rewritten atomically on every change
      results.json    final results
      points/         one JSON per finished sweep point (what makes a sweep resumable)
      *.csv, *.png    tables and figures
      log.txt         a line per event

Every file is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written file. A crash marks the run failed; what it finished stays on disk.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from workbench import jsonio
from workbench.errors import WorkbenchError
from workbench.saving import clean_stale, create_temp_file, unwritable, write_marker
from workbench.versions import library_versions

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATUSES = ("running", "done", "failed", "stopped")


class RunError(WorkbenchError):
    """A run folder cannot be created, resumed or read; the message says why and what to do."""


def default_root() -> Path:
    """Where runs go: `$WORKBENCH_RUNS`, else `./runs`."""
    return Path(os.environ.get("WORKBENCH_RUNS") or "runs")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename the temporary file over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_file(path)  # usual permissions; a kill's leftover is cleaned on resume
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    text = jsonio.dumps(obj, indent=2)
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+:@-]*", name) or ".." in name:
        raise RunError(f"bad file name {name!r}: use letters, digits and _ . + : @ - only")
    return name.replace(":", "-")


@dataclass
class Run:
    path: Path
    meta: dict = field(default_factory=dict)

    # --- what run.json says -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "")

    @property
    def status(self) -> str:
        return self.meta.get("status", "")

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})

    def _write_meta(self) -> None:
        self.meta["updated"] = _now()
        write_json(self.path / RUN_FILE, self.meta)

    def update(self, **fields) -> None:
        """Merge fields into run.json (e.g. data={"calibration_sha256": ...})."""
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(self.meta.get(key), dict):
                self.meta[key].update(value)
            else:
                self.meta[key] = value
        self._write_meta()

    # --- files -------------------------------------------------------------------------------
    def save_json(self, name: str, obj) -> Path:
        path = self.path / f"{_safe_name(name)}.json"
        write_json(path, obj)
        return path

    def load_json(self, name: str):
        return json.loads((self.path / f"{_safe_name(name)}.json").read_text(encoding="utf-8"))

    def save_table(self, name: str, table: pd.DataFrame) -> Path:
        path = self.path / f"{_safe_name(name)}.csv"
        _atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
        return path

    def load_table(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.path / f"{_safe_name(name)}.csv")

    def save_figure(self, name: str, figure, dpi: int = 100) -> Path:
        from workbench.plots import RENDER_LOCK  # matplotlib rendering is not thread-safe

        path = self.path / f"{_safe_name(name)}.png"
        with RENDER_LOCK:
            _atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi,
                                                           bbox_inches="tight"))
        return path

    def log(self, message: str) -> None:
        log.info("%s: %s", self.name, message)
        with open(self.path / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{_now()} {message}\n")

    # --- sweep points --------------------------------------------------------------------------
    def save_point(self, key: str, row: dict) -> None:
        """Store one finished point; `key` identifies it across resumes."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
        write_json(self.path / "points" / f"{slug}.json", {"key": key, "row": row})

    def points(self) -> dict[str, dict]:
        """Finished points by key; an unreadable point file is logged and left out (redone)."""
        found = {}
        for path in sorted((self.path / "points").glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                found[data["key"]] = data["row"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("%s: skipping unreadable point %s (%s)", self.name, path.name, err)
        return found

    # --- status -------------------------------------------------------------------------------
    def mark_done(self, results: dict | None = None) -> None:
        if results is not None:
            self.save_json("results", results)
        self.log("done")
        self.update(status="done", error=None, finished=_now())

    def mark_failed(self, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else "".join(
            traceback.format_exception_only(type(error), error)).strip()
        self.log(f"failed: {text}")
        if isinstance(error, BaseException):
            with open(self.path / "log.txt", "a", encoding="utf-8") as handle:
                handle.write("".join(traceback.format_exception(error)))
        self.update(status="failed", error=text, finished=_now())

    def mark_stopped(self, message: str = "stopped on request") -> None:
        self.log(message)
        self.update(status="stopped", error=message, finished=_now())


def open_run(path: str | Path, kind: str, config: dict, resume: bool = True) -> Run:
    """The run at exactly `path`: created if absent, resumed (status back to running) if it holds a
    run of the same kind and config. A different config there is an error, never overwritten."""
    path = Path(path)
    config = jsonio.plain(config)
    if (path / RUN_FILE).is_file():
        run = load_run(path)
        if not resume:
            raise RunError(f"{path} already holds a run; choose another folder")
        if run.kind != kind or run.config != config:
            raise RunError(f"{path} holds a {run.kind} run with a different config; choose "
                           "another folder or delete that one to start over")
        clean_stale(path)
        clean_stale(path / "points")
        run.update(status="running", error=None, resumed=_now())
        run.log("resumed")
        return run
    if path.exists() and any(path.iterdir()):
        raise RunError(f"{path} exists and is not a run folder (no {RUN_FILE}); choose an empty "
                       "or new folder")
    run = Run(path, {"kind": kind, "status": "running", "created": _now(), "config": config,
                     "versions": library_versions(), "data": {}, "error": None})
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, "run")  # ours: a save never replaces it, a cleanup may recognise it
        run._write_meta()
    except OSError as error:
        raise unwritable(path, error) from None
    run.log(f"created {kind} run")
    return run


def create_run(root: str | Path | None, kind: str, config: dict, name: str | None = None) -> Run:
    """A new run folder under `root` (default `default_root()`), named by time, kind and a tag."""
    root = Path(root) if root is not None else default_root()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = name or f"{stamp}-{kind}-{uuid.uuid4().hex[:6]}"
    return open_run(root / _safe_name(name), kind, config, resume=False)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    meta_path = path / RUN_FILE
    if not meta_path.is_file():
        raise RunError(f"{path} is not a run folder: it has no {RUN_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunError(f"{meta_path} is unreadable ({err}); the run folder is corrupt") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("status"), str) \
            or meta.get("status") not in STATUSES or not isinstance(meta.get("kind"), str):
        raise RunError(f"{meta_path} lacks a kind or a valid status; the run folder is corrupt")
    for name, kind in (("config", dict), ("data", dict), ("created", str), ("updated", str)):
        if meta.get(name) is not None and not isinstance(meta[name], kind):
            raise RunError(f"{meta_path}: its {name!r} is a {type(meta[name]).__name__}, not "
                           f"{'an object' if kind is dict else 'a time stamp'}; the run folder is corrupt")
    return Run(path, meta)


def _headline(run: Run) -> dict:
    """A few figures for the listing, from results.json or the finished points."""
    config = run.config
    row = {"method": config.get("method") or ",".join(config.get("methods", []) or []),
           "pattern": config.get("pattern", ""),
           "sparsity": config.get("sparsity") or ",".join(map(str, config.get("sparsities", []) or []))}
    if run.kind == "sweep":
        row["points"] = len(run.points())
    return row


def list_runs(root: str | Path | None = None) -> pd.DataFrame:
    """One row per readable run under `root`, newest first; corrupt folders are logged, skipped."""
    root = Path(root) if root is not None else default_root()
    columns = ["name", "kind", "status", "created", "updated", "method", "pattern", "sparsity",
               "points", "error", "path", "session"]
    rows = []
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                run = load_run(path)
                rows.append({"name": run.name, "kind": run.kind, "status": run.status,
                             "created": run.meta.get("created"), "updated": run.meta.get("updated"),
                             "error": run.meta.get("error"), "path": str(path),
                             "session": run.meta.get("session"), **_headline(run)})  # who made it (apps)
            except (RunError, OSError, TypeError, AttributeError, KeyError) as err:
                log.warning("skipping run folder %s: %s", path, err)
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("created", ascending=False, ignore_index=True)


def run_results(run: Run) -> pd.DataFrame:
    """A run's results as rows: a sweep's points, or a prune's flattened results.json."""
    if run.kind == "sweep":
        rows = list(run.points().values())
        return pd.DataFrame(rows)
    try:
        results = run.load_json("results")
    except FileNotFoundError:
        return pd.DataFrame()
    except (OSError, ValueError) as err:
        raise RunError(f"{run.path / 'results.json'} is unreadable ({err}); the run folder is "
                       "corrupt") from None
    if not isinstance(results, (dict, list)):
        raise RunError(f"{run.path / 'results.json'} holds a {type(results).__name__}, not results")
    return pd.json_normalize(results, sep="/")


def compare_runs(paths) -> pd.DataFrame:
    """Every run's result rows side by side, with a `run` column naming where each came from."""
    frames = []
    for path in paths:
        run = load_run(path)
        frame = run_results(run)
        frame.insert(0, "run", run.name)
        frame.insert(1, "status", run.status)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run"])
