"""What every command line of the project does with bad input: one line on stderr, exit status 2.

`python -m emoe_jax.<tool>` entry points catch the errors a user can fix (`USER_ERRORS`:
the project's `EmoeError`s are ValueErrors; missing, unreadable or existing files are
OSErrors) and hand them to `fail`, which prints `error: <message>` the way argparse
prints a bad flag, so scripts see the same shape whatever went wrong. Anything else is
a bug and keeps its traceback. Subcommands are argparse sub-parsers whose
`set_defaults(run=...)` names the function `run_subcommand` calls.
"""

from __future__ import annotations

import argparse
import sys

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def fail(error: object) -> int:
    """Print ``error: <error>`` on stderr; the exit status for bad input (2, as argparse uses)."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def run_subcommand(args: argparse.Namespace) -> int:
    """Call the function the chosen sub-parser registered with ``set_defaults(run=...)``."""
    return args.run(args)


__all__ = ["USER_ERRORS", "fail", "run_subcommand"]
