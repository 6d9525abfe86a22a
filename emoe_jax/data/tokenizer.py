"""Byte-level BPE tokenizer trained on a corpus's train split (Hugging Face `tokenizers`).

Steps of `train_tokenizer`:
  1. an empty BPE model with the GPT-2 byte-level pre-tokenizer (no prefix
     space) and the byte-level decoder, and *no normaliser*: every string maps
     to its UTF-8 bytes and back, so decode(encode(x)) == x exactly, including
     whitespace, newlines, tabs and any Unicode;
  2. special tokens `<bos>`, `<eos>`, `<pad>` get ids 0, 1, 2; the initial
     alphabet is all 256 bytes so no input is ever out of vocabulary;
  3. merges are learned from the train split's texts (min frequency 2);
  4. a post-processor puts `<bos>` before every encoded text (documents in
     the training stream start with `<bos>` too);
  5. `tokenizer.json` (HF format), `tokenizer_config.json` and
     `special_tokens_map.json` (for `transformers.PreTrainedTokenizerFast`) and
     `training_info.json` are written to a temporary folder renamed into place.

Literal "<bos>" text in an input must stay text, not become the special token:
`load_tokenizer` sets `encode_special_tokens = True` (not stored in
tokenizer.json by `tokenizers`), and tokenizer_config.json sets
`split_special_tokens: true`, the same switch for `transformers`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from emoe_jax.data.corpus import Corpus
from emoe_jax.atomic_io import replace_dir
from emoe_jax.data.errors import DataError

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def new_byte_level_bpe() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the exact-round-trip settings."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = None  # any normaliser (NFC, strip, lowercase) breaks the round trip
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_bos_post_processor(tokenizer: Tokenizer) -> None:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )


def train_tokenizer_from_texts(texts: Iterator[str], vocab_size: int, *, length: int | None = None,
                               min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `texts`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + 3 specials), got {vocab_size}")
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    for token, expected in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID)):
        if tokenizer.token_to_id(token) != expected:
            raise DataError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {expected}")
    _add_bos_post_processor(tokenizer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, info: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write tokenizer.json + HF config files into `out_dir` atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"output folder {out_dir} already exists; pass --overwrite to replace it")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / TOKENIZER_FILE).is_file():
        raise DataError(f"refusing to overwrite {out_dir}: it is not empty and holds no {TOKENIZER_FILE}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the result is an ordinary shared folder
    try:
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            # transformers would otherwise turn " ." into "." on decode: no exact round trip.
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,
            "add_prefix_space": False,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        info = {"vocab_size": tokenizer.get_vocab_size(), "bos_id": BOS_ID, "eos_id": EOS_ID,
                "pad_id": PAD_ID, **(info or {})}
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer folder (or its tokenizer.json) with literal special-token text kept as text."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found; train a tokenizer with `python -m emoe_jax.data tokenizer CORPUS_DIR {path}`"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{file} is not a valid tokenizers file ({error}); retrain the tokenizer") from error
    for token, expected in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID)):
        if tokenizer.token_to_id(token) != expected:
            raise DataError(f"{file}: special token {token} has id {tokenizer.token_to_id(token)}, "
                            f"expected {expected}; it was not made by emoe_jax.data")
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_tokenizer(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *, vocab_size: int = 4096,
                    min_frequency: int = 2, overwrite: bool = False, progress: bool = True) -> Tokenizer:
    """Train on the train split of the corpus at `corpus_dir`; save into `out_dir`."""
    corpus = Corpus(corpus_dir)
    train_docs = sum(info["documents"]["train"] for info in corpus.manifest["tasks"].values())
    if train_docs == 0:
        raise DataError(f"the train split of {corpus_dir} is empty; rebuild the corpus with more documents")
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise DataError(f"output folder {out_dir} already exists; pass --overwrite to replace it")
    texts = (doc.text for doc in tqdm(corpus.documents("train"), total=train_docs, desc="tokenizer training",
                                      unit="doc", disable=not progress))
    tokenizer = train_tokenizer_from_texts(texts, vocab_size, length=train_docs, min_frequency=min_frequency)
    info = {
        "corpus": str(Path(corpus_dir).resolve()),
        "corpus_files": corpus.manifest.get("files", {}),
        "tasks": corpus.tasks,
        "train_documents": train_docs,
        "train_chars": sum(info["chars"]["train"] for info in corpus.manifest["tasks"].values()),
        "min_frequency": min_frequency,
    }
    save_tokenizer(tokenizer, out_dir, info=info, overwrite=overwrite)
    return tokenizer
