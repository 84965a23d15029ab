"""Pre-tokenization: cut a text into the pieces byte-level BPE merges within (docs chapter 3).

BPE never merges across a piece boundary, so the pieces decide a lot: GPT-2 keeps " the" (the space
goes with the word), Llama 3 cuts numbers into runs of at most three digits, SmolLM2 cuts every
digit alone. Each family writes its rule as a list of regexes applied in turn, each one cutting
the pieces the previous left (a match is a piece, and so is any text between matches: HF's
`Split(behavior="isolated")`, and what llama.cpp's `unicode_regex_split` does):

    GPT-2    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    "Hello world  42" -> "Hello", " world", " ", " 42"   (\\s+(?!\\S) leaves a space to " 42")

Two sources of rules:
- a GGUF names its rule in `tokenizer.ggml.pre`; `GGUF_PRE` is llama.cpp's table
  (src/llama-vocab.cpp, `llm_tokenizer_bpe`), copied regex for regex; an unknown name is refused,
  as llama.cpp refuses it.
- a tokenizer.json spells its rule as `normalizer` + `pre_tokenizer` objects; `from_tokenizer_json`
  reads Sequence / Split / ByteLevel / Digits and NFC-style normalizers, and refuses the rest.

Why Python's `re` and not the `regex` package: `re` has no `\\p{L}`, so `unicode_class` builds each
class from `unicodedata` (every code point's general category) and `to_python_regex` writes it into
the pattern as ranges. That keeps minillm free of one more compiled dependency, and it lets us
define `\\s` as the Unicode White_Space property, which is what HF (Oniguruma) and llama.cpp match:
Python's own `\\s` also matches U+001C..U+001F, so "a\\x1cb" would split differently. The cost is
the running Python's Unicode version (3.11: Unicode 14): a letter added in a later version counts
as unassigned here (a few scripts and CJK extensions; no common text).
"""

from __future__ import annotations

import itertools
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

# llama.cpp's unicode_set_whitespace, the White_Space property; HF's \s matches the same set
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) \
    + "\u2028\u2029\u202f\u205f\u3000"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's GPT-2 expression: no final \s+ (a lone space before a letter is a gap piece, the same)
GPT2_CPP = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
          r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|"
          r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|"
          r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
         r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
         r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
         r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
         r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# tokenizer.ggml.pre -> (regexes, llama.cpp's default for add_bos, ignore_merges)
_LLAMA3 = ([LLAMA3], True, True)
_STARCODER = ([r"\p{N}", GPT2_CPP], False, False)
_GPT2 = ([GPT2_CPP], False, False)
_QWEN2 = ([QWEN2], False, False)
GGUF_PRE: dict[str, tuple[list[str], bool, bool]] = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2_CPP, r"\p{N}+", "[0-9][0-9][0-9]"], False, False),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"], _LLAMA3),
    "dbrx": ([LLAMA3], False, False), "smaug-bpe": ([LLAMA3], False, False),
    "chatglm-bpe": ([LLAMA3], False, False), "glm4": ([LLAMA3], False, False),
    "deepseek-llm": (["[\r\n]", r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba]+",
                      "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                      r"\s+$", DEEPSEEK_CJK, r"\p{N}+"], False, False),
    "deepseek-coder": (["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"],
                       False, False),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", GPT2_CPP, "[0-9][0-9][0-9]"], False, False),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"], _STARCODER),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                     "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais",
                     "trillion", "granite-docling", "exaone4"], _GPT2),
    **dict.fromkeys(["stablelm2", "qwen2", "deepseek-r1-qwen", "megrez", "hunyuan",
                     "solar-open"], _QWEN2),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], ([BLOOM], False, False)),
    "viking": ([BLOOM, r"\p{N}"], False, False),
    "tekken": ([TEKKEN], True, True),
    "gpt-4o": ([GPT4O], False, False), "llama4": ([GPT4O], False, False),
    "seed-coder": ([LLAMA3.replace(r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+",
                                   r"\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+")], False, False),
    "grok-2": (_QWEN2[0], False, False),
    "superbpe": ([r"\p{N}+", r"(?=(\d{3})+(?!\d))"], False, False),
}


