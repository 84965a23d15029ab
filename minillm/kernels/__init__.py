"""`minillm.kernels`: the Triton kernels, which live in the repository's top-level kernels/ folder.

This shim points the subpackage's path at that folder for a bare source checkout; an install maps
the folder here directly (pyproject.toml, [tool.setuptools.package-dir]). Why the folder is never
importable as a top-level `kernels`: kernels/README.md,
"Why it is minillm.kernels, and never kernels".
"""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))
