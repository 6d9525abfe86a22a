"""Byte-level BPE tokenizer: exact round trip, special tokens, save/load, transformers loading."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emoe_jax.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DataError,
    load_tokenizer,
    train_tokenizer_from_texts,
)
from emoe_jax.data.__main__ import main
from emoe_jax.data.synthetic import tiny_corpus

TRAIN_TEXTS = [
    "def f(x):\n    return x + 1\n\n", "Die Straße ist grün, über alles.\n", "The river ran under the city.\n",
    "\tindented\twith tabs\r\n", "数学 ∑ x² 😀 \u200b\n", "  two  spaces  ", "$\\alpha + \\beta$\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = tiny_corpus(root / "corpus")
    assert main(["tokenizer", str(corpus), str(root / "tok"), "--vocab-size", "400", "--no-progress",
                 "--json"]) == 0
    return root / "tok"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


WHITESPACE_HEAVY = st.lists(st.sampled_from([" ", "\n", "\t", "\r", "\r\n", "a", "ü", "😀", "<bos>", "<pad>",
                                             "\x00", "\u00a0", "\u2028"]), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=200), WHITESPACE_HEAVY))
def test_round_trip_is_exact(tokenizer, text):
    encoding = tokenizer.encode(text)
    assert encoding.ids[0] == BOS_ID
    assert tokenizer.decode(encoding.ids) == text
    plain = tokenizer.encode(text, add_special_tokens=False).ids
    assert plain == encoding.ids[1:]
    # literal special-token text stays text: only the post-processor emits special ids
    assert not {BOS_ID, EOS_ID, PAD_ID} & set(plain)
    assert tokenizer.decode(plain, skip_special_tokens=False) == text


def test_special_token_ids_and_vocab(tokenizer, tokenizer_dir):
    assert [tokenizer.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>")] == [0, 1, 2]
    assert tokenizer.get_vocab_size() == 400
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    info = json.loads((tokenizer_dir / "training_info.json").read_text())
    assert info["tasks"] == ["prose", "umlaut", "code"] and info["train_documents"] > 0


def test_training_compresses_and_is_deterministic():
    a = train_tokenizer_from_texts(iter(TRAIN_TEXTS), 320)
    b = train_tokenizer_from_texts(iter(TRAIN_TEXTS), 320)
    assert a.to_str() == b.to_str()
    text = "def f(x):\n    return x + 1\n"
    # the byte-level pre-tokenizer cuts this into 11 pieces, a floor for any merges
    assert len(a.encode(text, add_special_tokens=False).ids) < 0.7 * len(text.encode("utf-8"))


def test_transformers_loads_the_same_tokenizer(tokenizer, tokenizer_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (0, 1, 2)
    for text in ["Grüße <bos> aus  der\tStadt .\r\n", "x = [1 , 2]\n\n", "😀"]:
        ids = fast(text)["input_ids"]
        assert ids == tokenizer.encode(text).ids
        assert fast.decode(ids, skip_special_tokens=True) == text


def test_errors(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(DataError, match="at least 259"):
        train_tokenizer_from_texts(iter(["abc"]), 100)
    with pytest.raises(FileNotFoundError, match="python -m emoe_jax.data tokenizer"):
        load_tokenizer(tmp_path / "none")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not a valid tokenizers file"):
        load_tokenizer(tmp_path / "bad.json")
    assert main(["tokenizer", str(tmp_path / "no-corpus"), str(tmp_path / "t"), "--no-progress"]) == 2
    assert "not a built corpus" in capsys.readouterr().err
    corpus = tokenizer_dir.parent / "corpus"
    assert main(["tokenizer", str(corpus), str(tokenizer_dir), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_foreign_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="not made by emoe_jax.data"):
        load_tokenizer(tmp_path)
