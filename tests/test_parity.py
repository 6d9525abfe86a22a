"""Parity with transformers for every family: build a tiny random HF model, save it,
convert it with `python -m emoe_jax.convert`, and compare logits, greedy tokens and routing."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_tiny import FAMILIES, make_hf_model  # noqa: E402

from emoe_jax.checkpoint import load_checkpoint  # noqa: E402
from emoe_jax.model.hf_params import build_params, dense_from_converted  # noqa: E402
from emoe_jax.model.moe import ExpertSlots  # noqa: E402
from emoe_jax.model.resident import ResidentModel  # noqa: E402
from emoe_jax.runtime.engine import OffloadedEngine  # noqa: E402

PROMPTS = [[5, 9, 13, 22, 7, 31, 40, 3, 64], [3, 17, 8], [11, 12, 13, 14, 15, 90]]


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    family = request.param
    hf_model = make_hf_model(family)
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


def test_router_topk_ids_match(converted):
    family, hf_model, ckpt, ours, _ = converted
    _, routings, pad = ours.logits(PROMPTS)
    assert len(routings) == ckpt.config.num_moe_layers
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf_model(torch.tensor([prompt]), output_router_logits=True)
        hf_logits = [r for r in out.router_logits if r is not None]
        assert len(hf_logits) == len(routings)
        for layer, (r_ours, r_hf) in enumerate(zip(routings, hf_logits)):
            ref_ids = np.sort(torch.topk(r_hf.float(), ckpt.config.top_k, dim=-1).indices.numpy(), axis=-1)
            got = np.sort(np.asarray(r_ours.ids[i, pad[i]:]), axis=-1)
            assert (got == ref_ids).all(), f"{family} layer {layer} prompt {i}"


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
