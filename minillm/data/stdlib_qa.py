"""The embedded default instruction dataset: questions and answers about the Python standard
library, built from the running interpreter's own source files, so every machine has real data
without a download.

How: walk `sysconfig.get_paths()["stdlib"]` in sorted order (skipping tests, site-packages, IDLE and
other non-library folders and private modules), parse each file with `ast` (nothing is imported or
executed), and for every public function, class and public method that has a docstring emit Alpaca
records:

    describe   "What does `json.dumps` do?"              → the docstring's first sentence
    signature  "Write the signature of `textwrap.wrap`." → "wrap(text, width=70, **kwargs)"
               (functions, and classes with an explicit __init__: "Class(args without self)")
    module     "Which module defines `dumps`?"            → "json"
               (only names defined in one module)

Records carry two extra fields, "kind" (above) and "name" (the qualified name). The test split holds
every question about a held-out symbol (chosen by crc32 of its qualified name, so the split is
stable across runs and machines with the same stdlib): the model is tested on symbols it never
trained on. The "module" and "signature" questions have one short exact answer:
`short_answer_subset` picks them for exact-match / contains evaluation (eval/metrics.py).

The data depends on the Python version (its stdlib); the cache in `out_dir` records the version and
the stdlib path and is rebuilt when they change. Entry point:
`python -m minillm.data.stdlib_qa --out DIR`.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import re
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

from minillm.data.pretrain import CACHE_FILES
from minillm.util.cli import ArgumentParser, run_cli
from minillm.util.fileio import atomic_write_bytes, claim_directory

VERSION = 1  # bump when the records change, to invalidate caches
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
             "ensurepip", "pydoc_data", "__pycache__", "__phello__"}
MAX_ANSWER_CHARS = 300
MAX_SIGNATURE_CHARS = 100


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, path) of every public .py module under root, sorted by module name."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith((".", "_"))
                             and d.isidentifier() and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py") or (name.startswith("_") and name != "__init__.py"):
                continue
            parts = list(rel.parts) + ([] if name == "__init__.py" else [name[:-3]])
            if parts and all(p.isidentifier() for p in parts):
                out.append((".".join(parts), Path(dirpath) / name))
    return sorted(out)


def first_sentence(doc: str) -> str:
    """The first paragraph's first sentence,
    whitespace collapsed ("" if it is too long to be an answer)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.search(r"(?<=[.!?])\s", para)
    sentence = para[: m.start()] if m else para
    return sentence if 10 <= len(sentence) <= MAX_ANSWER_CHARS else ""


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef, name: str,
              drop_first: bool = False) -> str:
    """`name(args)` from the source (defaults and annotations as written);
    drop_first removes self."""
    args = node.args
    if drop_first:
        args = copy.copy(args)
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        elif args.args:
            args.args = args.args[1:]
    sig = f"{name}({ast.unparse(args)})"
    return sig if len(sig) <= MAX_SIGNATURE_CHARS else ""


def _public(name: str) -> bool:
    return not name.startswith("_")


def _functions(body):
    return [n for n in body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(n.name)]


