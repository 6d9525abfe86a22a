"""Routing traces of our own engine: which experts every prompt and generated token chose.

    python -m emoe_jax.traces collect --model CKPT --corpus CORPUS --split test \
        --max-new-tokens 32 --per-task 50 [--router-inputs] OUT

Steps of `iter_traces` (the Python API; `collect_traces` returns a list):
  1. encode each prompt (text with the checkpoint's tokenizer, or token ids as
     given), cut it to `prompt_tokens` tokens, and check that prompt + generated
     tokens fit the model's context;
  2. per batch, pass a `_StepRecorder` to `engine.generate(observers=...)`; the engine
     calls it once per MoE layer per forward step (the prefill step, then one
     decode step per generated token) with that layer's top-k ids and weights
     [B, T, k] and, with `record_router_inputs=True`, the router input
     [B, T, H]. The recorder only copies them to host memory, so generation is
     unchanged;
  3. generate `max_new_tokens + 1` tokens: the engine runs a forward pass over a
     generated token only when it needs the token after it, so the one extra
     token makes every kept generated token routed; the extra one is dropped;
  4. per prompt, keep the prefill rows at the prompt's real (non-padding)
     positions and one row per decode step, cut at the generated length the
     engine returns (EOS and everything after it are not kept), and yield a
     PromptTrace (token ids = prompt then generated, n_prefill = prompt length).

`collect_corpus_traces` selects corpus documents (tasks balanced round-robin,
each task's documents shuffled by `seed`), runs the steps above with an engine
loaded from a checkpoint, and streams the traces into a TraceWriter, so the
trace set appears only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emoe_jax.cli import USER_ERRORS, fail
from emoe_jax.errors import EmoeError
from ..traces.format import TraceMeta, TraceWriter, PromptTrace

if TYPE_CHECKING:  # the runtime pulls in JAX; importing it lazily keeps `--help` fast
    from ..data.documents import Document
    from .engine import OffloadedEngine, StepRouting
    from ..tokenizer import Tokenizer

PromptSpec = tuple[str, "str | Sequence[int]"]  # (task label, text or token ids)


class CollectError(EmoeError):
    """Bad input to trace collection; the message names the problem and the fix."""


# ---------------------------------------------------------------- recording


class _StepRecorder:
    """A routing hook that keeps every step's routing of one generate() call on the host.

    steps[s][l] holds the routing of forward step s (0 = prefill) at MoE layer l.
    """

    def __init__(self, num_moe_layers: int):
        self.num_moe_layers = num_moe_layers
        self.steps: list[list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]] = []

    def __call__(self, step: StepRouting) -> None:
        if step.moe_layer == 0:
            self.steps.append([])
        if not self.steps or len(self.steps[-1]) != step.moe_layer:
            raise RuntimeError(f"routing hook called for MoE layer {step.moe_layer} out of order")
        hidden = None
        if step.router_input is not None:
            hidden = np.asarray(step.router_input).astype(np.float16)  # [B, T, H]
        self.steps[-1].append((step.ids, step.weights, step.valid, hidden))

    def prompt_rows(self, i: int, n_prompt: int, n_generated: int):
        """Rows of batch element i: experts [T, L, k], weights [T, L, k], hidden [T, L, H] or None."""
        if len(self.steps) < 1 + n_generated or any(len(s) != self.num_moe_layers for s in self.steps):
            raise RuntimeError(
                f"engine reported {len(self.steps)} forward steps for {n_generated} generated tokens; "
                "expected one prefill step and one step per generated token over every MoE layer")
        prefill = self.steps[0]
        valid = prefill[0][2][i]  # [T_pad] bool: real prompt positions
        if int(valid.sum()) != n_prompt:
            raise RuntimeError(f"prefill marked {int(valid.sum())} real tokens for a {n_prompt}-token prompt")
        decode = self.steps[1 : 1 + n_generated]

        def gather(field: int) -> np.ndarray:
            head = np.stack([layer[field][i][valid] for layer in prefill], axis=1)  # [n_prompt, L, ...]
            if not decode:
                return head
            tail = np.stack([np.stack([layer[field][i, 0] for layer in s]) for s in decode])  # [n_gen, L, ...]
            return np.concatenate([head, tail.astype(head.dtype)])

        hidden = gather(3) if prefill[0][3] is not None else None
        return gather(0).astype(np.int16), gather(1).astype(np.float32), hidden


# ---------------------------------------------------------------- Python API


def trace_meta(engine: OffloadedEngine, model: str, *, router_inputs: bool = False, source: str = "") -> TraceMeta:
    """The TraceMeta of traces collected from `engine` (one recorded layer per MoE layer)."""
    cfg = engine.cfg
    return TraceMeta(
        model=model,
        num_layers=cfg.num_moe_layers,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        moe_layer_ids=cfg.moe_layers,
        hidden_size=cfg.hidden_size if router_inputs else None,
        source=source or f"emoe_jax engine ({engine.mode} mode), family {cfg.family}",
    )


def _encode_prompts(prompts: Sequence[PromptSpec], tokenizer: Tokenizer | None,
                    prompt_tokens: int | None) -> list[tuple[str, str, list[int]]]:
    """(task, text, token ids) per prompt; text is decoded from the kept ids when they were cut."""
    out = []
    for n, spec in enumerate(prompts):
        try:
            task, content = spec
        except (TypeError, ValueError):
            raise CollectError(f"prompt {n}: expected a (task, text or token ids) pair, got {spec!r}") from None
        if isinstance(content, str):
            if tokenizer is None:
                raise CollectError(f"prompt {n} is text but no tokenizer was given; pass tokenizer= or token ids")
            text, ids = content, tokenizer.encode(content)
        else:
            ids = [int(t) for t in content]
            text = tokenizer.decode(ids) if tokenizer is not None else ""
        if prompt_tokens is not None and len(ids) > prompt_tokens:
            ids = ids[:prompt_tokens]
            text = tokenizer.decode(ids) if tokenizer is not None else ""
        if not ids:
            raise CollectError(f"prompt {n} (task {task!r}) has no tokens; drop empty prompts")
        out.append((str(task), text, ids))
    return out


def iter_traces(engine: OffloadedEngine, prompts: Sequence[PromptSpec], tokenizer: Tokenizer | None,
                max_new_tokens: int, *, batch_size: int = 8, router_inputs: bool = False,
                prompt_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                seed: int = 0, stop_at_eos: bool = True, first_prompt_id: int = 0,
                progress: bool = False) -> Iterator[PromptTrace]:
    """Generate for `prompts` with `engine` and yield one PromptTrace per prompt, in order.

    prompts: (task label, text or token ids) pairs; text needs `tokenizer`.
    prompt_tokens: keep only the first N tokens of each prompt (None: all).
    router_inputs: also record the router input of every token ([T, L, H] float16).
    Prompt ids are first_prompt_id, first_prompt_id + 1, ... With temperature > 0
    the sampled tokens depend on the batch composition (one key per step and batch).
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise CollectError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise CollectError(f"batch_size must be at least 1, got {batch_size}")
    if prompt_tokens is not None and prompt_tokens < 1:
        raise CollectError(f"prompt_tokens must be at least 1, got {prompt_tokens}")
    encoded = _encode_prompts(prompts, tokenizer, prompt_tokens)
    if not encoded:
        raise CollectError("no prompts to trace")
    ctx = engine.cfg.max_position_embeddings
    room = ctx - max_new_tokens - 1  # +1: the extra token that makes the last kept one routed
    for n, (task, _, ids) in enumerate(encoded):
        if len(ids) > room:
            raise CollectError(
                f"prompt {n} (task {task!r}) has {len(ids)} tokens; with {max_new_tokens} new tokens it needs "
                f"{len(ids) + max_new_tokens + 1} positions but the model's context is {ctx}. "
                f"Cut prompts to at most {room} tokens (prompt_tokens / --prompt-tokens) or generate fewer")

    num_layers = engine.cfg.num_moe_layers
    with tqdm(total=len(encoded), unit="prompt", desc="tracing", disable=not progress) as bar:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            recorder = _StepRecorder(num_layers)
            result = engine.generate([ids for _, _, ids in batch], max_new_tokens + 1,
                                     temperature=temperature, top_p=top_p, seed=seed + start,
                                     stop_at_eos=stop_at_eos, observers=[recorder],
                                     record_router_inputs=router_inputs)
            for i, (task, text, ids) in enumerate(batch):
                generated = result.tokens[i][:max_new_tokens]
                experts, weights, hidden = recorder.prompt_rows(i, len(ids), len(generated))
                yield PromptTrace(
                    prompt_id=first_prompt_id + start + i,
                    task=task,
                    text=text,
                    token_ids=np.asarray(ids + generated, dtype=np.int32),  # [T]
                    experts=experts,  # [T, L, k] int16, rank order
                    weights=weights,  # [T, L, k] float32
                    n_prefill=len(ids),
                    hidden=hidden,  # [T, L, H] float16 or None
                )
            bar.update(len(batch))


