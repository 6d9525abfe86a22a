"""python -m emoe_jax.verify: every expert, dense group, the tokenizer and the manifest, with faults listed.

Issue 13: a truncated or damaged expert that is never routed to went unnoticed, and a
damaged dense group surfaced as a raw ZSTD error.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from emoe_jax.checkpoint import CheckpointError, load_checkpoint, write_checkpoint
from emoe_jax.config import tiny_config
from emoe_jax.verify import main, verify_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("verify")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tok_dir / "tokenizer.json"))
    cfg = tiny_config("mixtral", num_layers=2, add_bos=True, bos_token_id=1, eos_token_id=2)
    lm, e, h, i = cfg.num_moe_layers, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    rng = np.random.default_rng(0)
    experts = {"gate": rng.standard_normal((lm, e, h, i), np.float32),
               "up": rng.standard_normal((lm, e, h, i), np.float32),
               "down": rng.standard_normal((lm, e, i, h), np.float32)}
    dense = {"norm": {"weight": np.ones(h, np.float32)},
             "layers": {"0": {"input_layernorm": {"weight": rng.standard_normal(h).astype(np.float32)}}}}
    write_checkpoint(root / "ck", cfg, dense, experts, tokenizer_dir=tok_dir)
    return root / "ck"


def _copy(ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    return d


def test_a_sound_checkpoint_passes(ckpt, capsys):
    assert main([str(ckpt), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok:") and "0 faults" in out


def test_a_truncated_expert_nobody_reads_is_found(ckpt, tmp_path, capsys):
    d = _copy(ckpt, tmp_path)
    chunk = d / "experts" / "down" / "c.1.3.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-7])  # truncated
    flip = d / "experts" / "gate" / "c.0.5.0.0"
    raw = bytearray(flip.read_bytes())
    raw[10] ^= 0x40
    flip.write_bytes(bytes(raw))
    assert main([str(d), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    faults = "\n".join(report["faults"])
    assert "MoE layer 1 expert 3" in faults and "MoE layer 0 expert 5" in faults and len(report["faults"]) == 2


def test_a_damaged_dense_group_is_named_with_the_fix(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    for data in (d / "dense" / "layers_0" / "state" / "d").iterdir():  # the group's data files
        raw = bytearray(data.read_bytes())
        for k in range(len(raw) // 2, len(raw), 3):
            raw[k] ^= 0x5A
        data.write_bytes(bytes(raw))
    report = verify_checkpoint(d, progress=False)
    assert not report["ok"] and any("dense group 'layers_0'" in f and "--overwrite" in f for f in report["faults"])
    # Loading for a run says the same, not a raw ZSTD/Orbax error.
    with pytest.raises(CheckpointError, match="dense group 'layers_0'.*damaged.*emoe_jax.convert"):
        load_checkpoint(d).dense


def test_missing_tokenizer_and_inconsistent_manifest(ckpt, tmp_path, capsys):
    d = _copy(ckpt, tmp_path)
    (d / "tokenizer.json").unlink()
    m = json.loads((d / "manifest.json").read_text())
    m["all_expert_bytes"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    assert main([str(d), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "tokenizer.json is listed in the manifest but missing" in out and "all_expert_bytes" in out
    assert "tokenizer missing" in out


def test_not_a_checkpoint_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
