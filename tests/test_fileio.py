"""fileio: atomic writes keep the old file on any failure, leave no temp file, clean up after a
killed writer, and name the file when the disk is full."""

import errno
import os
import stat

import pytest
import torch

from minillm.util.fileio import (
    DiskFullError,
    atomic_directory,
    atomic_write,
    atomic_write_bytes,
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
    stale = [f".ckpt.pt.tmp.{DEAD_PID}",  # this version's name, dead writer
             f".ckpt.pt.tmp{DEAD_PID}",  # the name older minillm versions used
             ".ckpt.pt.tmp",  # older still: no pid at all
             f".ckpt.pt.tmp.{os.getpid()}"]  # ours: an earlier writer that had our pid
    live = f".ckpt.pt.tmp.{os.getppid()}"  # another live process writing the same target: kept
    other = f".other.bin.tmp.{DEAD_PID}"  # another target's: left to that target's writer
    for name in stale + [live, other]:
        (tmp_path / name).write_bytes(b"x" * 100)
    atomic_write_bytes(path, b"new")
    assert names(tmp_path) == sorted([live, other, "ckpt.pt"])
    # a whole-directory sweep (what training does on out_dir at start) takes
    # every target's stale ones
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [other]
    assert names(tmp_path) == sorted([live, "ckpt.pt"])


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # torch.save
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4224 vs 4160"),
])
def test_a_full_disk_names_the_file(tmp_path, error):
    path = tmp_path / "ckpt.pt"
    atomic_write_bytes(path, b"old")
    with pytest.raises(DiskFullError) as e:
        with atomic_write(path) as f:
            f.write(b"partial")
            raise error
    assert str(e.value) == (f"{path}: the disk is full (no space left on device); free some space "
                            f"and retry (the previous file, if any, is unchanged)")
    assert (e.value.errno == errno.ENOSPC and e.value.filename == str(path)
            and e.value.__cause__ is error)
    assert path.read_bytes() == b"old" and names(tmp_path) == ["ckpt.pt"]


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'no'}/x.bin: directory "
                                                f"{tmp_path / 'no'} does not"):
        atomic_write_bytes(tmp_path / "no" / "x.bin", b"")


def test_atomic_directory_replaces_whole_with_normal_permissions(tmp_path):
    out = tmp_path / "export"
    (tmp_path / f".export.tmp.{DEAD_PID}").mkdir()  # a killed export's half-written folder
    (tmp_path / f".export.tmp.{DEAD_PID}" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".export.old.tmp.{DEAD_PID}").mkdir()
    with atomic_directory(out) as d:
        (d / "a").write_bytes(b"1")
    assert names(tmp_path) == ["export"] and names(out) == ["a"]
    assert stat.S_IMODE(out.stat().st_mode) == normal_mode("dir")  # not mkdtemp's 0700
    with pytest.raises(ValueError):  # a failed export keeps the previous one
        with atomic_directory(out) as d:
            (d / "b").write_bytes(b"2")
            raise ValueError("bad adapter")
    assert names(tmp_path) == ["export"] and names(out) == ["a"]
    with atomic_directory(out) as d:  # a successful one replaces it as a whole
        (d / "b").write_bytes(b"2")
    assert names(tmp_path) == ["export"] and names(out) == ["b"]
