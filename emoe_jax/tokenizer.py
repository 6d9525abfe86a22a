"""Tokenizers of the supported families, with each family's BOS convention.

Steps of `load_tokenizer(path, config=None)`:
  1. find the tokenizer: `tokenizer.json` (a `tokenizers` file) in a checkpoint or
     Hugging Face directory, or that file itself; a directory with only a SentencePiece
     `tokenizer.model` is run by `sentencepiece` itself (the error says how to install it
     when missing); converting it through transformers gave other ids on runs of spaces;
  2. read `tokenizer_config.json` (bos/eos/pad tokens, `add_bos_token`) and
     `generation_config.json` (extra EOS ids) when present;
  3. decide whether `encode` prepends BOS, first rule that applies:
       a. `add_bos_token` in tokenizer_config.json (what the checkpoint's authors set;
          transformers 4 honoured it, transformers 5.23 lets the post-processor decide;
          see docs/checkpoint.md),
       b. the tokenizer.json post-processor, if there is one (what transformers 5 does),
       c. the family default `MoEConfig.add_bos`;
  4. `encode` tokenizes without the post-processor and prepends BOS itself, never
     twice (a text that already starts with the BOS token keeps a single one), and
     never appends EOS;
  5. the chat template (chat_template.jinja, or tokenizer_config.json's `chat_template`)
     renders `messages` as transformers does (emoe_jax/chat_template.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from emoe_jax.chat_template import render_chat
from emoe_jax.errors import ChatTemplateError, MissingTokenizerError, TokenizerError
from emoe_jax.config import ConfigError, MoEConfig, from_hf_config


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _config_in(directory: Path) -> MoEConfig | None:
    data = _read_json(directory / "config.json")
    if not data:
        return None
    try:
        return MoEConfig.from_dict(data) if "family" in data else from_hf_config(data)
    except (ConfigError, TypeError):
        return None


class Tokenizer:
    """encode/decode with the family's BOS convention; ids as plain Python ints."""

    def __init__(self, backend, *, add_bos: bool, bos_id: int | None, eos_ids: Sequence[int],
                 pad_id: int | None, source: str, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        self.backend = backend  # tokenizers.Tokenizer, or _SentencePieceBackend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ... as strings
        self.add_bos = add_bos
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))  # unique, order kept
        self.pad_id = pad_id
        self.source = source
        if add_bos and bos_id is None:
            raise TokenizerError(f"{source}: BOS is required but the tokenizer defines no BOS token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and (not ids or ids[0] != self.bos_id):
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos=True but the tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return list(ids)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        return [self.encode(t, add_bos) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> str:
        """The chat as text, rendered with the checkpoint's chat template (see chat_template.py)."""
        if self.chat_template is None:
            raise ChatTemplateError(
                f"{self.source}: this tokenizer has no chat template (neither chat_template.jinja nor a "
                "chat_template in tokenizer_config.json); it is probably a base model: prompt it with plain "
                "text instead of --chat / messages=")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, **kwargs)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs: Any) -> list[int] | str:
        """Like transformers' `apply_chat_template`: render, then encode with no special tokens
        added (the template writes BOS itself where the model wants one, so never a second BOS)."""
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_bos=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_ids}, pad={self.pad_id}, add_bos={self.add_bos})")