# --------------------------------------------------------------------------------------------------
# Unicode classes for Python's re


@lru_cache(maxsize=1)
def _categories() -> dict[str, list[tuple[int, int]]]:
    """General category (2 letters) -> sorted code point ranges [lo, hi], from unicodedata
    (about 0.2 s for all 1.1M code points, once per process)."""
    out: dict[str, list[tuple[int, int]]] = {}
    pos = 0
    cats = map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))
    for cat, run in itertools.groupby(cats):
        n = sum(1 for _ in run)
        out.setdefault(cat, []).append((pos, pos + n - 1))
        pos += n
    return out


def _escape(cp: int) -> str:
    return f"\\U{cp:08x}" if cp > 0xFFFF else f"\\u{cp:04x}"


def _ranges_to_class(ranges: list[tuple[int, int]]) -> str:
    return "".join(_escape(a) if a == b else f"{_escape(a)}-{_escape(b)}" for a, b in ranges)


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for a, b in sorted(ranges):
        if a > nxt:
            out.append((nxt, a - 1))
        nxt = max(nxt, b + 1)
    return out + ([(nxt, sys.maxunicode)] if nxt <= sys.maxunicode else [])


@lru_cache(maxsize=64)
def unicode_ranges(name: str) -> tuple[tuple[int, int], ...]:
    """`\\p{name}` as code point ranges: a category (L, Lu, N, P, ...) or `s` (White_Space)."""
    if name == "s":
        return tuple((ord(c), ord(c)) for c in WHITESPACE)
    cats = _categories()
    picked = [r for cat, rs in cats.items() if cat == name or (len(name) == 1 and cat[0] == name)
              for r in rs]
    if not picked:
        raise ValueError(f"pre-tokenizer regex: \\p{{{name}}} is not a Unicode general category "
                         f"minillm knows (scripts such as Han are not supported)")
    return tuple(sorted(picked))


def unicode_class(name: str, negate: bool = False) -> str:
    """The inside of a [...] class for \\p{name} (negate: \\P{name})."""
    ranges = list(unicode_ranges(name))
    return _ranges_to_class(_complement(ranges) if negate else ranges)


_TOKEN = re.compile(r"\\[pP]\{(\w+)\}|\\[pP](\w)|\\[sS]|\\.|\[\^?|\]|\$|.", re.S)


def to_python_regex(pattern: str) -> str:
    """A Rust / Oniguruma / ECMAScript pre-tokenizer regex rewritten for Python's re: \\p{..},
    \\P{..}, \\s and \\S become explicit ranges (inside a [...] class: their ranges; outside: a
    class of their own), and an unescaped $ outside a class becomes \\Z (end of text only, as in
    llama.cpp's ECMAScript, not Python's "before a final newline")."""
    out, inside = [], False
    for m in _TOKEN.finditer(pattern):
        tok = m.group(0)
        name = m.group(1) or m.group(2)
        if name or tok in (r"\s", r"\S"):
            negate = tok[1] in "PS"
            if inside:
                out.append(unicode_class(name or "s", negate))
            else:
                out.append("[" + unicode_class(name or "s", negate) + "]")
        elif tok.startswith("[") and not inside:
            inside = True
            out.append(tok)
        elif tok == "]" and inside and out[-1] not in ("[", "[^"):
            inside = False
            out.append(tok)
        elif tok == "$" and not inside:
            out.append(r"\Z")
        else:
            out.append(tok)
    return "".join(out)


@lru_cache(maxsize=256)
def compile_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(to_python_regex(pattern))
    except re.error as e:
        raise ValueError(f"pre-tokenizer regex {pattern[:60]!r}: cannot compile ({e})") from None


# --------------------------------------------------------------------------------------------------
# The steps


def split_pieces(pieces: list[str], rx: re.Pattern, behavior: str = "isolated",
                 invert: bool = False) -> list[str]:
    """HF's Split on each piece: the matches (invert: the text between them) are cut out and,
    per behavior, kept alone (isolated), dropped (removed), glued to the piece before
    (merged_with_previous) or after (merged_with_next), or joined with adjacent matches
    (contiguous)."""
    out = []
    for piece in pieces:
        spans, pos = [], 0  # (text, is_match)
        for m in rx.finditer(piece):
            if m.start() == m.end():
                continue  # an empty match cuts nothing (HF and llama.cpp agree)
            if m.start() > pos:
                spans.append((piece[pos:m.start()], invert))
            spans.append((m.group(0), not invert))
            pos = m.end()
        if pos < len(piece):
            spans.append((piece[pos:], invert))
        out += _apply_behavior(spans, behavior)
    return [p for p in out if p]


