"""Chat templates render as transformers renders them: ids equal AutoTokenizer.apply_chat_template.

Small templates written after the public ones of Mixtral-Instruct, Qwen3, OLMoE-Instruct and
DeepSeek-V2-Chat (their structure: BOS handling, role markers, generation prompt, EOS after
assistant turns, system messages, raise_exception), over one tiny byte-level BPE that knows
each family's special tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from emoe_jax.tokenizer import ChatTemplateError, load_tokenizer

transformers = pytest.importorskip("transformers")

MIXTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'assistant' and '</think>' in message.content %}
        {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
    {%- else %}
        {%- set content = message.content %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
OLMOE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
         "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
         "{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
         "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}")
DEEPSEEK_V2 = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
               "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
               "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
               "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# family -> (template, bos, eos, add_bos_token, where the template is stored)
FAMILIES = {
    "mixtral": (MIXTRAL, "<s>", "</s>", True, "tokenizer_config"),
    "qwen3_moe": (QWEN3, None, "<|im_end|>", False, "jinja"),
    "olmoe": (OLMOE, "<|endoftext|>", "<|endoftext|>", False, "tokenizer_config"),
    "deepseek_v2": (DEEPSEEK_V2, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True, "jinja"),
}
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
            "<|system|>", "<|user|>", "<|assistant|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
CHATS = [
    [{"role": "user", "content": "What is a mixture of experts?"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "def f(x):\n    return  x  + 1"}],
]
SYSTEM = {"role": "system", "content": "You are a concise assistant."}


def _save(d, family):
    template, bos, eos, add_bos, where = FAMILIES[family]
    tok = Backend(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[:3],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for c in CHATS for m in c] * 3 + ["User Assistant system"], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[3:]])
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "unk_token": "<unk>", "add_bos_token": add_bos}
    if where == "jinja":
        (d / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def _auto_ids(auto, chat, **kw):
    out = auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, **kw)
    out = out["input_ids"] if hasattr(out, "keys") else out
    return list(np.asarray(out).reshape(-1).tolist())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ids_equal_autotokenizer_apply_chat_template(tmp_path, family):
    d = tmp_path / family
    _save(d, family)
    auto = transformers.AutoTokenizer.from_pretrained(d)
    tok = load_tokenizer(d)
    chats = CHATS if family == "mixtral" else CHATS + [[SYSTEM, *CHATS[1]]]
    for chat in chats:
        ids = tok.apply_chat_template(chat)
        assert ids == _auto_ids(auto, chat), (family, chat)
        assert tok.render_chat(chat) == auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        if tok.bos_id is not None and FAMILIES[family][1] is not None:
            assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template's BOS, no second one
    if family == "qwen3_moe":
        kw = {"enable_thinking": False}
        assert tok.apply_chat_template(CHATS[0], **kw) == _auto_ids(auto, CHATS[0], **kw)
    if family == "mixtral":  # the template's own raise_exception becomes a clear error
        with pytest.raises(ChatTemplateError, match="roles must alternate"):
            tok.apply_chat_template([SYSTEM, *CHATS[0]])


def test_converter_copies_the_chat_template(tmp_path):
    from emoe_jax.checkpoint import load_checkpoint, write_checkpoint
    from emoe_jax.config import tiny_config

    src = tmp_path / "src"
    _save(src, "qwen3_moe")
    cfg = tiny_config("mixtral", num_layers=1, vocab_size=512)
    lm, e, h, i = 1, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    z = np.zeros((lm, e, h, i), np.float32)
    write_checkpoint(tmp_path / "ck", cfg, {"norm": {"weight": np.ones(h, np.float32)}},
                     {"gate": z, "up": z, "down": np.zeros((lm, e, i, h), np.float32)}, tokenizer_dir=src)
    assert (tmp_path / "ck" / "chat_template.jinja").read_text() == QWEN3
    tok = load_checkpoint(tmp_path / "ck").tokenizer
    assert tok.render_chat(CHATS[0]).endswith("<|im_start|>assistant\n")
