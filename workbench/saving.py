"""The one safe folder writer: every folder the project writes goes through here.

    save_folder("out/pruned", lambda tmp: model.save_pretrained(tmp), kind="model", overwrite=True)

    with staged_folder(dest, kind="export", overwrite=overwrite) as tmp:
        ...write files into tmp...                  # swapped into place when the block ends

Rules:
- Every folder written carries a marker file (`.prune-workbench`, a small JSON: kind, version,
  complete). A destination is replaced only when it carries that marker or is empty; anything
  else is refused with `UnsafeDestinationError`, whatever `overwrite` says. The current folder
  (or one above it) is never a destination.
- The new folder is written into a hidden temporary sibling, then swapped in: the old folder is
  renamed to a hidden backup, the new one renamed into place, and the backup removed. A kill at
  any moment leaves the old folder or the new one complete, or (between the two renames) the old
  one complete under its backup name; `clean_stale`, called by every save and by the CLI's
  preflight, puts such a backup back and removes temporary folders of ours left by a kill.
- Folders and files get the usual permissions (the process umask applies).
- An OSError while writing (full disk, read-only filesystem, no permission) ends in
  `UnwritableDestinationError`; the temporary folder is removed and the old folder untouched.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from workbench import __version__
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

MARKER = ".prune-workbench"
MARKER_FORMAT = 1
KINDS = ("model", "export", "run")
REPLACEABLE = ("model", "export")  # a run folder is never replaced by a save
# hidden siblings of a destination while it is written (tmp) or replaced (old)
_STAGE = re.compile(r"\.(?P<name>.+)\.pwb-(?P<role>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
_FIXES = {
    errno.ENOSPC: ("the disk is full", "Free some space or Choose a folder on another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "Free some space or Choose a folder on another disk"),
    errno.EFBIG: ("a file is too large for this filesystem", "Choose a folder on another disk"),
    errno.EROFS: ("the filesystem is read-only", "Choose a folder on a writable disk"),
    errno.EACCES: ("permission denied", "Choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("permission denied", "Choose a folder you can write to, or fix its permissions"),
}


class SaveError(WorkbenchError):
    """A folder cannot be written; the message names the folder, why, and the fix."""


class UnsafeDestinationError(SaveError):
    """The destination holds something we did not write: it is never replaced."""


class DestinationExistsError(SaveError, FileExistsError):
    """The destination holds a folder of ours and replacing it was not asked for."""


class ExportError(SaveError):
    """An export cannot be written, read or uploaded; the message names the problem and the fix."""


class UnwritableDestinationError(SaveError):
    """The destination cannot be written (full disk, read-only filesystem, no permission)."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


# --- the marker -------------------------------------------------------------------------------


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a folder we wrote, or None (no marker, unreadable, or not ours)."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("writer") != "prune-workbench":
        return None
    return data


def is_ours(folder: str | Path) -> bool:
    return read_marker(folder) is not None


