"""Training data: an embedded corpus that needs no download, byte-level tokens, a fixed
held-out split, deterministic batches, and two planted retrieval tasks.

Default corpus: the ``.py`` sources of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, about 30 MB for CPython 3.11: real, long files).
``--data`` replaces it with the user's own text files or directories.

Tokens are bytes 0..255 plus three specials (PAD, BOS, EOS), vocabulary 259. Each file
becomes ``[BOS] bytes [EOS]``; files are concatenated in sorted path order into one
token stream per split. A file belongs to the held-out split when the SHA-1 of its
relative path falls in the first ``val_percent`` of the hash range, so the split does
not depend on the file list, the machine or the Python version's other files.

Batches are a pure function of ``(seed, step)``: random windows of ``seq_len + 1``
tokens. Resuming at step s therefore replays exactly the batches a run without
interruption would have seen, and two runs with one seed see the same tokens.

Retrieval tasks (:data:`RETRIEVAL_TASKS`), planted into windows of real code, each scored
on digits that only a token far back predicts:

- ``"passkey"`` (:func:`plant_passkey`): a line with a random number, repeated later at a
  random distance; the copy is found by content (the line's prefix), which needs an
  induction circuit.
- ``"repeat"`` (:func:`plant_repeat`): a span of random digits, repeated exactly a fixed
  offset later; the copy is found by relative position, which the CPU demo's tiny model
  learns within its steps (a content-addressed copy it does not).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .recipe import REPEAT_SPAN, RETRIEVAL_TASKS

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
PASSKEY_PREFIX = b"\n# passkey = "
DEFAULT_VAL_PERCENT = 3


def encode(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes as int64 token ids [n]."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)


def decode(ids) -> str:
    """Token ids back to text; specials are dropped, invalid UTF-8 replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Sorted .py files of the standard library (no site-packages)."""
    root = stdlib_root()
    return sorted((p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def is_held_out(rel_path: str, val_percent: int = DEFAULT_VAL_PERCENT) -> bool:
    """Fixed split: the file is held out when sha1(relative path) mod 100 < val_percent."""
    h = int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "little")
    return h % 100 < val_percent


def _text_files(paths: list[str | os.PathLike]) -> list[tuple[Path, str]]:
    """(file, relative name) for user paths: files as given, directories walked."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [(f, f.relative_to(p).as_posix()) for f in sorted(p.rglob("*")) if f.is_file()]
        elif p.is_file():
            out.append((p, p.name))
        else:
            raise FileNotFoundError(f"--data: {p} is neither a file nor a directory")
    return out


@dataclass
class Corpus:
    """Token streams of the two splits (int16 [n] each) and where they came from.

    ``load_args``: the keyword arguments of :meth:`load` that rebuild this corpus (data
    paths made absolute); training checkpoints record them."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    n_files: tuple[int, int]
    load_args: dict = field(default_factory=dict)

    @classmethod
    def load(cls, data: list[str] | None = None, val_percent: int = DEFAULT_VAL_PERCENT,
             max_bytes: int | None = None) -> "Corpus":
        """The stdlib corpus (``data=None``) or the given files/directories.

        max_bytes caps each split's stream (train first ``max_bytes``, val a tenth of it,
        at least 64 KiB), taking files in sorted order: small, fast corpora for demos."""
        if data:
            files, source = _text_files(data), "files: " + ", ".join(map(str, data))
        else:
            root = stdlib_root()
            files = [(f, f.relative_to(root).as_posix()) for f in stdlib_files()]
            source = f"python stdlib: {root}"
        caps = (max_bytes, max(max_bytes // 10, 1 << 16)) if max_bytes else (None, None)
        parts: list[list[bytes]] = [[], []]
        sizes, counts = [0, 0], [0, 0]
        for f, rel in files:
            split = 1 if is_held_out(rel, val_percent) else 0
            if caps[split] is not None and sizes[split] >= caps[split]:
                continue
            raw = f.read_bytes()
            if b"\0" in raw[:4096]:       # binary file: not text
                continue
            parts[split].append(raw)
            sizes[split] += len(raw) + 2
            counts[split] += 1
        if not parts[0]:
            raise ValueError(f"no training text found in {source}")
        if not parts[1]:   # tiny user corpora: hold out the last file's tail instead
            last = parts[0][-1]
            cut = len(last) * 9 // 10
            parts[0][-1], parts[1] = last[:cut], [last[cut:]]
            counts[1] = 1
        load_args = {"data": [str(Path(d).resolve()) for d in data] if data else None,
                     "val_percent": val_percent, "max_bytes": max_bytes}
        return cls(_stream(parts[0], caps[0]), _stream(parts[1], caps[1]), source, (counts[0], counts[1]),
                   load_args)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0, split: str = "train") -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 random windows, a pure function of (seed, step)."""
        return random_windows(self.train if split == "train" else self.val, step, batch_size, seq_len, seed)

    def eval_windows(self, n: int, seq_len: int) -> torch.Tensor:
        """[n, seq_len + 1] int64 held-out windows at evenly spaced fixed offsets."""
        stream = self.val
        if len(stream) < seq_len + 1:
            raise ValueError(f"held-out split has {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.linspace(0, len(stream) - seq_len - 1, n).long()
        return torch.stack([stream[s:s + seq_len + 1].long() for s in starts.tolist()])


def _stream(parts: list[bytes], cap: int | None) -> torch.Tensor:
    """[BOS] file [EOS] for each file, concatenated: int16 [n] (bytes and specials fit)."""
    chunks = []
    for raw in parts:
        chunks.append(torch.tensor([BOS], dtype=torch.int16))
        if raw:
            chunks.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int16))
        chunks.append(torch.tensor([EOS], dtype=torch.int16))
    out = torch.cat(chunks)
    return out[:cap] if cap else out


