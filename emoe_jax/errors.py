"""The project's error classes share one base, so callers can catch one thing.

Every error emoe_jax raises on bad input (missing or corrupt files, wrong
configs, impossible budgets, unknown names) derives from `EmoeError`, itself a
ValueError so existing `except ValueError` callers keep working. Each module
keeps its own subclass next to the code that raises it; only the errors two
modules below the tokenizer both need live here.
"""

from __future__ import annotations


class EmoeError(ValueError):
    """Bad input to emoe_jax; the message names the problem and the fix."""


class TokenizerError(EmoeError):
    """A tokenizer file is missing, unreadable or inconsistent with the model."""


class MissingTokenizerError(TokenizerError, FileNotFoundError):
    """No tokenizer file where one was expected."""


class ChatTemplateError(TokenizerError):
    """A chat template is missing, fails to render, or the messages break its rules."""


__all__ = ["EmoeError", "TokenizerError", "MissingTokenizerError", "ChatTemplateError"]