def _apply_behavior(spans: list[tuple[str, bool]], behavior: str) -> list[str]:
    if behavior == "isolated":
        return [s for s, _ in spans]
    if behavior == "removed":
        return [s for s, is_match in spans if not is_match]
    out: list[str] = []
    if behavior == "merged_with_previous":
        for s, is_match in spans:
            if is_match and out:
                out[-1] += s
            else:
                out.append(s)
    elif behavior == "merged_with_next":
        glue = ""
        for s, is_match in spans:
            if is_match:
                glue += s
            else:
                out.append(glue + s)
                glue = ""
        if glue:
            out.append(glue)
    elif behavior == "contiguous":
        last = None
        for s, is_match in spans:
            if is_match and last:
                out[-1] += s
            else:
                out.append(s)
            last = is_match
    else:
        raise ValueError(f"Split behavior {behavior!r} is not one of isolated, removed, "
                         "merged_with_previous, merged_with_next, contiguous")
    return out


NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Sequence", "Replace", "Prepend"}


def normalize(text: str, spec: dict | None) -> str:
    """Apply a tokenizer.json normalizer (already checked by `check_normalizer`)."""
    if spec is None:
        return text
    t = spec["type"]
    if t == "Sequence":
        for s in spec["normalizers"]:
            text = normalize(text, s)
        return text
    if t == "Lowercase":
        return text.lower()
    if t == "Replace":
        return text.replace(spec["pattern"]["String"], spec["content"])
    if t == "Prepend":
        return spec["prepend"] + text if text else text
    return unicodedata.normalize(t, text)


def check_normalizer(spec: dict | None, where: str):
    if spec is None:
        return
    t = spec.get("type") if isinstance(spec, dict) else None
    if t not in NORMALIZERS:
        raise ValueError(f"{where}: normalizer {t!r} is not supported (minillm reads "
                         f"{', '.join(sorted(NORMALIZERS))})")
    if t == "Sequence":
        for s in spec.get("normalizers", []):
            check_normalizer(s, where)
    if t == "Replace" and "String" not in spec.get("pattern", {}):
        raise ValueError(f"{where}: normalizer Replace with a Regex pattern is not supported")


@dataclass
class PreTokenizer:
    """A normalizer plus the splitting steps: ("split", compiled, behavior, invert) in order.
    byte_level: the pieces are then byte-mapped (every byte-level BPE). add_prefix_space:
    ByteLevel's, a space put before a piece not starting with one. `gguf_pre` names the rule for
    llama.cpp (a GGUF's own); `patterns`, the regexes of a tokenizer.json made only of Isolated
    splits (`gguf_pre_name` looks them up); `json` is the tokenizer.json form."""
    steps: list[tuple] = field(default_factory=list)
    normalizer: dict | None = None
    add_prefix_space: bool = False
    gguf_pre: str | None = None
    json: dict | None = None
    patterns: tuple[str, ...] | None = None

    def split(self, text: str) -> list[str]:
        pieces = [text] if text else []
        for kind, *args in self.steps:
            if kind == "prefix":
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            else:
                pieces = split_pieces(pieces, *args)
        return pieces


