"""emoe_jax.traces: the routing-trace format and trace importers.

A trace set records which routed experts every token chose in every MoE layer
(docs/traces.md). Read with TraceSet.load, write with TraceWriter; import the
MoE-Beyond DeepSeek-V2-Lite CSVs with import_moe_beyond or
`python -m emoe_jax.traces import-moe-beyond SRC OUT`; record our own engine's
routing with `python -m emoe_jax.traces collect --model DIR --corpus DIR OUT` (the recorder runs the
engine, so it lives above it: emoe_jax.runtime.trace_collect.collect_traces).
"""

from .format import PromptTrace, TraceFormatError, TraceMeta, TraceSet, TraceWriter
from .split import split_by_prompt_id
from .moe_beyond import ImportSummary, MoeBeyondFormatError, import_moe_beyond, parse_prompts_txt, parse_trace_csv

__all__ = [
    "ImportSummary",
    "MoeBeyondFormatError",
    "PromptTrace",
    "TraceFormatError",
    "TraceMeta",
    "TraceSet",
    "TraceWriter",
    "import_moe_beyond",
    "parse_prompts_txt",
    "parse_trace_csv",
    "split_by_prompt_id",
]
