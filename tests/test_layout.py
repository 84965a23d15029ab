"""The house a learner walks: one folder per chapter, dependencies pointing one way.

Read from the source with `ast` (every import, lazy ones inside functions included):
- no import cycle between folders, the one documented lazy edge `Llama.from_pretrained` →
  formats/ aside;
- model.py imports only config.py (and that one edge); util/ imports nothing of minillm; kernels/
  imports only torch and triton;
- every folder's __init__.py is a docstring that names each of its files (no re-export shims), and
  the public face (minillm/__init__.py) exports names that exist.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "minillm"
FOLDERS = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
ALLOWED_LAZY = {("model", "formats")}  # Llama.from_pretrained, documented in model.py


def unit(module: str) -> str | None:
    """minillm.training.loop -> "train" (a folder); minillm.model -> "model"
    (a core file); else None."""
    parts = module.split(".")
    if parts[0] != "minillm" or len(parts) < 2:
        return None
    return parts[1]


def imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel == Path("__init__.py"):
            continue  # the public face imports from everywhere by design
        src = rel.parts[0].removesuffix(".py")
        for module, _ in imports(path):
            dst = unit(module)
            if dst is not None and dst != src and dst != "kernels":
                graph.setdefault(src, set()).add(dst)
    return graph


def test_the_folders_are_the_chapters():
    assert FOLDERS == ["data", "eval", "finetune", "formats", "generate", "kernels", "ship",
                       "tokenizer", "training", "util"]
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "config.py", "model.py", "names.py", "tour.py",
                   "tour_real.py"], top


def test_no_import_cycle_between_folders():
    graph = edges()
    for a, b in ALLOWED_LAZY:
        graph[a].discard(b)
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles


def test_the_bottom_of_the_house():
    model = [(m, line) for m, line in imports(PKG / "model.py") if m.startswith("minillm")]
    assert [m for m, _ in model] == ["minillm.config", "minillm.formats.load"], model
    # the lazy edge, at the end
    assert ("minillm.formats.load", max(line for _, line in model)) in model
    for path in (PKG / "util").glob("*.py"):
        assert not [m for m, _ in imports(path) if m.startswith("minillm")], path
    for path in (ROOT / "kernels").glob("*.py"):
        assert {m.split(".")[0] for m, _ in imports(path)} <= {"os", "sys", "time", "math", "torch",
                                                               "triton", "__future__",
                                                               "dataclasses", "collections"}, path


def test_each_folder_init_is_its_table_of_contents():
    for folder in FOLDERS:
        if folder == "kernels":
            continue  # the path shim to the top-level kernels/ folder (kernels/README.md)
        init = PKG / folder / "__init__.py"
        tree = ast.parse(init.read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree)
        assert doc and len(tree.body) == 1, f"{init}: a docstring and nothing else"
        for path in (PKG / folder).glob("*.py"):
            if path.name != "__init__.py":
                assert path.name in doc, f"{init} does not name {path.name}"


def test_public_face():
    import minillm

    for name in minillm.__all__:
        assert hasattr(minillm, name), name
    assert {"Llama", "ModelConfig", "load_pretrained", "load_tokenizer"} <= set(minillm.__all__)
