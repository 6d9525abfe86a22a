"""Trace collection from the engine records exactly the routing of the all-resident model."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoe_jax.config import tiny_config
from emoe_jax.data.documents import Document
from emoe_jax.model.random_init import random_model
from emoe_jax.model.resident import ResidentModel
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts
from emoe_jax.traces import TraceSet
from emoe_jax.traces.__main__ import main
from emoe_jax.runtime.trace_collect import CollectError, collect_traces, select_documents, trace_meta

NEW = 6
# Lengths 1..8 share one prefill bucket (8), so the engine compiles few shapes.
PROMPTS = [("alpha", [5, 9, 13, 22, 7]), ("beta", [3, 17, 8, 99, 4, 60, 61, 2]), ("gamma", [40])]


# One config (and graph) for the in-memory engines and the CLI's checkpoint, so that the
# jitted stages compile once for the whole module; the vocabulary fits the tiny tokenizer.
CFG = dict(vocab_size=384, bos_token_id=0, eos_token_id=1, pad_token_id=2, add_bos=True)
SLOTS = 4  # of 8 experts per layer: the engine swaps and streams waves while tracing


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("qwen3_moe", **CFG)
    g, p, ex = random_model(cfg, seed=0, router_scale=5.0)
    return cfg, g, p, ex, ResidentModel(cfg, g, p, ex)


def _engine(tiny, slots=SLOTS, **cfg_changes):
    cfg, g, p, ex, _ = tiny
    return OffloadedEngine(cfg.replace(**cfg_changes), g, p, InMemoryExperts(ex), device_experts=slots)


def _resident_routing(resident, sequences):
    """Per sequence: ids [T, L, k] and weights [T, L, k] of one left-padded all-resident forward."""
    _, routings, pad = resident.logits(sequences)
    out = []
    for i, seq in enumerate(sequences):
        sl = slice(int(pad[i]), None)
        ids = np.stack([np.asarray(r.ids[i, sl]) for r in routings], axis=1)
        weights = np.stack([np.asarray(r.weights[i, sl]) for r in routings], axis=1)
        assert ids.shape[0] == len(seq)
        out.append((ids, weights))
    return out


def _assert_same_traces(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.prompt_id, x.task, x.n_prefill) == (y.prompt_id, y.task, y.n_prefill)
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(np.sort(x.experts, -1), np.sort(y.experts, -1))
        np.testing.assert_allclose(x.weights, y.weights, atol=1e-5)


def test_recorded_routing_equals_all_resident_forward(tiny):
    cfg, _, _, _, resident = tiny
    engine = _engine(tiny)
    plain = engine.generate([ids for _, ids in PROMPTS], NEW, stop_at_eos=False)
    traces = collect_traces(engine, PROMPTS, None, NEW, batch_size=2, stop_at_eos=False)
    assert engine.routing_hooks == [] and engine.record_router_inputs is False

    refs = _resident_routing(resident, [t.token_ids.tolist() for t in traces])
    for n, ((task, prompt), trace, (ref_ids, ref_w)) in enumerate(zip(PROMPTS, traces, refs)):
        assert trace.prompt_id == n and trace.task == task and trace.n_prefill == len(prompt)
        assert trace.token_ids[: len(prompt)].tolist() == prompt
        # Collection does not change generation: the same tokens as a call without hooks.
        assert trace.token_ids[len(prompt):].tolist() == plain.tokens[n]
        assert trace.n_tokens == len(prompt) + NEW  # every generated token has its routing
        assert trace.experts.dtype == np.int16 and trace.experts.shape == (trace.n_tokens, cfg.num_moe_layers, 2)
        assert trace.hidden is None
        np.testing.assert_array_equal(np.sort(trace.experts, -1), np.sort(ref_ids, -1))
        np.testing.assert_allclose(trace.weights, ref_w, atol=2e-5)
        # Rank order: highest weight first.
        assert (np.diff(trace.weights, axis=-1) <= 0).all()


def _router_input_direct(tiny, tokens, decoder_layer):
    """The post-attention RMSNorm output that `decoder_layer`'s router sees, by a plain cacheless forward."""
    cfg, g, p, ex, _ = tiny

    @jax.jit
    def forward(tokens):  # [1, T] -> [1, T, H]
        model = nnx.merge(g, p)
        x = model.embed(tokens)
        pad = jnp.zeros((1,), jnp.int32)
        all_slots = jnp.arange(cfg.num_experts, dtype=jnp.int32)  # every expert resident, slot e = expert e
        for li in range(decoder_layer):  # qwen3_moe: every decoder layer is an MoE layer
            x, _, _ = model.layers[li](x, None, jnp.int32(0), pad, ex[cfg.moe_layers.index(li)], all_slots)
        return model.layers[decoder_layer].attend_and_route(x, None, jnp.int32(0), pad)[1]

    return np.asarray(forward(jnp.asarray([tokens], jnp.int32))[0])  # [T, H]


