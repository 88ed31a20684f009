"""The embedded corpus, byte tokens, fixed split, deterministic batches, passkey and repeat planting."""
import pytest
import torch

from flashdsa.data import (
    BOS,
    EOS,
    PASSKEY_PREFIX,
    REPEAT_SPAN,
    VOCAB_SIZE,
    Corpus,
    decode,
    encode,
    is_held_out,
    passkey_max_distance,
    plant_passkey,
    plant_repeat,
    plant_retrieval,
    random_windows,
    retrieval_windows,
    stdlib_files,
    training_batch,
)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load(max_bytes=1 << 20)


def test_bytes_round_trip():
    text = "def f(x):\n    return 'é' + x  # ü\n"
    ids = encode(text)
    assert ids.dtype == torch.int64 and ids.max() < 256 and len(ids) == len(text.encode())
    assert decode(torch.cat([torch.tensor([BOS]), ids, torch.tensor([EOS])])) == text
    assert VOCAB_SIZE == 259


def test_stdlib_corpus_and_fixed_split(corpus):
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    # the split depends only on the relative path
    assert is_held_out("json/decoder.py") == is_held_out("json/decoder.py")
    share = sum(is_held_out(f"pkg/mod{i}.py") for i in range(4000)) / 4000
    assert 0.02 < share < 0.04
    assert corpus.train.dtype == torch.int16 and len(corpus.train) == 1 << 20
    assert corpus.n_files[1] > 0 and len(corpus.val) > 1 << 16
    assert int(corpus.train[0]) == BOS and int(corpus.train.max()) < VOCAB_SIZE
    assert "python stdlib" in corpus.source
    text = decode(corpus.train[:5000])
    assert "def " in text or "import " in text
    # held-out text never appears in training: a 200-byte held-out slice is not a substring
    val = bytes(int(t) for t in corpus.val[1000:1200] if int(t) < 256)
    assert val not in bytes(int(t) for t in corpus.train[:200000] if int(t) < 256)


def test_batches_are_a_function_of_seed_and_step(corpus):
    a = corpus.batch(7, 4, 64, seed=3)
    assert a.shape == (4, 65) and a.dtype == torch.int64
    assert torch.equal(a, corpus.batch(7, 4, 64, seed=3))
    assert not torch.equal(a, corpus.batch(8, 4, 64, seed=3))
    assert not torch.equal(a, corpus.batch(7, 4, 64, seed=4))
    # a window is a contiguous slice of the stream
    s = corpus.train.long()
    row = a[0]
    starts = (s[: len(s) - 64] == row[0]).nonzero()[:, 0]
    assert any(torch.equal(s[i:i + 65], row) for i in starts.tolist())
    with pytest.raises(ValueError, match="fewer than seq_len"):
        random_windows(s[:10], 0, 1, 64)


def test_passkey_is_far_back_and_rows_point_at_digits():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.full((300,), ord("x"))
        w, rows = plant_passkey(w, 129, g)
        text = decode(w)
        assert text.count(PASSKEY_PREFIX.decode()) == 2
        first, second = (i for i in range(len(text)) if text.startswith(PASSKEY_PREFIX.decode(), i))
        key = text[second + len(PASSKEY_PREFIX):second + len(PASSKEY_PREFIX) + 5]
        assert key.isdigit() and text[first + len(PASSKEY_PREFIX):].startswith(key)
        assert decode(w[rows + 1]) == key
        assert int(rows[0]) + 1 - (first + len(PASSKEY_PREFIX)) > 129
    with pytest.raises(ValueError, match="too short"):
        plant_passkey(torch.zeros(100, dtype=torch.long), 90, g)


