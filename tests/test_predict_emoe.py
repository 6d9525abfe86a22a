"""eMoE: task extraction, Eq. 2 selection, eMoE-A invocation period, predictor paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emoe_jax.predict.drive import prompt_predictions, step_predictions
from emoe_jax.predict.emoe import EMoEPredictor, prompt_frequencies
from emoe_jax.predict.emoe_selection import EMoEError, expected_load, load_sensitivity, select_experts
from emoe_jax.predict.emoe_task import (
    CORPUS_KEYWORDS,
    KeywordTaskMatcher,
    NaiveBayesTaskClassifier,
    TaskExtractionError,
    accuracy,
)
from emoe_jax.sim import SimConfig, simulate
from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet


def traces_from(experts_list, texts=None, tasks=None, E=8):
    first = np.asarray(experts_list[0])
    meta = TraceMeta(model="t", num_layers=first.shape[1], num_experts=E, top_k=first.shape[2],
                     moe_layer_ids=tuple(range(first.shape[1])), hidden_size=None, source="test")  # fmt: skip
    prompts = []
    for i, x in enumerate(experts_list):
        x = np.asarray(x, np.int16)
        prompts.append(PromptTrace(prompt_id=i, task=(tasks or ["t"] * len(experts_list))[i],
                                   text=(texts or [""] * len(experts_list))[i],
                                   token_ids=np.arange(len(x), dtype=np.int32), experts=x, weights=None,
                                   n_prefill=len(x)))  # fmt: skip
    return TraceSet.from_prompts(meta, prompts)


def random_set(seed=0, prompts=8, L=3, E=8, k=2, T=6):
    rng = np.random.default_rng(seed)
    ex = [np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(int(rng.integers(1, T)))])
          for _ in range(prompts)]  # fmt: skip
    texts = ["please translate this" if i % 2 else "write a python function" for i in range(prompts)]
    return traces_from(ex, texts=texts, E=E)


# -- task extraction --------------------------------------------------------------


def test_keyword_matcher_on_hand_written_prompts():
    m = KeywordTaskMatcher()
    assert m.classify("Translate 'good morning' into English, please") == "translation"
    assert m.classify("Can you summarize this article in three key points?") == "summarization"
    assert m.classify("Fix the bug in my Python function that parses JSON") == "code"
    assert m.classify("Solve the equation x^2 - 4 = 0") == "math"
    assert m.classify("Write a short poem about autumn") == "generation"
    assert m.classify("Why is the sky blue?") == "question_answering"
    assert m.classify("hello there") == "general"  # no keyword: the default
    # whole words only: "classical" does not contain the keyword "class"
    assert m.scores("classical music")["code"] == 0


def test_keyword_matcher_ties_go_to_the_first_listed_task_and_empty_table_is_refused():
    m = KeywordTaskMatcher({"a": ("x",), "b": ("y",)}, default="none")
    assert m.classify("x y") == "a" and m.classify("y y") == "b" and m.classify("z") == "none"
    with pytest.raises(TaskExtractionError, match="empty"):
        KeywordTaskMatcher({})


def test_naive_bayes_learns_languages_and_round_trips(tmp_path):
    texts = ["der hund und die katze", "die sonne ist nicht kalt", "das ist ein haus",
             "el perro y la casa", "que es la vida", "los gatos por la calle"]  # fmt: skip
    labels = ["german"] * 3 + ["spanish"] * 3
    clf = NaiveBayesTaskClassifier(buckets=4096).fit(texts, labels)
    assert clf.classify("die katze ist nicht da") == "german"
    assert clf.classify("la casa es de los gatos") == "spanish"
    assert accuracy(clf, texts, labels) == 1.0
    path = clf.save(tmp_path / "nb.npz")
    back = NaiveBayesTaskClassifier.load(path)
    assert back.tasks == clf.tasks and back.classify("el perro") == clf.classify("el perro")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TaskExtractionError, match="corrupt"):
        NaiveBayesTaskClassifier.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="train-task-classifier"):
        NaiveBayesTaskClassifier.load(tmp_path / "missing.npz")
    with pytest.raises(TaskExtractionError):
        NaiveBayesTaskClassifier().fit([], [])


def test_corpus_keyword_table_matches_its_own_tasks():
    m = KeywordTaskMatcher(CORPUS_KEYWORDS, default="dialogue")
    assert m.classify("def f(self):\n    import os\n    return None") == "code"
    assert m.classify("Der Mann ist nicht da, und die Frau auch nicht.") == "german"


# -- Eq. 2 ----------------------------------------------------------------------------


def test_eq2_expected_load_on_a_hand_worked_example():
    # Two task types, L = 2 layers, E = 3 experts.
    freq = {"a": np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), "b": np.array([[0.0, 1.0, 0.0], [0.6, 0.4, 0.0]])}
    requests = [("a", 10), ("a", 5), ("b", 3)]  # W_j
    w_o = {"a": 2, "b": 4}
    s = {"b": np.array([1.0, 0.0])}  # task b is insensitive at layer 1; task a defaults to 1
    # task a: (10 + 5 + 2 * 2) = 19 tokens; task b: (3 + 1 * 4) = 7 tokens
    # layer 0: 19*[.5,.3,.2] + 7*1*[0,1,0] = [9.5, 12.7, 3.8]
    # layer 1: 19*[.1,.1,.8] + 7*0*[...]  = [1.9, 1.9, 15.2]
    n = expected_load(freq, requests, w_o, s)
    np.testing.assert_allclose(n, [[9.5, 12.7, 3.8], [1.9, 1.9, 15.2]])
    # top-2 per layer: layer 0 -> experts 1, 0; layer 1 -> 2 and the tie 0/1 goes to the lower id 0
    np.testing.assert_array_equal(select_experts(n, 2), [[True, True, False], [True, False, True]])
    # per-layer budgets, and zero loads are never selected
    np.testing.assert_array_equal(select_experts(np.array([[0.0, 0.0, 1.0], [3.0, 2.0, 1.0]]), [3, 1]),
                                  [[False, False, True], [True, False, False]])  # fmt: skip
    with pytest.raises(EMoEError, match="budget"):
        select_experts(n, 4)
    with pytest.raises(EMoEError, match="no expert frequencies"):
        expected_load(freq, [("c", 1)])


def test_sensitivity_file_loading_and_errors(tmp_path):
    good = tmp_path / "s.json"
    good.write_text(json.dumps({"code": [1, 0, 1]}))
    assert load_sensitivity(good, 3)["code"].tolist() == [1, 0, 1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"code": [1, 0]}))
    with pytest.raises(EMoEError, match="3 non-negative"):
        load_sensitivity(bad, 3)
    with pytest.raises(FileNotFoundError):
        load_sensitivity(tmp_path / "none.json", 3)


def test_zero_sensitivity_layer_gets_no_prefetch(tmp_path):
    ts = random_set()
    sens = tmp_path / "s.json"
    sens.write_text(json.dumps({"code": [1, 0, 1]}))
    p = EMoEPredictor(sensitivity=sens, sequence_model=False)
    p.fit(ts)
    preds = prompt_predictions(p, ts[0], ts.meta)  # text "write a python function" -> task code
    assert p.current_task == "code"
    layer = preds.target_step % 3
    assert np.all(preds.scores[layer == 1] == 0) and np.all(preds.scores[layer != 1].sum(1) > 0)


# -- predictor ---------------------------------------------------------------------


def test_unfitted_emoe_names_the_missing_fit():
    ts = random_set()
    with pytest.raises(RuntimeError, match="call fit"):
        step_predictions(EMoEPredictor(), ts[0], ts.meta)


@pytest.mark.parametrize("sequence_model", [False, True])
def test_fast_path_equals_step_path_across_prompts(sequence_model):
    train, replay = random_set(seed=1, prompts=10), random_set(seed=2, prompts=6)
    kw = dict(lookahead=2, period=2, history=2, sequence_model=sequence_model, train_steps=20, budget=3)
    fast, step = EMoEPredictor(**kw), EMoEPredictor(**kw)
    fast.fit(train)
    step.fit(train)
    for trace in replay:  # the history carries from prompt to prompt in both
        a, b = step_predictions(step, trace, replay.meta), prompt_predictions(fast, trace, replay.meta)
        np.testing.assert_array_equal(a.issue_step, b.issue_step)
        np.testing.assert_array_equal(a.target_step, b.target_step)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
        assert np.all((b.scores > 0).sum(1) <= 3)  # the budget limits each row


def test_sequence_model_is_invoked_every_period_prompts():
    train, replay = random_set(seed=3, prompts=12), random_set(seed=4, prompts=7)
    p = EMoEPredictor(period=3, history=1, train_steps=5)
    p.fit(train)
    calls = []
    original = p.model.forecast
    p.model.forecast = lambda *a, **k: calls.append(len(calls)) or original(*a, **k)
    invoked_at = []
    for i, trace in enumerate(replay):
        before = len(calls)
        prompt_predictions(p, trace, replay.meta)
        if len(calls) > before:
            invoked_at.append(i)
    # prompts 0, 3, 6 start a period; each forecasts once per task type seen in the period
    assert invoked_at[:1] == [0] and set(invoked_at) <= {0, 1, 3, 4, 6}
    assert 3 in invoked_at and 6 in invoked_at and 2 not in invoked_at and 5 not in invoked_at


@pytest.mark.parametrize("sequence_model", [False, True])
def test_repeated_pattern_reaches_full_hit_rate(sequence_model):
    # Every prompt routes every token to the same experts per layer.
    pattern = np.array([[0, 1], [2, 3], [4, 5]])  # [L, k]
    ts = traces_from([np.broadcast_to(pattern, (n, 3, 2)) for n in (12, 15, 11, 14, 13, 12)])
    p = EMoEPredictor(lookahead=0, history=1, period=2, sequence_model=sequence_model, train_steps=200)
    p.fit(ts.select(range(4)))
    assert np.allclose(prompt_frequencies(ts[0].experts, 8).sum(1), 2)
    r = simulate(ts.select(range(4, 6)), p, SimConfig.moe_beyond(capacity=6, warmup_tokens=0))
    assert r.hit_rate > 0.999 and r.prediction["recall@2"] > 0.999


def test_task_classifier_cli_trains_saves_and_reports(tmp_path, capsys):
    from emoe_jax.predict.emoe import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [("german", "der hund und die katze sind nicht da " * 3), ("spanish", "el perro y la casa de los gatos " * 3)]
    for split in ("train", "validation"):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"task": t, "doc_id": t, "text": x}) + "\n" for t, x in docs))
    assert main(["train-task-classifier", "--corpus", str(corpus), "--out", str(tmp_path / "nb.npz"),
                 "--chars", "40", "--buckets", "512", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["naive_bayes_accuracy"] == 1.0 and out["tasks"] == ["german", "spanish"]
    assert NaiveBayesTaskClassifier.load(tmp_path / "nb.npz").classify("die katze") == "german"
    assert main(["train-task-classifier", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "python -m emoe_jax.data build" in capsys.readouterr().err
