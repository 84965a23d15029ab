"""Text to token ids and back (docs chapter 3): the SentencePiece tokenizer LLaMA models ship, and
training one for a model built from scratch.

    spm_proto.py       SentencePiece's model file (a protobuf), read and written by hand
    sentencepiece.py   `Tokenizer`: encode / decode, added pieces, and `train_tokenizer`
"""
