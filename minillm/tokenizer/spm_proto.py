"""SentencePiece's ModelProto, encoded and decoded by hand (no protobuf dependency).

Protobuf wire format (https://protobuf.dev/programming-guides/encoding/): a message is a run of
fields, each `varint(field_number << 3 | wire_type)` then the value: wire 0 a varint, 1 eight bytes,
2 a varint length + bytes (strings and nested messages), 5 four bytes (float32).

The parts of sentencepiece_model.proto that minillm touches (field numbers from that file):

    ModelProto      { 1: repeated SentencePiece, 2: TrainerSpec, 3: NormalizerSpec }
    SentencePiece   { 1: piece (string), 2: score (float), 3: type (NORMAL 1, UNKNOWN 2, CONTROL 3,
                      USER_DEFINED 4, UNUSED 5, BYTE 6) }
    TrainerSpec     { 3: model_type (BPE = 2), 4: vocab_size, 35: byte_fallback,
                      40..43: unk/bos/eos/pad id, 45..48: unk/bos/eos/pad piece }
    NormalizerSpec  { 1: name, 3: add_dummy_prefix (default true), 4: remove_extra_whitespaces,
                      5: escape_whitespaces }

Two uses: the GGUF writer reads what the SentencePiece API does not expose (`add_dummy_prefix`,
which pieces are USER_DEFINED: `piece_types`) from a tokenizer.model, and the GGUF reader rebuilds a
tokenizer.model from the vocabulary a GGUF carries (`bpe_model_proto`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

NORMAL_PIECE, USER_DEFINED_PIECE, BYTE_PIECE = 1, 4, 6  # SentencePiece.Type values


# --------------------------------------------------------------------------------------------------
# Encoding


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are sent as 10-byte two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_int(num: int, value: int) -> bytes:
    return _varint(num << 3 | 0) + _varint(value)


def _pb_bytes(num: int, value: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _pb_float(num: int, value: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", value)


def piece_entry(piece: str, score: float, piece_type: int) -> bytes:
    """One `pieces` entry (ModelProto field 1). Appended to a serialized model it adds a piece at
    the end of the vocabulary: a parser concatenates the values of a repeated field in file
    order."""
    return _pb_bytes(1, _pb_bytes(1, piece.encode("utf-8")) + _pb_float(2, float(score))
                     + _pb_int(3, int(piece_type)))


def bpe_model_proto(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                    special_ids: dict[str, int], add_dummy_prefix: bool) -> bytes:
    """A serialized BPE ModelProto over these pieces.

    `special_ids` maps "unknown", "bos", "eos", "padding" to ids (-1: none). Normalization is
    identity with whitespace escaped to "▁", no extra-whitespace removal, and the dummy prefix as
    given: what llama.cpp applies to a "llama" vocabulary. byte_fallback is on when any piece is a
    BYTE piece.
    """
    pieces = b"".join(piece_entry(t, s, ty) for t, s, ty in zip(tokens, scores, types, strict=True))
    trainer = _pb_int(3, 2)  # model_type = BPE
    trainer += _pb_int(4, len(tokens))  # vocab_size
    trainer += _pb_int(35, int(BYTE_PIECE in {int(t) for t in types}))  # byte_fallback
    # unk/bos/eos/pad_id
    for num, name in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        trainer += _pb_int(num, special_ids[name])
    # unk/bos/eos/pad_piece
    for num, name in ((45, "unknown"), (46, "bos"), (47, "eos"), (48, "padding")):
        if special_ids[name] >= 0:
            trainer += _pb_bytes(num, tokens[special_ids[name]].encode("utf-8"))
    normalizer = _pb_bytes(1, b"identity")  # name
    normalizer += _pb_int(3, int(bool(add_dummy_prefix)))  # add_dummy_prefix
    normalizer += _pb_int(4, 0)  # remove_extra_whitespaces
    normalizer += _pb_int(5, 1)  # escape_whitespaces
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


# --------------------------------------------------------------------------------------------------
# Decoding


def proto_fields(buf: bytes, what: str) -> dict[int, list]:
    """Decode one message level: field number -> values (ints, or bytes for length-delimited
    fields).

    Raises ValueError naming `what` and the byte position on a malformed varint, an unsupported wire
    type (3, 4: groups) or a field running past the end.
    """
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos, what)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos, what)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 2:
            n, pos = _read_varint(buf, pos, what)
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"{what}: unsupported protobuf wire type {wire} at byte {pos}")
        if pos > len(buf):
            raise ValueError(f"{what}: protobuf field {key >> 3} runs past the end")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def _read_varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    """(value, position after it)."""
    n, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError(f"{what}: malformed protobuf varint at byte {pos}")
        n |= (buf[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if buf[pos - 1] < 0x80:
            return n, pos


def add_dummy_prefix(model_bytes: bytes, what: str) -> bool:
    """NormalizerSpec.add_dummy_prefix of a serialized ModelProto (true when absent, the proto
    default)."""
    model = proto_fields(model_bytes, what)
    normalizer = proto_fields(model[3][-1], f"{what} normalizer_spec") if 3 in model else {}
    return bool(normalizer.get(3, [1])[-1])


def piece_types(model_bytes: bytes, what: str) -> list[int]:
    """SentencePiece.type of every piece, in id order (NORMAL when the field is absent, its
    default)."""
    pieces = proto_fields(model_bytes, what).get(1, [])
    return [proto_fields(p, f"{what} piece {i}").get(3, [NORMAL_PIECE])[-1]
            for i, p in enumerate(pieces)]
