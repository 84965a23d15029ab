"""Training data (docs chapters 3 and 4): a corpus into a token stream, and instruction examples
into masked, padded or packed batches.

    pretrain.py   corpus -> memory-mapped token cache -> random (x, y) windows; the unigram baseline
    templates.py  prompt and chat templates (alpaca, vicuna, chatml), in Python and as Jinja
    chat_template.py  a model's own Jinja chat template: read, rendered in a sandbox, masked
    instruct.py   Alpaca / ShareGPT / completion records -> tokens with a loss mask -> batches
    stdlib_qa.py  the embedded question/answer set built from the standard library's source
    preference.py TRL's preference records -> truncated [chosen; rejected] batches; stdlib pairs
"""
