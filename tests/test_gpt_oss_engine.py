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


def test_forced_replay_runs_the_gpt_oss_120b_shape_at_reduced_width():
    from emoe_jax.bench.replay import forced_replay_model, run_forced_replay
    from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet

    model = forced_replay_model("gpt-oss-120b", scale=1 / 32, seed=0, vocab_size=256)
    cfg = model.cfg
    shape = (cfg.num_moe_layers, cfg.num_experts, cfg.top_k, cfg.window_of(0), cfg.expert_bias)
    assert shape == (36, 128, 4, 128, True)
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    assert model.expert_bytes_total == 36 * 128 * (3 * h * i + 2 * i + h) * 2  # bf16, biases included
    rng = np.random.default_rng(0)
    meta = TraceMeta(model="synthetic", num_layers=36, num_experts=128, top_k=4, moe_layer_ids=cfg.moe_layers,
                     hidden_size=None, source="test")
    experts = np.stack([np.stack([rng.permutation(128)[:4] for _ in range(36)]) for _ in range(5)]).astype(np.int16)
    traces = TraceSet.from_prompts(meta, [PromptTrace(0, "", "", np.arange(5, dtype=np.int32), experts, None, 2)])
    out = run_forced_replay({"device_experts": 0.1}, traces, 1, model=model, prompt_tokens=2, decode_tokens=3,
                            warmup=False)
    # Each step looks up the distinct experts its tokens need per layer: prefill (2 tokens) then 3 decode steps.
    prefill = sum(len(set(experts[:2, layer].ravel())) for layer in range(36))
    assert out["device_hits_with_prefill"] + out["device_misses_with_prefill"] == prefill + 3 * 36 * 4
