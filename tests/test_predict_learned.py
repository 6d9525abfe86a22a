"""Learned predictor: causality, fast path vs step path, labels/masks, checkpoints, a learnable pattern."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_jax.predict import available_predictors, get_predictor
from emoe_jax.predict.drive import prompt_predictions, step_predictions
from emoe_jax.predict.learned import (
    LearnedConfig,
    LearnedPredictor,
    LearnedPredictorError,
    TrainSettings,
    load,
    recall_at_k,
    save,
    train_model,
)
from emoe_jax.predict.learned.data import horizon_labels, pack_prompts
from emoe_jax.sim import SimConfig, simulate
from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet

L, E, K = 3, 8, 2


def make_set(experts_list, token_ids=None):
    meta = TraceMeta(model="t", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=(0, 1, 2),
                     hidden_size=None, source="test")  # fmt: skip
    prompts = [
        PromptTrace(prompt_id=i, task="", text="",
                    token_ids=np.asarray(token_ids[i] if token_ids else np.arange(len(x)) * 7, np.int32),
                    experts=np.asarray(x, np.int16), weights=None, n_prefill=len(x))  # fmt: skip
        for i, x in enumerate(experts_list)
    ]
    return TraceSet.from_prompts(meta, prompts)


def random_experts(rng, T):
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])


TINY = LearnedConfig(num_layers=L, num_experts=E, top_k=K, horizon=3, d_model=16, num_heads=2, mlp_hidden=32,
                     token_buckets=64, window=4)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model():
    rng = np.random.default_rng(0)
    ts = make_set([random_experts(rng, n) for n in (9, 5, 3)])
    return train_model(ts, TINY, TrainSettings(steps=3, batch_size=2, row_len=8), progress=False).model


def test_fast_path_equals_step_path_beyond_the_window(tiny_model):
    rng = np.random.default_rng(1)
    ts = make_set([random_experts(rng, n) for n in (11, 4, 1)])  # 11 > 2 * (window - 1) + 1 tokens
    p = LearnedPredictor(lookahead=3, model=tiny_model)
    for trace in ts:
        a, b = step_predictions(p, trace, ts.meta), prompt_predictions(p, trace, ts.meta)
        np.testing.assert_array_equal(a.issue_step, b.issue_step)
        np.testing.assert_array_equal(a.target_step, b.target_step)
        np.testing.assert_allclose(a.scores, b.scores, atol=2e-6)


def test_predictions_never_read_the_future(tiny_model):
    """Changing the routing from step s0 on (and later token ids) leaves predictions issued at <= s0 unchanged."""
    rng = np.random.default_rng(2)
    base = random_experts(rng, 10)
    ids = np.arange(10) * 13
    p = LearnedPredictor(lookahead=3, model=tiny_model)
    for t0, l0 in [(0, 0), (4, 1), (7, 2), (9, 0)]:
        other = base.copy()
        other[t0, l0:] = random_experts(rng, 1)[0, l0:]
        if t0 < 9:
            other[t0 + 1 :] = random_experts(rng, 10 - t0 - 1)
        ids2 = ids.copy()
        ids2[t0 + 1 :] += 1
        a = p.all_scores(make_set([base], [ids])[0])  # [T, L, h, E]
        b = p.all_scores(make_set([other], [ids2])[0])
        s0 = t0 * L + l0
        flat_a, flat_b = a.reshape(10 * L, -1), b.reshape(10 * L, -1)
        np.testing.assert_allclose(flat_a[: s0 + 1], flat_b[: s0 + 1], atol=1e-6)
        assert not np.allclose(flat_a[s0 + 1 :], flat_b[s0 + 1 :], atol=1e-6)  # later steps see the change


def test_horizon_labels_mask_padding_and_prompt_ends():
    experts = np.zeros((1, 3, L, K), np.int32)
    experts[0, :, :, 0] = np.arange(3)[:, None] * 2  # token t routes to 2t and 1 at every layer
    experts[0, :, :, 1] = 1
    seg = np.array([[1, 1, 0]])  # two real tokens, one pad
    labels, mask = (np.asarray(x) for x in horizon_labels(experts, seg, horizon=4, num_experts=E))
    # step (t=0, l=2) + 1 = (t=1, l=0): experts {2, 1}
    assert labels[0, 0, 2, 1].nonzero()[0].tolist() == [1, 2]
    # targets inside token 1 are real; anything on the pad token is masked
    assert mask[0, 1, 0, 2] and not mask[0, 1, 1, 2] and not mask[0, 2].any()
    # token 0: of its 3 layers x 5 distances only (l=2, d=4) -> step 6 = the pad token is masked
    assert mask[0, 0].sum() == 3 * 5 - 1 and not mask[0, 0, 2, 4]


def test_pack_prompts_splits_long_prompts_and_separates_segments():
    rng = np.random.default_rng(3)
    ts = make_set([random_experts(rng, n) for n in (3, 10, 2)])
    rows = pack_prompts(ts, L, K, row_len=4, buckets=64)
    assert rows.real_tokens == 15
    # the 10-token prompt becomes pieces of 4, 4, 2, each starting at position 0 without a previous token
    assert (rows.pos[rows.seg > 0] == 0).sum() == 5 and not rows.has_prev[rows.pos == 0].any()
    np.testing.assert_array_equal(rows.prev_experts[0, 1], rows.experts[0, 0])


def test_checkpoint_round_trip_and_clear_errors(tiny_model, tmp_path):
    path = save(tmp_path / "ckpt", tiny_model, {"note": "test"})
    model, info = load(path)
    assert info == {"note": "test"} and model.cfg == TINY
    ts = make_set([random_experts(np.random.default_rng(4), 6)])
    a = LearnedPredictor(lookahead=1, model=tiny_model).all_scores(ts[0])
    b = LearnedPredictor(lookahead=1, checkpoint=path).all_scores(ts[0])
    np.testing.assert_allclose(a, b, atol=5e-3)  # float16 storage
    save(path, model, {"note": "again"})  # replacing works and leaves no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(FileNotFoundError, match="python -m emoe_jax.predict.learned train"):
        load(tmp_path / "missing")
    (path / "config.json").write_text("{not json")
    with pytest.raises(LearnedPredictorError, match="corrupt"):
        load(path)


def test_bad_settings_give_clear_errors(tiny_model):
    with pytest.raises(LearnedPredictorError, match="horizon"):
        LearnedPredictor(lookahead=4, model=tiny_model)
    other = make_set([np.zeros((2, L, K), np.int16) + np.array([0, 1])])
    meta = TraceMeta(model="t", num_layers=L, num_experts=16, top_k=K, moe_layer_ids=(0, 1, 2),
                     hidden_size=None, source="test")  # fmt: skip
    with pytest.raises(LearnedPredictorError, match="E=8"):
        LearnedPredictor(model=tiny_model).predict_prompt(other[0], meta)
    with pytest.raises(LearnedPredictorError, match="divisible"):
        LearnedConfig(num_layers=2, num_experts=4, top_k=2, d_model=10, num_heads=3)


def test_registered_and_missing_default_checkpoint_is_explained(tmp_path):
    assert "learned" in available_predictors()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_predictor("learned", checkpoint=str(tmp_path / "nope"))


def test_learns_a_repeated_pattern_to_full_recall():
    # Each token's routing is a fixed function of its id: learnable from the id alone,
    # and from the previous layers of the same token.
    table = np.stack([random_experts(np.random.default_rng(5), 1)[0] for _ in range(4)])  # [4, L, K]
    rng = np.random.default_rng(6)
    ids = [rng.integers(0, 4, n) for n in (30, 25, 28, 20)]
    ts = make_set([table[i] for i in ids], [i * 1 for i in ids])
    cfg = TINY.with_(horizon=1, d_model=32, mlp_hidden=64)
    res = train_model(ts.select(range(3)), cfg, TrainSettings(steps=150, batch_size=4, row_len=32, lr=1e-2), progress=False)
    p = LearnedPredictor(lookahead=0, model=res.model)
    metrics = recall_at_k(p, ts.select([3]))
    assert metrics["recall@2"] > 0.99
    sim = simulate(ts.select([3]), p, SimConfig.moe_beyond(capacity=6, warmup_tokens=0))
    assert sim.hit_rate > 0.99


def test_cli_errors_are_clear(tmp_path, capsys):
    from emoe_jax.predict.learned.__main__ import main

    assert main(["evaluate", "--traces", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err
    rng = np.random.default_rng(7)
    from emoe_jax.traces import TraceWriter

    with TraceWriter(tmp_path / "ts", make_set([random_experts(rng, 3)]).meta) as w:
        for trace in make_set([random_experts(rng, n) for n in (3, 4)]):
            w.add(trace)
    assert main(["evaluate", "--traces", str(tmp_path / "ts"), "--checkpoint", str(tmp_path / "nockpt")]) == 2
    assert "python -m emoe_jax.predict.learned train" in capsys.readouterr().err


def test_router_inputs_are_used_from_the_previous_layer_only():
    """With router inputs: fast path == step path, and layer l's own input never affects step (t, l)."""
    rng = np.random.default_rng(8)
    meta = TraceMeta(model="t", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=(0, 1, 2),
                     hidden_size=5, source="test")  # fmt: skip
    prompts = [PromptTrace(prompt_id=i, task="", text="", token_ids=np.arange(n, dtype=np.int32),
                           experts=random_experts(rng, n).astype(np.int16), weights=None, n_prefill=n,
                           hidden=rng.normal(size=(n, L, 5)).astype(np.float16))
               for i, n in enumerate((6, 4))]  # fmt: skip
    ts = TraceSet.from_prompts(meta, prompts)
    cfg = TINY.with_(hidden_size=5)
    model = train_model(ts, cfg, TrainSettings(steps=2, batch_size=1, row_len=8), progress=False).model
    p = LearnedPredictor(lookahead=2, model=model)
    a, b = step_predictions(p, ts[0], meta), prompt_predictions(p, ts[0], meta)
    np.testing.assert_allclose(a.scores, b.scores, atol=2e-6)
    base = p.all_scores(ts[0]).reshape(6 * L, -1, E)
    changed = ts[0].hidden.copy()
    changed[2, 1] += 3.0  # router input of (t=2, l=1)
    other = p.all_scores(PromptTrace(prompt_id=0, task="", text="", token_ids=ts[0].token_ids, experts=ts[0].experts,
                                     weights=None, n_prefill=6, hidden=changed)).reshape(6 * L, -1, E)  # fmt: skip
    s = 2 * L + 1
    np.testing.assert_allclose(base[: s + 1], other[: s + 1], atol=1e-6)  # up to and including (2, 1)
    assert not np.allclose(base[s + 1], other[s + 1], atol=1e-6)  # (2, 2) reads layer 1's input



