"""The one folder writer: never replaces what we did not write, survives a kill at any step, fails
cleanly on a full or read-only disk, and writes with the usual permissions."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workbench import saving
from workbench.runs import create_run
from workbench.saving import (
    MARKER,
    DestinationExistsError,
    UnsafeDestinationError,
    UnwritableDestinationError,
    check_writable,
    clean_stale,
    read_marker,
    save_folder,
)

ROOT = Path(__file__).resolve().parents[1]
OLD = {"a.txt": "old", "sub/b.txt": "old b", "sub/deeper/c.txt": "old c"}
NEW = {"a.txt": "new", "sub/b.txt": "new b", "d.txt": "new d"}


def _writer(files: dict[str, str]):
    def write(folder: Path) -> None:
        for name, text in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return write


def _content(folder: Path) -> dict[str, str] | None:
    """{relative path: text} of a folder, its marker left out; None when it does not exist."""
    if not folder.is_dir():
        return None
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _ours(folder: Path, files=OLD) -> Path:
    return save_folder(folder, _writer(files), "model")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- what may be replaced -----------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("layout", ["file", "subfolders only"])
def test_a_folder_that_is_not_ours_is_never_replaced(tmp_path, overwrite, layout):
    dest = tmp_path / "project"
    if layout == "file":
        dest.mkdir()
        (dest / "thesis.txt").write_text("years of work")
    else:
        (dest / "data" / "raw").mkdir(parents=True)
        (dest / "src").mkdir()
    before = _snapshot(dest), sorted(p.name for p in dest.rglob("*"))
    for attempt in (lambda: save_folder(dest, _writer(NEW), "model", overwrite),
                    lambda: check_writable(dest, overwrite)):
        with pytest.raises(UnsafeDestinationError) as caught:
            attempt()
        message = str(caught.value)
        assert str(dest) in message and "not written by prune-workbench" in message
        assert "never replaced" in message and "Choose a new or empty folder" in message
    assert (_snapshot(dest), sorted(p.name for p in dest.rglob("*"))) == before
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_the_current_folder_is_never_a_destination(tmp_path, monkeypatch, out):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "train.py").write_text("print('mine')")
    monkeypatch.chdir(project)
    with pytest.raises(UnsafeDestinationError, match="never replaced"):
        save_folder(out, _writer(NEW), "model", overwrite=True)
    # even a folder of ours is not replaced while we stand in it
    ours = _ours(tmp_path / "ours")
    monkeypatch.chdir(ours)
    with pytest.raises(UnsafeDestinationError, match="current folder"):
        save_folder(".", _writer(NEW), "model", overwrite=True)
    assert _content(ours) == OLD
    assert (project / "train.py").read_text() == "print('mine')"
    assert _hidden(tmp_path) == [] and _hidden(project) == []


def test_a_folder_of_ours_is_replaced_only_when_asked(tmp_path):
    dest = _ours(tmp_path / "out")
    marker = read_marker(dest)
    assert marker["kind"] == "model" and marker["complete"] is True and marker["version"]
    with pytest.raises(DestinationExistsError, match="overwrite") as caught:
        save_folder(dest, _writer(NEW), "model")
    assert isinstance(caught.value, FileExistsError) and isinstance(caught.value, ValueError)
    assert _content(dest) == OLD
    save_folder(dest, _writer(NEW), "export", overwrite=True)
    assert _content(dest) == NEW and read_marker(dest)["kind"] == "export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_written_without_asking(tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    save_folder(dest, _writer(NEW), "model")
    assert _content(dest) == NEW and read_marker(dest)["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_links_files_and_run_folders_are_refused(tmp_path):
    target = _ours(tmp_path / "target")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    (tmp_path / "file").write_text("x")
    run = create_run(tmp_path / "runs", "prune", {"method": "wanda"})
    for dest, message in [(tmp_path / "link", "symbolic link"), (tmp_path / "file", "is a file"),
                          (run.path, "run folder")]:
        with pytest.raises(UnsafeDestinationError, match=message):
            save_folder(dest, _writer(NEW), "model", overwrite=True)
    assert _content(target) == OLD and (tmp_path / "file").read_text() == "x"
    assert (run.path / "run.json").is_file()


# --- a kill at any step -------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    from workbench import saving

    dest, phase = Path(sys.argv[1]), sys.argv[2]
    step, _, at = phase.partition(":")
    calls = {"rename": 0, "unlink": 0}

    def killing(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            if step == name and calls[name] == int(at):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    os.rename = killing("rename", os.rename)
    os.unlink = killing("unlink", os.unlink)

    def write(folder):
        (folder / "a.txt").write_text("new")
        if step == "write":
            os.kill(os.getpid(), signal.SIGKILL)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text("new b")
        (folder / "d.txt").write_text("new d")

    saving.save_folder(dest, write, "model", overwrite=True)
""")


