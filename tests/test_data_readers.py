"""Readers, text helpers and package fetching of emoe_jax.data."""

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emoe_jax.data import readers
from emoe_jax.data.documents import assign_split, chunk_text, clean_text, decode_bytes
from emoe_jax.data.errors import DataError, SourceUnavailableError
from emoe_jax.data.fetch import fetch_debian_package, locate_pypi_package
from emoe_jax.data.sources import DEFAULT_SOURCES


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab \n"), max_size=300), max_chars=st.integers(1, 40))
def test_chunk_text_pieces_concatenate_back_and_fit(text, max_chars):
    pieces = chunk_text(text, max_chars)
    assert "".join(pieces) == text
    assert all(len(p) <= max_chars for p in pieces)
    assert all(p for p in pieces[:-1])


def test_chunk_text_prefers_paragraph_breaks():
    text = "aaaa\n\nbbbb\ncccc\n\ndddd"
    assert chunk_text(text, 12) == ["aaaa\n\n", "bbbb\ncccc\n\n", "dddd"]


def test_clean_text_normalises_newlines_and_drops_controls():
    assert clean_text("a\r\nb\rc\x1b[1;31mred\x1b[0m\x00\x07\td\x0c") == "a\nb\ncred\td"


def test_decode_bytes_falls_back_to_cp1252():
    assert decode_bytes("£5 ü".encode("utf-8")) == "£5 ü"
    assert decode_bytes("£5 ü".encode("cp1252")) == "£5 ü"


def test_assign_split_is_stable_and_close_to_fractions():
    splits = [assign_split("t", f"doc{i}") for i in range(4000)]
    assert splits == [assign_split("t", f"doc{i}") for i in range(4000)]
    train = splits.count("train") / len(splits)
    assert 0.88 < train < 0.92
    assert 0.035 < splits.count("validation") / len(splits) < 0.065
    # the task is part of the key: the same id may land elsewhere in another task
    assert splits != [assign_split("u", f"doc{i}") for i in range(4000)]


def test_read_python_files_skips_tests_and_tables(tmp_path):
    _write(tmp_path / "a.py", "x = 1\n")
    _write(tmp_path / "pkg" / "b.py", "y = 2\n")
    _write(tmp_path / "test" / "test_a.py", "assert 1\n")
    _write(tmp_path / "encodings" / "cp1.py", "table\n")
    _write(tmp_path / "site-packages" / "c.py", "z\n")
    _write(tmp_path / "notes.txt", "not code\n")
    assert list(readers.read_python_files(tmp_path)) == [("a.py", "x = 1\n"), ("pkg/b.py", "y = 2\n")]


def test_read_rest_files(tmp_path):
    _write(tmp_path / "library" / "os.rst.txt", "os\n==\n")
    _write(tmp_path / "index.rst", "Index\n")
    _write(tmp_path / "conf.py", "x\n")
    assert list(readers.read_rest_files(tmp_path)) == [("index.rst", "Index\n"), ("library/os.rst.txt", "os\n==\n")]


def test_read_tex_sections_cuts_at_sectioning_commands(tmp_path):
    _write(tmp_path / "m.tex", "preamble\n\\section{A}\nalpha $x^2$\n\\subsec{B}\nbeta\n\\sectionmark\n")
    _write(tmp_path / "macros.tex", "\\def\\x{1}\n")
    docs = list(readers.read_tex_sections(tmp_path, skip=frozenset({"macros.tex"})))
    assert docs == [("m.tex:0", "preamble\n"), ("m.tex:1", "\\section{A}\nalpha $x^2$\n"),
                    ("m.tex:2", "\\subsec{B}\nbeta\n\\sectionmark\n")]


