"""generate's bad-input cases from issue 13: sampling edges, --device-experts forms, what --model
points at (file, empty, junk, a Hugging Face folder converted into the cache), missing tokenizer,
Ctrl-C, --predictor list, restricted-mode stats, --chat. In-process `main` calls (no interpreter
start per case) on the tiny checkpoint of test_generate_cli."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from emoe_jax import generate
from emoe_jax.runtime import stages
from emoe_jax.runtime.budget import BudgetError, parse_expert_count
from emoe_jax.sampling import SamplingError, check_sampling


def _main(capsys, *args):
    rc = generate.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(capsys, *args):
    rc, out, err = _main(capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out), err


# ---- sampling -------------------------------------------------------------------------------
def test_top_p_zero_samples_the_argmax_not_token_0():
    logits = jax.numpy.asarray(np.array([[0.1, 2.0, 1.9, -1.0], [3.0, 0.0, 2.9, 1.0]], np.float32))
    for i in range(20):
        got = stages.sample(logits, jax.random.key(i), np.float32(0.8), np.float32(0.0), top_p_enabled=True)
        assert np.asarray(got).tolist() == [1, 0]
    # top_p = 1 keeps every token: over many keys each of the 4 tokens of a flat row appears.
    flat = jax.numpy.zeros((1, 4))
    seen = {int(stages.sample(flat, jax.random.key(i), np.float32(1.0), np.float32(1.0), top_p_enabled=True)[0])
            for i in range(60)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("t,p,needle", [(-0.5, 1.0, "temperature=-0.5"), (0.8, 2.0, "top_p=2.0"),
                                        (0.8, -0.1, "top_p=-0.1"), (float("nan"), 1.0, "temperature=nan")])
def test_bad_sampling_values_are_refused(t, p, needle):
    with pytest.raises(SamplingError, match=needle):
        check_sampling(t, p)


def test_sampling_flags_at_the_cli_and_the_api(tiny_ckpt, capsys):
    rc, _, err = _main(capsys, "--model", str(tiny_ckpt), "--prompt", "a", "--top-p", "2")
    assert rc != 0 and "--top-p=2.0" in err and "[0, 1]" in err
    rc, _, err = _main(capsys, "--model", str(tiny_ckpt), "--prompt", "a", "--temperature", "-1")
    assert rc == 2 and "--temperature=-1.0" in err
    # Also the --device-experts forms: 100% (all) and 1 (ONE per layer, with a note); exact mode
    # gives the same tokens for both budgets.
    greedy, err = _json(capsys, "--model", str(tiny_ckpt), "--prompt", "hello world", "--max-new-tokens", "4",
                        "--device-experts", "100%")
    assert greedy["stats"]["device_expert_bytes"] == greedy["stats"]["all_expert_bytes"] and "note" not in err
    nucleus0, err = _json(capsys, "--model", str(tiny_ckpt), "--prompt", "hello world", "--max-new-tokens", "4",
                          "--temperature", "0.8", "--top-p", "0", "--device-experts", "1")
    assert nucleus0["tokens"] == greedy["tokens"]  # top-p 0 = the argmax (was: BOS tokens, empty text)
    assert "ONE expert per MoE layer" in err and nucleus0["stats"]["device_slots_per_layer"] in (1, [1] * 3)
    from emoe_jax.runtime.engine import OffloadedEngine

    engine = OffloadedEngine.from_checkpoint(tiny_ckpt, device_experts="all")
    with pytest.raises(SamplingError, match="temperature=-1"):
        engine.generate([[3, 4]], 2, temperature=-1.0)


# ---- --device-experts ------------------------------------------------------------------------
def test_device_expert_forms_and_the_rule_in_help():
    assert [parse_expert_count(s, 64, "x") for s in ("100%", "all", "ALL", "25%", "1.0", "1", "16")] == \
        [64, 64, 64, 16, 64, 1, 16]
    with pytest.raises(BudgetError, match="experts over all MoE layers"):
        parse_expert_count("999", 128, "--host-experts", per="over all MoE layers")
    with pytest.raises(BudgetError, match="percentage"):
        parse_expert_count("150%", 64, "x")
    assert generate.note_device_experts("1") and generate.note_device_experts("4,1,8")
    assert not generate.note_device_experts("1.0") and not generate.note_device_experts("16")
    text = " ".join(generate.build_parser().format_help().split())
    assert "an integer a COUNT (16), so 1 means one expert per layer" in text and "100%" in text


# ---- --model ---------------------------------------------------------------------------------
def test_model_path_that_is_a_file_empty_or_junk(tiny_ckpt, tmp_path, capsys):
    rc, _, err = _main(capsys, "--model", str(tiny_ckpt / "config.json"), "--prompt", "a")
    assert rc == 2 and "is a file, not a folder" in err and str(tiny_ckpt) in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _main(capsys, "--model", str(tmp_path / "empty"), "--prompt", "a")
    assert rc == 2 and "empty folder" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    rc, _, err = _main(capsys, "--model", str(tmp_path / "junk"), "--prompt", "a")
    assert rc == 2 and "neither an emoe_jax checkpoint" in err and "notes.txt" in err


def test_hf_folder_is_converted_into_the_cache_and_tokenizer_is_required(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from test_convert import make_hf
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, _ = make_hf(tmp_path, "olmoe")
    monkeypatch.setenv("EMOE_JAX_CACHE", str(tmp_path / "cache"))
    rc, _, err = _main(capsys, "--model", str(hf), "--prompt", "a b", "--max-new-tokens", "2")
    assert rc == 2 and "converting it once into" in err and "no tokenizer.json or tokenizer.model" in err, err
    assert "Traceback" not in err and "incomplete conversion" not in err
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith(hf.name + "-") and (cached / "manifest.json").exists()
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 3, "b": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))  # added later: copied into the cached checkpoint
    out, err = _json(capsys, "--model", str(hf), "--prompt", "a b", "--max-new-tokens", "2")
    assert "converting" not in err and len(out["tokens"][0]) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.name]


# ---- Ctrl-C, --predictor list, restricted stats -------------------------------------------------
def test_ctrl_c_exits_130_with_one_line(tiny_ckpt, capsys, monkeypatch):
    from emoe_jax.runtime.engine import OffloadedEngine

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(OffloadedEngine, "generate", interrupted)
    rc, _, err = _main(capsys, "--model", str(tiny_ckpt), "--prompt", "a", "--no-stream")
    assert rc == 130 and err == "interrupted\n"


def test_predictor_list_offers_only_what_generate_runs(capsys):
    rc, out, _ = _main(capsys, "--predictor", "list")
    assert rc == 0 and "ORACLE" not in out and "belady" not in out and "oracle-prefetch" not in out
    assert "--model-checkpoint" not in out and "needs --train-traces DIR" in out
    names = [line.split()[0] for line in out.splitlines()]
    assert {"none", "prev-token", "spec-gating", "learned", "emoe"} <= set(names)


def test_restricted_stats_count_the_resident_set_loaded_up_front(tiny_ckpt, capsys):
    out, _ = _json(capsys, "--model", str(tiny_ckpt), "--prompt", "a", "--max-new-tokens", "2",
                   "--mode", "restricted", "--device-experts", "0.5")
    s = out["stats"]
    assert s["preload_h2d_bytes"] == s["device_expert_bytes"] > 0
    assert "resident set loaded up front" in generate.format_stats(s)


# ---- --chat ----------------------------------------------------------------------------------
def test_chat_renders_the_template_with_one_bos(tiny_ckpt, tmp_path, capsys):
    rc, _, err = _main(capsys, "--model", str(tiny_ckpt), "--prompt", "hi", "--chat")
    assert rc == 2 and "no chat template" in err
    d = tmp_path / "chat"
    shutil.copytree(tiny_ckpt, d)
    (d / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")
    from emoe_jax.checkpoint import load_checkpoint

    tok = load_checkpoint(d).tokenizer
    ids = generate.encode_prompts(tok, ["hello world"], chat=True, system="be brief")
    text = tok.render_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}])
    assert text.startswith(tok.special_tokens["bos_token"]) and ids[0] == tok.encode(text)
    assert ids[0][0] == tok.bos_id and ids[0][1] != tok.bos_id  # the template's BOS, no second one
    chat, _ = _json(capsys, "--model", str(d), "--prompt", "hello world", "--chat", "--system", "be brief",
                    "--max-new-tokens", "2")
    assert chat["stats"]["prefill_tokens"] == len(ids[0])