def _run_child(dest: Path, phase: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", CHILD, str(dest), phase], env=env, timeout=120).returncode


# rename:1 moves the old folder aside, rename:2 moves the new one in, unlink:k removes the backup
@pytest.mark.parametrize("phase, survivor", [("write", OLD), ("rename:1", OLD), ("rename:2", OLD),
                                             ("unlink:1", NEW), ("unlink:3", NEW), ("none", NEW)])
def test_a_kill_during_overwrite_leaves_the_old_or_the_new_folder(tmp_path, phase, survivor):
    dest = _ours(tmp_path / "out")
    code = _run_child(dest, phase)
    assert code == (0 if phase == "none" else -9)
    now = _content(dest)
    if phase == "rename:2":  # between the two renames: the old folder, complete, under its backup name
        assert now is None
        (backup,) = [p for p in tmp_path.iterdir() if ".pwb-old-" in p.name]
        assert _content(backup) == OLD and read_marker(backup)["complete"]
    else:
        assert now in (OLD, NEW) and now == survivor
    # the next start (the CLI's preflight) puts things right and leaves nothing hidden
    check_writable(dest, overwrite=True)
    assert _content(dest) == survivor and read_marker(dest)["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_folder(dest, _writer({"final.txt": "x"}), "model", overwrite=True)
    assert _content(dest) == {"final.txt": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cleanup_leaves_what_is_not_recognisably_ours(tmp_path):
    lookalike = tmp_path / ".out.pwb-tmp-999999999-abcdef12"  # our name, no marker, not empty
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine")
    live = tmp_path / f".out.pwb-tmp-{os.getpid()}-abcdef12"  # a writer that is still running
    live.mkdir()
    saving.write_marker(live, "model", complete=False)
    other = tmp_path / ".something-else"
    other.mkdir()
    assert clean_stale(tmp_path) == []
    assert (lookalike / "notes.txt").read_text() == "mine" and live.is_dir() and other.is_dir()
    dead = tmp_path / ".out.pwb-tmp-999999999-0123abcd"
    dead.mkdir()
    saving.write_marker(dead, "model", complete=False)
    assert clean_stale(tmp_path, "out") == [dead] and not dead.exists()


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = _ours(tmp_path / "out")
    real, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(saving.os, "rename", second_fails)
    with pytest.raises(UnwritableDestinationError, match="permission denied"):
        save_folder(dest, _writer(NEW), "model", overwrite=True)
    assert _content(dest) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- full and read-only disks ---------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, ro): a small tmpfs (as root); skipped only where mounting is not allowed."""
    mounted = []

    def mount(name: str, size: str = "1m", ro: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def test_disk_full_while_writing_is_a_clear_error_and_keeps_the_old_folder(tmp_path):
    dest = _ours(tmp_path / "out")

    def write(folder: Path) -> None:
        (folder / "a.txt").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    with pytest.raises(UnwritableDestinationError) as caught:
        save_folder(dest, write, "model", overwrite=True)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, ValueError)
    assert str(dest) in str(caught.value) and "disk is full" in str(caught.value)
    assert "Free some space" in str(caught.value)
    assert _content(dest) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_really_full_disk_fails_cleanly(tmpfs):
    from tiny_models import tiny_model

    disk = tmpfs("small", size="64k")  # the tiny model's weights need about 400 KiB
    old = _ours(disk / "out")
    with pytest.raises(UnwritableDestinationError, match="disk is full"):
        saving.save_model_folder(tiny_model("llama"), None, old, overwrite=True)
    assert _content(old) == OLD
    assert sorted(p.name for p in disk.iterdir()) == ["out"]


def test_a_read_only_disk_is_refused_before_any_work(tmpfs):
    disk = tmpfs("disk")
    old = _ours(disk / "out")
    _remount_read_only(disk)
    for dest in (old, disk / "new", disk / "deeper" / "new"):
        with pytest.raises(UnwritableDestinationError, match="read-only") as caught:
            check_writable(dest, overwrite=True)
        assert caught.value.errno == errno.EROFS and "writable disk" in str(caught.value)
        with pytest.raises(UnwritableDestinationError, match="read-only"):
            save_folder(dest, _writer(NEW), "model", overwrite=True)
    assert _content(old) == OLD
    read_only = tmpfs("ro", ro=True)
    with pytest.raises(UnwritableDestinationError, match="read-only"):
        check_writable(read_only / "x")


# --- permissions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_folders_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        dest = _ours(tmp_path / "out")
        temp_file = saving.create_temp_file(tmp_path / "x.zip")
        run = create_run(tmp_path / "runs", "prune", {})
    finally:
        os.umask(previous)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [dest, *dest.rglob("*"), temp_file, run.path,
                                                          *run.path.iterdir()]}
    for path, mode in modes.items():
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_an_export_respects_the_umask(tmp_path):
    from tiny_models import tiny_model

    from workbench.export import export_model

    previous = os.umask(0o022)
    try:
        exported = export_model(tiny_model("llama"), None, tmp_path, "perm", formats=("masked", "compact"))
    finally:
        os.umask(previous)
    for path in [exported.path, exported.path / "compact", exported.zip_path, *exported.files]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


# --- the CLI checks before it loads or prunes -----------------------------------------------------


def _cli(capsys, monkeypatch, *argv):
    from workbench import cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(cli, "load_from_args", never)
    code = cli.main([*map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_prune_out_is_refused_before_pruning(tmp_path, capsys, monkeypatch, overwrite):
    notes = tmp_path / "notes"
    (notes / "drafts").mkdir(parents=True)
    (notes / "thesis.txt").write_text("years of work")
    code, err = _cli(capsys, monkeypatch, "prune", "--model", "x", "--out", notes, *overwrite)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "never replaced" in err[0]
    assert (notes / "thesis.txt").read_text() == "years of work" and (notes / "drafts").is_dir()
    monkeypatch.chdir(notes)
    code, err = _cli(capsys, monkeypatch, "prune", "--model", "x", "--out", ".", *overwrite)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")
    assert sorted(p.name for p in notes.iterdir()) == ["drafts", "thesis.txt"]
    code, err = _cli(capsys, monkeypatch, "export", "--model", "x", "--root", tmp_path, "--name", "notes",
                     *overwrite)
    assert code == 2 and len(err) == 1 and "never replaced" in err[0]
    assert _hidden(tmp_path) == []


def test_prune_out_on_a_read_only_disk_is_refused_before_pruning(tmpfs, capsys, monkeypatch):
    disk = tmpfs("ro", ro=True)
    code, err = _cli(capsys, monkeypatch, "prune", "--model", "x", "--out", disk / "pruned")
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "read-only" in err[0]


def test_prune_out_replaces_a_folder_of_ours_and_marks_it(tmp_path, capsys):
    from conftest import char_tokenizer
    from tiny_models import tiny_model

    from workbench.cli import save_model_folder

    out = save_model_folder(tiny_model("llama"), char_tokenizer(), tmp_path / "out")
    assert read_marker(out)["kind"] == "model" and (out / "model.safetensors").is_file()
    with pytest.raises(DestinationExistsError, match="--overwrite"):
        save_model_folder(tiny_model("llama", seed=1), None, out)
    before = (out / "model.safetensors").read_bytes()
    save_model_folder(tiny_model("llama", seed=1), None, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before and not (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
