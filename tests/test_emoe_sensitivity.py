"""Sensitivity profiling: a layer whose routing is irrelevant by construction gets s = 0."""

import json

import numpy as np
import pytest

from emoe_jax.config import tiny_config
from emoe_jax.emoe.sensitivity import (SensitivityError, output_similarity, profile_sensitivity, random_routing,
                                       sensitivity_from, write_profile)
from emoe_jax.model.moe import ExpertSlots
from emoe_jax.model.random_init import random_model
from emoe_jax.predict.emoe import load_sensitivity
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts

PROMPTS = {"a": [[5, 9, 13, 22, 7, 3], [3, 17, 8, 40]], "b": [[60, 61, 2, 99, 100, 11, 4]]}


@pytest.fixture(scope="module")
def engine():
    # norm_topk_prob: the k routing weights sum to 1, so with identical experts any choice gives the same output.
    cfg = tiny_config("qwen3_moe", num_layers=2)
    assert cfg.norm_topk_prob
    g, p, ex = random_model(cfg, seed=0, router_scale=5.0)
    ex = list(ex)
    ex[1] = ExpertSlots(*(np.repeat(np.asarray(w)[:1], cfg.num_experts, axis=0) for w in ex[1]))  # layer 1: all equal
    return OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts)


def test_irrelevant_layer_has_zero_sensitivity_and_normal_layer_positive(engine, tmp_path):
    report = profile_sensitivity(engine, PROMPTS, max_new_tokens=6, seed=0)
    for task in PROMPTS:
        s = report["sensitivity"][task]
        assert s[1] == 0.0, report["details"][task]
        assert s[0] > 0.0, report["details"][task]
        assert report["details"][task]["agreement"][1] == 1.0
    # Written atomically in the format the eMoE predictor loads.
    path, side = write_profile(tmp_path / "sens.json", report)
    loaded = load_sensitivity(path, engine.cfg.num_moe_layers)
    assert set(loaded) == set(PROMPTS)
    np.testing.assert_array_equal(loaded["a"], report["sensitivity"]["a"])
    assert "details" in json.loads(side.read_text())
    assert not list(tmp_path.glob(".*tmp*"))


def test_profile_is_deterministic_and_override_keeps_router_weights(engine):
    r1 = profile_sensitivity(engine, PROMPTS, max_new_tokens=4, seed=3, layers=[0])
    r2 = profile_sensitivity(engine, PROMPTS, max_new_tokens=4, seed=3, layers=[0])
    assert r1["sensitivity"] == r2["sensitivity"]
    assert r1["sensitivity"]["a"][1] == 1.0  # not profiled: eMoE's default s = 1

    class Step:  # the fields random_routing reads
        moe_layer = 0
        ids = np.zeros((2, 3, 2), np.int32)
        weights = np.full((2, 3, 2), 0.5, np.float32)

    ids, w = random_routing(0, 8, seed=1)(Step)
    assert ids.shape == (2, 3, 2) and all(len(set(row)) == 2 for row in ids.reshape(-1, 2))
    assert w is Step.weights
    Step.moe_layer = 1
    assert random_routing(0, 8, seed=1)(Step) is None


def test_similarity_by_hand():
    logits = np.log(np.array([[[0.5, 0.5], [0.9, 0.1]]]))  # [B=1, steps=2, V=2]
    same = output_similarity([[0, 0]], logits, [[0, 0]], logits)
    assert same["agreement"][0] == 1.0 and same["kl"][0] == pytest.approx(0.0, abs=1e-12)
    other = np.log(np.array([[[0.5, 0.5], [0.1, 0.9]]]))
    diff = output_similarity([[0, 0]], logits, [[0, 1]], other)
    kl_step2 = 0.9 * np.log(9) + 0.1 * np.log(1 / 9)
    assert diff["agreement"][0] == 0.5 and diff["kl"][0] == pytest.approx(kl_step2 / 2)
    assert sensitivity_from(1.0, 0.0) == 0.0 and sensitivity_from(0.0, 1e9) == 1.0


def test_clear_errors(engine):
    with pytest.raises(SensitivityError, match="at least one prompt"):
        profile_sensitivity(engine, {"a": []})
    with pytest.raises(SensitivityError, match="layers"):
        profile_sensitivity(engine, PROMPTS, layers=[5])


def test_cli_missing_corpus_is_a_clear_error(tmp_path, capsys):
    from emoe_jax.emoe.sensitivity import main

    assert main(["--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "s.json")]) == 2
    assert "python -m emoe_jax.data build" in capsys.readouterr().err
