"""Parity with transformers for every family: build a tiny random HF model, save it,
convert it with `python -m emoe_jax.convert`, and compare logits, greedy tokens and routing."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


from emoe_jax.checkpoint import load_checkpoint  # noqa: E402
from emoe_jax.model.hf_params import build_params, dense_from_converted  # noqa: E402
from emoe_jax.model.moe import ExpertSlots  # noqa: E402
from emoe_jax.model.resident import ResidentModel  # noqa: E402
from emoe_jax.runtime.engine import OffloadedEngine  # noqa: E402

PROMPTS = [[5, 9, 13, 22, 7, 31, 40, 3, 64], [3, 17, 8], [11, 12, 13, 14, 15, 90]]

# Parity cases: the families (conftest's make_hf_model builds each), plus Mixtral with a sliding
# window short enough to matter.
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss",
            "mixtral_sliding")


# Variants of a family with structural options its default tiny model lacks.
VARIANTS = {
    # DeepSeek-V2 (236B) / V2-Chat: group-limited greedy routing over 4 groups, the best 2 kept.
    "deepseek_v2-grouped": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
}


@pytest.fixture(scope="module", params=FAMILIES + tuple(VARIANTS))
def converted(make_hf_model, request, tmp_path_factory):
    family, overrides = VARIANTS.get(request.param, (request.param, {}))
    hf_model = make_hf_model(family, **overrides)
    family = request.param
    hf_model.generation_config.eos_token_id = None  # compare 16 tokens, never stop early
    root = tmp_path_factory.mktemp(family)
    hf_model.save_pretrained(root / "hf")
    proc = subprocess.run([sys.executable, "-m", "emoe_jax.convert", str(root / "hf"), str(root / "ours"),
                           "--dtype", "float32", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(root / "ours")
    graphdef, params = build_params(ckpt.config, dense_from_converted(ckpt.dense))
    experts = []
    for ml in range(ckpt.config.num_moe_layers):
        layer = ckpt.experts.read_layer(ml)
        experts.append(ExpertSlots(*(jnp.asarray(layer[w]) for w in ("gate", "up", "down"))))
    return family, hf_model, ckpt, ResidentModel(ckpt.config, graphdef, params, experts), root / "ours"


def test_logits_match_for_padded_batch(converted):
    family, hf_model, _, ours, _ = converted
    logits, _, pad = ours.logits(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(np.asarray(logits[i, pad[i]:]), ref, atol=1e-5, rtol=1e-5, err_msg=family)


def _hf_chosen_ids(hf_model, prompt):
    """Expert ids each transformers router chose ([T, k] per MoE layer), captured from the routers'
    outputs (router_logits, weights, indices): for sigmoid/grouped routers the top-k of the logits
    is not the choice."""
    chosen, hooks = [], []
    for module in hf_model.modules():
        if type(module).__name__.endswith("Router"):
            hooks.append(module.register_forward_hook(lambda m, a, out: chosen.append(out[2].clone())))
    try:
        with torch.no_grad():
            hf_model(torch.tensor([prompt]))
    finally:
        for h in hooks:
            h.remove()
    return chosen


def test_router_topk_ids_match(converted):
    family, hf_model, ckpt, ours, _ = converted
    _, routings, pad = ours.logits(PROMPTS)
    assert len(routings) == ckpt.config.num_moe_layers
    grouped_or_biased = 0
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf_model(torch.tensor([prompt]), output_router_logits=True)
        hf_logits = [r for r in out.router_logits if r is not None]
        hf_ids = _hf_chosen_ids(hf_model, prompt)
        assert len(hf_logits) == len(hf_ids) == len(routings)
        for layer, (r_ours, r_hf, ids_hf) in enumerate(zip(routings, hf_logits, hf_ids)):
            ref_ids = np.sort(ids_hf.numpy(), axis=-1)
            got = np.sort(np.asarray(r_ours.ids[i, pad[i]:]), axis=-1)
            assert (got == ref_ids).all(), f"{family} layer {layer} prompt {i}"
            plain = np.sort(torch.topk(r_hf.float(), ckpt.config.top_k, dim=-1).indices.numpy(), axis=-1)
            grouped_or_biased += int((plain != ref_ids).any(-1).sum())
    if ckpt.config.score_correction_bias or ckpt.config.n_group > 1:
        # The test model's groups and correction bias must change some choices, or this proves nothing.
        assert grouped_or_biased > 0, family
    else:
        assert grouped_or_biased == 0, family


def test_greedy_16_tokens_match_generate(converted):
    family, hf_model, _, ours, path = converted
    refs = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        refs.append(out[0, len(prompt):].tolist())
    assert ours.generate(PROMPTS, 16).tolist() == refs, family
    # The offloaded engine (a quarter of the experts on the device) gives the same tokens.
    engine = OffloadedEngine.from_checkpoint(path, device_experts=0.25)
    assert engine.generate(PROMPTS, 16, stop_at_eos=False).tokens == refs, family
