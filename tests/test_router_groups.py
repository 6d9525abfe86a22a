"""Sigmoid and group-limited routers against transformers' router modules at the real models' shapes
(DeepSeek-V3: 256 experts in 8 groups, best 4 kept, top-8; DeepSeek-V2: 160 in 8, best 3, top-6)."""

import jax.numpy as jnp
import numpy as np
import pytest

from emoe_jax.config import get_preset
from emoe_jax.model.moe import route

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter  # noqa: E402

HIDDEN, TOKENS = 64, 256


def _compare(hf_router, cfg, bias=None):
    torch.manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN)
    with torch.no_grad():
        logits, ref_w, ref_ids = hf_router(x)
    got = route(jnp.asarray(logits.numpy()), cfg, None, None if bias is None else jnp.asarray(bias))
    ref_ids, ref_w = ref_ids.numpy(), ref_w.numpy()
    order_ref, order_got = np.argsort(ref_ids, -1), np.argsort(np.asarray(got.ids), -1)
    ids_ref = np.take_along_axis(ref_ids, order_ref, -1)
    ids_got = np.take_along_axis(np.asarray(got.ids), order_got, -1)
    np.testing.assert_array_equal(ids_got, ids_ref)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(got.weights), order_got, -1),
                               np.take_along_axis(ref_w, order_ref, -1), rtol=1e-6, atol=1e-7)
    return logits


def _v3_like(router_cls, preset):
    cfg = get_preset(preset)
    hf_cfg = tf.DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=cfg.num_experts,
                                 num_experts_per_tok=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
                                 routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=True)
    router = router_cls(hf_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
        router.e_score_correction_bias.normal_(0, 0.05)
    return cfg, router, router.e_score_correction_bias.numpy().copy()


@pytest.mark.parametrize("preset", ["deepseek-v3", "kimi-k2", "glm-4.5"])
def test_noaux_tc_router_matches_transformers(preset):
    cls = Glm4MoeTopkRouter if preset.startswith("glm") else DeepseekV3TopkRouter
    cfg, router, bias = _v3_like(cls, preset)
    logits = _compare(router, cfg, bias)
    # The bias and the groups matter here: plain top-k of the scores picks differently for some tokens.
    plain = np.sort(torch.topk(logits, cfg.top_k, -1).indices.numpy(), -1)
    ours = np.sort(np.asarray(route(jnp.asarray(logits.numpy()), cfg, None, jnp.asarray(bias)).ids), -1)
    assert (plain != ours).any(-1).mean() > 0.1


def test_group_limited_greedy_matches_transformers():
    # DeepSeek-V2 (236B): 160 experts, 8 groups, the best 3 kept, top-6, routed factor 16.
    cfg = get_preset("deepseek-v2-lite").replace(num_experts=160, top_k=6, topk_method="group_limited_greedy",
                                                 n_group=8, topk_group=3, routed_scaling_factor=16.0)
    hf_cfg = tf.DeepseekV2Config(hidden_size=HIDDEN, n_routed_experts=160, num_experts_per_tok=6,
                                 topk_method="group_limited_greedy", n_group=8, topk_group=3,
                                 routed_scaling_factor=16.0)
    router = DeepseekV2TopkRouter(hf_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    logits = _compare(router, cfg)
    ours = np.asarray(route(jnp.asarray(logits.numpy()), cfg).ids)
    assert len(np.unique(ours // 20, axis=None)) > 3  # tokens use different groups...
    assert max(len(set(row // 20)) for row in ours) <= 3  # ...but each token at most 3 of them


def test_restricted_sigmoid_routing_picks_only_resident_experts():
    cfg = get_preset("deepseek-v3")
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(32, 256)), jnp.float32)
    resident = jnp.zeros(256, bool).at[jnp.arange(0, 256, 3)].set(True)
    r = route(logits, cfg, resident, jnp.zeros(256))
    assert bool(resident[r.ids].all())
