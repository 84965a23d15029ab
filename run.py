"""One entry point that does all the set-up: `python3 run.py JOB [ARGS...]`.

    python3 run.py train              # the main job: train the tiny model on the stdlib corpus (CPU ok)
    python3 run.py test               # the whole test suite
    python3 run.py generate --checkpoint out/tiny --prompt "def "
    python3 run.py export ...  |  python3 run.py tour  |  python3 run.py python -m minillm.train.flops ...
    python3 run.py eval --checkpoint out/tiny --task stdlib-modules --task notes.txt   # benchmark table

On first use (and whenever pyproject.toml changes) it creates a virtual environment in .venv and installs
minillm with its dependencies into it; then it runs the job with that environment's Python. Nothing to
activate, nothing else to install. Needs only Python >= 3.11. Uses the standard library only.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".minillm-installed"
JOBS = {
    "train": ["train.py"],
    "generate": ["generate.py"],
    "export": ["export.py"],
    "tour": ["-m", "minillm.tour"],
    "eval": ["-m", "minillm.eval.harness"],
    "test": ["-m", "pytest"],
    "python": [],
}


def ensure_env():
    if sys.version_info < (3, 11):  # noqa: UP036 -- run.py is what a user runs with an old Python
        sys.exit(f"minillm needs Python >= 3.11, this is {sys.version.split()[0]}")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text() == want:
        return
    if not PY.exists():
        print(f"[run.py] creating virtual environment in {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("[run.py] installing minillm and its dependencies (first run only)", file=sys.stderr)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(want)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in JOBS:
        print(__doc__)
        sys.exit(f"usage: python3 run.py {{{','.join(JOBS)}}} [ARGS...]")
    ensure_env()
    cmd = [str(PY), *JOBS[sys.argv[1]], *sys.argv[2:]]
    sys.exit(subprocess.run(cmd, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