def test_passkey_within_a_distance_range():
    """min_distance <= distance <= max_distance (end of the first copy to the start of the
    second), passkey_max_distance plantable whatever the draws, bad ranges named."""
    m = len(PASSKEY_PREFIX) + 6
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(60):
        w, rows = plant_passkey(torch.full((400,), ord("x")), 100, g, max_distance=140)
        text = decode(w)
        first, second = (i for i in range(len(text)) if text.startswith(PASSKEY_PREFIX.decode(), i))
        seen.add(second - first - m)
    assert min(seen) >= 100 and max(seen) <= 140 and len(seen) > 10
    for n in (257, 1001):
        d = passkey_max_distance(n)
        for s in range(50):
            plant_passkey(torch.zeros(n, dtype=torch.long), d, torch.Generator().manual_seed(s), max_distance=d)
    with pytest.raises(ValueError, match="min_distance <= max_distance"):
        plant_passkey(torch.zeros(400, dtype=torch.long), 100, g, max_distance=99)


def test_retrieval_and_training_batches(corpus):
    w, rows = retrieval_windows(corpus, 3, 256, 65)
    assert w.shape == (3, 257) and rows.shape == (3, 5)
    assert torch.equal(w, retrieval_windows(corpus, 3, 256, 65)[0])
    b = training_batch(corpus, 0, 16, 256, plant_prob=0.5, distance=65)
    n = sum(decode(x).count(PASSKEY_PREFIX.decode()) >= 2 for x in b)
    assert 2 <= n <= 14
    assert torch.equal(b, training_batch(corpus, 0, 16, 256, plant_prob=0.5, distance=65))
    assert torch.equal(training_batch(corpus, 0, 16, 256), corpus.batch(0, 16, 256))


def _repeats(window, offset):
    """Starts of the digit spans of REPEAT_SPAN that recur exactly ``offset`` tokens later."""
    span = REPEAT_SPAN
    digit = (window >= ord("0")) & (window <= ord("9"))
    return [s for s in range(len(window) - offset - span + 1)
            if digit[s:s + span].all() and torch.equal(window[s:s + span], window[s + offset:s + offset + span])]


def test_repeat_is_a_digit_span_copied_at_the_offset():
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(20):
        w = torch.full((257,), ord("x"))
        w, rows = plant_repeat(w, 128, g)
        (start,) = _repeats(w, 128)           # exactly one span, copied exactly 128 tokens later
        starts.add(start)
        assert int((w != ord("x")).sum()) == 2 * REPEAT_SPAN      # nothing else written
        # rows: the copy's positions but its last; each row's next token is a copied digit after the
        # first, the token 128 back
        assert torch.equal(rows, torch.arange(start + 128, start + 128 + REPEAT_SPAN - 1))
        assert torch.equal(w[rows + 1], w[rows + 1 - 128])
        assert torch.equal(w[rows + 1], w[start + 1:start + REPEAT_SPAN])
    assert len(starts) > 10 and max(starts) <= 257 - 128 - REPEAT_SPAN
    with pytest.raises(ValueError, match=r"needs windows of 192 tokens \(seq_len >= 191\), got 129"):
        plant_repeat(torch.zeros(129, dtype=torch.long), 128, g)
    with pytest.raises(ValueError, match="at least the span"):
        plant_repeat(torch.zeros(257, dtype=torch.long), 32, g)
    with pytest.raises(ValueError, match="retrieval task"):
        plant_retrieval("copy", torch.zeros(257, dtype=torch.long), 128, g)


def test_repeat_at_random_offsets():
    """With max_offset, each repeat's offset is drawn from [offset, max_offset] (capped to what
    the window holds), and the answer rows are the copy's, found at that offset."""
    g = torch.Generator().manual_seed(1)
    offsets = []
    for _ in range(40):
        w = torch.full((513,), ord("x"))
        w, rows = plant_repeat(w, 128, g, max_offset=300)
        (off,) = [o for o in range(128, 301) if _repeats(w, o)]
        offsets.append(off)
        assert int((w != ord("x")).sum()) == 2 * REPEAT_SPAN
        assert torch.equal(w[rows + 1], w[rows + 1 - off]) and int(rows[0]) - off in _repeats(w, off)
    assert min(offsets) >= 128 and max(offsets) <= 300 and len(set(offsets)) > 20
    w, _ = plant_repeat(torch.full((257,), ord("x")), 128, g, max_offset=10_000)   # capped: 257 - 64
    assert max(o for o in range(128, 194) if _repeats(w, o)) <= 257 - REPEAT_SPAN
    with pytest.raises(ValueError, match="offset <= max_offset"):
        plant_repeat(torch.zeros(513, dtype=torch.long), 128, g, max_offset=100)


