"""Token streams and batch iterators, checked against plain per-document / per-row references."""

import itertools

import numpy as np
import pytest

from emoe_jax.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DataError,
    TokenStreams,
    encode_corpus,
    load_corpus,
    load_tokenizer,
    random_batches,
    sequential_batches,
)
from emoe_jax.data.__main__ import main
from emoe_jax.data.synthetic import tiny_corpus, tiny_tokenizer


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    corpus = tiny_corpus(root / "corpus", docs_per_task=60)
    return corpus, tiny_tokenizer(corpus, root / "tok")


@pytest.fixture(scope="module")
def streams(paths):
    return encode_corpus(*paths, "train", progress=False)


def test_encode_corpus_matches_per_document_reference(paths, streams):
    corpus, tok_dir = paths
    tokenizer = load_tokenizer(tok_dir)
    reference = {}
    for doc in load_corpus(corpus, "train"):
        ids = [BOS_ID] + tokenizer.encode(doc.text, add_special_tokens=False).ids + [EOS_ID]
        reference.setdefault(doc.task, []).extend(ids)
    assert streams.tasks == ("prose", "umlaut", "code")
    for task in streams.tasks:
        assert streams.arrays[task].dtype == np.int32
        np.testing.assert_array_equal(streams.arrays[task], np.array(reference[task], dtype=np.int32))
    assert streams.vocab_size == tokenizer.get_vocab_size()


def test_encode_selected_tasks_and_errors(paths):
    only = encode_corpus(*paths, "validation", tasks=["code"], progress=False)
    assert only.tasks == ("code",) and only.arrays["code"][0] == BOS_ID
    with pytest.raises(DataError, match="not in corpus"):
        encode_corpus(*paths, "train", tasks=["nope"], progress=False)
    with pytest.raises(DataError, match="unknown split"):
        encode_corpus(*paths, "dev", progress=False)


def test_random_batches_shapes_rows_and_determinism(streams):
    batches = list(itertools.islice(random_batches(streams, batch_size=8, seq_len=33, seed=3), 50))
    again = list(itertools.islice(random_batches(streams, batch_size=8, seq_len=33, seed=3), 50))
    other = next(random_batches(streams, batch_size=8, seq_len=33, seed=4))
    for b, c in zip(batches, again):
        np.testing.assert_array_equal(b.tokens, c.tokens)
        np.testing.assert_array_equal(b.task_ids, c.task_ids)
    assert not np.array_equal(batches[0].tokens, other.tokens)
    for b in batches:
        assert b.tokens.shape == (8, 33) and b.tokens.dtype == np.int32
        assert b.task_ids.shape == (8,) and b.valid.all()
        for row in range(8):  # plain reference: slice the row's task stream at its start
            stream = streams.arrays[streams.tasks[b.task_ids[row]]]
            assert 0 <= b.starts[row] <= stream.size - 33
            np.testing.assert_array_equal(b.tokens[row], stream[b.starts[row]: b.starts[row] + 33])
    counts = np.bincount(np.concatenate([b.task_ids for b in batches]), minlength=3)
    assert counts.min() > 400 / 3 * 0.6  # uniform mixing: 400 rows, about 133 per task


def test_task_weights(streams):
    batch = next(random_batches(streams, 64, 16, seed=0, task_weights={"code": 1.0, "prose": 0.0}))
    assert (batch.task_ids == streams.task_id("code")).all()
    with pytest.raises(DataError, match="unknown task"):
        next(random_batches(streams, 4, 16, task_weights={"klingon": 1.0}))
    with pytest.raises(DataError, match="positive sum"):
        next(random_batches(streams, 4, 16, task_weights={"code": 0.0}))


def test_sequential_batches_cover_every_window_once(streams):
    seq_len, batch_size = 50, 16
    batches = list(sequential_batches(streams, batch_size, seq_len))
    rows = [(int(k), int(s)) for b in batches for k, s, v in zip(b.task_ids, b.starts, b.valid) if v]
    expected = [(k, s) for k, t in enumerate(streams.tasks)
                for s in range(0, streams.arrays[t].size // seq_len * seq_len, seq_len)]
    assert rows == expected
    last = batches[-1]
    padding = ~last.valid
    assert (last.tokens[padding] == PAD_ID).all() and (last.task_ids[padding] == -1).all()
    for b in batches:
        for row in np.nonzero(b.valid)[0]:
            stream = streams.arrays[streams.tasks[b.task_ids[row]]]
            np.testing.assert_array_equal(b.tokens[row], stream[b.starts[row]: b.starts[row] + seq_len])


def test_shape_errors(streams):
    with pytest.raises(DataError, match="shorter than seq_len"):
        next(random_batches(streams, 2, 10**7))
    with pytest.raises(DataError, match="positive"):
        next(sequential_batches(streams, 0, 8))


def test_save_load_and_cli(paths, streams, tmp_path, capsys):
    path = streams.save(tmp_path / "train.npz")
    loaded = TokenStreams.load(path)
    assert loaded.tasks == streams.tasks and loaded.split == "train"
    for task in streams.tasks:
        np.testing.assert_array_equal(loaded.arrays[task], streams.arrays[task])
    assert main(["encode", str(paths[0]), str(paths[1]), str(tmp_path / "cli.npz"), "--no-progress"]) == 0
    capsys.readouterr()
    cli = TokenStreams.load(tmp_path / "cli.npz")
    assert cli.num_tokens() == streams.num_tokens()
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a token-stream file"):
        TokenStreams.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        TokenStreams.load(tmp_path / "missing.npz")
