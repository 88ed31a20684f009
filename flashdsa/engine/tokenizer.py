"""The tokenizer interface the engine needs, and a byte-level tokenizer.

The engine only calls ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``eos_token_id``, ``bos_token_id`` and ``apply_chat_template(messages) -> str``; any
object with those works (e.g. a thin wrapper of a Hugging Face tokenizer).
"""
from __future__ import annotations


class ByteTokenizer:
    """Bytes of the UTF-8 text, shifted past the special tokens: token = byte + offset.

    With the default offset 2, ids 0 and 1 are bos and eos (the DSAConfig defaults) and
    the vocabulary has 258 entries. Decoding drops special tokens and replaces broken
    UTF-8 with U+FFFD."""

    def __init__(self, bos_token_id: int = 0, eos_token_id: int = 1, offset: int = 2):
        self.bos_token_id, self.eos_token_id, self.offset = bos_token_id, eos_token_id, offset
        self.vocab_size = 256 + offset

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_bos else []) + ids

    def decode(self, ids) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        """A plain-text chat format: one "<role>: <content>" line per message, then
        "assistant:" for the reply."""
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"


def default_tokenizer(vocab_size: int, bos_token_id: int | None, eos_token_id: int | None):
    """The project's byte-level tokenizer (flashdsa.data when present) sized for a model."""
    try:  # the model/data helper's tokenizer, when it exists
        from ..data import ByteTokenizer as DataTokenizer  # type: ignore
        tok = DataTokenizer()
        if getattr(tok, "vocab_size", vocab_size) <= vocab_size:
            return tok
    except (ImportError, AttributeError, TypeError):
        pass
    tok = ByteTokenizer(bos_token_id if bos_token_id is not None else 0,
                        eos_token_id if eos_token_id is not None else 1)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the byte-level tokenizer needs a vocabulary of {tok.vocab_size}, the model has "
                         f"{vocab_size}: pass a tokenizer")
    return tok
