"""A model's own chat template: the Jinja string a checkpoint ships, read from its files and
rendered exactly as transformers' `apply_chat_template` renders it, in jinja2's sandbox.

    load_chat_template(checkpoint)  → the Jinja source, or None
        dir/tokenizer_config.json "chat_template"   a string, or [{"name", "template"}, …] where
                                                    "default" is taken (transformers 4.x)
        dir/chat_template.jinja                     transformers 5 writes it apart
        model.gguf tokenizer.chat_template          what llama.cpp reads
    render_chat_template(source, messages, …)  → the prompt string
    template_segments(source, messages, …)     → [(text, trained)]: the loss mask for training

Rendering (transformers' `_compile_jinja_template` + `render_jinja_template`, utils/
chat_template_utils.py): an `ImmutableSandboxedEnvironment` with trim_blocks and lstrip_blocks,
the loop-controls extension ({% break %}, {% continue %}), `{% generation %}` blocks (rendered as
their body), the globals `raise_exception`, `strftime_now`, `dict`, `namespace` (no underscore
names) and a `tojson` filter that is plain `json.dumps` (ensure_ascii off, no HTML escaping);
the variables `messages`, `tools` (None), `documents` (None), `add_generation_prompt`,
`bos_token`, `eos_token`.

A template is code from a file minillm did not write: the sandbox refuses attribute access to
`__class__`, `__subclasses__`, `__globals__` and the like and has no `open`, `os` or imports, so a
hostile template executes nothing and fails with one line; its output is cut at MAX_CHARS
characters, so `{% for i in range(10**9) %}` ends with an error instead of filling the memory.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minillm.util.fileio import read_json_object, read_text

MAX_CHARS = 1 << 20  # one rendered prompt: a million characters is far above any context
TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 writes the template apart


@dataclass(frozen=True)
class JinjaTemplate:
    """A chat template given as Jinja source (a model's own, or ChatML's), where the built-in
    alpaca and vicuna are names (templates.py): what the tokenizing and chat code dispatch on."""

    source: str
    where: str = "chat template"  # the file it came from, for error messages

    def __str__(self) -> str:  # what a log line names it by (the source is too long to print)
        return f"jinja ({self.where})"


# --------------------------------------------------------------------------------------------------
# the sandbox


class _Generation(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask tag): its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() without underscore attributes (transformers' TemplateNamespace)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, where reading an unsafe attribute (`x.__class__`) raises at once:
    jinja2 itself returns an undefined value that prints as "" and fails only when used further."""

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of "
                                              f"{type(obj).__name__!r} object is unsafe")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **k: dict(*a, **k))
    return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    """The template compiled once (a training set renders it thousands of times: compiling is
    most of the cost of a render)."""
    return _environment().from_string(source)


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", where: str = "chat template",
                         max_chars: int = MAX_CHARS) -> str:
    """The string `source` renders for `messages`, as transformers' apply_chat_template(...,
    tokenize=False). Any failure — a syntax error, raise_exception, an unsafe attribute, an
    undefined name called, output beyond max_chars — is one ValueError naming `where`."""
    try:
        template = _compiled(source)
        out, n = [], 0
        for chunk in template.generate(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token):
            n += len(chunk)
            if n > max_chars:
                raise ValueError(f"{where}: the rendered prompt exceeds {max_chars} characters "
                                 f"(cut off)")
            out.append(chunk)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{where}: line {e.lineno}: {e.message}") from None
    except (jinja2.exceptions.TemplateError, TypeError, AttributeError, KeyError,
            IndexError, OverflowError, RecursionError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# the loss mask: which characters of a rendered conversation are the assistant's


def template_segments(source: str, messages: list[dict], bos_token: str = "",
                      eos_token: str = "", where: str = "chat template") -> list[tuple[str, bool]]:
    """The rendered conversation cut into [(text, trained)]: only each assistant turn is trained,
    its content and the end of turn up to and including eos_token (the end-of-turn marker: ChatML's
    <|im_end|>, Llama 3's <|eot_id|>); the rest of the tail ("\\n") and every other turn are
    prompt. The texts join to render(messages, add_generation_prompt=False).

    The cut is found by rendering prefixes: before = render(messages[:i], add_generation_prompt=
    True) and after = render(messages[:i+1]), so turn i is after[len(before):]. A template that
    does not render a conversation prefix by prefix (one that rewrites earlier turns) is refused.
    """
    def render(msgs, gen):
        return render_chat_template(source, msgs, gen, bos_token, eos_token, where)

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError(f"{where}: the template does not render the conversation prefix by "
                             f"prefix (message {i} changes what comes before it), so the "
                             f"assistant turns cannot be masked")
        turn = after[len(before):]
        has_end = bool(eos_token) and eos_token in turn
        end = turn.find(eos_token) + len(eos_token) if has_end else len(turn)
        segments += [(before[len(done):], False), (turn[:end], True)]
        done = before + turn[:end]
    full = render(messages, False)
    if not full.startswith(done):
        raise ValueError(f"{where}: the template does not render the conversation prefix by prefix")
    if full[len(done):]:
        segments.append((full[len(done):], False))
    return [(text, trained) for text, trained in segments if text]


def encode_with_specials(tokenizer, text: str) -> list[int]:
    """Token ids of rendered template text: the tokenizer's BOS and EOS strings become their ids
    (a SentencePiece encoder reads "</s>" as characters), the rest is encoded without BOS / EOS."""
    specials = {tokenizer.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id)
                if i is not None and i >= 0}
    ids, rest = [], text
    while rest:
        hits = [(rest.find(s), s) for s in specials if s and s in rest]
        if not hits:
            return ids + tokenizer.encode(rest, bos=False, eos=False)
        at, s = min(hits)
        if at:
            ids += tokenizer.encode(rest[:at], bos=False, eos=False)
        ids.append(specials[s])
        rest = rest[at + len(s):]
    return ids


