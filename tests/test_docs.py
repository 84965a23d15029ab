"""The docs stay true: every ```bash runnable block in docs/*.md (and README.md) runs and exits 0,
every relative link points at a file that exists, and every link to a name in the code lands on
the line that defines it.

Links to code are written [`name`](../minillm/file.py#L123), where `name` is a function, class,
method (`Class.method`) or module-level constant, and L123 the line of its `def` / `class` /
assignment, so a reader's click opens the definition. Code moves, so the anchors are generated, not
typed:

    # rewrite every anchor (and the file, if the name moved to one other file) in docs/*.md and
    # README.md, and list what changed
    python -m tests.test_docs --fix

How a runnable block is run: as one bash script (`set -e`, so every line must succeed) from the
repository root, with the venv's bin directory first on PATH (so `python` is the interpreter running
these tests) and `/tmp/minillm-docs` replaced by a temporary folder. Nothing else is rewritten or
appended: the commands in the docs are already small. Blocks run in file order, then block order,
sharing that folder, because a chapter's later commands use its earlier outputs. TRITON_INTERPRET is
removed from the environment (the conftest sets it for in-process kernel tests; a user's shell does
not have it), and OMP_NUM_THREADS=1 keeps each command on one core: on a busy machine, several
processes each spinning OpenMP threads on every core slow down by 10x or more, and these models are
too small to gain from threads.
"""

from __future__ import annotations

import ast
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
CODE_NAME = re.compile(r"^`([A-Za-z_][\w.]*)`$")  # [`Llama.forward`](../minillm/model.py#L123)
# where a name that left its file is looked for
CODE_DIRS = ("minillm", "kernels", "bench", "tests", ".")


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
    ("docs/03-training-from-scratch.md", 0): ["at step 10", "done: 20 steps",
                                              "vs unigram baseline"],
    ("docs/04-instruction-data.md", 0): ["train |", "short-answer", "False), (", "True)]"],
    ("docs/05-lora-and-qlora.md", 0): ["lora)", "qlora)", "lora8)",
                                       "adapter_config.json adapter_model.safetensors"],
    ("docs/08-shipping.md", 0): ["wrote", ".gguf", "38 tensors; 2 32"],
    ("docs/10-nf4-kernels.md", 0): ["| quantize | 37x129 | float32 | 0 | ✅ |",
                                    "| dequantize | 64x130 | bfloat16 | 0 | ✅ |"],
    ("docs/09-scaling-up.md", 0): ["total 15.59 GiB (3.52 GiB with checkpointing)",
                                   "total 37.39 GiB (17.25 GiB with checkpointing)"],
}


@pytest.fixture(scope="module")
def docs_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("minillm-docs")


def test_docs_exist_and_have_runnable_commands():
    names = {p.name for p in DOCS}
    chapters = sorted(n for n in names if re.match(r"\d\d-", n))
    assert len(chapters) == 11 and "README.md" in names, sorted(names)
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for chapter in chapters:
        assert f"({chapter})" in index, f"docs/README.md does not link {chapter}"
    files_with_blocks = {f for f, _, _ in BLOCKS}
    assert len(files_with_blocks) >= 6, files_with_blocks
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "## Run it" in text or path.name == "README.md", \
            f"{path.name} has no '## Run it' section"


@pytest.mark.parametrize("source,index,script", BLOCKS, ids=[f"{f}#{i}" for f, i, _ in BLOCKS])
def test_runnable_block(source, index, script, docs_tmp):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    script = script.replace(DOCS_TMP, str(docs_tmp))
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"{source} block {index} failed (exit {proc.returncode}):\n"
                                  f"{script}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr ---\n{proc.stderr[-3000:]}")
    seen = " ".join((proc.stdout + proc.stderr).split())
    for want in EXPECTED.get((source, index), []):
        assert want in seen, (f"{source} block {index}: expected {want!r} in the output:\n"
                              f"{seen[-3000:]}")


def _links() -> list[tuple[Path, str, str]]:
    out = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        # links inside code blocks are not links
        text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
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


# --------------------------------------------------------------------------------------------------
# Links land on the line


