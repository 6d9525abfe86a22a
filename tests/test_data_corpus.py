"""Corpus builder, loader and the `build`/`stats` CLI on fixture sources and the real stdlib source."""

import json

import pytest

from emoe_jax.data import (
    SPLITS,
    BuildConfig,
    Corpus,
    DataError,
    Source,
    SourceUnavailableError,
    build_corpus,
    iter_corpus,
    load_corpus,
)
from emoe_jax.data.__main__ import main
from emoe_jax.data.sources import DEFAULT_SOURCES
from emoe_jax.data.synthetic import fixture_sources

SMALL = BuildConfig(max_chars_per_task=None, min_doc_chars=1)


@pytest.fixture
def registry(tmp_path):
    return fixture_sources(tmp_path / "packages", docs_per_task=60)


def _all_docs(path):
    return {split: load_corpus(path, split) for split in SPLITS}


def test_build_writes_labelled_disjoint_splits(tmp_path, registry):
    manifest = build_corpus(tmp_path / "c", registry=registry, config=SMALL, progress=False)
    docs = _all_docs(tmp_path / "c")
    assert set(manifest["tasks"]) == {"prose", "umlaut", "code"}
    for split, split_docs in docs.items():
        assert {d.task for d in split_docs} <= set(registry)
        for task, info in manifest["tasks"].items():
            mine = [d for d in split_docs if d.task == task]
            assert info["documents"][split] == len(mine)
            assert info["chars"][split] == sum(len(d.text) for d in mine)
    keys = {split: {(d.task, d.group_id) for d in split_docs} for split, split_docs in docs.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(k) for k in keys.values()) == 180  # every generated document, once
    assert len(docs["train"]) > len(docs["validation"]) + len(docs["test"])
    Corpus(tmp_path / "c").verify()


def test_build_is_byte_identical_and_seed_only_moves_the_subset(tmp_path, registry):
    capped = BuildConfig(max_chars_per_task=6000, min_doc_chars=1)
    build_corpus(tmp_path / "a", registry=registry, config=capped, progress=False)
    build_corpus(tmp_path / "b", registry=registry, config=capped, progress=False)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other_seed = BuildConfig(max_chars_per_task=6000, min_doc_chars=1, seed=1)
    build_corpus(tmp_path / "s", registry=registry, config=other_seed, progress=False)
    a = {(d.task, d.doc_id): split for split, ds in _all_docs(tmp_path / "a").items() for d in ds}
    s = {(d.task, d.doc_id): split for split, ds in _all_docs(tmp_path / "s").items() for d in ds}
    assert set(a) != set(s)
    # a document picked under both seeds is in the same split under both
    assert all(a[key] == s[key] for key in set(a) & set(s))


def test_caps_bound_chars_and_docs(tmp_path, registry):
    manifest = build_corpus(tmp_path / "c", registry=registry, progress=False,
                            config=BuildConfig(max_chars_per_task=5000, min_doc_chars=1))
    for info in manifest["tasks"].values():
        assert 4000 < sum(info["chars"].values()) <= 5000
    manifest = build_corpus(tmp_path / "d", registry=registry, progress=False,
                            config=BuildConfig(max_docs_per_task=7, min_doc_chars=1))
    assert all(sum(info["documents"].values()) == 7 for info in manifest["tasks"].values())


