"""Files in and out, once for all of minillm: writes that a crash, a `kill -9` or a full disk never
leave half-done, and the one reader of the text formats users hand us (JSON, JSON lines, TOML),
whose every failure is one line naming the file (and the line).

    with atomic_write(out_dir / "ckpt.pt") as f:      # f: a binary file opened on a temp file
        torch.save(state, f)                          # (or f.write(bytes), array.tofile(f), ...)
    # on success: flushed, fsynced, renamed over ckpt.pt, the directory fsynced
    # on an exception: the temp file is removed and ckpt.pt is still the old file

    atomic_write_bytes(path, data)                    # the same, for bytes already in memory

    with atomic_directory(out / "merged") as d:       # d: an empty temp directory beside the target
        save_hf(model, d)                             # on success it replaces out/merged as a whole

How: the data goes to `.{name}.tmp.{pid}` in the same directory (a rename is only atomic within one
file system), is flushed and fsynced, then `os.replace`d onto the target (readers see the old file
or the new one, never a mix), and the directory is fsynced so that the rename itself survives a
power cut.

A writer killed with `kill -9` cannot clean up, so its temp file stays. Each `atomic_write` first
removes the temp files of *the same target* whose writer is gone: the pid in the name is no longer
alive (or is our own: a leftover from an earlier writer that had our pid), or the name carries no
pid (temp names of older minillm versions: `.{name}.tmp`, `.{name}.tmp{pid}`). A temp file of a live
other process is kept: we expect one writer per target, but two processes on one machine (a DDP
rank, a second run) must never delete each other's file mid-write.
`remove_stale_temp_files(directory)` applies the same rule to a whole directory; training calls it
on out_dir at start, so a killed run's leftovers go even before the first checkpoint. (The pid test
is per machine: on a file system shared between hosts, a stale temp file whose pid happens to be
alive here stays until a later run.)

A full disk shows up as OSError(ENOSPC) from write/flush/fsync, or, from torch.save's C++ zip
writer, as a RuntimeError "... unexpected pos N vs M" with no path. Both become one `DiskFullError`
that names the file.

Reading: `read_text` (UTF-8, regular files only, bounded size), then `read_json` /
`read_json_object`, `read_jsonl` (yields "file:LINE" with each value), `read_json_records` (a JSON
array or JSON lines) and `read_toml`. Not UTF-8, invalid or absurdly nested JSON, a device or a
directory: each is one ValueError.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# .{target name}.tmp.{pid}; also matches the older .{name}.tmp{pid} and .{name}.tmp (pid = "")
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp\.?(?P<pid>\d*)$")


class DiskFullError(OSError):
    """The disk filled up while writing `path`; the old file (if any) is intact."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC,
                         f"{path}: the disk is full (no space left on device); free some space "
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
    """Remove the temp files (and temp directories) left in `directory` by dead writers: all
    targets, or only those of the file named `target`. Returns what was removed."""
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
    return isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc)
                                              or "failed writing" in str(exc))


def _raise_disk_full(exc: BaseException, path: Path):
    # an inner write may have named its file
    if is_disk_full(exc) and not isinstance(exc, DiskFullError):
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
    replaces `path` (a file or directory already there is moved aside to `.{name}.old.tmp.{pid}`,
    then deleted: a directory cannot be renamed over a non-empty one). On an exception the temp
    directory is deleted and `path` is unchanged. The directory gets the usual permissions, 0777
    minus the umask, like os.makedirs (tempfile.mkdtemp would make it 0700). Stale temp directories
    of `path` are removed first, by the rule of atomic_write."""
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


# --------------------------------------------------------------------------------------------------
# reading


# a text minillm reads whole (a config, a prompts file, a task): 1 GiB at most
MAX_TEXT_BYTES = 1 << 30


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file (a leading BOM dropped), or one error naming the file: not
    found, a directory or a device (/dev/zero would never end), larger than max_bytes, unreadable,
    or not UTF-8 (with the line and the offending byte)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ValueError(f"{path}: expected a {what}, found {kind}")
    if st.st_size > max_bytes:
        raise ValueError(f"{path}: {what} of {st.st_size:,d} bytes is larger than the "
                         f"{max_bytes:,d} allowed")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text "
                         f"(byte {raw[e.start]:#04x} at offset {e.start})") from None


def parse_json(text: str, where: str):
    """json.loads with one error naming `where` (a file, or file:line) for invalid or too deeply
    nested JSON; JSON's own wording of the problem is kept after ours."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:  # our words first: json's own wording changes between Pythons
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        raise ValueError(f"{where}: invalid JSON at {at} ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: invalid JSON (nested too deeply to parse)") from None


def read_json(path: str | Path, what: str = "JSON file"):
    """The JSON value in a file (read_text's and parse_json's errors)."""
    return parse_json(read_text(path, what), str(path))


def read_json_object(path: str | Path, what: str = "JSON file") -> dict:
    """read_json, whose top level must be an object."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object in the {what}, "
                         f"found {type(obj).__name__}")
    return obj


def read_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[str, object]]:
    """("file:LINE", value) for each non-blank line of a JSON-lines file; a bad line is one error
    naming file:line (the 1-based line number an editor shows). Lines end at "\n" only: JSON strings
    may hold a raw U+2028 or form feed, which str.splitlines would cut at."""
    for lineno, line in enumerate(read_text(path, what).split("\n"), start=1):
        if line.strip():
            yield f"{path}:{lineno}", parse_json(line, f"{path}:{lineno}")


def read_json_records(path: str | Path, what: str = "data file") -> Iterator[tuple[str, object]]:
    """(where, record) from a JSON array file ("file[i]") or a JSONL file ("file:LINE"), told apart
    by the first character."""
    text = read_text(path, what)
    if text.lstrip().startswith("["):
        for i, record in enumerate(parse_json(text, str(path))):
            yield f"{path}[{i}]", record
        return
    yield from read_jsonl(path, what)


def read_toml(path: str | Path, what: str = "TOML file") -> dict:
    """A TOML file as a dict (read_text's errors, and one for TOML that does not parse)."""
    text = read_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: cannot parse the {what} ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: cannot parse the {what} (nested too deeply)") from None