def definitions(file: Path) -> dict[str, int]:
    """{qualified name: line} for what a Python file defines: functions, classes,
    methods as "Class.method", module-level constants, and (by their bare name)
    functions nested in functions."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    found: dict[str, int] = {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.setdefault(prefix + node.name, node.lineno)
                visit(node.body, prefix + node.name + "." if isinstance(node, ast.ClassDef) else "")
            elif isinstance(node, ast.Assign | ast.AnnAssign) and not prefix:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, node.lineno)

    visit(tree.body, "")
    return found


def code_links(text: str):
    """(match, name, file part, anchor line or None) for each [`name`](file.py#Ln)
    link outside code blocks."""
    fenced = [m.span() for m in re.finditer(r"^```.*?^```", text, flags=re.S | re.M)]
    for m in LINK.finditer(text):
        name, target = m.group(1), m.group(2)
        if any(a <= m.start() < b for a, b in fenced) or not CODE_NAME.match(name):
            continue
        file_part, _, anchor = target.partition("#")
        if file_part.endswith(".py") and not name.endswith(".py`"):
            line = int(anchor[1:]) if re.fullmatch(r"L\d+", anchor) else None
            yield m, name.strip("`"), file_part, line


def _defining_files(name: str) -> list[Path]:
    """Every Python file in the repository (outside the venv) that defines `name`."""
    files = {f for d in CODE_DIRS for f in (ROOT / d).glob("*.py" if d == "." else "**/*.py")}
    return sorted(f for f in files if name in definitions(f))


def fix_text(text: str, base: Path, doc_name: str) -> tuple[str, list[str]]:
    """Markdown `text` (of a file in folder `base`) with its code links landing on their
    definitions, and notes on what changed or could not be fixed (a name defined
    nowhere, or in several files)."""
    notes, pieces, last = [], [], 0
    for m, name, file_part, _ in code_links(text):
        file = (base / file_part).resolve()
        defs = definitions(file) if file.exists() else {}
        if name not in defs:
            homes = _defining_files(name)
            if len(homes) != 1:
                notes.append(f"{doc_name}: `{name}` is not in {file_part}; defined in "
                             f"{homes or 'no file'}")
                continue
            file = homes[0]
            file_part = os.path.relpath(file, base)
            defs = definitions(file)
        new = f"[`{name}`]({file_part}#L{defs[name]})"
        if new != m.group(0):
            notes.append(f"{doc_name}: {m.group(0)} -> {new}")
            pieces += [text[last : m.start()], new]
            last = m.end()
    return "".join(pieces) + text[last:], notes


def fix_links(path: Path) -> list[str]:
    """Rewrite the code links of one Markdown file in place (see fix_text); returns the notes."""
    text = path.read_text(encoding="utf-8")
    fixed, notes = fix_text(text, path.parent, path.name)
    if fixed != text:
        path.write_text(fixed, encoding="utf-8")
    return notes


def test_code_links_land_on_the_definition():
    """[`Llama.setup_caches`](../minillm/model.py#L200) must point at the line that defines it."""
    wrong = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for m, name, file_part, line in code_links(text):
            at = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            file = path.parent / file_part
            right = definitions(file).get(name) if file.exists() else None
            if right is None:
                wrong.append(f"{at}: `{name}` is not defined in {file_part}")
            elif line != right:
                wrong.append(f"{at}: should end #L{right}, where `{name}` is defined")
    assert not wrong, ("\n".join(wrong)
                       + "\n(`python -m tests.test_docs --fix` rewrites the anchors)")


def test_anchor_checker_and_fixer(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "m.py").write_text("X = 1\n\n\nclass A:\n    def f(self):\n"
                               "        def inner():\n            pass\n")
    assert definitions(code / "m.py") == {"X": 1, "A": 4, "A.f": 5, "inner": 6}
    doc = tmp_path / "doc.md"
    doc.write_text("[`A.f`](code/m.py#L1) and [`X`](code/m.py), [`m.py`](code/m.py)\n"
                   "```\n[`A`](code/m.py)\n```\n")
    assert ([(n, f, line) for _, n, f, line in code_links(doc.read_text())]
            == [("A.f", "code/m.py", 1), ("X", "code/m.py", None)])
    assert len(fix_links(doc)) == 2
    assert doc.read_text().startswith("[`A.f`](code/m.py#L5) and [`X`](code/m.py#L1), "
                                      "[`m.py`](code/m.py)")
    assert fix_links(doc) == []  # already right


def test_docs_fit_in_100_columns():
    long = [f"{p.relative_to(ROOT)}:{i}: {len(line)} characters"
            for p in SOURCES + [ROOT / "kernels" / "README.md", ROOT / "bench" / "README.md"]
            for i, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1)
            if len(line) > 100]
    assert not long, "\n".join(long)


def test_figures_are_pngs():
    pngs = sorted((ROOT / "docs").glob("*.png"))
    assert {p.name for p in pngs} >= {"train_loss.png", "train_lr.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", p
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert 200 <= width <= 2000 and 200 <= height <= 2000, (p, width, height)


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python -m tests.test_docs --fix    (rewrites the #L anchors of code links "
                 "in the docs)")
    for source in SOURCES:
        for note in fix_links(source):
            print(note)