def template_token_ids(tokenizer, source: str, messages: list[dict], add_generation_prompt: bool,
                       where: str = "chat template") -> tuple[list[int], list[bool]]:
    """(ids, trained per id) of a conversation in a Jinja template: each segment of
    template_segments encoded on its own, with the generation prompt appended when asked. No BOS
    is added: a template that wants one writes {{ bos_token }} (as apply_chat_template tokenizes,
    add_special_tokens=False)."""
    bos, eos = (tokenizer.id_to_piece(tokenizer.bos_id), tokenizer.id_to_piece(tokenizer.eos_id))
    segments = template_segments(source, messages, bos, eos, where)
    if add_generation_prompt:
        full = render_chat_template(source, messages, False, bos, eos, where)
        prompt = render_chat_template(source, messages, True, bos, eos, where)
        if prompt.startswith(full) and prompt != full:
            segments.append((prompt[len(full):], False))
    ids, trained = [], []
    for text, is_trained in segments:
        t = encode_with_specials(tokenizer, text)
        ids += t
        trained += [is_trained] * len(t)
    return ids, trained


# --------------------------------------------------------------------------------------------------
# reading it from a checkpoint


def _from_tokenizer_config(path: Path) -> str | None:
    value = read_json_object(path, "tokenizer config").get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # transformers 4.x: named templates
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{path}: chat_template is a list without a 'default' template "
                         f"(names: {sorted(str(n) for n in named)})")
    raise ValueError(f"{path}: chat_template must be a string or a list of {{name, template}}, "
                     f"found {type(value).__name__}")


def model_template(checkpoint: str | os.PathLike) -> JinjaTemplate | None:
    """The checkpoint's own chat template as a JinjaTemplate naming its checkpoint, or None."""
    source = load_chat_template(checkpoint)
    return None if source is None else JinjaTemplate(source, f"{checkpoint}: chat template")


def load_chat_template(checkpoint: str | os.PathLike) -> str | None:
    """The Jinja chat template a checkpoint ships (see the module docstring), or None."""
    path = Path(checkpoint)
    if path.is_file() and path.suffix == ".gguf":
        from minillm.formats.gguf_reader import read_gguf

        value = read_gguf(path).metadata.get("tokenizer.chat_template")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: tokenizer.chat_template must be a STRING")
        return value
    if not path.is_dir():
        return None
    if (path / TEMPLATE_FILE).is_file():
        return read_text(path / TEMPLATE_FILE, "chat template")
    if (path / "tokenizer_config.json").is_file():
        return _from_tokenizer_config(path / "tokenizer_config.json")
    return None
