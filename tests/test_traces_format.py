"""Trace-set format: writer/loader round trip, views, atomic writes, corrupt input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emoe_jax.traces import PromptTrace, TraceFormatError, TraceMeta, TraceSet, TraceWriter

L, E, K, H = 3, 8, 2, 4


def make_meta(hidden: bool = False) -> TraceMeta:
    return TraceMeta(
        model="tiny", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=(1, 2, 4),
        hidden_size=H if hidden else None, source="test",
    )


def make_prompt(rng: np.random.Generator, pid: int, T: int, *, weights: bool, hidden: bool) -> PromptTrace:
    # Distinct experts per (token, layer), as a router's top-k would be.
    experts = np.stack([rng.permutation(E)[:K] for _ in range(T * L)]).reshape(T, L, K).astype(np.int16)
    return PromptTrace(
        prompt_id=pid,
        task=f"task{pid % 2}",
        text=f"prompt, \"{pid}\"\nwith ünïcode",
        token_ids=rng.integers(-1, 1000, T).astype(np.int32),
        experts=experts,
        weights=rng.random((T, L, K), dtype=np.float32) if weights else None,
        n_prefill=max(T - 1, 0),
        hidden=rng.standard_normal((T, L, H)).astype(np.float16) if hidden else None,
        tokens=tuple(f"t{pid}_{i}" for i in range(T)) if pid % 3 else None,
    )


def make_prompts(weights: bool = False, hidden: bool = False, lengths=(5, 1, 7, 3)) -> list[PromptTrace]:
    rng = np.random.default_rng(0)
    return [make_prompt(rng, pid, T, weights=weights, hidden=hidden) for pid, T in zip((10, 3, 7, 42), lengths)]


def write(path: Path, meta: TraceMeta, prompts: list[PromptTrace]) -> Path:
    with TraceWriter(path, meta) as w:
        for p in prompts:
            w.add(p)
    return path


def assert_same_prompt(got: PromptTrace, want: PromptTrace) -> None:
    assert got.prompt_id == want.prompt_id
    assert (got.task, got.text, got.n_prefill, got.tokens) == (want.task, want.text, want.n_prefill, want.tokens)
    assert got.token_ids.dtype == np.int32 and got.experts.dtype == np.int16
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_array_equal(got.experts, want.experts)
    if want.weights is None:
        assert got.weights is None
    else:
        assert got.weights.dtype == np.float32
        # Stored as float16 on disk: exactly the float16 rounding of what was written.
        np.testing.assert_array_equal(got.weights, want.weights.astype(np.float16).astype(np.float32))
    if want.hidden is None:
        assert got.hidden is None
    else:
        assert got.hidden.dtype == np.float16
        np.testing.assert_array_equal(got.hidden, want.hidden)


@pytest.mark.parametrize("weights,hidden", [(False, False), (True, False), (False, True), (True, True)])
def test_round_trip(tmp_path, weights, hidden):
    meta = make_meta(hidden)
    prompts = make_prompts(weights, hidden)
    ts = TraceSet.load(write(tmp_path / "set", meta, prompts))
    assert ts.meta == meta
    assert len(ts) == len(prompts)
    assert ts.n_tokens == sum(p.n_tokens for p in prompts)
    assert ts.has_weights == weights
    np.testing.assert_array_equal(ts.prompt_ids, [p.prompt_id for p in prompts])  # stored (insertion) order
    assert ts.prompt_ids.dtype == np.int64
    assert ts.tasks == [p.task for p in prompts]
    for got, want in zip(ts, prompts):
        assert_same_prompt(got, want)
    assert isinstance(ts[0].experts, np.memmap)  # read lazily from disk
    assert (tmp_path / "set" / "weights.npy").exists() == weights
    assert (tmp_path / "set" / "hidden.npy").exists() == hidden
    # The in-memory set reads back exactly like the loaded one.
    mem = TraceSet.from_prompts(meta, prompts)
    for got, want in zip(mem, ts):
        assert_same_prompt(got, want)


def test_files_follow_the_documented_layout(tmp_path):
    prompts = make_prompts(weights=True)
    path = write(tmp_path / "set", make_meta(), prompts)
    offsets = np.load(path / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 5, 6, 13, 16]
    # Plain np.load (no mmap) reads the streamed .npy files; headers carry the final row count.
    assert np.load(path / "experts.npy").shape == (16, L, K)
    assert np.load(path / "weights.npy").dtype == np.float16
    np.testing.assert_array_equal(np.load(path / "token_ids.npy"), np.concatenate([p.token_ids for p in prompts]))
    lines = (path / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[2])
    assert rec == {"prompt_id": 7, "task": "task1", "text": prompts[2].text, "n_tokens": 7, "n_prefill": 6,
                   "tokens": list(prompts[2].tokens)}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "emoe_jax.traces" and meta["version"] == 1
    assert meta["moe_layer_ids"] == [1, 2, 4] and meta["num_tokens"] == 16 and meta["has_weights"] is True


def test_getitem_and_select(tmp_path):
    prompts = make_prompts()
    ts = TraceSet.load(write(tmp_path / "set", make_meta(), prompts))
    assert ts[-1].prompt_id == 42
    with pytest.raises(IndexError):
        ts[4]
    with pytest.raises(TypeError):
        ts[1:2]

    view = ts.select([2, 0])
    assert len(view) == 2 and view.prompt_ids.tolist() == [7, 10] and view.tasks == ["task1", "task0"]
    assert view.n_tokens == 7 + 5
    assert_same_prompt(view[0], prompts[2])
    assert_same_prompt(view[1], prompts[0])
    assert view.select([-1]).prompt_ids.tolist() == [10]  # a view of a view indexes the view
    assert ts.select(slice(1, None, 2)).prompt_ids.tolist() == [3, 42]
    assert ts.select(np.array([True, False, False, True])).prompt_ids.tolist() == [10, 42]
    empty = ts.select([])
    assert len(empty) == 0 and empty.n_tokens == 0 and list(empty) == []
    with pytest.raises(IndexError):
        ts.select([4])
    with pytest.raises(ValueError):
        ts.select(np.array([True, False]))


def test_empty_trace_set_round_trips(tmp_path):
    ts = TraceSet.load(write(tmp_path / "set", make_meta(), []))
    assert len(ts) == 0 and ts.n_tokens == 0 and ts.prompt_ids.shape == (0,)


def test_exception_mid_write_leaves_nothing(tmp_path):
    prompts = make_prompts(weights=True, hidden=True)
    with pytest.raises(RuntimeError, match="boom"):
        with TraceWriter(tmp_path / "set", make_meta(hidden=True)) as w:
            w.add(prompts[0])
            w.add(prompts[1])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary directory


def test_invalid_prompt_aborts_write(tmp_path):
    bad = make_prompts()[0]
    bad = PromptTrace(**{**bad.__dict__, "experts": np.full((5, L, K), E, dtype=np.int16)})
    with pytest.raises(TraceFormatError, match="outside"):
        with TraceWriter(tmp_path / "set", make_meta()) as w:
            w.add(make_prompts()[1])
            w.add(bad)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_unless_overwrite(tmp_path):
    path = write(tmp_path / "set", make_meta(), make_prompts()[:1])
    with pytest.raises(FileExistsError, match="overwrite"):
        TraceWriter(path, make_meta())
    with TraceWriter(path, make_meta(), overwrite=True) as w:
        for p in make_prompts()[1:]:
            w.add(p)
    assert TraceSet.load(path).prompt_ids.tolist() == [3, 7, 42]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize(
    "change,match",
    [
        ({"experts": np.zeros((5, L, K + 1), np.int16)}, "expected"),
        ({"experts": np.full((5, L, K), -1, np.int16)}, "outside"),
        ({"token_ids": np.zeros(4, np.int32)}, "token_ids"),
        ({"weights": np.zeros((5, L, 1), np.float32)}, "weights"),
        ({"hidden": np.zeros((5, L, H), np.float16)}, "hidden_size is None"),
        ({"n_prefill": 6}, "n_prefill"),
        ({"tokens": ("a",)}, "token strings"),
    ],
)
def test_writer_rejects_inconsistent_prompts(tmp_path, change, match):
    good = make_prompts()[0]
    bad = PromptTrace(**{**good.__dict__, **change})
    with TraceWriter(tmp_path / "set", make_meta()) as w:
        with pytest.raises(TraceFormatError, match=match):
            w.add(bad)
    with pytest.raises(TraceFormatError, match=match):
        TraceSet.from_prompts(make_meta(), [bad])


def test_writer_rejects_duplicate_ids_and_mixed_weights(tmp_path):
    with_w, without_w = make_prompts(weights=True), make_prompts()
    with TraceWriter(tmp_path / "a", make_meta()) as w:
        w.add(without_w[0])
        with pytest.raises(TraceFormatError, match="twice"):
            w.add(without_w[0])
        with pytest.raises(TraceFormatError, match="weights"):
            w.add(with_w[1])
    with pytest.raises(TraceFormatError, match="twice"):
        TraceSet.from_prompts(make_meta(), [without_w[0], without_w[0]])
    with pytest.raises(TraceFormatError, match="weights"):
        TraceSet.from_prompts(make_meta(), [without_w[0], with_w[1]])


def test_meta_validation():
    with pytest.raises(TraceFormatError, match="moe_layer_ids"):
        TraceMeta("m", 2, 8, 2, (1,), None, "")
    with pytest.raises(TraceFormatError, match="top_k"):
        TraceMeta("m", 1, 2, 3, (1,), None, "")
    with pytest.raises(TraceFormatError, match="num_experts"):
        TraceMeta("m", 1, 0, 1, (1,), None, "")


# ---------------------------------------------------------------- corrupt sets


@pytest.fixture
def good_set(tmp_path) -> Path:
    return write(tmp_path / "set", make_meta(), make_prompts(weights=True))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace set"):
        TraceSet.load(tmp_path / "nope")


@pytest.mark.parametrize("name", ["meta.json", "prompts.jsonl", "offsets.npy", "token_ids.npy", "experts.npy", "weights.npy"])
def test_missing_file(good_set, name):
    (good_set / name).unlink()
    with pytest.raises(TraceFormatError, match=name.replace(".", r"\.") + " is missing"):
        TraceSet.load(good_set)


def test_truncated_npy(good_set):
    data = (good_set / "experts.npy").read_bytes()
    (good_set / "experts.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match="experts.npy"):
        TraceSet.load(good_set)


def test_garbage_npy(good_set):
    (good_set / "offsets.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(TraceFormatError, match="offsets.npy is not a readable .npy"):
        TraceSet.load(good_set)


def test_wrong_dtype_and_shape(good_set):
    np.save(good_set / "experts.npy", np.zeros((16, L, K), np.int32))
    with pytest.raises(TraceFormatError, match="dtype int32"):
        TraceSet.load(good_set)
    np.save(good_set / "experts.npy", np.zeros((15, L, K), np.int16))
    with pytest.raises(TraceFormatError, match="shape"):
        TraceSet.load(good_set)


def test_expert_ids_out_of_range(good_set):
    np.save(good_set / "experts.npy", np.full((16, L, K), E, np.int16))
    with pytest.raises(TraceFormatError, match="outside"):
        TraceSet.load(good_set)
    assert len(TraceSet.load(good_set, check_values=False)) == 4  # opt-out reads no data


def test_corrupt_json(good_set):
    (good_set / "meta.json").write_text("{")
    with pytest.raises(TraceFormatError, match="meta.json is not valid JSON"):
        TraceSet.load(good_set)


def test_prompts_disagree_with_offsets(good_set):
    lines = (good_set / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[1])
    rec["n_tokens"] += 1
    lines[1] = json.dumps(rec)
    (good_set / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TraceFormatError, match="n_tokens"):
        TraceSet.load(good_set)
    (good_set / "prompts.jsonl").write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    with pytest.raises(TraceFormatError, match="offsets.npy has shape"):
        TraceSet.load(good_set)


def test_wrong_format_version(good_set):
    meta = json.loads((good_set / "meta.json").read_text())
    meta["version"] = 99
    (good_set / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TraceFormatError, match="version 99"):
        TraceSet.load(good_set)
