"""The learned predictor inside the one-jit step: same scores as its host step path, exact outputs."""

import jax
import numpy as np
from flax import nnx

from emoe_jax.predict.base import PromptInfo
from emoe_jax.predict.learned.config import LearnedConfig
from emoe_jax.predict.learned.model import RoutingPredictorNet
from emoe_jax.predict.learned.predictor import LearnedPredictor
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.ingraph_learned import LearnedInGraph
from emoe_jax.runtime.ingraph_predictors import PrefillRouting
from emoe_jax.runtime.tiers import InMemoryExperts



def tiny_learned(cfg, hidden=True, seed=0):
    net_cfg = LearnedConfig(num_layers=cfg.num_moe_layers, num_experts=cfg.num_experts, top_k=cfg.top_k, horizon=2,
                            d_model=16, num_heads=2, mlp_hidden=32, token_buckets=64, window=3,
                            hidden_size=cfg.hidden_size if hidden else None)
    return LearnedPredictor(model=RoutingPredictorNet(net_cfg, rngs=nnx.Rngs(seed)))


def test_in_graph_scores_equal_the_host_step_path(tiny_model):
    cfg = tiny_model("deepseek_v2")[0]
    lm, e, k, hsz = cfg.num_moe_layers, cfg.num_experts, cfg.top_k, cfg.hidden_size
    for hidden in (True, False):
        host = tiny_learned(cfg, hidden)
        ingraph = LearnedInGraph(host, cfg)
        rng = np.random.default_rng(0)
        n_prompt, n_decode = 5, 6  # longer than the receptive field (2 blocks x window 3)
        tokens = rng.integers(0, 200, n_prompt + n_decode)
        ids = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(lm)])
                        for _ in tokens]).astype(np.int32)  # [T, Lm, k]
        normed = rng.normal(size=(len(tokens), lm, hsz)).astype(np.float32)  # router inputs [T, Lm, H]
        host.begin_prompt(PromptInfo(prompt_id=0, task="", text="", n_prefill=n_prompt, num_layers=lm,
                                     num_experts=e, top_k=k))
        for t in range(n_prompt):
            host.begin_token(t, int(tokens[t]))
            for layer in range(lm):
                host.observe_router_input(t, layer, normed[t, layer])
                host.observe(t, layer, ids[t, layer])
        state = ingraph.init_state(PrefillRouting(tokens[None, :n_prompt].astype(np.int32), ids[None, :n_prompt],
                                                  np.ones((1, n_prompt), bool), np.arange(n_prompt)[None]))
        begin = jax.jit(lambda pp, st, tok, pos: ingraph.begin_step(None, pp, st, tok, pos))
        after = jax.jit(lambda pp, st, h, i, ml: ingraph.after_routing(None, pp, st, ml, h, i), static_argnums=4)
        end = jax.jit(ingraph.end_step)
        params = ingraph.params()
        for t in range(n_prompt, n_prompt + n_decode):
            host.begin_token(t, int(tokens[t]))
            scores, state = begin(params, state, np.array([tokens[t]], np.int32), np.array([t], np.int32))
            np.testing.assert_allclose(np.asarray(scores)[0], host.predict(t, 0).scores[0], atol=1e-5)
            for layer in range(lm - 1):
                host.observe_router_input(t, layer, normed[t, layer])
                host.observe(t, layer, ids[t, layer])
                scores, state = after(params, state, normed[t, layer][None], ids[t, layer][None], layer)
                np.testing.assert_allclose(np.asarray(scores)[0], host.predict(t, layer + 1).scores[0], atol=1e-5)
            host.observe(t, lm - 1, ids[t, lm - 1])
            state = end(params, state, ids[t][:, None])


def test_learned_in_graph_prefetch_keeps_outputs_exact(tiny_model):
    cfg, g, p, ex, resident = tiny_model("qwen3_moe")
    prompts = [[5, 9, 13, 22, 7], [3, 17, 8]]
    ref = resident.generate(prompts, 8)
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, predictor=tiny_learned(cfg))
    out = engine.generate(prompts, 8, stop_at_eos=False)
    assert out.stats["decode_path"] == "onejit" and out.stats["predictor"] == "learned"
    assert [out.tokens[i] for i in range(2)] == [ref[i].tolist() for i in range(2)]
    pf = out.stats["prefetch"]
    assert pf["in_graph"] and pf["completed"] > 0 and pf["completed"] == pf["timely"] + pf["wasted"]