def test_router_inputs_have_the_right_shape_and_match_a_direct_forward(tiny):
    cfg = tiny[0]
    engine = _engine(tiny)
    traces = collect_traces(engine, PROMPTS[:2], None, 4, batch_size=2, router_inputs=True, stop_at_eos=False)
    assert engine.record_router_inputs is False  # restored
    for trace in traces:
        assert trace.hidden.shape == (trace.n_tokens, cfg.num_moe_layers, cfg.hidden_size)
        assert trace.hidden.dtype == np.float16
        layer = 1  # MoE layer 1 = decoder layer 1 (qwen3_moe has no dense layers)
        direct = _router_input_direct(tiny, trace.token_ids.tolist(), cfg.moe_layers[layer])
        # Prefill rows and generated-token rows alike; float16 storage bounds the error.
        np.testing.assert_allclose(trace.hidden[:, layer].astype(np.float32), direct, rtol=2e-3, atol=2e-3)
        assert np.abs(direct).max() > 0.1  # a real signal, not zeros
    meta = trace_meta(engine, "tiny", router_inputs=True)
    ts = TraceSet.from_prompts(meta, traces)  # the format accepts what collection produces
    assert ts.meta.hidden_size == cfg.hidden_size and ts.meta.moe_layer_ids == cfg.moe_layers


def test_tokens_after_eos_are_dropped(tiny):
    free = collect_traces(_engine(tiny), PROMPTS[:1], None, NEW, stop_at_eos=False)[0]
    generated = free.token_ids[free.n_prefill:].tolist()
    eos = generated[3]
    cut = generated.index(eos)  # first occurrence: generation stops there, EOS excluded
    trace = collect_traces(_engine(tiny, eos_token_id=eos), PROMPTS[:1], None, NEW)[0]
    assert trace.token_ids[trace.n_prefill:].tolist() == generated[:cut]
    assert trace.n_tokens == trace.n_prefill + cut
    np.testing.assert_array_equal(trace.experts, free.experts[: trace.n_tokens])


def test_batch_size_one_and_many_give_identical_traces(tiny):
    engine = _engine(tiny)
    one = collect_traces(engine, PROMPTS, None, NEW, batch_size=1, router_inputs=True, first_prompt_id=10)
    many = collect_traces(engine, PROMPTS, None, NEW, batch_size=2, router_inputs=True, first_prompt_id=10)
    assert [t.prompt_id for t in one] == [10, 11, 12]
    _assert_same_traces(one, many)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.hidden.astype(np.float32), b.hidden.astype(np.float32), atol=2e-3)


def test_bad_prompts_are_clear_errors(tiny):
    engine = _engine(tiny)
    with pytest.raises(CollectError, match="no tokenizer"):
        collect_traces(engine, [("t", "some text")], None, 2)
    with pytest.raises(CollectError, match="has no tokens"):
        collect_traces(engine, [("t", [])], None, 2)
    with pytest.raises(CollectError, match="context is 256"):
        collect_traces(engine, [("t", [5] * 252)], None, 4)
    with pytest.raises(CollectError, match="no prompts"):
        collect_traces(engine, [], None, 2)
    with pytest.raises(CollectError, match="pair"):
        collect_traces(engine, [[1, 2, 3]], None, 2)
    # Out-of-vocabulary ids reach the engine, which refuses them; the hook is removed anyway.
    with pytest.raises(ValueError, match="outside"):
        collect_traces(engine, [("t", [1, 384])], None, 2)
    assert engine.routing_hooks == []


def test_prompt_tokens_cuts_prompts(tiny):
    trace = collect_traces(_engine(tiny), PROMPTS[1:2], None, 2, prompt_tokens=3)[0]
    assert trace.n_prefill == 3 and trace.token_ids[:3].tolist() == PROMPTS[1][1][:3]