def test_repeat_retrieval_and_training_batches(corpus):
    w, rows = retrieval_windows(corpus, 3, 256, 128, task="repeat")
    assert w.shape == (3, 257) and rows.shape == (3, REPEAT_SPAN - 1)
    assert torch.equal(w, retrieval_windows(corpus, 3, 256, 128, task="repeat")[0])
    for x, r in zip(w, rows):
        assert int(r[0]) - 128 in _repeats(x, 128)
    b = training_batch(corpus, 0, 16, 256, plant_prob=0.5, distance=128, task="repeat")
    n = sum(bool(_repeats(x, 128)) for x in b)
    assert 2 <= n <= 14
    assert not any(_repeats(x, 128) for x in corpus.batch(0, 16, 256))     # code alone has no such repeat
    assert torch.equal(b, training_batch(corpus, 0, 16, 256, plant_prob=0.5, distance=128, task="repeat"))
    b = training_batch(corpus, 0, 16, 256, plant_prob=1.0, distance=64, task="repeat", max_distance=190)
    assert all(any(_repeats(x, o) for o in range(64, 191)) for x in b)
    w, rows = retrieval_windows(corpus, 8, 256, 64, task="repeat", max_distance=190)
    offs = [next(o for o in range(64, 191) if int(r[0]) - o in _repeats(x, o)) for x, r in zip(w, rows)]
    assert len(set(offs)) > 1


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 2000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file\n" * 2000)
    c = Corpus.load([str(tmp_path)])
    assert "files:" in c.source and len(c.val) > 0
    text = decode(torch.cat([c.train, c.val]))
    assert text.count("hello world") == 2000 and text.count("second file") == 2000
    with pytest.raises(FileNotFoundError, match="--data"):
        Corpus.load([str(tmp_path / "missing")])


def test_passkey_curriculum():
    """The largest distance grows geometrically from CURRICULUM_START to the window; the
    smallest grows with it to the floor and stays below it, so that the distances vary
    once the largest is past twice CURRICULUM_START; after the curriculum the batches are
    the plain ones."""
    from flashdsa.data import CURRICULUM_START, curriculum_distances

    steps, floor, n = 100, 2049, 8192
    ramp = [curriculum_distances(s, floor, n, steps) for s in range(steps)]
    assert ramp[0] == (CURRICULUM_START, CURRICULUM_START) and all(lo <= hi for lo, hi in ramp)
    assert [hi for _, hi in ramp] == sorted(hi for _, hi in ramp) and ramp[-1][1] > 0.9 * n
    assert abs(ramp[steps // 2][1] - (CURRICULUM_START * n) ** 0.5) <= 1   # geometric: the mean of the ends
    assert [lo for lo, _ in ramp] == sorted(lo for lo, _ in ramp)
    assert all(CURRICULUM_START <= lo <= floor for lo, _ in ramp) and ramp[-1][0] == floor
    assert all(lo < hi for lo, hi in ramp if hi >= 2 * CURRICULUM_START)
    assert curriculum_distances(steps, floor, n, steps) == (floor, None)
    assert curriculum_distances(steps, floor, n, steps, n - 64) == (floor, n - 64)
    corpus = Corpus.load(max_bytes=1 << 18)
    def batch(step, curriculum):
        lo, hi = curriculum_distances(step, 65, 256, steps) if curriculum else (65, None)
        return training_batch(corpus, step, 4, 256, 0, 1.0, lo, "passkey", hi)

    assert torch.equal(batch(steps, True), batch(steps, False))
    assert not torch.equal(batch(0, True), batch(0, False))
