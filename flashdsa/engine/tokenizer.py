"""The tokenizer interface the engine needs, and the project's byte-level tokenizer.

The engine only calls ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``eos_token_id``, ``bos_token_id`` and ``apply_chat_template(messages) -> str``; any
object with those works (e.g. a thin wrapper of a Hugging Face tokenizer). The server
also uses ``token_bytes(id) -> bytes`` where a tokenizer has it (the logprobs fields).
"""
from __future__ import annotations

from .. import data


class ByteTokenizer:
    """The byte-level tokens of :mod:`flashdsa.data` (what ``flashdsa train`` models read):
    ids 0..255 are the UTF-8 bytes, then PAD 256, BOS 257, EOS 258 (vocabulary 259).
    Decoding drops the specials and replaces broken UTF-8 with U+FFFD."""

    vocab_size = data.VOCAB_SIZE
    pad_token_id, bos_token_id, eos_token_id = data.PAD, data.BOS, data.EOS

    def encode(self, text: str) -> list[int]:
        return data.encode(text).tolist()

    def decode(self, ids) -> str:
        return data.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (none for the specials)."""
        return bytes([token_id]) if token_id < 256 else b""

    def apply_chat_template(self, messages: list[dict]) -> str:
        """A plain-text chat format: one "<role>: <content>" line per message, then
        "assistant:" for the reply."""
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"


def default_tokenizer(vocab_size: int) -> ByteTokenizer:
    """The byte-level tokenizer, checked against the model's vocabulary."""
    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"the byte-level tokenizer needs a vocabulary of {ByteTokenizer.vocab_size}, the model "
                         f"has {vocab_size}: pass a tokenizer")
    return ByteTokenizer()
