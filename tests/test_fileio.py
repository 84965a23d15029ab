"""fileio: atomic writes keep the old file on any failure, leave no temp file, clean up after a
killed writer, and name the file when the disk is full."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.util.fileio import (
    DiskFullError,
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
    claim_directory,
    lock_directory,
    remove_stale_temp_files,
    temp_path,
)

DEAD_PID = 4194305  # above the largest pid Linux hands out (2**22): no process can have it


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def normal_mode(kind: str) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if kind == "dir" else 0o666) & ~umask


def test_writes_fsyncs_and_replaces(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
                                                 or real_fsync(fd)))
    with atomic_write(path) as f:
        f.write(b"new ")
        torch.save({"x": torch.arange(3)}, f)  # torch.save takes the open file too
        # nothing visible before the end
        assert temp_path(path).exists() and path.read_bytes() == b"old"
    assert path.read_bytes()[:4] == b"new " and names(tmp_path) == ["a.bin"]
    # the file, then its directory (so the rename survives a power cut)
    assert synced == [False, True]
    assert stat.S_IMODE(path.stat().st_mode) == normal_mode("file")


def test_an_exception_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_write_bytes(path, b"version 1")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_write(path) as f:
                f.write(b"half of version 2")
                raise exc
        assert path.read_bytes() == b"version 1" and names(tmp_path) == ["ckpt.pt"]


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    path = tmp_path / "ckpt.pt"
    stale = [f".minillm-tmp.{DEAD_PID}.ckpt.pt",  # a dead writer's
             f".minillm-tmp.{os.getpid()}.ckpt.pt"]  # an earlier writer that had our pid
    live = f".minillm-tmp.{os.getppid()}.ckpt.pt"  # another live process writing it: kept
    other = f".minillm-tmp.{DEAD_PID}.other.bin"  # another target's: left to that target's writer
    # user files that only look like temp files (and older minillm's temp names): never touched
    users = [".notes.tmp", f".ckpt.pt.tmp.{DEAD_PID}", ".ckpt.pt.tmp", ".minillm-tmp.x.ckpt.pt"]
    for name in stale + [live, other] + users:
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / ".build.tmp").mkdir()  # a user's directory with a temp-like name
    (tmp_path / ".build.tmp" / "keep.txt").write_bytes(b"mine")
    atomic_write_bytes(path, b"new")
    assert names(tmp_path) == sorted([live, other, "ckpt.pt", ".build.tmp"] + users)
    # a whole-directory sweep (what training does on out_dir at start) takes every target's stale
    # ones, and only minillm's
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [other]
    assert names(tmp_path) == sorted([live, "ckpt.pt", ".build.tmp"] + users)
    assert (tmp_path / ".build.tmp" / "keep.txt").read_bytes() == b"mine"


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # torch.save
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4224 vs 4160"),
])
def test_a_full_disk_names_the_file(tmp_path, error, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_write_bytes(path, b"old")
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 100, 0, 0, 0, 255))  # 0 blocks available
    monkeypatch.setattr(os, "statvfs", lambda p: full)
    with pytest.raises(DiskFullError) as e:
        with atomic_write(path) as f:
            f.write(b"partial")
            raise error
    assert str(e.value) == (f"{path}: the disk is full (no space left on device); free some space "
                            f"and retry (the previous file, if any, is unchanged)")
    assert (e.value.errno == errno.ENOSPC and e.value.filename == str(path)
            and e.value.__cause__ is error)
    assert path.read_bytes() == b"old" and names(tmp_path) == ["ckpt.pt"]


def test_a_write_cut_short_on_a_roomy_disk_is_not_called_a_full_disk(tmp_path):
    # torch.save's writer says "unexpected pos" / "failed writing" for a write interrupted by
    # Ctrl-C too; with room on the file system that is not a full disk, and the error stays as is
    path = tmp_path / "ckpt.pt"
    atomic_write_bytes(path, b"old")
    error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(RuntimeError) as e:
        with atomic_write(path) as f:
            f.write(b"partial")
            raise error
    assert e.value is error and not isinstance(e.value, DiskFullError)
    assert path.read_bytes() == b"old" and names(tmp_path) == ["ckpt.pt"]


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'no'}/x.bin: directory "
                                                f"{tmp_path / 'no'} does not"):
        atomic_write_bytes(tmp_path / "no" / "x.bin", b"")


def test_atomic_directory_replaces_whole_with_normal_permissions(tmp_path):
    out = tmp_path / "export"
    # a killed export's half-written folder, and its aside
    (tmp_path / f".minillm-tmp.{DEAD_PID}.export").mkdir()
    (tmp_path / f".minillm-tmp.{DEAD_PID}.export" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".minillm-tmp.{DEAD_PID}.export.old").mkdir()
    with atomic_directory(out, "hf export") as d:
        (d / "a").write_bytes(b"1")
    assert names(tmp_path) == ["export"] and names(out) == [".minillm", "a"]
    assert stat.S_IMODE(out.stat().st_mode) == normal_mode("dir")  # not mkdtemp's 0700
    with pytest.raises(ValueError):  # a failed export keeps the previous one
        with atomic_directory(out, "hf export") as d:
            (d / "b").write_bytes(b"2")
            raise ValueError("bad adapter")
    assert names(tmp_path) == ["export"] and names(out) == [".minillm", "a"]
    with atomic_directory(out, "hf export") as d:  # a successful one replaces it as a whole
        (d / "b").write_bytes(b"2")
    assert names(tmp_path) == ["export"] and names(out) == [".minillm", "b"]


def test_what_minillm_did_not_write_is_never_replaced(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    report = tmp_path / "report.txt"
    report.write_text("mine")
    run = claim_directory(tmp_path / "run", "training run")  # minillm's, of another kind
    for target, found in ((user, "files minillm did not write"), (report, "is a file"),
                          (run, "minillm's training run"), (Path("/dev/null"), "not a directory")):
        with pytest.raises(FileExistsError, match=found):
            with atomic_directory(target, "hf export"):
                raise AssertionError("never reached: refused before any work")
    assert (user / "notes.txt").read_text() == "mine" and report.read_text() == "mine"
    assert Path("/dev/null").is_char_device() and names(run) == [".minillm"]
    assert not [n for n in names(tmp_path) if n.startswith(".minillm-tmp")]


def test_claim_directory_takes_new_empty_own_and_legacy_dirs_only(tmp_path):
    assert names(claim_directory(tmp_path / "a" / "b", "training run")) == [".minillm"]
    (tmp_path / "empty").mkdir()
    claim_directory(tmp_path / "empty", "training run")
    claim_directory(tmp_path / "empty", "training run")  # again: its own kind
    old = tmp_path / "old-run"  # what an older minillm left, without a marker
    old.mkdir()
    (old / "train_config.json").write_text("{}")
    claim_directory(old, "training run", legacy=("train_config.json",))
    assert names(old) == [".minillm", "train_config.json"]
    with pytest.raises(FileExistsError, match="minillm's training run, not a minillm data cache"):
        claim_directory(old, "data cache")
    for bad in ("", "."):
        with pytest.raises(ValueError, match="must be named"):
            claim_directory(bad, "training run")


def test_one_writer_per_run_directory(tmp_path):
    claim_directory(tmp_path / "run", "training run")
    code = ("import sys, time; from minillm.util.fileio import lock_directory; "
            "lock_directory(sys.argv[1]); print('locked', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by another minillm training run "
                                               rf"\(pid {holder.pid}, holding"):
            lock_directory(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    lock_directory(tmp_path / "run")  # a killed holder's lock never blocks
    lock_directory(tmp_path / "run")  # and this process may take it again
