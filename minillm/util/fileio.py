"""Writing files so that a crash, a `kill -9` or a full disk never leaves a half-written one behind.

    with atomic_write(out_dir / "ckpt.pt") as f:      # f: a binary file opened on a temp file
        torch.save(state, f)                          # (or f.write(bytes), array.tofile(f), ...)
    # on success: flushed, fsynced, renamed over ckpt.pt, the directory fsynced
    # on an exception: the temp file is removed and ckpt.pt is still the old file

    atomic_write_bytes(path, data)                    # the same, for bytes already in memory

    with atomic_directory(out / "merged") as d:       # d: an empty temp directory beside the target
        save_hf(model, d)                             # on success it replaces out/merged as a whole

How: the data goes to `.{name}.tmp.{pid}` in the same directory (a rename is only atomic within one file
system), is flushed and fsynced, then `os.replace`d onto the target (readers see the old file or the new
one, never a mix), and the directory is fsynced so that the rename itself survives a power cut.

A writer killed with `kill -9` cannot clean up, so its temp file stays. Each `atomic_write` first removes
the temp files of *the same target* whose writer is gone: the pid in the name is no longer alive (or is
our own: a leftover from an earlier writer that had our pid), or the name carries no pid (temp names of
older minillm versions: `.{name}.tmp`, `.{name}.tmp{pid}`). A temp file of a live other process is kept: we
expect one writer per target, but two processes on one machine (a DDP rank, a second run) must never
delete each other's file mid-write. `remove_stale_temp_files(directory)` applies the same rule to a whole
directory; training calls it on out_dir at start, so a killed run's leftovers go even before the first
checkpoint. (The pid test is per machine: on a file system shared between hosts, a stale temp file whose
pid happens to be alive here stays until a later run.)

A full disk shows up as OSError(ENOSPC) from write/flush/fsync, or, from torch.save's C++ zip writer, as a
RuntimeError "... unexpected pos N vs M" with no path. Both become one `DiskFullError` that names the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# .{target name}.tmp.{pid}; also matches the older .{name}.tmp{pid} and .{name}.tmp (pid = "")
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp\.?(?P<pid>\d*)$")


class DiskFullError(OSError):
    """The disk filled up while writing `path`; the old file (if any) is intact."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"{path}: the disk is full (no space left on device); free some space "
                                       f"and retry (the previous file, if any, is unchanged)")
        self.filename = str(path)

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return self.strerror


def temp_path(path: Path) -> Path:
    """The temp file atomic_write uses for `path` in this process."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale(pid: str) -> bool:
    return pid == "" or int(pid) == os.getpid() or not _pid_alive(int(pid))


def remove_stale_temp_files(directory: Path, target: str | None = None) -> list[Path]:
    """Remove the temp files (and temp directories) left in `directory` by dead writers: all targets, or
    only those of the file named `target`. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        m = _TEMP_NAME.match(entry.name)
        if m is None or (target is not None and m["target"] != target) or not _is_stale(m["pid"]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or EDQUOT, a full quota) from the OS, or torch.save's zip writer failing mid-file."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "failed writing" in str(exc))


def _raise_disk_full(exc: BaseException, path: Path):
    if is_disk_full(exc) and not isinstance(exc, DiskFullError):  # an inner write may have named its file
        raise DiskFullError(path) from exc


def _fsync_directory(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file whose contents replace `path` only if the `with` block succeeds.

    The file is created with the usual permissions (0666 minus the umask), like open(path, "wb").
    Failure modes: a missing parent directory raises FileNotFoundError naming it; a full disk raises
    DiskFullError naming `path`; any other exception propagates unchanged. In every failure case the
    temp file is gone and `path` holds what it held before."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
    remove_stale_temp_files(path.parent, path.name)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as exc:  # also KeyboardInterrupt: never leave the temp file
        tmp.unlink(missing_ok=True)
        _raise_disk_full(exc, path)
        raise


def atomic_write_bytes(path: str | Path, data: bytes):
    """atomic_write for bytes already in memory."""
    with atomic_write(path) as f:
        f.write(data)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty directory `.{name}.tmp.{pid}` beside `path`; when the `with` block succeeds it
    replaces `path` (a file or directory already there is moved aside to `.{name}.old.tmp.{pid}`, then
    deleted: a directory cannot be renamed over a non-empty one). On an exception the temp directory is
    deleted and `path` is unchanged. The directory gets the usual permissions, 0777 minus the umask, like
    os.makedirs (tempfile.mkdtemp would make it 0700). Stale temp directories of `path` are removed first,
    by the rule of atomic_write."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
    old = path.with_name(f".{path.name}.old.tmp.{os.getpid()}")
    for target in (path.name, f"{path.name}.old"):
        remove_stale_temp_files(path.parent, target)
    tmp = temp_path(path)
    os.mkdir(tmp)
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)  # put the previous one back
            raise
        _fsync_directory(path.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk_full(exc, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink(missing_ok=True)


# -----------------------------------------------------------------------------------------------------
# reading


def read_json_object(path: str | Path, what: str = "file") -> dict:
    """Parse a JSON file whose top level must be an object: one clear error naming the file for a missing
    or unreadable file, bytes that are not UTF-8, invalid or absurdly nested JSON, or a top level that is
    not an object."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8").removeprefix("\ufeff"))  # JSON is UTF-8 (a BOM is allowed)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a {what}: JSON nested too deeply to parse") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj
