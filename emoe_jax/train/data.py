"""Token streams for training, encoded once per run directory and cached.

`cached_streams` encodes a split with `emoe_jax.data.encode_corpus` and saves it
as RUN_DIR/tokens/{split}.npz next to a fingerprint (tokenizer.json and corpus
split-file sizes + mtimes); a later call (a resumed run) reuses the file only
when the fingerprint matches, so a changed corpus or tokenizer is re-encoded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from emoe_jax.atomic_io import write_json_atomic
from emoe_jax.data import TokenStreams, encode_corpus
from emoe_jax.data.errors import DataError


def _fingerprint(corpus_dir: Path, tokenizer_dir: Path, split: str) -> dict:
    tok = Path(tokenizer_dir) / "tokenizer.json"
    if not tok.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}; train one with "
                                "`python -m emoe_jax.data tokenizer CORPUS OUT`")
    split_file = Path(corpus_dir) / f"{split}.jsonl"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file} not found; build the corpus with `python -m emoe_jax.data build`")
    stat = split_file.stat()
    return {"tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest(),
            "split_file": str(split_file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_streams(corpus_dir: str | Path, tokenizer_dir: str | Path, split: str, cache_dir: str | Path,
                   progress: bool = True) -> TokenStreams:
    cache_dir = Path(cache_dir)
    fingerprint = _fingerprint(Path(corpus_dir), Path(tokenizer_dir), split)
    npz, meta = cache_dir / f"{split}.npz", cache_dir / f"{split}.json"
    if npz.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()) == fingerprint:
                return TokenStreams.load(npz)
        except (json.JSONDecodeError, DataError):
            pass  # unreadable cache: re-encode below
    streams = encode_corpus(corpus_dir, tokenizer_dir, split, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    streams.save(npz)
    write_json_atomic(meta, fingerprint, indent=None)
    return streams
