"""`minillm.kernels`: the Triton kernels, which live in the repository's top-level kernels/ folder.

kernels/ is a plain folder of modules with no __init__.py, so it is never a regular top-level package named
`kernels`: that name belongs to an unrelated PyPI package which transformers and bitsandbytes probe for, and
a folder without __init__.py can never shadow an installed package (and transformers' probe recognises it
as "not installed"). This shim points the package path at that folder for source checkouts and editable
installs; a built wheel maps the folder here directly (pyproject.toml, [tool.setuptools.package-dir]).
"""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))