def collect_traces(engine: OffloadedEngine, prompts: Sequence[PromptSpec], tokenizer: Tokenizer | None,
                   max_new_tokens: int, **kwargs: Any) -> list[PromptTrace]:
    """All traces of `iter_traces` as a list (for small prompt sets; no corpus needed)."""
    return list(iter_traces(engine, prompts, tokenizer, max_new_tokens, **kwargs))


# ---------------------------------------------------------------- corpus selection


def select_documents(documents: Sequence[Document], *, per_task: int | None = None,
                     max_prompts: int | None = None, seed: int = 0) -> list[Document]:
    """A task-balanced, seed-deterministic choice of non-empty documents.

    Each task's documents are shuffled with a generator seeded by (seed, task) and
    cut to `per_task`; the tasks are then interleaved round-robin (tasks in order
    of first appearance) and the result cut to `max_prompts`, so every prefix is
    as balanced as the tasks' sizes allow.
    """
    by_task: dict[str, list[Document]] = {}
    for doc in documents:
        if doc.text:
            by_task.setdefault(doc.task, []).append(doc)
    queues = []
    for task, docs in by_task.items():
        docs = sorted(docs, key=lambda d: d.doc_id)  # independent of file order
        random.Random(f"{seed}/{task}").shuffle(docs)
        queues.append(docs[:per_task] if per_task is not None else docs)
    chosen: list[Document] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        chosen.extend(q[rank] for q in queues if rank < len(q))
    return chosen[:max_prompts] if max_prompts is not None else chosen