def test_select_documents_is_balanced_and_seeded():
    docs = [Document(task, f"{task}{i}", f"text {i}") for task, n in (("a", 5), ("b", 2), ("c", 4)) for i in range(n)]
    docs.append(Document("c", "empty", ""))
    chosen = select_documents(docs, seed=0)
    assert len(chosen) == 11 and "empty" not in {d.doc_id for d in chosen}
    assert [d.task for d in chosen[:6]] == ["a", "b", "c"] * 2  # round-robin while every task has documents
    assert select_documents(list(reversed(docs)), seed=0) != chosen  # task order follows the input...
    assert sorted(d.doc_id for d in select_documents(list(reversed(docs)), seed=0)) == sorted(
        d.doc_id for d in chosen)  # ...but the documents do not
    assert select_documents(docs, seed=0) == chosen
    assert select_documents(docs, seed=1) != chosen
    capped = select_documents(docs, per_task=1, seed=0)
    assert [d.task for d in capped] == ["a", "b", "c"]
    assert [d.task for d in select_documents(docs, max_prompts=4, seed=0)] == ["a", "b", "c", "a"]


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def corpus_and_model(tmp_path_factory, tiny):
    from emoe_jax.checkpoint import write_checkpoint
    from emoe_jax.data.synthetic import tiny_corpus, tiny_tokenizer
    from emoe_jax.model.hf_params import nest_for_checkpoint, params_to_hf

    root = tmp_path_factory.mktemp("collect")
    corpus = tiny_corpus(root / "corpus", docs_per_task=12)
    tokenizer = tiny_tokenizer(corpus, root / "tokenizer", vocab_size=384)
    cfg, g, p, ex, _ = tiny
    experts = {w: np.stack([np.asarray(layer[j]) for layer in ex]) for j, w in enumerate(("gate", "up", "down"))}
    ckpt = root / "ckpt"
    write_checkpoint(ckpt, cfg, nest_for_checkpoint(params_to_hf(cfg, p)), experts, tokenizer_dir=tokenizer)
    return corpus, ckpt, cfg, tiny[4]


def test_cli_collects_a_loadable_trace_set_with_tasks(corpus_and_model, tmp_path, capsys, monkeypatch):
    from emoe_jax.checkpoint import load_checkpoint
    from emoe_jax.data.corpus import Corpus

    corpus, ckpt, cfg, resident = corpus_and_model
    out = tmp_path / "traces"
    args = ["collect", "--model", str(ckpt), "--corpus", str(corpus), "--split", "train", "--max-new-tokens", "3",
            "--max-prompts", "5", "--prompt-tokens", "8", "--batch-size", "2", "--device-experts", "0.5",
            "--router-inputs", "--json", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    ts = TraceSet.load(out)
    assert len(ts) == summary["prompts"] == 5
    tasks = Corpus(corpus).tasks
    assert ts.tasks == [tasks[0], tasks[1], tasks[2], tasks[0], tasks[1]]  # balanced round-robin
    assert ts.meta.model == str(ckpt) and ts.meta.moe_layer_ids == cfg.moe_layers
    assert ts.meta.hidden_size == cfg.hidden_size and ts.has_weights
    assert summary["tokens"] == ts.n_tokens == summary["prefill_tokens"] + summary["generated_tokens"]
    assert summary["prompts_per_task"] == {t: ts.tasks.count(t) for t in set(ts.tasks)}

    tokenizer = load_checkpoint(ckpt).tokenizer
    docs = {d.text: d for d in Corpus(corpus).load("train")}
    refs = _resident_routing(resident, [t.token_ids.tolist() for t in ts])
    for trace, (ref_ids, ref_w) in zip(ts, refs):
        assert trace.n_prefill == 8 and trace.token_ids[0] == 0  # cut to 8 tokens, BOS first
        assert trace.n_tokens <= 8 + 3
        assert trace.text == tokenizer.decode(trace.token_ids[:8].tolist())
        assert any(text.startswith(trace.text) and d.task == trace.task for text, d in docs.items())
        np.testing.assert_array_equal(np.sort(trace.experts, -1), np.sort(ref_ids, -1))
        np.testing.assert_allclose(trace.weights, ref_w, atol=1e-3)  # stored as float16

    # The same run again, with relative paths, gives the same trace set (deterministic choice and generation).
    monkeypatch.chdir(ckpt.parent)
    relative = [x.replace(str(ckpt.parent) + "/", "") for x in args[:-1]]
    assert main([*relative, "again"]) == 0
    capsys.readouterr()
    again = TraceSet.load(ckpt.parent / "again")
    assert again.meta.model == "ckpt"
    _assert_same_traces(list(ts), list(again))
    shutil.rmtree(ckpt.parent / "again")
    # An existing output is refused, not overwritten.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"--split": "tset"}, "unknown split 'tset'"),
    ({"--corpus": "/nonexistent/corpus"}, "not a built corpus"),
    ({"--model": "/nonexistent/ckpt"}, "checkpoint directory not found"),
    ({"--device-experts": "99"}, "between 1 and 8"),
    ({"--split": "test"}, "has no non-empty documents"),  # 12 documents per task leave the test split empty
    ({"--max-new-tokens": "300"}, "leaves no room for a prompt"),
])
def test_cli_bad_inputs_are_clear_errors(corpus_and_model, tmp_path, capsys, change, message):
    corpus, ckpt, _, _ = corpus_and_model
    opts = {"--model": str(ckpt), "--corpus": str(corpus), "--split": "train", "--max-new-tokens": "2"}
    opts.update(change)
    out = tmp_path / "traces"
    assert main(["collect", *[x for kv in opts.items() for x in kv], str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written