def test_long_documents_are_cut_into_parts_that_share_a_split(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    for i in range(30):
        (folder / f"d{i}.txt").write_text("".join(f"paragraph {i}.{j} " * 5 + "\n\n" for j in range(20)))
    from emoe_jax.data import readers
    from emoe_jax.data.fetch import PackageFiles

    files = PackageFiles("pkg", "1", "local", folder)
    reg = {"long": Source("long", "long docs", lambda _c: files, lambda f: readers.read_text_files(f.root), "-")}
    build_corpus(tmp_path / "c", registry=reg, progress=False,
                 config=BuildConfig(max_chars_per_task=None, max_doc_chars=500))
    docs = [(split, d) for split, ds in _all_docs(tmp_path / "c").items() for d in ds]
    assert all(len(d.text) <= 500 for _, d in docs)
    parts = {}
    for split, d in docs:
        parts.setdefault(d.group_id, set()).add(split)
    assert len(parts) == 30 and all(len(s) == 1 for s in parts.values())
    assert any("#" in d.doc_id for _, d in docs)
    assert "".join(d.text for _, d in sorted(docs, key=lambda x: int(x[1].doc_id.split("#")[1]))
                   if d.group_id == "d0") == (folder / "d0.txt").read_text()


def test_duplicates_and_short_documents_are_dropped(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "a.txt").write_text("same text, long enough to keep\n")
    (folder / "b.txt").write_text("same text, long enough to keep\n")
    (folder / "c.txt").write_text("tiny\n")
    (folder / "d.txt").write_text("another document that is long enough\n")
    from emoe_jax.data import readers
    from emoe_jax.data.fetch import PackageFiles

    files = PackageFiles("pkg", "1", "local", folder)
    reg = {"t": Source("t", "d", lambda _c: files, lambda f: readers.read_text_files(f.root), "-")}
    manifest = build_corpus(tmp_path / "c", registry=reg, progress=False,
                            config=BuildConfig(min_doc_chars=10))
    info = manifest["tasks"]["t"]
    assert (info["raw_documents"], info["duplicates_dropped"], info["too_short_dropped"]) == (4, 1, 1)
    ids = sorted(d.doc_id for split in SPLITS for d in load_corpus(tmp_path / "c", split))
    assert ids == ["a", "d"]


def test_real_stdlib_source_in_a_bounded_build(tmp_path):
    manifest = build_corpus(tmp_path / "c", ["code"], progress=False,
                            config=BuildConfig(max_chars_per_task=200_000))
    info = manifest["tasks"]["code"]
    assert info["source"]["kind"] == "python"
    assert 150_000 < sum(info["chars"].values()) <= 200_000
    assert info["available_chars"] > 1_000_000
    texts = [d.text for d in iter_corpus(tmp_path / "c", "train")]
    assert any("def " in t for t in texts)


def test_unavailable_source_fails_before_writing(tmp_path, registry):
    def missing(_cache):
        raise SourceUnavailableError("package 'x' is needed: pip install x")

    reg = dict(registry, broken=Source("broken", "never there", missing, lambda f: [], "pip install x"))
    with pytest.raises(SourceUnavailableError, match="pip install x"):
        build_corpus(tmp_path / "c", registry=reg, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "packages"]


def test_output_folder_rules(tmp_path, registry):
    out = tmp_path / "c"
    build_corpus(out, ["prose"], registry=registry, config=SMALL, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        build_corpus(out, ["code"], registry=registry, config=SMALL, progress=False)
    build_corpus(out, ["code"], registry=registry, config=SMALL, progress=False, overwrite=True)
    assert Corpus(out).tasks == ["code"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "packages"]  # no temp folders left
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        build_corpus(other, registry=registry, config=SMALL, progress=False, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_options(tmp_path, registry):
    with pytest.raises(DataError, match="unknown task"):
        build_corpus(tmp_path / "c", ["prose", "klingon"], registry=registry, progress=False)
    with pytest.raises(DataError, match="sum to 1"):
        BuildConfig(split_fractions=(0.9, 0.2, 0.1))
    with pytest.raises(DataError, match="positive"):
        BuildConfig(max_chars_per_task=0)


def test_loader_errors(tmp_path, registry):
    with pytest.raises(FileNotFoundError, match="python -m emoe_jax.data build"):
        Corpus(tmp_path / "nothing")
    out = tmp_path / "c"
    build_corpus(out, registry=registry, config=SMALL, progress=False)
    with pytest.raises(DataError, match="unknown split"):
        load_corpus(out, "dev")
    with open(out / "validation.jsonl", "a") as handle:
        handle.write("{broken\n")
    with pytest.raises(DataError, match="validation.jsonl:"):
        load_corpus(out, "validation")
    with pytest.raises(DataError, match="manifest hash"):
        Corpus(out).verify()
    (out / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="format"):
        Corpus(out)


def test_cli_build_stats_and_errors(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["build", str(out), "--tasks", "code", "--max-chars-per-task", "50000",
                 "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"]["code"]["source"]["kind"] == "python"
    assert main(["stats", str(out), "--verify", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["verified"] and sum(stats["tasks"]["code"]["train"].values()) > 0
    assert main(["build", str(tmp_path / "x"), "--tasks", "nope", "--no-progress"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "missing")]) == 2
    assert "not a built corpus" in capsys.readouterr().err
    assert main(["tasks", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(DEFAULT_SOURCES)
    assert len(DEFAULT_SOURCES) >= 6
