"""Trainer: loss falls, balancing loss formula, exact blocked mixing, bit-exact resume,
export -> engine parity, routing-analysis statistics, CLI errors. Tiny configs only."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoe_jax.config import tiny_config
from emoe_jax.data.synthetic import tiny_corpus, tiny_tokenizer
from emoe_jax.model.moe import ExpertSlots, mix_reference, route
from emoe_jax.train.__main__ import main as train_main
from emoe_jax.train.analyze import analyze_checkpoint, experts_for_share, mutual_information
from emoe_jax.train.forward import train_forward
from emoe_jax.train.losses import load_balance_loss
from emoe_jax.train.loop import RunConfig, train_lm
from emoe_jax.model.moe import SlotRouting, mix_blocked_slots
from emoe_jax.train.step import OptimConfig, init_model, make_optimizer, train_step

CFG = tiny_config("qwen3_moe", vocab_size=384, num_layers=2, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=1, pad_token_id=2, add_bos=True)
SEQ = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    corpus = tiny_corpus(root / "corpus", docs_per_task=20)
    return corpus, tiny_tokenizer(corpus, root / "tok", vocab_size=384)


def _run(data, **optim) -> RunConfig:
    corpus, tok = data
    return RunConfig(model=CFG, optim=OptimConfig(total_steps=4, warmup=2, lr=3e-3, **optim), corpus=str(corpus),
                     tokenizer=str(tok), batch=4, seq_len=SEQ, seed=3)


def test_train_steps_decrease_loss_on_fixed_batch():
    graphdef, params, experts = init_model(CFG, 0)
    opt = OptimConfig(total_steps=20, warmup=1, lr=3e-3)
    tx = make_optimizer(opt)
    trainable = {"params": params, "experts": experts}
    state = tx.init(trainable)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (4, SEQ + 1)), jnp.int32)
    losses = []
    for _ in range(6):
        trainable, state, m = train_step(trainable, state, tokens, graphdef=graphdef, tx=tx, opt=opt)
        losses.append(float(m["ce"]))
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(np.isfinite(losses))


def test_load_balance_loss_matches_formula():
    # 1 layer, 4 tokens, 3 experts, top-2, hand-made logits and assignments.
    logits = jnp.asarray([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.5, 0.5, 0.0]]])
    ids = jnp.asarray([[[0, 1], [1, 2], [2, 0], [0, 1]]], jnp.int32)
    probs = np.exp(np.asarray(logits[0])) / np.exp(np.asarray(logits[0])).sum(-1, keepdims=True)
    f = np.array([3, 3, 2]) / 8.0  # share of the 8 assignments per expert
    p = probs.mean(0)
    expected = 3 * np.sum(f * p)
    assert float(load_balance_loss(logits, ids)) == pytest.approx(expected, rel=1e-6)
    # Uniform probabilities and uniform assignments give exactly 1.
    uniform = load_balance_loss(jnp.zeros((1, 6, 3)), jnp.asarray([[[0, 1], [2, 0], [1, 2]] * 2], jnp.int32))
    assert float(uniform) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("n", [1, 50])
def test_mix_blocked_matches_reference_values_and_gradients(n):
    e, h, i, k = 8, 12, 6, 3
    cfg = tiny_config("qwen3_moe", num_experts=e, top_k=k, hidden_size=h, moe_intermediate_size=i)
    key = jax.random.split(jax.random.PRNGKey(n), 5)
    x = jax.random.normal(key[0], (n, h))
    wr = jax.random.normal(key[1], (h, e))
    # Weights scaled like a real init so outputs are O(1) and float32 rounding stays ~1e-6.
    experts = ExpertSlots(jax.random.normal(key[2], (e, h, i)) * h ** -0.5,
                          jax.random.normal(key[3], (e, h, i)) * h ** -0.5,
                          jax.random.normal(key[4], (e, i, h)) * i ** -0.5)
    identity = jnp.arange(e)

    def loss(fn, x, wr, ex):
        r = route(x @ wr, cfg)
        return jnp.sum(jnp.sin(fn(x, r, ex)))

    blocked = lambda x, r, ex: mix_blocked_slots(x, SlotRouting(r.ids, r.weights), ex, block=4)  # noqa: E731
    reference = lambda x, r, ex: mix_reference(x, r, ex, identity)  # noqa: E731
    r = route(x @ wr, cfg)
    np.testing.assert_allclose(jax.jit(blocked)(x, r, experts), jax.jit(reference)(x, r, experts),
                               rtol=1e-5, atol=1e-5)
    g_b = jax.jit(jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2)))(x, wr, experts)
    g_r = jax.jit(jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2)))(x, wr, experts)
    for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_train_forward_equals_model_forward():
    graphdef, params, experts = init_model(CFG, 1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, SEQ)), jnp.int32)
    logits, stats = jax.jit(train_forward, static_argnums=0)(graphdef, params, experts, tokens)
    maps = jnp.tile(jnp.arange(CFG.num_experts, dtype=jnp.int32), (CFG.num_moe_layers, 1))

    @jax.jit
    def reference(params, experts, tokens):
        model = nnx.merge(graphdef, params)
        return model.forward(tokens, None, jnp.int32(0), jnp.zeros(2, jnp.int32), experts, maps,
                             method="reference")

    ref, _, routings = reference(params, experts, tokens)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(stats.ids[0].reshape(2, SEQ, -1), routings[0].ids)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "straight"
    summary = train_lm(_run(data), run_dir, eval_every=2, save_every=2, eval_batch=4, progress=False,
                       log=lambda s: None)
    return run_dir, summary


def test_resume_is_bit_exact(data, trained, tmp_path):
    from emoe_jax.train.export import load_run

    straight_dir, summary = trained
    assert summary["step"] == 4 and summary["tokens"] == 4 * 4 * SEQ
    split_dir = tmp_path / "split"
    first = train_lm(_run(data), split_dir, eval_every=100, save_every=100, progress=False,
                     max_steps_this_call=3, log=lambda s: None)
    assert first["step"] == 3 and first["reason"] == "max steps this call"
    second = train_lm(_run(data), split_dir, eval_every=100, save_every=100, progress=False, log=lambda s: None)
    assert second["step"] == 4
    _, _, a, meta_a = load_run(straight_dir)
    _, _, b, meta_b = load_run(split_dir)
    assert meta_a["batches"] == meta_b["batches"] == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = [json.loads(line) for line in (straight_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "ce" in r] == [1, 2, 3, 4]
    assert any(r.get("event") == "eval" and "all" in r["validation"] for r in lines)


def test_checkpoint_round_trip_with_relative_run_dir(tmp_path, monkeypatch):
    from emoe_jax.train import checkpointing

    monkeypatch.chdir(tmp_path)
    graphdef, params, experts = init_model(CFG, 2)
    tx = make_optimizer(OptimConfig())
    trainable = {"params": params, "experts": experts}
    state = tx.init(trainable)
    path = checkpointing.save("rel_run", trainable, state, {"step": 7, "batches": 7, "tokens": 1, "elapsed_s": 0.5})
    assert [p.resolve() for p in checkpointing.list_checkpoints("rel_run")] == [path]
    back, back_state, meta = checkpointing.restore(
        checkpointing.list_checkpoints("rel_run")[0], *init_model(CFG, 5)[1:], state)
    assert meta["step"] == 7
    for x, y in zip(jax.tree.leaves((trainable, state)), jax.tree.leaves((back, back_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_time_limit_stops_and_saves(data, tmp_path):
    from emoe_jax.train.checkpointing import list_checkpoints

    summary = train_lm(_run(data), tmp_path / "run", time_limit_min=1e-9, progress=False, log=lambda s: None)
    assert summary["reason"] == "time limit" and summary["step"] == 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000000"]


def test_resume_refuses_other_settings(data, trained):
    from emoe_jax.train.checkpointing import TrainCheckpointError

    run_dir, _ = trained
    with pytest.raises(TrainCheckpointError, match="different settings"):
        train_lm(_run(data, aux_coef=0.5), run_dir, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from emoe_jax.train.export import export_run

    run_dir, _ = trained
    out = tmp_path_factory.mktemp("export") / "ckpt"
    info = export_run(run_dir, out, dtype="float32", eval_batch=4, progress=False)
    return out, info


def test_export_reproduces_trained_logits_in_engine(trained, exported):
    from emoe_jax.checkpoint import load_checkpoint
    from emoe_jax.runtime.engine import OffloadedEngine
    from emoe_jax.tokenizer import load_tokenizer
    from emoe_jax.train.export import load_run

    out, info = exported
    assert info["steps"] == 4 and info["tokens_seen"] == 4 * 4 * SEQ
    assert set(info["validation_float32"]) >= {"code", "prose", "umlaut", "all"}
    ckpt = load_checkpoint(out)
    assert ckpt.config == CFG
    tokenizer = load_tokenizer(out)
    text = "def value(x):\n    return x über"
    ids = tokenizer.encode(text)
    assert ids[0] == 0 and tokenizer.decode(ids) == text
    _, graphdef, trainable, _ = load_run(trained[0])
    want, _ = train_forward(graphdef, trainable["params"], trainable["experts"], jnp.asarray([ids]))
    engine = OffloadedEngine.from_checkpoint(out, device_experts=0.25)
    result = engine.generate([ids], 3, return_logits=True, stop_at_eos=False)
    np.testing.assert_allclose(result.logits[0, 0], want[0, -1], rtol=1e-4, atol=1e-4)
    assert result.tokens[0][0] == int(jnp.argmax(want[0, -1]))


def test_export_bf16_and_refuses_non_empty_out(trained, exported, tmp_path):
    from emoe_jax.checkpoint import load_checkpoint
    from emoe_jax.train.export import export_run

    run_dir, _ = trained
    with pytest.raises(FileExistsError, match="overwrite"):
        export_run(run_dir, exported[0], progress=False)
    info = export_run(run_dir, tmp_path / "bf16", progress=False, eval_batch=4)
    assert load_checkpoint(tmp_path / "bf16").manifest["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "training.json").read_text())["steps"] == info["steps"]


def test_mutual_information_extremes():
    specialised = np.diag([30, 10, 60]).astype(float)  # task t always on expert t
    mi, h = mutual_information(specialised)
    p = np.array([30, 10, 60]) / 100
    assert h == pytest.approx(-np.sum(p * np.log2(p)))
    assert mi == pytest.approx(h)
    independent = np.outer([1, 2, 3], [5, 1, 4, 2]) * 10.0  # p(task, expert) = p(task) p(expert)
    mi, _ = mutual_information(independent)
    assert mi == pytest.approx(0.0, abs=1e-12)
    assert experts_for_share(np.array([0, 10, 70, 20])) == 2
    assert experts_for_share(np.array([1, 1, 1, 1, 1])) == 4


def test_analyze_matches_export_perplexity(data, exported):
    out, info = exported
    result = analyze_checkpoint(out, data[0], "validation", seq_len=SEQ, batch=4, progress=False)
    for task, v in info["validation_float32"].items():
        assert result["perplexity"][task]["ppl"] == pytest.approx(v["ppl"], rel=1e-4)
    counts = np.asarray(result["counts"])  # [Lm, K, E]
    assert counts.shape == (CFG.num_moe_layers, 3, CFG.num_experts)
    tokens = sum(v["tokens"] for t, v in result["perplexity"].items() if t != "all")
    assert counts[0].sum() == tokens * CFG.top_k
    for layer in result["layers"]:
        assert 0 <= layer["mi_bits"] <= layer["h_task_bits"] + 1e-9


def test_cli_errors_are_clear(tmp_path, capsys):
    code = train_main(["lm", "--corpus", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "none"),
                       "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "tokenizer" in capsys.readouterr().err
    assert train_main(["export", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "run.json" in capsys.readouterr().err
    assert train_main(["lm", "--corpus", "c", "--tokenizer", "t", "--out", str(tmp_path / "r"),
                       "--preset", "nope"]) == 2
    assert "unknown training preset" in capsys.readouterr().err
