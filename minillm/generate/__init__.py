"""Generation (docs chapter 2): sampling, the KV-cache decode loop, batches, speculative decoding,
chat, and the tools around them.

    decode.py   sampling, prefill / decode_one_token, the decode loops, streaming text
    chat.py     multi-turn chat in the template a model was tuned with
    trace.py    every module's output shape through one forward pass
"""
