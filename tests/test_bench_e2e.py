"""python -m emoe_jax.bench e2e on a tiny checkpoint and a tiny corpus: every section runs and is consistent."""

import json

import numpy as np
import pytest

from emoe_jax.bench.e2e import main, markdown
from emoe_jax.checkpoint import write_checkpoint
from emoe_jax.config import tiny_config
from emoe_jax.data.synthetic import tiny_corpus, tiny_tokenizer
from emoe_jax.model.hf_params import nest_for_checkpoint, params_to_hf
from emoe_jax.model.random_init import random_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    corpus = tiny_corpus(root / "corpus", docs_per_task=12)
    tok = tiny_tokenizer(corpus, root / "tok", vocab_size=300)
    cfg = tiny_config("qwen3_moe", vocab_size=300, bos_token_id=0, eos_token_id=1, pad_token_id=2, add_bos=True)
    _, params, experts = random_model(cfg, seed=3, router_scale=5.0)
    stacked = {w: np.stack([np.asarray(getattr(e, w)) for e in experts]) for w in ("gate", "up", "down")}
    write_checkpoint(root / "ckpt", cfg, nest_for_checkpoint(params_to_hf(cfg, params)), stacked, tokenizer_dir=tok)
    return root, corpus


def test_e2e_runs_and_exact_configs_agree_with_the_full_model(setup, capsys):
    root, corpus = setup
    out = root / "out"
    rc = main(["--model", str(root / "ckpt"), "--corpus", str(corpus), "--no-replay", "--fractions", "0.25",
               "--configs", "on-demand,lru,prev-token,prev-token+score,recency-reuse,emoe-prefetch,emoe-restricted,fused",
               "--prompt-tokens", "12",
               "--new-tokens", "5", "--similarity-fractions", "0.5,1", "--out", str(out), "--json"])
    assert rc == 0
    report = json.loads((out / "e2e.json").read_text())
    rows = {r["config"]: r for r in report["embedded"]["rows"]}
    assert set(rows) == {"on-demand", "lru", "prev-token", "prev-token+score", "recency-reuse", "emoe-prefetch",
                         "emoe-restricted", "fused"}
    for name in ("on-demand", "lru", "prev-token", "prev-token+score", "recency-reuse", "emoe-prefetch"):
        assert rows[name]["token_agreement"] == 1.0  # exact mode: the full model's picks, always
        assert rows[name]["kl"] < 1e-6
        assert rows[name]["compiles_after_warmup"] == 0
    assert rows["on-demand"]["device_hit_rate"] == 0.0 < rows["lru"]["device_hit_rate"]
    assert rows["prev-token"]["prefetch"]["completed"] > 0
    assert rows["on-demand"]["ratio_vs_on_demand"] == 1.0
    # Restricted mode with every expert resident is the full model; with half, it may differ.
    sweep = {r["fraction"]: r for r in report["claims"]["sweep"]}
    assert sweep[1.0]["token_agreement"] == 1.0
    assert report["claims"]["at_threshold"]["fraction"] <= 1.0
    assert (out / "e2e.md").read_text() == markdown(report)
    for png in ("e2e_tokps.png", "e2e_stall.png", "e2e_memory.png", "e2e_similarity.png"):
        assert (out / png).stat().st_size > 1000
    assert json.loads(capsys.readouterr().out)["embedded"]["rows"]


def test_e2e_missing_inputs_are_clear_errors(setup, capsys):
    root, corpus = setup
    assert main(["--model", str(root / "ckpt"), "--corpus", str(root / "nope"), "--no-replay"]) == 2
    assert "corpus" in capsys.readouterr().err
    assert main(["--configs", "magic"]) == 2
    assert "unknown config" in capsys.readouterr().err
