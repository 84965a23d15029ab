"""Generation (docs chapter 2): from a prompt to text, with a KV cache.

    sampling.py      logits -> the next token: repetition penalty, temperature, top-k, top-p
    decode.py        prefill / decode_one_token, the scaffold every loop shares, the batch-1 loop
    batched.py       several prompts at once: left padding, per-row positions and masks
    speculative.py   a draft model proposes, the target verifies: the target's own distribution
    text.py          generate_text: the one prompt -> text helper; streaming, stop strings
    prompts.py       prompts as a user types them: escapes, a file of prompts
    chat.py          multi-turn chat in the template a model was tuned with
    fast_linear.py   RowSplitLinear: batch-1 CPU decode spread over the threads, as a module swap
    trace.py         every module's output shape through one forward pass
"""
