"""Rendering a checkpoint's chat template the way transformers does.

Instruct checkpoints ship a Jinja chat template (chat_template.jinja or the
`chat_template` of tokenizer_config.json). transformers renders it in a sandboxed
Jinja environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a JSON `tojson` filter (no HTML escaping), `raise_exception`,
`strftime_now`, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
as variables, then encodes the text with no special tokens added. We do the same,
so `Tokenizer.apply_chat_template` gives the ids `AutoTokenizer.apply_chat_template`
gives (tests/test_chat_template.py checks Mixtral-Instruct, Qwen3, OLMoE-Instruct and
DeepSeek-V2-Chat style templates). Not supported: transformers' `{% generation %}`
tag (assistant-token masks, a training feature).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Sequence

from emoe_jax.errors import ChatTemplateError


def _error(message: str) -> ChatTemplateError:
    return ChatTemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise _error("rendering a chat template needs jinja2: pip install 'jinja2>=3.1'") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise _error(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None, **kwargs: Any) -> str:
    """messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...] -> the prompt text."""
    import jinja2

    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise _error("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    try:
        return _compile(template).render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         **{**(special_tokens or {}), **kwargs})
    except jinja2.exceptions.TemplateError as e:
        raise _error(f"the chat template refused these messages: {e}") from None
