"""Tokenizer wrapper: BOS rules, agreement with transformers.AutoTokenizer, SentencePiece-only dirs."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from emoe_jax.config import tiny_config
from emoe_jax.tokenizer import TokenizerError, load_tokenizer

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "mixture of experts offloading",
         "experts of the world", ""]


def _backend(template: bool) -> Backend:
    tok = Backend(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return tok


@pytest.mark.parametrize("add_bos", [True, False])
def test_matches_autotokenizer(tmp_path, add_bos):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_backend(template=False), bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                                add_bos_token=add_bos)
    fast.save_pretrained(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos is add_bos
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 3)
    for text in TEXTS + ["unseen wörds ✓"]:
        ids = tok.encode(text)
        assert ids == auto(text)["input_ids"], text
        assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True) == text
        assert (ids[:1] == [1]) is add_bos
    # An explicit argument overrides the default either way.
    assert (tok.encode("hello", add_bos=not add_bos)[:1] == [1]) is (not add_bos)


def _save_raw(tmp_path, template: bool, tok_cfg: dict | None, gen_cfg: dict | None = None):
    d = tmp_path / f"raw_{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    _backend(template).save(str(d / "tokenizer.json"))
    if tok_cfg is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if gen_cfg is not None:
        (d / "generation_config.json").write_text(json.dumps(gen_cfg))
    return d


def test_bos_rules_and_no_double_bos(tmp_path):
    specials = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    # a. tokenizer_config's add_bos_token wins over the post-processor.
    d = _save_raw(tmp_path, template=True, tok_cfg={**specials, "add_bos_token": False})
    assert load_tokenizer(d).encode("hello world")[0] != 1
    # b. no add_bos_token: the post-processor decides (it prepends <s>).
    d = _save_raw(tmp_path, template=True, tok_cfg=dict(specials))
    tok = load_tokenizer(d)
    assert tok.add_bos and tok.encode("hello world")[0] == 1
    # Never a double BOS, even when the text spells it out.
    assert tok.encode("<s>hello world") == tok.encode("hello world")
    # c. neither: the family default from the config, and EOS ids merged from all sources.
    d = _save_raw(tmp_path, template=False, tok_cfg=None, gen_cfg={"eos_token_id": [2, 3]})
    with_bos = load_tokenizer(d, tiny_config("mixtral", add_bos=True, bos_token_id=1, eos_token_id=2))
    assert with_bos.add_bos and with_bos.encode("hello")[0] == 1 and with_bos.eos_ids == (2, 3)
    assert not load_tokenizer(d, tiny_config("qwen3_moe")).add_bos
    # BOS required but undefined: clear error.
    with pytest.raises(TokenizerError, match="no BOS"):
        load_tokenizer(d, tiny_config("mixtral", add_bos=True))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def _train_spm(d):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS[:4] * 20), model_prefix=str(d / "tokenizer"),
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    return spm


def test_sentencepiece_only_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    spm = _train_spm(tmp_path)
    tok = load_tokenizer(tmp_path)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:4]:
        assert tok.encode(text) == [1, *ref.encode(text)] == auto(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_missing_dependency_message(tmp_path, monkeypatch):
    _train_spm(tmp_path)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import now raises ImportError
    with pytest.raises(TokenizerError, match="pip install sentencepiece protobuf"):
        load_tokenizer(tmp_path)


def test_checkpoint_tokenizer_is_copied_and_lazy(tmp_path):
    from emoe_jax.checkpoint import load_checkpoint, write_checkpoint

    src = _save_raw(tmp_path, template=True, tok_cfg={"bos_token": "<s>", "eos_token": "</s>"})
    cfg = tiny_config("mixtral", num_layers=1, add_bos=True, bos_token_id=1, eos_token_id=2)
    lm, e, h, i = 1, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    experts = {"gate": np.zeros((lm, e, h, i), np.float32), "up": np.zeros((lm, e, h, i), np.float32),
               "down": np.zeros((lm, e, i, h), np.float32)}
    write_checkpoint(tmp_path / "ck", cfg, {"norm": {"weight": np.ones(h, np.float32)}}, experts, tokenizer_dir=src)
    shutil.rmtree(src)
    tok = load_checkpoint(tmp_path / "ck").tokenizer
    assert tok.encode("hello world")[0] == 1 and tok.eos_ids == (2,)


@pytest.mark.parametrize("keep_spaces", [False, True])  # spm's default normalizer, and Llama/Mixtral's
def test_sentencepiece_runs_of_spaces_match_sentencepiece_itself(tmp_path, keep_spaces):
    spm = pytest.importorskip("sentencepiece")
    code = ["def f(x):\n    return  x  +  1", "if a:\n\tpass", "a   b    c", "  two leading", "trailing   "]
    spm.SentencePieceTrainer.train(sentence_iterator=iter((TEXTS[:4] + code) * 20),
                                   model_prefix=str(tmp_path / "tokenizer"), vocab_size=70, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   remove_extra_whitespaces=not keep_spaces)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    tok = load_tokenizer(tmp_path)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in code + [" hello", "x\n    y", "    indented"]:
        assert tok.encode(text) == [1, *ref.encode(text)], repr(text)
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))


def test_add_bos_token_wins_over_a_post_processor_without_bos(tmp_path):
    """DeepSeek-V2's case (docs/checkpoint.md): add_bos_token true, post-processor adds no BOS."""
    d = _save_raw(tmp_path, template=False, tok_cfg={"bos_token": "<s>", "add_bos_token": True})
    backend = Backend.from_file(str(d / "tokenizer.json"))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # a post-processor that adds nothing
    backend.save(str(d / "tokenizer.json"))
    assert load_tokenizer(d).encode("hello world")[0] == 1
