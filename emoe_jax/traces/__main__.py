"""Trace tools: python -m emoe_jax.traces <command> ...

Commands are registered by modules: each module listed in SUBCOMMAND_MODULES
defines `register_cli(subparsers)`, which adds one argparse sub-parser and sets
`run=<callable(args) -> int>` on it (emoe_jax.cli.run_subcommand calls it). Adding a command means writing such a
module and naming it here; modules that do not exist (yet) are skipped.

    python -m emoe_jax.traces import-moe-beyond SRC OUT [--prompts P] [--tokenizer T] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import sys

from emoe_jax.cli import run_subcommand

SUBCOMMAND_MODULES = (
    "emoe_jax.traces.moe_beyond_cli",  # import-moe-beyond
    "emoe_jax.runtime.trace_collect",  # collect (traces from our own engine: it runs the runtime)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emoe_jax.traces",
        description="Create and convert expert-routing trace sets (see docs/traces.md).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the command's module is not written yet: offer the others
                continue
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_subcommand(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
