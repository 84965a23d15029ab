"""Prompts as a user types them: the escapes a shell cannot type easily, and a file of prompts for a batch
(`generate.py --prompts FILE`)."""

from __future__ import annotations

import json
import re
from pathlib import Path


def unescape(text: str) -> str:
    """The escapes a shell cannot type easily: \\n newline, \\t tab, \\\\ one backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def read_prompts(path: Path) -> list[str]:
    """A .jsonl file: one object per line with a "prompt" string. Any other file: one prompt per line,
    with the escapes of `unescape`. Blank lines are skipped."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(unescape(line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{n}: expected an object with a \"prompt\" string, found {line[:60]!r}")
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts
