"""gpt-oss structure (sinks, sliding windows in the KV-cached decode, biased clamped-SwiGLU experts
in device slots) through the one-jit offloaded decode: tokens and logits equal the all-resident model."""

import numpy as np

from emoe_jax.config import tiny_config
from emoe_jax.model.random_init import random_model
from emoe_jax.model.resident import ResidentModel
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts

PROMPTS = [[5, 9, 13, 22, 7, 31, 40, 3, 64], [3, 17, 8]]


def test_gpt_oss_onejit_decode_equals_all_resident():
    # The staged path runs the same model functions; tests/test_parity.py drives it from a converted
    # checkpoint at 25% of the experts. Here the one-jit step (in-graph fetches, waves) is checked.
    cfg = tiny_config("gpt_oss", top_k=4)  # window 4 in layers 0 and 2: shorter than prompt + decode
    g, p, ex = random_model(cfg, seed=0, router_scale=5.0)
    assert ex[0].gate.shape[1:] == (cfg.hidden_size + 1, cfg.moe_intermediate_size)  # bias row
    resident = ResidentModel(cfg, g, p, ex)
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, decode_path="onejit")
    out = engine.generate(PROMPTS, 8, stop_at_eos=False, return_logits=True)
    assert out.stats["decode_path"] == "onejit"
    assert out.tokens == resident.generate(PROMPTS, 8).tolist()  # 2 slots for top-4: layers run in waves
    for i, prompt in enumerate(PROMPTS):
        logits, _, _ = resident.logits([prompt + out.tokens[i][:-1]])
        np.testing.assert_allclose(out.logits[i], np.asarray(logits[0, len(prompt) - 1:]), atol=2e-5, rtol=1e-5)
