"""Files in and out, once for all of minillm: writes that a crash, a `kill -9` or a full disk never
leave half-done, and the one reader of the text formats users hand us (JSON, JSON lines, TOML),
whose every failure is one line naming the file (and the line).

    with atomic_write(out_dir / "ckpt.pt") as f:      # f: a binary file opened on a temp file
        torch.save(state, f)                          # (or f.write(bytes), array.tofile(f), ...)
    # on success: flushed, fsynced, renamed over ckpt.pt, the directory fsynced
    # on an exception: the temp file is removed and ckpt.pt is still the old file

    atomic_write_bytes(path, data)                    # the same, for bytes already in memory

    with atomic_directory(out / "hf", "hf export") as d:  # d: an empty temp directory beside
        save_hf(model, d)                             # on success it replaces out/hf as a whole

    claim_directory(out_dir, "training run")          # new, empty or minillm's own; else refused
    lock_directory(out_dir)                           # one writer per run directory

How: the data goes to `.minillm-tmp.{pid}.{name}` in the same directory (a rename is only atomic
within one file system), is flushed and fsynced, then `os.replace`d onto the target (readers see the
old file or the new one, never a mix), and the directory is fsynced so that the rename itself
survives a power cut.

A writer killed with `kill -9` cannot clean up, so its temp file stays. Each `atomic_write` first
removes the temp files of *the same target* whose writer is gone (the pid in the name is no longer
alive, or is our own: a leftover from an earlier writer that had our pid). Only names with the
`.minillm-tmp.` prefix are ever removed, so no user file can be taken for a temp file. A temp file
of a live other process is kept: we expect one writer per target, but two processes on one machine
(a DDP rank, a second run) must never delete each other's file mid-write.
`remove_stale_temp_files(directory)` applies the same rule to a whole directory; training calls it
on out_dir at start, so a killed run's leftovers go even before the first checkpoint. (The pid test
is per machine: on a file system shared between hosts, a stale temp file whose pid happens to be
alive here stays until a later run.)

Ownership (the section "what minillm owns" below): every directory minillm writes whole carries a
`.minillm` marker naming its kind; minillm writes into, or replaces, only its own directory of that
kind, and refuses anything else at an output path with one line. `lock_directory` keeps a second
training run out of a run directory that is in use.

A full disk shows up as OSError(ENOSPC) from write/flush/fsync, or, from torch.save's C++ zip
writer, as a RuntimeError "... unexpected pos N vs M" (or "failed writing") with no path. Both
become one `DiskFullError` that names the file, but the RuntimeError only when the file system
really is nearly full: the same text also comes from a write interrupted by Ctrl-C.

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

# .minillm-tmp.{pid}.{target name}: a name no user file has, so the sweep can never take one
TEMP_PREFIX = ".minillm-tmp."
_TEMP_NAME = re.compile(r"^\.minillm-tmp\.(?P<pid>\d+)\.(?P<target>.+)$")
MARKER = ".minillm"  # {"kind": ...}: in every directory minillm owns (a run, an export, a cache)
LOCK = ".minillm-lock"  # held (fcntl.flock) by the one process writing into a run directory


class DiskFullError(OSError):
    """The disk filled up while writing `path`; the old file (if any) is intact."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC,
                         f"{path}: the disk is full (no space left on device); free some space "
                         f"and retry (the previous file, if any, is unchanged)")
        self.filename = str(path)

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return self.strerror


