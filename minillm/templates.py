"""Prompt templates: the one place that turns an instruction (or a conversation) into the text a model sees.

Training data (instruct.py) and generation (`generate.py --template`) both call `format_prompt`, so the
prompt a fine-tuned model is queried with is byte for byte the prompt it was trained on.

Templates:

    none     the instruction as is (plus "\\n\\n" + input when there is one): plain completion
    alpaca   Stanford Alpaca's prompt, exactly as tloen/alpaca-lora's templates/alpaca.json:
             prompt_input    "Below is an instruction that describes a task, paired with an input that
                             provides further context. Write a response that appropriately completes
                             the request.\\n\\n### Instruction:\\n{instruction}\\n\\n
                             ### Input:\\n{input}\\n\\n### Response:\\n"
             prompt_no_input "Below is an instruction that describes a task. Write a response that
                             appropriately completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n
                             ### Response:\\n"
             (https://github.com/tloen/alpaca-lora/blob/main/templates/alpaca.json)
    vicuna   multi-turn chat, FastChat's "vicuna_v1.1" conversation template (the format ShareGPT data was
             trained in by Vicuna, https://lmsys.org/blog/2023-03-30-vicuna/):
                 "{system} USER: {human_1} ASSISTANT: {gpt_1}</s>USER: {human_2} ASSISTANT: {gpt_2}</s>"
             Chosen because it needs no new special tokens (LLaMA's vocabulary has only <s>, </s>, <unk>),
             so it works on any base checkpoint; "</s>" is the tokenizer's EOS id, never the literal text.

The response is never part of a template: it is appended after the prompt (with EOS), so that the prompt's
tokens at training time are exactly the tokens `generate` is given (see instruct.py, where each segment is
tokenized on its own).
"""

from __future__ import annotations

TEMPLATES = ("none", "alpaca", "vicuna")

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_RESPONSE_SPLIT = "### Response:"  # alpaca-lora cuts generated text after this marker

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_USER, VICUNA_ASSISTANT = "USER:", "ASSISTANT:"


def _check(template_name: str):
    if template_name not in TEMPLATES:
        raise ValueError(f"unknown template {template_name!r}; expected one of {list(TEMPLATES)}")


def format_prompt(template_name: str, instruction: str, input: str | None = None) -> str:
    """The prompt text for one instruction (+ optional input) in `template_name`; the model's answer
    follows it directly. An empty input counts as no input (as in alpaca-lora)."""
    _check(template_name)
    if template_name == "alpaca":
        if input:
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    user = f"{instruction}\n\n{input}" if input else instruction
    if template_name == "vicuna":
        return f"{VICUNA_SYSTEM} {VICUNA_USER} {user} {VICUNA_ASSISTANT}"
    return user


def conversation_segments(turns: list[tuple[str, str]], template_name: str = "vicuna",
                          system: str | None = None) -> list[tuple[str, bool]]:
    """A conversation [(role, text)], roles alternating "human", "gpt" (human first, gpt last), → the
    segments [(text, is_response)] to tokenize one by one; an EOS follows every response segment.

    Vicuna v1.1: "{system} USER: {h1} ASSISTANT:" | "{g1}" </s> | "USER: {h2} ASSISTANT:" | "{g2}" </s>
    The response text carries no leading space: SentencePiece's dummy prefix supplies it ("▁Paris").
    """
    if template_name != "vicuna":
        raise ValueError(f"conversations need the multi-turn template 'vicuna', found {template_name!r}")
    system = VICUNA_SYSTEM if system is None else system
    segments = []
    for i, (role, text) in enumerate(turns):
        if role == "human":
            head = f"{system} " if i == 0 and system else ""
            segments.append((f"{head}{VICUNA_USER} {text} {VICUNA_ASSISTANT}", False))
        elif role == "gpt":
            segments.append((text, True))
        else:
            raise ValueError(f"conversation turn {i}: role {role!r}; expected 'human' or 'gpt'")
    return segments