def symbols(module: str, tree: ast.Module) -> list[dict]:
    """[{qualname, name, module, doc, signature, top_level}]
    for the module's public documented symbols."""
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            out.append(dict(qualname=f"{module}.{node.name}", name=node.name, module=module,
                            top_level=True, doc=ast.get_docstring(node) or "",
                            signature=signature(node, node.name)))
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            inits = [n for n in node.body
                     if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
            init = inits[0] if inits else None
            out.append(dict(qualname=f"{module}.{node.name}", name=node.name, module=module,
                            top_level=True, doc=ast.get_docstring(node) or "",
                            signature=signature(init, node.name, drop_first=True) if init else ""))
            for m in _functions(node.body):
                out.append(dict(qualname=f"{module}.{node.name}.{m.name}", name=m.name,
                                module=module, top_level=False, doc=ast.get_docstring(m) or "",
                                signature=""))
    return out


def stdlib_records(root: str | Path | None = None) -> tuple[list[dict], dict]:
    """All records (deterministic order) and stats {modules, unparsable, symbols}."""
    root = Path(root) if root is not None else stdlib_root()
    syms, unparsable = [], []
    files = module_files(root)
    for module, path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            # e.g. files kept for other Python versions: counted, not fatal
            unparsable.append(module)
            continue
        syms.extend(symbols(module, tree))
    defined_in: dict[str, set[str]] = {}
    for s in syms:
        if s["top_level"]:
            defined_in.setdefault(s["name"], set()).add(s["module"])
    records = []
    for s in syms:
        q = s["qualname"]
        sentence = first_sentence(s["doc"])
        if sentence:
            records.append(dict(instruction=f"What does `{q}` do?", input="", output=sentence,
                                kind="describe", name=q))
        if s["signature"]:
            records.append(dict(instruction=f"Write the signature of `{q}`.", input="",
                                output=s["signature"], kind="signature", name=q))
        if s["top_level"] and s["doc"] and len(defined_in[s["name"]]) == 1:
            records.append(dict(instruction=f"Which module defines `{s['name']}`?", input="",
                                output=s["module"], kind="module", name=q))
    stats = dict(modules=len(files), unparsable=len(unparsable), symbols=len(syms))
    return records, stats


def is_test(qualname: str, test_frac: float) -> bool:
    return zlib.crc32(qualname.encode()) % 10_000 < round(test_frac * 10_000)


def short_answer_subset(examples: list) -> list:
    """Examples (instruct.Example, or record dicts) whose answer is one short string:
    module, signature."""
    def kind(e):
        return e.get("kind") if isinstance(e, dict) else e.meta.get("kind")

    return [e for e in examples if kind(e) in ("module", "signature")]


# --------------------------------------------------------------------------------------------------
# the cached files


@dataclass
class StdlibDataset:
    train_path: Path
    test_path: Path
    meta: dict


def _write_jsonl(path: Path, records: list[dict]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def build_stdlib_dataset(out_dir: str | Path, test_frac: float = 0.05,
                         root: str | Path | None = None, force: bool = False) -> StdlibDataset:
    """Write stdlib_train.jsonl, stdlib_test.jsonl and stdlib_meta.json under out_dir (each
    atomically), or reuse them when the meta matches (same generator version, Python, stdlib path,
    test_frac) and the files' sha256 match the meta."""
    out_dir = Path(out_dir)
    claim_directory(out_dir, "data cache", legacy=CACHE_FILES)
    root = Path(root) if root is not None else stdlib_root()
    train_path, test_path, meta_path = (out_dir / f"stdlib_{s}.jsonl"
                                        for s in ("train", "test", "meta"))
    meta_path = out_dir / "stdlib_meta.json"
    key = dict(version=VERSION, python=sys.version.split()[0], stdlib=str(root),
               test_frac=test_frac)
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if ({k: meta.get(k) for k in key} == key and meta.get("train_sha256") == _sha256(train_path)
                and meta.get("test_sha256") == _sha256(test_path)):
            return StdlibDataset(train_path, test_path, meta)
    records, stats = stdlib_records(root)
    train = [r for r in records if not is_test(r["name"], test_frac)]
    test = [r for r in records if is_test(r["name"], test_frac)]
    meta = dict(key, **stats, n_train=len(train), n_test=len(test),
                n_test_short=len(short_answer_subset(test)),
                train_sha256=_write_jsonl(train_path, train),
                test_sha256=_write_jsonl(test_path, test))
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return StdlibDataset(train_path, test_path, meta)


def main(argv=None):
    ap = ArgumentParser(description="Build the stdlib instruction dataset (Alpaca JSONL) from this "
                                             "Python's standard library sources.")
    ap.add_argument("--out", required=True,
                    help="directory for stdlib_{train,test}.jsonl and stdlib_meta.json")
    ap.add_argument("--test-frac", type=float, default=0.05,
                    help="fraction of symbols held out for testing")
    ap.add_argument("--root", default=None,
                    help="stdlib directory to read (default: this interpreter's)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    ap.add_argument("--preference", action="store_true",
                    help="also write the preference pairs stdlib_pref_{train,test}.jsonl (chosen: "
                         "the right answer, rejected: a plausible wrong one; data/preference.py)")
    args = ap.parse_args(argv)
    ds = build_stdlib_dataset(args.out, args.test_frac, args.root, args.force)
    m = ds.meta
    print(f"{ds.train_path}: {m['n_train']:,d} train | {ds.test_path}: {m['n_test']:,d} test "
          f"({m['n_test_short']:,d} short-answer) | {m['modules']} modules, "
          f"{m['symbols']:,d} symbols, {m['unparsable']} unparsable")
    if args.preference:
        from minillm.data.preference import build_stdlib_preferences

        for path in build_stdlib_preferences(args.out):
            n = sum(1 for line in path.read_text().splitlines() if line)
            print(f"{path}: {n:,d} preference pairs")


if __name__ == "__main__":
    sys.exit(run_cli(main))