def _generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


def random_windows(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[batch_size, seq_len + 1] int64 windows at random offsets drawn from (seed, step)."""
    if len(stream) < seq_len + 1:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=_generator(seed, step))
    offs = torch.arange(seq_len + 1)
    return stream[starts[:, None] + offs[None, :]].long()


def passkey_max_distance(window_len: int, digits: int = 5) -> int:
    """The longest distance :func:`plant_passkey` can plant in a window of ``window_len``
    tokens whatever its random draws (the second copy ends at most window_len / 16 before
    the window's end)."""
    m = len(PASSKEY_PREFIX) + digits + 1
    return window_len - 2 * m - max(1, window_len // 16 - 1)


def plant_passkey(window: torch.Tensor, min_distance: int, generator: torch.Generator, digits: int = 5,
                  max_distance: int | None = None):
    """Plant a retrieval task in a token window [n] (in place; returns it and the answer rows).

    Writes ``\\n# passkey = DDDDD\\n`` (a random number) early in the window and the same
    line again near its end; the digits of the second copy can only be predicted by
    looking back at the first, at least ``min_distance`` tokens earlier (from the end of
    the first copy to the start of the second), and at most ``max_distance`` when given. Returns
    ``(window, rows)``: ``rows`` [digits] are positions p of the window whose *next*
    token window[p + 1] is an answer digit, i.e. the rows of the logits to score."""
    n = window.shape[0]
    key = bytes(str(int(torch.randint(10**(digits - 1), 10**digits, (1,), generator=generator))), "ascii")
    needle = encode(PASSKEY_PREFIX + key + b"\n")
    m = len(needle)
    q_start = n - m - int(torch.randint(1, max(2, n // 16), (1,), generator=generator))
    latest = q_start - min_distance - m
    if latest < 0:
        raise ValueError(f"window of {n} tokens too short for a passkey {min_distance} tokens back")
    earliest = 0 if max_distance is None else max(0, q_start - max_distance - m)
    if earliest > latest:
        raise ValueError(f"passkey distance: expected min_distance <= max_distance, got {min_distance} > "
                         f"{max_distance}")
    k_start = int(torch.randint(earliest, latest + 1, (1,), generator=generator))
    window[k_start:k_start + m] = needle
    window[q_start:q_start + m] = needle
    first_digit = q_start + len(PASSKEY_PREFIX)
    rows = torch.arange(first_digit - 1, first_digit - 1 + digits)
    return window, rows


def check_repeat(window_len: int, offset: int, span: int = REPEAT_SPAN) -> None:
    """Raise ValueError unless a ``span``-digit repeat at ``offset`` fits a window of
    ``window_len`` tokens (``seq_len + 1``) without the copy overwriting the original."""
    if offset < span:
        raise ValueError(f"repeat offset {offset}: expected at least the span of {span} digits "
                         f"(the copy would overwrite its original)")
    if window_len < offset + span:
        raise ValueError(f"a {span}-digit span repeated {offset} tokens later needs windows of {offset + span} "
                         f"tokens (seq_len >= {offset + span - 1}), got {window_len} (seq_len {window_len - 1})")


def plant_repeat(window: torch.Tensor, offset: int, generator: torch.Generator, span: int = REPEAT_SPAN,
                 max_offset: int | None = None):
    """Plant a repeat in a token window [n] (in place; returns it and the answer rows).

    Writes ``span`` random digits at a random position and the same digits again exactly
    ``offset`` tokens later, or, with ``max_offset``, a random offset from ``offset`` to
    ``max_offset`` (capped to what the window holds), so that the copy can only be found
    by its content. The copy's first digit cannot be predicted (nothing says a copy starts
    there); each later one is the token ``offset`` positions back. Returns ``(window,
    rows)``: ``rows`` [span - 1] are positions p of the window whose *next* token
    window[p + 1] is a copied digit after the first, i.e. the rows of the logits to score."""
    n = window.shape[0]
    check_repeat(n, offset, span)
    if max_offset is not None:
        if max_offset < offset:
            raise ValueError(f"repeat offsets: expected offset <= max_offset, got {offset} > {max_offset}")
        offset = int(torch.randint(offset, min(max_offset, n - span) + 1, (1,), generator=generator))
    digits = torch.randint(ord("0"), ord("9") + 1, (span,), generator=generator)
    start = int(torch.randint(0, n - offset - span + 1, (1,), generator=generator))
    window[start:start + span] = digits
    window[start + offset:start + offset + span] = digits
    copy = start + offset
    return window, torch.arange(copy, copy + span - 1)


def plant_retrieval(task: str, window: torch.Tensor, distance: int, generator: torch.Generator,
                    max_distance: int | None = None):
    """Plant ``task`` (one of :data:`RETRIEVAL_TASKS`) in ``window`` [n], in place: a
    passkey ``distance`` to ``max_distance`` (default: any) tokens back, or a repeat
    exactly ``distance`` tokens back (with ``max_distance``: ``distance`` to
    ``max_distance``). Returns ``(window, rows)`` as :func:`plant_passkey` and
    :func:`plant_repeat` do."""
    if task == "passkey":
        return plant_passkey(window, distance, generator, max_distance=max_distance)
    if task == "repeat":
        return plant_repeat(window, distance, generator, max_offset=max_distance)
    raise ValueError(f"retrieval task: expected one of {RETRIEVAL_TASKS}, got {task!r}")


def retrieval_windows(corpus: Corpus, n: int, seq_len: int, distance: int, seed: int = 1234,
                      task: str = "passkey", max_distance: int | None = None):
    """n held-out windows [n, seq_len + 1] with ``task`` planted in each (:func:`plant_retrieval`),
    and their answer rows [n, answer digits]."""
    g = torch.Generator().manual_seed(seed)
    base = corpus.eval_windows(n, seq_len).clone()
    rows = [plant_retrieval(task, base[i], distance, g, max_distance)[1] for i in range(n)]
    return base, torch.stack(rows)


CURRICULUM_START = REPEAT_SPAN  # the curriculum's largest distance at data step 0 (a repeat's shortest)


def curriculum_distances(step: int, floor: int, seq_len: int, steps: int,
                         max_distance: int | None = None) -> tuple[int, int | None]:
    """(min, max) retrieval distance (passkey distance or repeat offset) at data step
    ``step`` of a curriculum of ``steps`` data steps: the largest distance grows
    geometrically from CURRICULUM_START tokens to the whole window (it doubles in equal
    numbers of steps, so that short distances, where the copy is learned first, get as
    many steps as long ones), and the smallest is half of it (at least CURRICULUM_START)
    until that reaches ``floor``, so that the distances always vary and the answer can
    only be found by its content; from ``steps`` on, the plain ones: (``floor``,
    ``max_distance``)."""
    if step >= steps:
        return floor, max_distance
    largest = int(CURRICULUM_START * (max(seq_len, CURRICULUM_START) / CURRICULUM_START) ** (step / steps))
    return min(floor, max(CURRICULUM_START, largest // 2)), largest


def training_batch(corpus: Corpus, step: int, batch_size: int, seq_len: int, seed: int = 0,
                   plant_prob: float = 0.0, distance: int = 0, task: str = "passkey",
                   max_distance: int | None = None) -> torch.Tensor:
    """A training batch [B, seq_len + 1]; with ``plant_prob`` > 0 that share of the
    windows carries ``task`` planted ``distance`` (to ``max_distance``, when given) tokens
    back (:func:`plant_retrieval`), which teaches the retrieval skill the evaluation
    measures."""
    x = corpus.batch(step, batch_size, seq_len, seed)
    if plant_prob > 0:
        g = _generator(seed + 7919, step)
        for i in range(batch_size):
            if float(torch.rand((), generator=g)) < plant_prob:
                plant_retrieval(task, x[i], distance, g, max_distance)
    return x
