"""Prompts as a user types them: the escapes a shell cannot type easily, and a file of prompts for a
batch (`generate.py --prompts FILE`)."""

from __future__ import annotations

import re
from pathlib import Path

from minillm.util.fileio import check_unicode, read_jsonl, read_text


def unescape(text: str) -> str:
    """The escapes a shell cannot type easily: \\n newline, \\t tab, \\\\ one backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def read_prompts(path: Path) -> list[str]:
    """A .jsonl file: one object per line with a "prompt" string. Any other file: one prompt per
    line, with the escapes of `unescape`. Blank lines are skipped."""
    if path.suffix != ".jsonl":
        lines = read_text(path, "prompts file").split("\n")
        prompts = [unescape(line.removesuffix("\r")) for line in lines if line.strip()]
    else:
        prompts = []
        for where, record in read_jsonl(path, "prompts file"):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{where}: expected an object with a \"prompt\" string, "
                                 f"found {str(record)[:60]!r}")
            prompts.append(check_unicode(record["prompt"], where))
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts
