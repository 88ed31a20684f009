"""The tokenizer interface the engine needs, and the project's byte-level tokenizer.

The engine only calls ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``eos_token_id``, ``bos_token_id`` and ``apply_chat_template(messages) -> str``; any
object with those works; :class:`HFTokenizer` wraps a Hugging Face tokenizer (what
``LLM`` loads from a checkpoint directory's tokenizer files). The server also uses
``token_bytes(id) -> bytes`` where a tokenizer has it (the logprobs fields).
"""
from __future__ import annotations

from pathlib import Path

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class HFTokenizer:
    """The engine's tokenizer interface over a Hugging Face tokenizer (what a checkpoint
    directory's tokenizer files load as; :func:`load_tokenizer`).

    ``encode`` adds the tokenizer's special tokens (its BOS) unless the text already starts
    with the BOS token, as the text of ``apply_chat_template`` does (the chat template
    writes it); ``decode`` drops special tokens; ``token_bytes`` knows a byte-level BPE's
    bytes (the logprobs fields of the server)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        self._special = set(tokenizer.all_special_ids)
        self._bytes_of = None   # byte-level BPE (GPT-2's, DeepSeek's): a token's characters -> its bytes
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
            from transformers.convert_slow_tokenizer import bytes_to_unicode
            self._bytes_of = {ch: b for b, ch in bytes_to_unicode().items()}

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for (none for a special token), where the tokenizer is a
        byte-level BPE; else None (the server then writes the token's decoded text)."""
        if token_id in self._special:
            return b""
        if self._bytes_of is None:
            return None
        try:
            return bytes(self._bytes_of[ch] for ch in self.tokenizer.convert_ids_to_tokens(token_id))
        except KeyError:   # a token outside the byte alphabet (an added token)
            return None

    def encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The messages through the tokenizer's chat template, ending with the assistant's
        turn (a ValueError where the tokenizer has no template)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: send a plain prompt (/v1/completions), or "
                             "set the tokenizer's chat_template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_tokenizer(path) -> HFTokenizer | None:
    """The Hugging Face tokenizer of a checkpoint directory (its tokenizer files, read by
    transformers' AutoTokenizer), or None where the directory has none (a byte-level model
    of ``flashdsa train``, say). Tokenizer files without transformers installed are an
    error, not a silent fall back to byte tokens."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(f"{path} has a Hugging Face tokenizer; reading it needs transformers "
                          "(pip install transformers), or pass tokenizer=") from e
    return HFTokenizer(AutoTokenizer.from_pretrained(path))


def default_tokenizer(vocab_size: int) -> ByteTokenizer:
    """The byte-level tokenizer, checked against the model's vocabulary."""
    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"the byte-level tokenizer needs a vocabulary of {ByteTokenizer.vocab_size}, the model "
                         f"has {vocab_size}: pass a tokenizer")
    return ByteTokenizer()
