"""Triton kernels for minillm, each file beside a plain-PyTorch reference of what it computes.

This folder is the package `minillm.kernels` (pyproject.toml maps it); it imports only torch and triton.

It must never be importable as the top-level name `kernels`: that name belongs to an unrelated PyPI package
which transformers and bitsandbytes probe with `import kernels`. Installed, the folder only exists as
`minillm.kernels`. But in a source checkout the repository root is on sys.path (scripts run from there,
pytest adds it), so `import kernels` would find this folder first. When that happens we step aside: the
name is handed to the real package if one is installed elsewhere on sys.path, or the import fails exactly
as it would without us (ModuleNotFoundError), which is what the probes expect.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real  # the import system returns what sys.modules holds after this file runs
    _spec.loader.exec_module(_real)
