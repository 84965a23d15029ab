"""The kernels folder is `minillm.kernels` and never a regular top-level package `kernels` (that
name belongs to a PyPI package which transformers and bitsandbytes probe with `import kernels`),
even from a source checkout whose root is on sys.path."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, extra_path: str | None = None) -> str:
    paths = [str(ROOT)] + ([extra_path] if extra_path else [])
    script = f"import sys; sys.path[:0] = {paths!r}\n" + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout


def test_kernels_folder_is_only_a_namespace_portion():
    # without __init__.py, `import kernels` from a checkout yields an empty namespace (no __file__),
    # which transformers' availability probe reads as "not installed"; minillm.kernels still imports
    out = run("import kernels\nprint(getattr(kernels, '__file__', None))\n"
              "import minillm.kernels.nf4 as m\nprint(m.__name__)")
    assert out.split() == ["None", "minillm.kernels.nf4"]
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_real_kernels_package_wins(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("def get_kernel(name):\n"
                                                      "    return 'real:' + name\n")
    out = run("import kernels\nprint(kernels.get_kernel('x'))\n"
              "import minillm.kernels.nf4_matmul\nprint('ok')",
              extra_path=str(tmp_path))
    assert out.split() == ["real:x", "ok"]


def test_wheel_maps_kernels_under_minillm():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["minillm.kernels"] == "kernels"
    assert "kernels" not in cfg["packages"] and "minillm.kernels" in cfg["packages"]


def test_jobs_run_without_the_repository_root_on_sys_path():
    # run.py starts every job with PYTHONSAFEPATH=1 (kernels/README.md): from the root,
    # `import kernels` then finds nothing here, and minillm still imports (from the install)
    src = (ROOT / "run.py").read_text()
    assert 'PYTHONSAFEPATH="1"' in src
    code = "import importlib.util as u, minillm.kernels.nf4; print(u.find_spec('kernels'))"
    env = {**__import__("os").environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["None"]