class _SentencePieceBackend:
    """`sentencepiece` itself behind the few `tokenizers.Tokenizer` methods `Tokenizer` uses.

    Why not convert tokenizer.model to a `tokenizers` object (what transformers does): the
    converted Metaspace pre-tokenizer does not reproduce SentencePiece's normalizer, so
    runs of spaces (code indentation), leading spaces and tabs got other ids than the
    model was trained on. The model file is the ground truth, so we run it.
    """

    post_processor = None  # no template: `load_tokenizer` decides BOS from tokenizer_config / the family

    def __init__(self, model_file: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._unk = self.sp.unk_id()

    class _Encoding:
        def __init__(self, ids: list[int]):
            self.ids = ids

    def encode(self, text: str, add_special_tokens: bool = False) -> "_SentencePieceBackend._Encoding":
        return self._Encoding(list(self.sp.encode(text)))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if not skip_special_tokens:
            return "".join(self.sp.id_to_piece(i) if self.sp.is_control(i) else self.sp.decode([i]) for i in ids)
        return self.sp.decode([i for i in ids if not self.sp.is_control(i)])

    def token_to_id(self, token: str) -> int | None:
        tid = self.sp.piece_to_id(token)
        return None if tid == self._unk and token != self.sp.id_to_piece(self._unk) else tid

    def id_to_token(self, tid: int) -> str | None:
        return self.sp.id_to_piece(tid) if 0 <= tid < self.sp.get_piece_size() else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.sp.get_piece_size()


def _from_sentencepiece(directory: Path):
    """A SentencePiece tokenizer.model, run by `sentencepiece` (see _SentencePieceBackend)."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError as e:
        raise TokenizerError(
            f"{directory} has only a SentencePiece tokenizer.model; reading it needs "
            f"`pip install sentencepiece protobuf` ({e})"
        ) from None
    try:
        return _SentencePieceBackend(directory / "tokenizer.model")
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
        raise TokenizerError(f"cannot read {directory / 'tokenizer.model'}: {e}") from None


def _post_processor_adds_bos(backend, bos_id: int | None) -> bool | None:
    """True/False when tokenizer.json has a post-processor (does it prepend BOS?), else None."""
    if backend.post_processor is None:
        return None
    if bos_id is None:
        return False
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def load_tokenizer(path: str | Path, config: MoEConfig | None = None) -> Tokenizer:
    """Tokenizer of a converted checkpoint, a Hugging Face directory, or a tokenizer.json file."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    if path.is_file():
        directory, tok_file = path.parent, path
    elif path.is_dir():
        directory, tok_file = path, path / "tokenizer.json"
    else:
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    source = tok_file
    if tok_file.is_file():
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise TokenizerError(f"{tok_file} is not a valid tokenizers file: {e}") from None
    elif (directory / "tokenizer.model").is_file():
        backend = _from_sentencepiece(directory)
        source = directory / "tokenizer.model"
    else:
        raise MissingTokenizerError(
            f"no tokenizer.json or tokenizer.model in {directory}, so text cannot be encoded; copy the "
            "tokenizer files of the Hugging Face checkpoint there (python -m emoe_jax.convert copies them when "
            "the source has them), or pass token ids (engine.generate([[ids]], ...))"
        )
    if config is None:
        config = _config_in(directory)
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    gen_cfg = _read_json(directory / "generation_config.json")

    def special(name: str, fallback: int | None) -> int | None:
        token = _token_str(tok_cfg.get(name))
        tid = backend.token_to_id(token) if token else None
        return tid if tid is not None else fallback

    bos_id = special("bos_token", config.bos_token_id if config else None)
    pad_id = special("pad_token", config.pad_token_id if config else None)
    eos: list[int] = []
    eos_tok = special("eos_token", None)
    if eos_tok is not None:
        eos.append(eos_tok)
    if config is not None:
        eos.extend(config.eos_ids)
    gen_eos = gen_cfg.get("eos_token_id")
    eos.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else [])

    if isinstance(tok_cfg.get("add_bos_token"), bool):
        add_bos = tok_cfg["add_bos_token"]
    else:
        from_post = _post_processor_adds_bos(backend, bos_id)
        add_bos = from_post if from_post is not None else bool(config.add_bos if config else False)
    special_tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = _token_str(tok_cfg.get(name))
        if token is None:
            tid = {"bos_token": bos_id, "eos_token": eos_tok, "pad_token": pad_id}.get(name)
            token = backend.id_to_token(tid) if tid is not None else None
        if token is not None:
            special_tokens[name] = token
    return Tokenizer(backend, add_bos=add_bos, bos_id=bos_id, eos_ids=eos, pad_id=pad_id, source=str(source),
                     chat_template=_chat_template(directory, tok_cfg), special_tokens=special_tokens)


def _chat_template(directory: Path, tok_cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja (newer checkpoints) or tokenizer_config.json's chat_template (older;
    a string, or a list of named templates of which transformers uses 'default')."""
    path = directory / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    tpl = tok_cfg.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None