def write_marker(folder: str | Path, kind: str, complete: bool = True, **extra) -> Path:
    """Write the marker into `folder` (which must exist)."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}: one of {', '.join(KINDS)}")
    data = {"writer": "prune-workbench", "kind": kind, "format": MARKER_FORMAT, "version": __version__,
            "complete": bool(complete), "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **extra}
    path = Path(folder) / MARKER
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


# --- errors from the filesystem -------------------------------------------------------------


def _errno_of(error: BaseException) -> int | None:
    """The OS error number behind an exception: OSError, or safetensors' error, which wraps the
    Rust io::Error as text ("... No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"\((?:os error|Os \{ code:) (\d+)", str(error))
    return int(match.group(1)) if match else None


def unwritable(dest: Path, error: BaseException) -> UnwritableDestinationError:
    """The typed error for an OSError met while writing `dest`."""
    code = _errno_of(error)
    why, fix = _FIXES.get(code, (getattr(error, "strerror", None) or str(error), "Check the folder and try again"))
    where = getattr(error, "filename", None)
    detail = f" ({where})" if where and str(where) != str(dest) else ""
    return UnwritableDestinationError(f"cannot write {dest}: {why}{detail}; nothing was changed there. {fix}",
                                      code)


# --- hidden siblings ----------------------------------------------------------------------------


def _stage_name(name: str, role: str) -> str:
    return f".{name}.pwb-{role}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_ours(folder: Path) -> None:
    """Remove a folder of ours, its marker last, so a kill half-way leaves it recognisable."""
    for entry in list(folder.iterdir()):
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


def clean_stale(parent: str | Path, name: str | None = None) -> list[Path]:
    """Clean what a killed save left in `parent` (for destination `name`, or every one).

    A hidden backup whose destination is missing is renamed back into place; other backups and
    temporary folders are removed. Only entries of ours are touched: the name pattern of a stage,
    a marker inside (or an empty folder), and a writer process that is gone. Returns what was
    cleaned or restored.
    """
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    host = socket.gethostname()
    done = []
    for entry in entries:
        match = _STAGE.fullmatch(entry.name)
        if match is None or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_file():
                if match["role"] == "tmp":
                    entry.unlink()
                    done.append(entry)
                continue
            marker = read_marker(entry)
            if marker is None and any(entry.iterdir()):
                continue  # not recognisably ours: leave it
            if marker is not None and marker.get("host", host) != host:
                continue  # written from another machine: its writer may be alive
            dest = parent / match["name"]
            if match["role"] == "old" and not os.path.lexists(dest):
                entry.rename(dest)
                log.warning("restored %s from the backup a killed save left", dest)
            else:
                _remove_ours(entry)
                log.info("removed %s, left by a killed save", entry)
            done.append(entry)
        except OSError as error:
            log.warning("could not clean %s (%s)", entry, error)
    return done


def create_temp_file(beside: str | Path) -> Path:
    """A new empty hidden file next to `beside`, with the usual permissions (umask applies),
    named so that `clean_stale` removes it if a kill leaves it behind."""
    beside = Path(beside)
    path = beside.parent / _stage_name(beside.name, "tmp")
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return path


# --- checks -------------------------------------------------------------------------------------


def check_destination(dest: str | Path, overwrite: bool = False, replaceable: tuple[str, ...] = REPLACEABLE) -> Path:
    """Refuse a destination we may not replace; returns it as a Path. Writes nothing.

    Refused whatever `overwrite` says: a symbolic link, a file, the current folder or one above
    it, a non-empty folder without our marker, a run folder. A folder of ours needs `overwrite`.
    """
    path = Path(dest).expanduser()
    if path.is_symlink():
        raise UnsafeDestinationError(f"{path} is a symbolic link; saves never write through links. "
                                     "Remove the link or choose another folder")
    if path.exists() and not path.is_dir():
        raise UnsafeDestinationError(f"{path} is a file, not a folder; give a folder path")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UnsafeDestinationError(f"{path} is the current folder or one above it; it is never replaced. "
                                     f"Give a new folder instead, e.g. {path / 'pruned'}")
    if not path.is_dir():
        return path
    try:
        empty = not any(path.iterdir())
    except OSError as error:
        raise unwritable(path, error) from None
    if empty:
        return path
    marker = read_marker(path)
    if marker is None:
        raise UnsafeDestinationError(
            f"{path} exists, is not empty and was not written by prune-workbench (it has no {MARKER} "
            "marker), so it is never replaced, with or without overwrite. Choose a new or empty folder, "
            "or move its contents away yourself")
    kind = marker.get("kind")
    if kind not in replaceable:
        raise UnsafeDestinationError(f"{path} holds a prune-workbench {kind} folder, which a save never "
                                     "replaces; choose another folder")
    if not overwrite:
        raise DestinationExistsError(f"{path} already holds a saved {kind} folder; pass overwrite=True "
                                     "(--overwrite) to replace it, or choose another folder")
    return path


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_writable(dest: str | Path, overwrite: bool = False) -> Path:
    """The preflight before any long work: stale stages cleaned, the destination allowed, and its
    nearest existing parent folder writable (probed by creating and removing a hidden folder)."""
    path = Path(dest).expanduser()
    clean_stale(path.parent, path.name)
    check_destination(path, overwrite)
    base = _nearest_existing(path.parent.absolute())
    if not base.is_dir():
        raise UnsafeDestinationError(f"{base} is a file, so {path} cannot be created there; choose another folder")
    probe = base / _stage_name(path.name, "tmp")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as error:
        raise unwritable(path, error) from None
    return path


# --- writing ------------------------------------------------------------------------------------


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(folder: Path) -> None:
    """Give everything written into `folder` the modes a plain open()/mkdir() would: some writers
    (safetensors, tempfile) create 0600 files."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _swap(tmp: Path, dest: Path) -> None:
    """Backup-then-swap: old -> hidden backup, new -> dest, backup removed."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    backup = dest.parent / _stage_name(dest.name, "old")
    os.rename(dest, backup)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(backup, dest)
        raise
    try:
        _remove_ours(backup)
    except OSError as error:  # the new folder is in place; the next save cleans the backup
        log.warning("could not remove the backup %s (%s)", backup, error)


@contextmanager
def staged_folder(dest: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder to write into; swap it into `dest` when the block ends.

    The block's exception (or a refusal) removes the temporary folder and leaves `dest` as it was.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}: one of {', '.join(KINDS)}")
    dest = Path(dest).expanduser()
    clean_stale(dest.parent, dest.name)
    check_destination(dest, overwrite)
    tmp = dest.parent / _stage_name(dest.name, "tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)  # not mkdtemp: its 0700 would ignore the umask
    except OSError as error:
        raise unwritable(dest, error) from None
    try:
        write_marker(tmp, kind, complete=False, pid=os.getpid(), host=socket.gethostname())
        yield tmp
        write_marker(tmp, kind, complete=True)
        _usual_modes(tmp)
        check_destination(dest, overwrite)  # it may have changed while we wrote
        _swap(tmp, dest)
    except BaseException as error:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if _errno_of(error) in _WRITE_ERRNOS and not isinstance(error, SaveError):
            raise unwritable(dest, error) from error
        raise


def save_folder(dest: str | Path, write: Callable[[Path], object], kind: str, overwrite: bool = False) -> Path:
    """`write(folder)` into a temporary sibling of `dest`, then swap it into place; returns `dest`."""
    with staged_folder(dest, kind, overwrite) as tmp:
        write(tmp)
    return Path(dest).expanduser()


# --- model folders --------------------------------------------------------------------------


@contextmanager
def saveable(model: nn.Module) -> Iterator[nn.Module]:
    """Let `save_pretrained` accept a model loaded from GGUF, and put its quantizer back after.

    A dequantized GGUF model still carries a quantizer and `quantization_config`; transformers
    refuses to save it until both are gone. The caller's model is left as it was.
    """
    from workbench.models import strip_quantizer

    config = getattr(model, "config", None)
    missing = object()
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(config, "quantization_config", missing) if config is not None else missing
    is_quantized = model.__dict__.get("is_quantized", missing)
    strip_quantizer(model)
    try:
        yield model
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if quant_config is not missing:
            config.quantization_config = quant_config
        if is_quantized is not missing:
            model.__dict__["is_quantized"] = is_quantized


def patch_config(folder: Path, entry: dict) -> None:
    """Add a `workbench` entry to config.json, so the saved config says how sparse the model is."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["workbench"] = entry
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model_folder(model, tokenizer, dest: str | Path, overwrite: bool = False) -> Path:
    """`save_pretrained` (safetensors) and the tokenizer, as a model folder of ours."""
    from workbench.models import strip_quantizer

    def write(folder: Path) -> None:
        strip_quantizer(model).save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return save_folder(dest, write, "model", overwrite)


__all__ = ["MARKER", "DestinationExistsError", "ExportError", "SaveError", "UnsafeDestinationError",
           "UnwritableDestinationError", "check_destination", "check_writable", "clean_stale",
           "create_temp_file", "is_ours", "patch_config", "read_marker", "save_folder",
           "save_model_folder", "saveable", "staged_folder", "write_marker"]