# ---------------------------------------------------------------- corpus -> trace set


@dataclasses.dataclass
class CollectSummary:
    out: str
    model: str
    corpus: str
    split: str
    prompts: int
    prompts_per_task: dict[str, int]
    prefill_tokens: int
    generated_tokens: int
    tokens: int
    prompts_cut: int  # prompts cut to prompt_tokens
    prompt_tokens: int | None
    max_new_tokens: int
    stopped_at_eos: int  # prompts that produced EOS before max_new_tokens
    router_inputs: bool
    device_slots_per_layer: int
    batch_size: int
    seconds: float
    tokens_per_s: float
    output_bytes: int


def collect_corpus_traces(model: str | os.PathLike, corpus: str | os.PathLike, out: str | os.PathLike, *,
                          split: str = "test", max_new_tokens: int = 32, max_prompts: int | None = None,
                          per_task: int | None = None, prompt_tokens: int | None = None, batch_size: int = 8,
                          device_experts: str | float | int | None = None,
                          host_experts: str | float | int | None = None, router_inputs: bool = False,
                          temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                          overwrite: bool = False, progress: bool = True) -> CollectSummary:
    """Trace the engine of checkpoint `model` over `split` of `corpus` into the trace set `out`.

    prompt_tokens None cuts only documents too long for the context (to
    context - max_new_tokens - 1 tokens). The trace set appears only once complete.
    """
    from ..data.corpus import Corpus
    from .engine import OffloadedEngine

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; remove it or pass --overwrite")
    for name, value in (("max_prompts", max_prompts), ("per_task", per_task)):
        if value is not None and value < 1:
            raise CollectError(f"{name} must be at least 1 (or unset for no limit), got {value}")
    documents = Corpus(corpus).load(split)  # FileNotFoundError / DataError name the problem
    chosen = select_documents(documents, per_task=per_task, max_prompts=max_prompts, seed=seed)
    if not chosen:
        raise CollectError(f"split {split!r} of {corpus} has no non-empty documents to trace")

    # Resolved: Orbax refuses relative checkpoint paths ("Checkpoint path should be absolute").
    engine = OffloadedEngine.from_checkpoint(Path(model).resolve(), device_experts=device_experts,
                                             host_experts=host_experts)
    tokenizer = engine.checkpoint.tokenizer
    room = engine.cfg.max_position_embeddings - max_new_tokens - 1
    if room < 1:
        raise CollectError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                           f"context of {engine.cfg.max_position_embeddings} tokens")
    cut_to = room if prompt_tokens is None else prompt_tokens
    sampling = "greedy" if temperature <= 0 else f"temperature {temperature}, top-p {top_p}"
    source = (f"emoe_jax engine ({engine.mode} mode, {engine.num_slots}/{engine.cfg.num_experts} device experts "
              f"per layer), {Path(corpus).name} split {split}, seed {seed}, {sampling}, "
              f"up to {max_new_tokens} new tokens, prompts cut to {cut_to} tokens")
    meta = trace_meta(engine, str(model), router_inputs=router_inputs, source=source)

    prompts = [(doc.task, doc.text) for doc in chosen]
    cut = sum(len(tokenizer.encode(text)) > cut_to for _, text in prompts)
    per_task_counts: dict[str, int] = {}
    prefill = generated = eos = 0
    with TraceWriter(out, meta, overwrite=overwrite) as writer:
        for trace in iter_traces(engine, prompts, tokenizer, max_new_tokens, batch_size=batch_size,
                                 router_inputs=router_inputs, prompt_tokens=cut_to, temperature=temperature,
                                 top_p=top_p, seed=seed, progress=progress):
            writer.add(trace)
            per_task_counts[trace.task] = per_task_counts.get(trace.task, 0) + 1
            prefill += trace.n_prefill
            generated += trace.n_tokens - trace.n_prefill
            eos += trace.n_tokens - trace.n_prefill < max_new_tokens
    seconds = time.perf_counter() - t0
    return CollectSummary(
        out=str(out), model=str(model), corpus=str(corpus), split=split, prompts=len(prompts),
        prompts_per_task=per_task_counts, prefill_tokens=prefill, generated_tokens=generated,
        tokens=prefill + generated, prompts_cut=int(cut), prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens, stopped_at_eos=int(eos), router_inputs=router_inputs,
        device_slots_per_layer=engine.num_slots, batch_size=batch_size, seconds=round(seconds, 2),
        tokens_per_s=round((prefill + generated) / seconds, 1) if seconds else 0.0,
        output_bytes=sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    )


