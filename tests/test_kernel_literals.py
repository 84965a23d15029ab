"""Every float constant inside a Triton kernel has an explicit dtype.

A bare Python float in a `@triton.jit` body gets its type inferred, and Triton versions infer
differently: Triton 3.8 types `1e-38` (below float32's smallest normal) as fp64, which broke
`tl.math.div_rn` in the NF4 quantize kernel on the Triton that current torch pins, while Triton
3.9 kept it fp32. This test reads the kernel sources (no Triton needed) and fails on any float
literal, or module-level float constant (`_FLOOR = tl.constexpr(1e-38)`), used in a jit body
other than as the value of `tl.full(shape, value, dtype)` or a load's `other=` (which `tl.load`
casts to the pointer's type).
"""

import ast
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"


def _is_jit(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def _float_value(node: ast.expr, known: dict[str, float]) -> float | None:
    """The float a module-level `NAME = 1.5`, `NAME = tl.constexpr(1.5)` or
    `tl.constexpr(OTHER)` binds."""
    if isinstance(node, ast.Call) and node.args and getattr(node.func, "attr", "") == "constexpr":
        node = node.args[0]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Name):
        return known.get(node.id)
    return node.value if isinstance(node, ast.Constant) and type(node.value) is float else None


def untyped_float_literals(source: str, filename: str = "<kernel>") -> list[str]:
    """'file:line literal' for each float constant in a jit body that no explicit dtype covers."""
    tree = ast.parse(source)
    float_names: dict[str, float] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) \
                and (v := _float_value(stmt.value, float_names)) is not None:
            float_names.update((t.id, v) for t in stmt.targets if isinstance(t, ast.Name))
    allowed: set[int] = set()  # ids of Constant nodes in a typed position
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = (node.func.attr if isinstance(node.func, ast.Attribute)
                    else getattr(node.func, "id", ""))
            if name == "full" and len(node.args) >= 2:
                allowed.update(id(n) for n in ast.walk(node.args[1]))
            for kw in node.keywords:
                if name == "load" and kw.arg == "other":
                    allowed.update(id(n) for n in ast.walk(kw.value))
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and _is_jit(fn):
            for node in ast.walk(fn):
                if id(node) in allowed:
                    continue
                if isinstance(node, ast.Constant) and type(node.value) is float:
                    found.append(f"{filename}:{node.lineno} {node.value!r}")
                elif isinstance(node, ast.Name) and node.id in float_names:
                    found.append(f"{filename}:{node.lineno} {node.id}={float_names[node.id]!r}")
    return found


KERNEL_FILES = sorted(KERNEL_DIR.glob("*.py"))


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_kernel_float_literals_have_explicit_dtype(path):
    assert untyped_float_literals(path.read_text(), path.name) == []


def test_checker_catches_the_fp64_floor():
    # The line that broke under Triton 3.8, and its fixed form.
    broken = (
        "ABSMAX_FLOOR = 1e-38\n"
        "FLOOR = tl.constexpr(ABSMAX_FLOOR)\n"
        "@triton.jit\n"
        "def k(x):\n"
        "    safe = tl.maximum(x, 1e-38)\n"
        "    y = tl.where(x > 0, x, 0.0)\n"
        "    z = tl.maximum(x, FLOOR)\n"
    )
    fixed = (
        "FLOOR = tl.constexpr(1e-38)\n"
        "@triton.jit\n"
        "def k(x, p):\n"
        "    safe = tl.maximum(x, tl.full([4], FLOOR, tl.float32))\n"
        "    v = tl.load(p, mask=x > 0, other=0.0)\n"
    )
    assert untyped_float_literals(broken) == ["<kernel>:5 1e-38", "<kernel>:6 0.0",
                                              "<kernel>:7 FLOOR=1e-38"]
    assert untyped_float_literals(fixed) == []