def temp_path(path: Path, suffix: str = "") -> Path:
    """The temp file (or directory) atomic_write uses for `path` in this process."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}.{path.name}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale(pid: str) -> bool:
    return int(pid) == os.getpid() or not _pid_alive(int(pid))


def remove_stale_temp_files(directory: Path, target: str | None = None) -> list[Path]:
    """Remove minillm's own temp files (and temp directories) left in `directory` by dead writers:
    all targets, or only those of the file named `target` (and its `.old` aside). Only names with
    the `.minillm-tmp.{pid}.` prefix are ever touched. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        m = _TEMP_NAME.match(entry.name)
        wanted = target is None or m is not None and m["target"] in (target, f"{target}.old")
        if m is None or not wanted or not _is_stale(m["pid"]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


FULL_DISK_MARGIN = 1 << 20  # a file system with less free than this (bytes) is full for a writer


def is_disk_full(exc: BaseException, path: Path | None = None) -> bool:
    """ENOSPC (or EDQUOT, a full quota) from the OS; or torch.save's zip writer failing mid-file
    while the file system of `path` has (almost) no room left. The writer's own text is the same
    for a write cut short by Ctrl-C, which must not be reported as a full disk."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # numpy's tofile reports a short write as OSError("N requested and M written"), with no errno
    short_write = isinstance(exc, OSError) and exc.errno is None and "written" in str(exc)
    writer_failed = isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc)
                                                       or "failed writing" in str(exc))
    if not (short_write or writer_failed) or path is None:
        return short_write or writer_failed
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return True
    return st.f_bavail * st.f_frsize < FULL_DISK_MARGIN


def _raise_disk_full(exc: BaseException, path: Path):
    # an inner write may have named its file
    if is_disk_full(exc, path) and not isinstance(exc, DiskFullError):
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
def atomic_directory(path: str | Path, kind: str) -> Iterator[Path]:
    """Yield an empty temp directory beside `path` (marked as minillm's `kind`, see
    claim_directory); when the `with` block succeeds it replaces `path` as a whole. Only a directory
    minillm wrote as the same kind is ever replaced: anything else at `path` (a user's directory or
    file, a device, minillm's directory of another kind) is refused with one line before any work is
    done. The old directory is moved aside and deleted after the rename (a directory cannot be
    renamed over a non-empty one). On an exception the temp directory is deleted and `path` is
    unchanged. The directory gets the usual permissions, 0777 minus the umask, like os.makedirs."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
    replacing = path.exists() or path.is_symlink()
    if replacing:
        require_owned(path, kind)
    remove_stale_temp_files(path.parent, path.name)
    tmp, old = temp_path(path), temp_path(path, ".old")
    os.mkdir(tmp)
    try:
        _write_marker(tmp, kind)
        yield tmp
        if replacing:
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


# --------------------------------------------------------------------------------------------------
# what minillm owns: a marker in each directory it writes whole, and one writer per run directory
#
# A directory minillm creates (a training run's out_dir, an HF or Meta export, a token cache) holds
# `.minillm`, {"kind": ...}. minillm writes into, or replaces, only such a directory of the same
# kind; an existing directory without the marker is someone else's and is refused with one line
# (unless it is empty, or holds what an older minillm wrote there: `legacy` names those files).
# This is the one rule behind every output path of every job: nothing minillm did not write is
# deleted or overwritten, and no flag turns that off (move the old thing away, or pick another
# path).


def _write_marker(directory: Path, kind: str):
    atomic_write_bytes(directory / MARKER, (json.dumps({"kind": kind}) + "\n").encode())


def owned_kind(path: str | Path) -> str | None:
    """The kind a directory's marker records, or None (no marker, not a directory, unreadable)."""
    marker = Path(path) / MARKER
    try:
        obj = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (OSError, ValueError):
        return None
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def require_owned(path: Path, kind: str):
    """Refuse, with one line, to replace `path` unless it is minillm's directory of this kind."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        what = ("a symlink" if path.is_symlink() else "a file" if path.is_file()
                else "not a directory")
        raise FileExistsError(f"{path}: exists and is {what}; minillm writes a {kind} as a new "
                              f"directory and never replaces what it did not write (pick another "
                              f"path)")
    found = owned_kind(path)
    if found != kind:
        held = f"minillm's {found}" if found else "files minillm did not write (no .minillm marker)"
        raise FileExistsError(f"{path}: exists and holds {held}, not a minillm {kind}; minillm "
                              f"never replaces it: pick another path, or move it away first")


def claim_directory(path: str | Path, kind: str, legacy: tuple[str, ...] = ()) -> Path:
    """Make `path` a directory minillm may write `kind` files into: create it (with its parents),
    or take an existing one that is empty (or holds only minillm's temp files), marked with this
    kind, or holds one of the `legacy` files an older minillm wrote there without a marker.
    Anything else is refused with one line (FileExistsError) before anything is written."""
    if str(path).strip() in ("", "."):
        raise ValueError(f"the {kind} directory must be named (found {str(path)!r}): minillm never "
                         f"writes into the working directory itself")
    path = Path(path)
    if path.exists() or path.is_symlink():
        unmarked_dir = path.is_dir() and not path.is_symlink() and owned_kind(path) is None
        # empty: nothing in it but minillm's own temp files (a writer killed before the marker)
        empty = unmarked_dir and all(_TEMP_NAME.match(p.name) for p in path.iterdir())
        adopt = empty or unmarked_dir and any((path / name).exists() for name in legacy)
        if not adopt:
            require_owned(path, kind)
    else:
        path.mkdir(parents=True, exist_ok=True)
    if owned_kind(path) != kind:
        _write_marker(path, kind)
    return path


def check_replaceable_file(path: str | Path, is_ours, what: str):
    """Refuse, with one line, to write the file `path` over anything but a file minillm wrote
    (`is_ours(path)` decides, e.g. a GGUF whose metadata names minillm as its writer)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_file() or not is_ours(path):
        kind = ("a symlink" if path.is_symlink() else "a directory" if path.is_dir()
                else "not a regular file" if not path.is_file() else "a file minillm did not write")
        raise FileExistsError(f"{path}: exists and is {kind}; minillm writes a {what} only to a "
                              f"new path or over its own earlier {what} (pick another path)")


# the lock files this process holds, by inode (a run directory may be moved while held), and their
# descriptors, kept open until the process ends
_HELD_LOCKS: dict[tuple[int, int], int] = {}


def lock_directory(directory: str | Path, what: str = "training run"):
    """Take the advisory lock (fcntl.flock) on `directory/.minillm-lock` for the rest of this
    process: one writer per run directory. A second process gets one line naming the pid that
    holds it; this process may take it again (the tour and the tests train into one directory
    twice). The kernel drops a flock when its process dies, so a lock left by a killed run never
    blocks; the file keeps the holder's pid only for the message."""
    import fcntl  # POSIX, as the rest of minillm's file handling

    directory = Path(directory).resolve()
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) in _HELD_LOCKS:
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(f"{directory}: in use by another minillm {what} (pid {holder}, holding "
                           f"{path}); wait for it to end, or pick another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[(st.st_dev, st.st_ino)] = fd


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


def check_unicode(text: str, where: str) -> str:
    """`text`, or one error naming `where` when it holds a lone surrogate: what Python makes of
    bytes that are not UTF-8 on a command line (or a JSON "\\ud800" escape), which no tokenizer
    encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        raise ValueError(f"{where}: not valid Unicode text: a lone surrogate U+{code:04X} at "
                         f"character {e.start} (bytes that are not UTF-8?)") from None
    return text


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