def test_read_fortunes_groups_and_dedupes(tmp_path):
    _write(tmp_path / "sprueche", "eins\n%\nzwei\nzeilen\n%\neins\n%\n%\ndrei\n")
    _write(tmp_path / "sprueche.dat", "binary index")
    (tmp_path / "sprueche.u8").symlink_to(tmp_path / "sprueche")
    assert list(readers.read_fortunes(tmp_path, group_chars=8)) == [
        ("sprueche:0", "eins\n\nzwei\nzeilen\n"), ("sprueche:3", "drei\n")]
    assert list(readers.read_fortunes(tmp_path, group_chars=10_000)) == [
        ("sprueche:0", "eins\n\nzwei\nzeilen\n\ndrei\n")]


def test_read_chitchat_renames_speakers(tmp_path):
    data = {"c2": {"messages": [[{"sender": "x9", "text": "hi  there"}, {"sender": "x9", "text": "you?"}],
                                [{"sender": "q1", "text": "fine"}], [{"sender": "x9", "text": " "}]]},
            "c1": {"messages": []}}
    _write(tmp_path / "dataset.json", json.dumps(data))
    assert list(readers.read_chitchat(tmp_path / "dataset.json")) == [("c2", "A: hi there\nA: you?\nB: fine\n")]
    _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(DataError, match="not valid chitchat JSON"):
        list(readers.read_chitchat(tmp_path / "bad.json"))


def test_read_text_files_and_missing_folder(tmp_path):
    _write(tmp_path / "business" / "001.txt", "Title\n\nBody.\n")
    assert list(readers.read_text_files(tmp_path)) == [("business/001", "Title\n\nBody.\n")]
    with pytest.raises(DataError, match="does not exist"):
        list(readers.read_text_files(tmp_path / "nope"))


def test_missing_pypi_package_names_the_install_command():
    with pytest.raises(SourceUnavailableError, match="pip install no-such-dist-xyz"):
        locate_pypi_package("no-such-dist-xyz", "no_such_module_xyz")


def test_unknown_debian_package_names_the_package(tmp_path):
    with pytest.raises(SourceUnavailableError, match="no-such-package-emoe-xyz"):
        fetch_debian_package("no-such-package-emoe-xyz", tmp_path)
    assert not list(tmp_path.rglob("*.deb"))


def test_stdlib_code_source_reads_real_modules():
    source = DEFAULT_SOURCES["code"]
    files = source.obtain(Path("/nonexistent-cache"))
    docs = dict(readers.read_python_files(files.root))
    assert "json/decoder.py" in docs and "class JSONDecoder" in docs["json/decoder.py"]
    assert not any(doc_id.startswith(("test/", "encodings/")) for doc_id in docs)


@pytest.mark.parametrize("task,pattern", [
    ("dialogue", r"A: [^\n]+\n(?:[A-Z]: [^\n]+\n)*"),  # one utterance a line, speakers renamed
    ("news", r"(?s)[^\n]+\n\n[A-Z].*"),  # title, blank line, body
])
def test_pypi_sources_read_real_documents(task, pattern):
    source = DEFAULT_SOURCES[task]
    try:
        files = source.obtain(Path("/nonexistent-cache"))
    except SourceUnavailableError as error:
        pytest.skip(f"PyPI source for task {task} not installed: {error}")
    first = []
    for doc in source.read(files):
        first.append(doc)
        if len(first) == 5:
            break
    assert len(first) == 5 and all(re.fullmatch(pattern, text) for _, text in first), first[0][1][:200]


def test_debian_source_fetches_and_reads(tmp_path):
    """Fetches fortunes-es (~0.3 MB) with apt-get download into a temporary cache."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not on this machine: Debian sources cannot be tested here")
    source = DEFAULT_SOURCES["spanish"]
    try:
        files = source.obtain(tmp_path)
    except SourceUnavailableError as error:
        pytest.skip(f"Debian package fortunes-es could not be downloaded (run `apt-get update`?): {error}")
    assert files.kind == "debian" and files.version
    docs = list(source.read(files))
    assert len(docs) > 100 and any("ñ" in text or "á" in text for _, text in docs)
    # a second obtain reuses the cached .deb and extraction
    assert source.obtain(tmp_path).root == files.root
