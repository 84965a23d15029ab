"""The docs stay true: every ```bash runnable block in docs/*.md (and README.md) runs and exits 0, every
relative link points at a file that exists, and every linked function or class name is defined there.

How a runnable block is run: as one bash script (`set -e`, so every line must succeed) from the repository
root, with the venv's bin directory first on PATH (so `python` is the interpreter running these tests) and
`/tmp/minillm-docs` replaced by a temporary folder. Nothing else is rewritten or appended: the commands
in the docs are already small. Blocks run in file order, then block order, sharing that folder, because a
chapter's later commands use its earlier outputs. TRITON_INTERPRET is removed from the environment (the
conftest sets it for in-process kernel tests; a user's shell does not have it), and OMP_NUM_THREADS=1 keeps
each command on one core: on a busy machine, several processes each spinning OpenMP threads on every core
slow down by 10x or more, and these models are too small to gain from threads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
SOURCES = DOCS + [ROOT / "README.md"]
DOCS_TMP = "/tmp/minillm-docs"
RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
CODE_NAME = re.compile(r"^`([A-Za-z_][\w.]*)`$")  # [`Llama.forward`](../minillm/model.py)


def runnable_blocks() -> list[tuple[str, int, str]]:
    out = []
    for path in SOURCES:
        for i, m in enumerate(RUNNABLE.finditer(path.read_text(encoding="utf-8"))):
            out.append((path.relative_to(ROOT).as_posix(), i, m.group(1)))
    return out


BLOCKS = runnable_blocks()
# what the chapters say you will see (whitespace-normalised substrings of stdout + stderr)
EXPECTED = {
    ("docs/01-transformer.md", 0): ["embed_tokens Embedding", "lm_head Linear", "512) float32"],
    ("docs/02-setup-and-inference.md", 0): ["def forward(self", "prefill:", "decode:"],
    ("docs/03-training-from-scratch.md", 0): ["at step 10", "done: 20 steps", "vs unigram baseline"],
    ("docs/04-instruction-data.md", 0): ["train |", "short-answer", "False), (", "True)]"],
    ("docs/05-lora-and-qlora.md", 0): ["lora)", "qlora)", "adapter_config.json adapter_model.safetensors"],
    ("docs/07-shipping.md", 0): ["wrote", ".gguf", "39 tensors; 2 32"],
    ("docs/08-scaling-up.md", 0): ["total 16.04 GiB (3.96 GiB with checkpointing)",
                                   "total 39.26 GiB (19.13 GiB with checkpointing)"],
}


@pytest.fixture(scope="module")
def docs_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("minillm-docs")


def test_docs_exist_and_have_runnable_commands():
    names = {p.name for p in DOCS}
    chapters = sorted(n for n in names if re.match(r"\d\d-", n))
    assert len(chapters) == 8 and "README.md" in names, sorted(names)
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for chapter in chapters:
        assert f"({chapter})" in index, f"docs/README.md does not link {chapter}"
    files_with_blocks = {f for f, _, _ in BLOCKS}
    assert len(files_with_blocks) >= 6, files_with_blocks
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "## Run it" in text or path.name == "README.md", f"{path.name} has no '## Run it' section"


@pytest.mark.parametrize("source,index,script", BLOCKS, ids=[f"{f}#{i}" for f, i, _ in BLOCKS])
def test_runnable_block(source, index, script, docs_tmp):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    script = script.replace(DOCS_TMP, str(docs_tmp))
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"{source} block {index} failed (exit {proc.returncode}):\n{script}\n"
                                  f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    seen = " ".join((proc.stdout + proc.stderr).split())
    for want in EXPECTED.get((source, index), []):
        assert want in seen, f"{source} block {index}: expected {want!r} in the output:\n{seen[-3000:]}"


def _links() -> list[tuple[Path, str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # links inside code blocks are not links
        for text_part, target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # http(s), mailto, in-page anchors
            out.append((path, text_part, target))
    return out


def test_relative_links_point_to_existing_files():
    links = _links()
    assert len(links) > 100, "expected the chapters to link the code throughout"
    broken = [f"{p.name}: [{t}]({target})" for p, t, target in links
              if not (p.parent / target.split("#")[0]).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_linked_names_are_defined_in_the_linked_file():
    """[`Llama.setup_caches`](../minillm/model.py) must name something model.py defines."""
    missing = []
    for path, text, target in _links():
        m = CODE_NAME.match(text)
        file = path.parent / target.split("#")[0]
        if not m or file.suffix != ".py" or m.group(1).endswith(".py"):
            continue
        name = m.group(1).split(".")[-1]
        src = file.read_text(encoding="utf-8")
        if not re.search(rf"^\s*(def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]", src, re.M):
            missing.append(f"{path.name}: `{m.group(1)}` not defined in {target}")
    assert not missing, "\n".join(missing)


def test_figures_are_pngs():
    pngs = sorted((ROOT / "docs").glob("*.png"))
    assert {p.name for p in pngs} >= {"train_loss.png", "train_lr.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", p
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert 200 <= width <= 2000 and 200 <= height <= 2000, (p, width, height)