def _untrained_checkpoint(root, name, cfg):
    from flax import nnx

    from emoe_jax.predict.learned import RoutingPredictorNet

    return save(root / name, RoutingPredictorNet(cfg, rngs=nnx.Rngs(0)), {"name": name})


def test_checkpoint_is_picked_by_model_shape(tmp_path):
    """Without a checkpoint, the one trained for the traces' (or given) L, E, k is loaded; clear error if none."""
    from emoe_jax.predict.learned import find_checkpoint, list_checkpoints

    other = TINY.with_(num_layers=5, num_experts=16, top_k=4)
    _untrained_checkpoint(tmp_path, "a-other", other)
    _untrained_checkpoint(tmp_path, "b-inputs", TINY.with_(hidden_size=5))
    _untrained_checkpoint(tmp_path, "c-routing", TINY)
    (tmp_path / ".c-routing.tmp-1").mkdir()  # a half-written save is never picked
    (tmp_path / "task-nb.npz").write_bytes(b"")  # other predictors' files are ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["a-other", "b-inputs", "c-routing"]
    pick = lambda **kw: find_checkpoint(L, E, K, root=tmp_path, **kw).name  # noqa: E731
    assert pick() == "c-routing"  # unknown whether router inputs come: the one that runs anywhere
    assert pick(router_inputs=True) == "b-inputs" and pick(hidden_size=5) == "b-inputs"
    assert pick(hidden_size=7) == "c-routing"  # no checkpoint takes inputs of width 7
    assert pick(router_inputs=False) == "c-routing"
    assert find_checkpoint(5, 16, 4, root=tmp_path).name == "a-other"
    with pytest.raises(LearnedPredictorError, match=r"matches L=4, E=8, k=2.*a-other: L=5, E=16, k=4.*train one"):
        find_checkpoint(4, 8, 2, root=tmp_path)

    # Lazily, from the traces: with router inputs in the traces -> the checkpoint that uses them.
    rng = np.random.default_rng(10)
    ts = make_set([random_experts(rng, 5)])
    p = LearnedPredictor(lookahead=1, search_dir=tmp_path)
    assert p.cfg is None
    p.fit(ts)
    assert p.checkpoint.name == "c-routing" and p.cfg == TINY
    meta_h = TraceMeta(model="t", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=(0, 1, 2), hidden_size=5,
                       source="test")  # fmt: skip
    p = LearnedPredictor(lookahead=1, search_dir=tmp_path)
    p.fit(TraceSet.from_prompts(meta_h, [PromptTrace(prompt_id=0, task="", text="", token_ids=np.arange(3, dtype=np.int32),
                                                     experts=random_experts(rng, 3).astype(np.int16), weights=None,
                                                     n_prefill=3, hidden=np.zeros((3, L, 5), np.float16))]))  # fmt: skip
    assert p.checkpoint.name == "b-inputs"
    # From the constructor's shape, or from the prompt the runtime starts (step path).
    assert LearnedPredictor(num_layers=5, num_experts=16, top_k=4, search_dir=tmp_path).cfg == other
    p = LearnedPredictor(lookahead=1, search_dir=tmp_path)
    step = step_predictions(p, ts[0], ts.meta)
    assert p.checkpoint.name == "c-routing"
    np.testing.assert_allclose(step.scores, prompt_predictions(p, ts[0], ts.meta).scores, atol=2e-6)
    with pytest.raises(LearnedPredictorError, match="all of num_layers"):
        LearnedPredictor(num_layers=3, search_dir=tmp_path)
    with pytest.raises(LearnedPredictorError, match="call fit"):
        LearnedPredictor(search_dir=tmp_path).all_scores(ts[0])
    with pytest.raises(LearnedPredictorError, match="no learned-predictor checkpoint"):
        LearnedPredictor(search_dir=tmp_path / "empty").fit(ts)


def test_registry_picks_the_committed_checkpoint_for_each_model():
    """get_predictor('learned') with a model's shape loads the committed checkpoint trained for it."""
    from emoe_jax.predict.learned import PREDICTORS_DIR

    expected = [((26, 64, 6), None, "learned-dsv2lite"), ((8, 32, 4), True, "learned-embedded"),
                ((8, 32, 4), None, "learned-embedded-routing"), ((8, 32, 4), False, "learned-embedded-routing")]  # fmt: skip
    for (nl, ne, k), inputs, name in expected:
        if not (PREDICTORS_DIR / name / "config.json").is_file():
            pytest.fail(f"committed checkpoint {name} is missing")
        p = get_predictor("learned", lookahead=1, num_layers=nl, num_experts=ne, top_k=k, router_inputs=inputs)
        assert p.checkpoint.name == name and (p.cfg.num_layers, p.cfg.num_experts, p.cfg.top_k) == (nl, ne, k)
        assert (p.cfg.hidden_size is not None) == bool(inputs)