# ---------------------------------------------------------------- CLI


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "collect",
        help="record routing traces of a checkpoint's engine over corpus documents",
        description=(
            "Run the offloaded engine (exact mode) of a converted checkpoint over documents of one corpus "
            "split and record, per prompt, the token ids (prompt then generated), each token's top-k experts "
            "and router weights in every MoE layer, the task label and the prompt text, optionally the "
            "router inputs. Tasks are balanced round-robin; the choice of documents depends only on --seed. "
            "The trace set (docs/traces.md) appears only once complete."
        ),
    )
    p.add_argument("out", type=Path, help="trace-set directory to create (must not exist unless --overwrite)")
    p.add_argument("--model", type=Path, required=True, help="converted checkpoint directory (with tokenizer)")
    p.add_argument("--corpus", type=Path, required=True, help="built corpus directory (python -m emoe_jax.data build)")
    p.add_argument("--split", default="test", help="corpus split: train, validation or test (default test)")
    p.add_argument("--max-new-tokens", type=_positive, default=32, metavar="N",
                   help="tokens generated per prompt, fewer when EOS comes first (default 32)")
    p.add_argument("--max-prompts", type=_positive, default=None, metavar="P", help="trace at most P prompts")
    p.add_argument("--per-task", type=_positive, default=None, metavar="P", help="at most P prompts per task")
    p.add_argument("--prompt-tokens", type=_positive, default=None, metavar="T",
                   help="cut each document to its first T tokens (default: only cut what the context cannot hold)")
    p.add_argument("--batch-size", type=_positive, default=8, metavar="B", help="prompts per engine call (default 8)")
    p.add_argument("--device-experts", default=None, metavar="F",
                   help="device slots per MoE layer, a fraction (0.25) or a count (16); default all. "
                        "Traces do not depend on it (exact mode), only speed does")
    p.add_argument("--host-experts", default=None, metavar="F",
                   help="host-tier capacity over all layers, a fraction or a count (default all)")
    p.add_argument("--router-inputs", action="store_true",
                   help="also store every token's router input (float16 [T, L, H]; large)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document choice and of sampling (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new set is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object with the summary instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    try:
        summary = collect_corpus_traces(
            args.model, args.corpus, args.out, split=args.split, max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts, per_task=args.per_task, prompt_tokens=args.prompt_tokens,
            batch_size=args.batch_size, device_experts=args.device_experts, host_experts=args.host_experts,
            router_inputs=args.router_inputs, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            overwrite=args.overwrite, progress=not args.no_progress and (not args.json or sys.stderr.isatty()),
        )
    except USER_ERRORS as e:
        return fail(e)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary)))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: CollectSummary) -> str:
    tasks = ", ".join(f"{task} {n}" for task, n in s.prompts_per_task.items())
    return "\n".join([
        f"wrote {s.out}: {s.output_bytes / 1e6:.2f} MB in {s.seconds:.1f} s ({s.tokens_per_s:,.1f} tokens/s)",
        f"  model        {s.model} ({s.device_slots_per_layer} device experts per layer)",
        f"  prompts      {s.prompts:,} from {s.corpus} [{s.split}]: {tasks}",
        f"  tokens       {s.tokens:,} = {s.prefill_tokens:,} prompt + {s.generated_tokens:,} generated",
        f"  cut prompts  {s.prompts_cut:,} (to {s.prompt_tokens or 'context'} tokens);"
        f" {s.stopped_at_eos:,} stopped at EOS before {s.max_new_tokens} tokens",
        f"  router inputs {'stored' if s.router_inputs else 'not stored'}",
    ])


__all__ = [
    "CollectError", "CollectSummary", "collect_corpus_traces", "collect_traces", "iter_traces",
    "select_documents", "trace_meta",
]
