"""emoe_jax.traces: the routing-trace format and trace importers.

A trace set records which routed experts every token chose in every MoE layer
(docs/traces.md). Read with TraceSet.load, write with TraceWriter; import the
MoE-Beyond DeepSeek-V2-Lite CSVs with import_moe_beyond or
`python -m emoe_jax.traces import-moe-beyond SRC OUT`; record our own engine's
routing with collect_traces or `python -m emoe_jax.traces collect --model DIR --corpus DIR OUT`.
"""

from .format import PromptTrace, TraceFormatError, TraceMeta, TraceSet, TraceWriter
from .collect import CollectError, collect_traces, iter_traces, trace_meta
from .moe_beyond import ImportSummary, MoeBeyondFormatError, import_moe_beyond, parse_prompts_txt, parse_trace_csv

__all__ = [
    "CollectError",
    "collect_traces",
    "iter_traces",
    "trace_meta",
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
]
