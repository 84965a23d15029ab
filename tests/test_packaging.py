"""The kernels folder is `minillm.kernels` and never takes the global name `kernels` (a PyPI package that
transformers and bitsandbytes probe with `import kernels`), even from a source checkout on sys.path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, extra_path: str | None = None) -> str:
    env_path = [str(ROOT)] + ([extra_path] if extra_path else [])
    script = f"import sys; sys.path[:0] = {env_path!r}\n" + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout


def test_import_kernels_is_not_ours():
    out = run("try:\n    import kernels\n    print('imported', kernels.__file__)\nexcept ModuleNotFoundError:\n"
              "    print('absent')\nimport minillm.kernels.nf4\nprint('minillm.kernels ok')")
    assert out.split() == ["absent", "minillm.kernels", "ok"]


def test_real_kernels_package_wins(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    return 'real:' + name\n")
    out = run("import kernels\nprint(kernels.get_kernel('x'))\nimport minillm.kernels.nf4_matmul\nprint('ok')",
              extra_path=str(tmp_path))
    assert out.split() == ["real:x", "ok"]