def for_gguf(pre: str, where: str) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = pre`."""
    if pre not in GGUF_PRE:
        raise ValueError(f"{where}: tokenizer.ggml.pre is {pre!r}, which minillm does not know "
                         f"(known: {', '.join(sorted(GGUF_PRE))})")
    regexes = GGUF_PRE[pre][0]
    steps = [("split", compile_regex(r), "isolated", False) for r in regexes]
    splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in regexes]
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return PreTokenizer(steps, gguf_pre=pre, patterns=tuple(regexes),
                        json={"type": "Sequence", "pretokenizers": splits + [bl]})


# tokenizer.json pre-tokenizers whose llama.cpp table entry is known: (patterns, prefix) -> pre
LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_HF = LLAMA3_HF.replace(r"\p{N}{1,3}", r"\p{N}")
# HF's spelling of a regex -> llama.cpp's (the same matches)
KNOWN_JSON = {(LLAMA3_HF,): (LLAMA3,), (QWEN2_HF,): (QWEN2,), (GPT2,): (GPT2_CPP,),
              (r"\p{N}", GPT2): (r"\p{N}", GPT2_CPP)}
# names tried first: the families minillm is checked on (smollm detokenizes without llama.cpp's
# clean_spaces, as HF does)
PREFERRED = ("llama-bpe", "qwen2", "smollm", "gpt-2")


def gguf_pre_name(patterns: tuple[str, ...] | None, ignore_merges: bool) -> str | None:
    """The llama.cpp pre name whose regexes are `patterns` (Isolated splits in order) and whose
    ignore_merges is the tokenizer's (llama.cpp ties it to the name), or None."""
    if patterns is None:
        return None
    patterns = KNOWN_JSON.get(patterns, patterns)
    names = [*PREFERRED, *GGUF_PRE]
    return next((n for n in names if tuple(GGUF_PRE[n][0]) == patterns
                 and GGUF_PRE[n][2] == ignore_merges), None)
SPLIT_BEHAVIORS = {"Isolated": "isolated", "Removed": "removed", "Contiguous": "contiguous",
                   "MergedWithPrevious": "merged_with_previous",
                   "MergedWithNext": "merged_with_next"}


def from_tokenizer_json(pre: dict | None, normalizer: dict | None, where: str) -> PreTokenizer:
    """The pre-tokenizer a tokenizer.json spells: Sequence of Split (a String or Regex pattern,
    any behavior, invert), Digits (individual_digits) and a final ByteLevel (add_prefix_space,
    use_regex: GPT-2's regex); its normalizer NFC / NFD / NFKC / NFKD / Lowercase / Replace /
    Prepend / Sequence. Anything else is refused: it would tokenize differently."""
    check_normalizer(normalizer, where)
    items = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if pre is None or not any(p and p.get("type") == "ByteLevel" for p in items):
        raise ValueError(f"{where}: pre_tokenizer has no ByteLevel step, so this is not a "
                         f"byte-level BPE tokenizer (minillm reads byte-level BPE only)")
    steps, patterns, prefix = [], [], False
    for k, p in enumerate(items):
        t = p.get("type") if isinstance(p, dict) else None
        if t == "ByteLevel" and k != len(items) - 1:
            raise ValueError(f"{where}: pre_tokenizer steps after ByteLevel are not supported")
        if t == "Split":
            pat, behavior = p.get("pattern", {}), p.get("behavior")
            if behavior not in SPLIT_BEHAVIORS or not ({"Regex", "String"} & set(pat)):
                raise ValueError(f"{where}: pre_tokenizer Split needs a pattern (Regex or String)"
                                 f" and a behavior in {', '.join(SPLIT_BEHAVIORS)}")
            rx = (compile_regex(pat["Regex"]) if "Regex" in pat
                  else re.compile(re.escape(pat["String"])))
            steps.append(("split", rx, SPLIT_BEHAVIORS[behavior], bool(p.get("invert"))))
            patterns.append(pat.get("Regex") if behavior == "Isolated" and not p.get("invert")
                            else None)
        elif t == "Digits":
            pattern = r"\p{N}" if p.get("individual_digits") else r"\p{N}+"
            steps.append(("split", compile_regex(pattern), "isolated", False))
            patterns.append(pattern)
        elif t == "ByteLevel":
            if p.get("add_prefix_space"):
                steps.append(("prefix",))
                prefix = True
            if p.get("use_regex", True):
                steps.append(("split", compile_regex(GPT2), "isolated", False))
                patterns.append(GPT2)
        else:
            raise ValueError(f"{where}: pre_tokenizer {t!r} is not supported (minillm reads "
                             f"Sequence, Split, Digits and ByteLevel)")
    known = None if prefix or normalizer is not None or None in patterns else tuple(patterns)
    return PreTokenizer(steps, normalizer, prefix, None, pre, known)
