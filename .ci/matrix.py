"""The compatibility matrix: the test suite in one fresh venv per cell, as a user's pip resolves it.

    python3 .ci/matrix.py                 # the cells CI runs: py3.13, floors, torch-cpu
    python3 .ci/matrix.py py3.12 floors   # just these cells (py3.12 runs only when named)

The README's own path (Python 3.11, whatever pip resolves today) is run by .ci/run through run.py;
the cells here add what a new user might have instead:

    py3.13           today's newest versions on the newest supported Python
    py3.12           the same on Python 3.12, between the README's 3.11 and 3.13: run by hand, not
                     in CI (CI's 90 minutes hold the README's path and three cells with room)
    floors           Python 3.11 with every dependency at the floor pyproject.toml declares
                     (`name>=X` installed as `name==X`; torch's floor brings the Triton it pins)
    torch-cpu        Python 3.11 with the CPU build of torch 2.13.0 (the one wheel on these
                     machines' disk) and whatever Triton pip then resolves

In every cell the suite runs the Triton kernels through the interpreter against their references and
compiles every kernel variant ahead of time for sm_80 and sm_90 (tests/test_kernels_compile.py), so
"works with this Triton" is tested without a GPU. The cells leave out the two end-to-end files (the
tour, and the docs' runnable blocks: about 8 minutes of training runs on 2 cores that call the
library the other tests cover); the README cell runs them, so CI stays well inside its 90 minutes.

Wheels are downloaded once: each cell first `pip download`s its requirements into one shared
wheelhouse (~/.cache/minillm-ci/wheels, kept between runs; pip skips a file that is already there),
then installs from it with --no-index. pip's own HTTP cache is not relied on (on these machines it
stores nothing). Venvs live in .ci-venvs/ (ignored by git), are made anew each run and removed after
their cell. Standard library only; exits non-zero if any cell fails, after a summary table.
"""

import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".ci-venvs"
WHEELS = Path.home() / ".cache" / "minillm-ci" / "wheels"
PYENV = Path.home() / ".pyenv" / "versions"


def find_python(version: str) -> str:
    """The interpreter for `version` ("3.12"): pyenv's newest patch release, else pythonX.Y on
    PATH."""
    found = sorted(PYENV.glob(f"{version}.*/bin/python3"),
                   key=lambda p: [int(x) for x in p.parts[-3].split(".")])
    if found:
        return str(found[-1])
    exe = shutil.which(f"python{version}")
    if exe is None:
        sys.exit(f"error: no Python {version} found (looked in {PYENV} and on PATH)")
    return exe


def requirements() -> list[str]:
    """What `pip install -e .[dev]` needs from an index: the build backend, dependencies and dev
    extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = project["build-system"]["requires"]
    return [*build, *project["project"]["dependencies"],
            *project["project"]["optional-dependencies"]["dev"]]


def floor_pins() -> list[str]:
    """pyproject.toml's dependencies with each `>=` floor turned into `==` (markers kept)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        req, _, marker = dep.partition(";")
        if ">=" not in req:
            sys.exit(f"error: pyproject.toml dependency {dep!r} has no '>=' floor to test")
        pins.append(req.replace(">=", "==").strip() + (f"; {marker.strip()}" if marker else ""))
    return pins


CELLS = {  # name -> (Python version, extra requirements installed together with minillm[dev])
    "py3.12": ("3.12", []),
    "py3.13": ("3.13", []),
    "floors": ("3.11", floor_pins()),
    "torch-cpu": ("3.11", ["torch==2.13.0"]),
}
CI_CELLS = ["py3.13", "floors", "torch-cpu"]  # what `python3 .ci/matrix.py` runs

VERSIONS = """
import importlib.metadata as m, sys
names = ["torch", "triton", "numpy", "sentencepiece", "safetensors", "tqdm", "tensorboard",
         "jinja2"]
print("python " + sys.version.split()[0] + ", " + ", ".join(f"{n} {m.version(n)}" for n in names))
"""


END_TO_END = ["--ignore=tests/test_tour.py", "--ignore=tests/test_docs.py"]


def run(cmd: list[str], **kw) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw).returncode


def run_cell(name: str, pytest_args: list[str]) -> tuple[str, str, float]:
    version, extra = CELLS[name]
    venv = VENVS / name
    shutil.rmtree(venv, ignore_errors=True)
    t0 = time.time()
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "-q"]
    WHEELS.mkdir(parents=True, exist_ok=True)
    if (
        run([find_python(version), "-m", "venv", str(venv)])
        or run([*pip, "download", "-d", str(WHEELS), *requirements(), *extra])
        or run([*pip, "install", "--no-index", "--find-links", str(WHEELS), "-e", ".[dev]", *extra])
    ):
        return name, "install failed", time.time() - t0
    versions = subprocess.run([py, "-c", VERSIONS], capture_output=True, text=True).stdout.strip()
    print(f"[{name}] {versions}", flush=True)
    # the slowest tests by name, so a cell that grows slow says where its time went
    rc = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", *END_TO_END,
              *pytest_args])
    shutil.rmtree(venv, ignore_errors=True)  # a CUDA torch venv is ~5 GB
    result = ("passed" if rc == 0 else f"FAILED (pytest exit {rc})") + f" — {versions}"
    return name, result, time.time() - t0


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or CI_CELLS
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        sys.exit(f"error: unknown cell {unknown[0]!r}; cells: {', '.join(CELLS)}")
    results = [run_cell(n, [a for a in argv if a.startswith("-")]) for n in names]
    print("\n| cell | result | minutes |\n|---|---|---|")
    for name, result, secs in results:
        print(f"| {name} | {result} | {secs / 60:.1f} |")
    return 0 if all(r.startswith("passed") for _, r, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
