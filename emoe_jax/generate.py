"""Generate text with a fraction of the experts on the device: the main job.

    python -m emoe_jax.generate --prompt "def fibonacci(n):"
    python -m emoe_jax.generate --model out/olmoe --prompt "Hello" --device-experts 0.1 --json
    python -m emoe_jax.generate --model ~/models/OLMoE-1B-7B-Instruct --chat --prompt "Hi"   # HF folder

Steps: load the converted checkpoint (default: the embedded model in
checkpoints/embedded), tokenize the prompts with the checkpoint's tokenizer,
run the offloaded engine (exact by default), stream the text, print stats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from emoe_jax.cli import USER_ERRORS, fail
from emoe_jax.runtime.engine_config import EVICTION_SCORES
from emoe_jax.runtime.ingraph_predictors import IN_GRAPH_NAMES
from emoe_jax.runtime.policies import POLICIES, check_policy

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "embedded"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emoe_jax.generate",
        description="Generate with an MoE model whose experts are offloaded: only --device-experts of each "
                    "layer's experts live on the accelerator, the rest are fetched from host memory or disk "
                    "on demand. In exact mode (default) the output equals the all-resident model's. "
                    "Compiled steps are cached on disk (~/.cache/emoe_jax/xla, or $EMOE_JAX_CACHE/xla; "
                    "EMOE_JAX_COMPILE_CACHE=0 turns it off), so a repeated configuration starts fast.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="converted checkpoint directory (python -m emoe_jax.convert HF_DIR OUT_DIR makes one), or "
                        "a Hugging Face model folder (config.json + *.safetensors), converted once into the cache")
    p.add_argument("--cache-dir", default=None,
                   help="where a Hugging Face --model is converted to (default: $EMOE_JAX_CACHE, else "
                        "~/.cache/emoe_jax); the folder is named <model>-<source fingerprint>")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, rendered with the checkpoint's chat template (instruct "
                        "models) as transformers' apply_chat_template does")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--prompts-file", help="file with one prompt per line (added to --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 means greedy; > 0 samples (negative is an error)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in [0, 1] (with temperature > 0), as in transformers: the most "
                        "probable tokens whose mass reaches top-p are kept, and always the top token (0 = argmax)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-experts", default="0.25",
                   help="experts per MoE layer on the device, for every layer or as a comma list with one value per "
                        "MoE layer (4,8,8,16). Rule: a value with a decimal point is a fraction (0.25; 1.0 = all), "
                        "N%% a percentage (25%%, 100%%), 'all' every expert, and an integer a COUNT (16), so 1 "
                        "means one expert per layer")
    p.add_argument("--host-experts", default=None,
                   help="experts held in host memory in total over all MoE layers, same forms as --device-experts "
                        "(default: all)")
    p.add_argument("--mode", choices=["exact", "restricted"], default="exact",
                   help="exact: fetch every routed expert (output unchanged); restricted: eMoE's lossy mode, "
                        "tokens go to their best resident expert and nothing is fetched")
    p.add_argument("--policy", choices=list(POLICIES), default="lru",
                   help="device slot eviction: lru, lfu (staged path), or score (needs --predictor): evict the "
                        "expert the predictor's latest scores rank lowest, LRU breaking ties")
    p.add_argument("--admission", choices=["all", "cost"], default="all",
                   help="cost (with --policy score and an in-graph predictor): prefetch a predicted expert only if "
                        "it scores above the expert it would evict")
    p.add_argument("--eviction-scores", choices=list(EVICTION_SCORES), default="latest",
                   help="with --policy score: latest (each layer's nearest prediction, then its reuse scores "
                        "once it ran) or reuse (reuse scores only: what causal-reuse's and recency-reuse's learned "
                        "reuse models are for)")
    p.add_argument("--predictor", default="none",
                   help="prefetch experts this predictor expects (exact mode): spec-gating, prev-token and learned "
                        "run inside the one-jit decode step (and recency-reuse, which only ranks evictions); the "
                        "others (static-freq, moe-infinity, emoe, ...) on the host, in a background thread, on the "
                        "staged path (--predictor list shows those generate can run and what each needs); outputs "
                        "never change, only speed")
    p.add_argument("--train-traces", default=None,
                   help="trace set of this model for predictors fitted on traces (static-freq, moe-infinity, emoe)")
    p.add_argument("--predictor-checkpoint", default=None, help="learned predictor checkpoint directory")
    p.add_argument("--lookahead", type=int, default=None, help="predictor lookahead in layers (default: its own)")
    p.add_argument("--prefetch-k", type=int, default=None,
                   help="experts prefetched per predicted layer (default: the model's top-k)")
    p.add_argument("--no-reuse", action="store_true",
                   help="keep nothing on the device between steps (naive on-demand offloading baseline)")
    p.add_argument("--decode-path", choices=["auto", "onejit", "staged"], default="auto",
                   help="auto: each decode step is one jitted executable (routing, in-graph fetches of missed "
                        "experts from pinned host memory, mixing, sampling) where it applies, else the staged "
                        "per-layer loop, which is needed for a host tier smaller than all experts (disk tier), "
                        "host-only predictors, --no-reuse, --policy lfu, or a backend without pinned_host memory; "
                        "the stats name the path and why. onejit: insist (error if it cannot); staged: force the loop")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--no-stream", action="store_true", help="print text only at the end")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, stats)")
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise SystemExit(f"error: --prompts-file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give at least one --prompt (or --prompts-file)")
    for i, text in enumerate(prompts):
        if not text.strip():
            raise SystemExit(f"error: prompt {i} is empty; give some text")
    return prompts


def _check_model(path: Path) -> None:
    if path.exists():
        return
    if path == DEFAULT_MODEL:
        raise SystemExit(
            f"error: the embedded default model is missing at {path}. Reinstall from a full clone of the "
            "repository, or pass --model DIR with a checkpoint converted by python -m emoe_jax.convert.")
    raise SystemExit(f"error: --model {path} does not exist; convert a Hugging Face checkpoint with "
                     "python -m emoe_jax.convert HF_DIR OUT_DIR, or give the Hugging Face folder itself")


# Predictors that only rank evictions (they predict nothing to prefetch): useless without --policy score.
EVICTION_ONLY = ("recency-reuse",)


def runnable_predictors() -> dict[str, str]:
    """name -> what it is and what generate needs for it; oracles (simulator only) left out."""
    from .predict import available_predictors
    from .runtime.predictors import NEEDS_TRACES

    out = {"none": "no prefetch: fetch each expert when routed (default)"}
    for name, desc in available_predictors().items():
        if desc.startswith("ORACLE"):
            continue
        if name == "spec-gating":
            desc = "next layers' routers applied to the current router input (uses this model's own router weights)"
        if name == "learned":
            desc += "; or --predictor-checkpoint DIR"
        if name in NEEDS_TRACES:
            desc += "; needs --train-traces DIR (python -m emoe_jax.traces collect --model MODEL ...)"
        if name in EVICTION_ONLY:
            desc += "; use with --policy score --eviction-scores reuse"
        where = "in-graph" if name in IN_GRAPH_NAMES else "host thread, staged path"
        out[name] = f"[{where}] {desc}"
    return out


def note_device_experts(spec: str) -> str | None:
    """The one form users misread: `1` is one expert per layer, not all of them."""
    if any(x.strip() == "1" for x in str(spec).split(",")):
        return ("note: --device-experts 1 means ONE expert per MoE layer on the device (an integer is a count); "
                "write 1.0, 100% or all for every expert")
    return None


def encode_prompts(tokenizer, prompts: list[str], chat: bool, system: str | None = None) -> list[list[int]]:
    """Token ids per prompt: plain text with the checkpoint's BOS rule, or (chat) one user message
    rendered with the chat template, whose BOS is the template's own (no second one)."""
    if not chat:
        return [tokenizer.encode(p) for p in prompts]
    head = [{"role": "system", "content": system}] if system else []
    return [tokenizer.apply_chat_template([*head, {"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise  # argparse's own exits (--help: 0, bad flags: 2)
        print(e.code, file=sys.stderr)  # our "error: ..." messages
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # one line, no traceback; 130 = 128 + SIGINT, as shells report
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.predictor == "list":
        for name, desc in runnable_predictors().items():
            print(f"{name:22s} {desc}")
        return 0
    from .sampling import SamplingError, check_sampling

    try:
        check_sampling(args.temperature, args.top_p, names=("--temperature", "--top-p"))
    except SamplingError as e:
        raise SystemExit(f"error: {e}") from None
    if args.system and not args.chat:
        raise SystemExit("error: --system is a chat message; add --chat")
    try:
        check_policy(args.policy, args.predictor not in ("none", "on-demand"))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.admission == "cost" and args.policy != "score":
        raise SystemExit("error: --admission cost compares a prediction with its victim's score; add --policy score")
    if args.eviction_scores != "latest" and args.policy != "score":
        raise SystemExit("error: --eviction-scores chooses what score eviction ranks by; add --policy score")
    if args.predictor in EVICTION_ONLY and args.policy != "score":
        raise SystemExit(f"error: {args.predictor} predicts nothing to prefetch, it only ranks evictions; add "
                         "--policy score --eviction-scores reuse")
    prompts = _prompts(args)
    note = note_device_experts(args.device_experts)
    if note:
        print(note, file=sys.stderr)
    _check_model(Path(args.model))

    from .checkpoint import load_checkpoint
    from .checkpoint.resolve import resolve_model

    try:
        model_dir = resolve_model(args.model, cache_dir=args.cache_dir, progress=not args.json)
        # The tokenizer before the engine: a checkpoint without one fails in a second, not after loading.
        tokenizer = load_checkpoint(model_dir).tokenizer
        ids = encode_prompts(tokenizer, prompts, args.chat, args.system)
    except USER_ERRORS as e:
        return fail(e)

    import jax.numpy as jnp

    from .compile_cache import enable_compile_cache

    enable_compile_cache()  # a second run of a configuration loads its compiled steps from disk

    from .runtime.engine import OffloadedEngine
    from .runtime.predictors import runtime_predictor

    try:
        dtype = jnp.dtype(args.dtype) if args.dtype else None
        predictor = None
        if args.predictor not in ("none", "on-demand"):
            predictor = runtime_predictor(args.predictor, load_checkpoint(model_dir).config, model_dir,
                                          args.train_traces, args.lookahead, args.predictor_checkpoint)
        engine = OffloadedEngine.from_checkpoint(model_dir, dtype=dtype, device_experts=args.device_experts,
                                                 host_experts=args.host_experts, mode=args.mode,
                                                 policy=args.policy, admission=args.admission,
                                                 eviction_scores=args.eviction_scores, predictor=predictor,
                                                 prefetch_k=args.prefetch_k, reuse=not args.no_reuse,
                                                 decode_path=args.decode_path)
        preload_bytes = _preload_restricted(engine) if args.mode == "restricted" else 0
        stream = not args.json and not args.no_stream and len(prompts) == 1
        printer = _StreamPrinter(tokenizer, "" if args.chat else prompts[0]) if stream else None
        result = engine.generate(ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 seed=args.seed, on_token=printer)
    except USER_ERRORS as e:
        return fail(e)
    texts = [tokenizer.decode(t) for t in result.tokens]
    stats = {**result.stats, "memory": engine.memory_report()}
    if args.mode == "restricted":
        stats["preload_h2d_bytes"] = preload_bytes
    if args.json:
        print(json.dumps({"text": texts, "tokens": result.tokens, "stats": stats}))
        return 0
    if printer is not None:
        printer.finish(result.tokens[0])
    else:
        for prompt, text in zip(prompts, texts):
            print(f"--- {prompt!r}\n{'' if args.chat else prompt}{text}\n")
    print(format_stats(stats), file=sys.stderr)
    return 0


def _preload_restricted(engine) -> int:
    """Restricted mode needs a resident set up front. Without a predictor (see
    emoe_jax.predict) we keep the lowest-numbered experts and say so. Returns the bytes
    moved host -> device for it (the run's own stats start after, so they would say 0)."""
    print("note: restricted mode without a predictor keeps experts 0..S-1 of each layer resident",
          file=sys.stderr)
    before = engine.device_cache.stats.bytes_in
    for moe_layer in range(engine.cfg.num_moe_layers):
        engine.preload(moe_layer, range(engine.slots[moe_layer]))
    return engine.device_cache.stats.bytes_in - before


class _StreamPrinter:
    """Prints new text as tokens arrive (decoding the whole sequence so multi-byte tokens stay intact)."""

    def __init__(self, tokenizer, prompt: str):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""
        print(prompt, end="", flush=True)

    def __call__(self, step, tokens) -> None:
        if tokens[0] < 0:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, final_ids) -> None:
        text = self.tokenizer.decode(final_ids)
        if text.startswith(self.shown):
            print(text[len(self.shown):], end="")
        print(flush=True)


def format_stats(s: dict) -> str:
    mib = 1 / 2**20
    lines = [
        "---- stats ----",
        f"prefill: {s['prefill_tokens']} tokens in {s['prefill_s']:.3f} s ({s['prefill_tokens_per_s']:.1f} tok/s)",
        f"decode:  {s['decode_tokens']} tokens in {s['decode_s']:.3f} s ({s['decode_tokens_per_s']:.1f} tok/s)",
        f"device experts: {s['device_slots_per_layer']} slots/layer, {s['device_expert_bytes'] * mib:.1f} MiB "
        f"of {s['all_expert_bytes'] * mib:.1f} MiB of all experts "
        f"({100 * s['device_expert_bytes'] / max(s['all_expert_bytes'], 1):.0f}%)",
        f"device hit rate: {100 * s['device_hit_rate']:.1f}% ({s['device']['hits']} hits, "
        f"{s['device']['misses']} misses, {s['device']['evictions']} evictions, {s['waves']} waves)",
        f"host hit rate:   {100 * s['host_hit_rate']:.1f}% (capacity {s['host_capacity_experts']} experts, "
        f"{s['host']['misses']} disk reads)",
        f"moved: host->device {s['h2d_bytes'] * mib:.1f} MiB, disk->host {s['disk_to_host_bytes'] * mib:.1f} MiB"
        + (f", plus the resident set loaded up front: {s['preload_h2d_bytes'] * mib:.1f} MiB"
           if "preload_h2d_bytes" in s else ""),
        f"stalled on misses: {s['stall_s']:.3f} s; compilations: {s['compiles']}; mode: {s['mode']}; "
        f"eviction: {s.get('policy', 'lru')}" + (", cost-aware admission" if s.get("admission") == "cost" else ""),
        f"decode path: {s['decode_path']}" + (f" ({s['decode_path_reason']})" if s.get("decode_path_reason") else ""),
    ]
    pf = s.get("prefetch")
    if pf and pf.get("in_graph"):
        lines.append(f"prefetch ({s['predictor']}, in-graph): {pf['completed']} copied, {pf['timely']} timely hits, "
                     f"{pf['wasted']} unused")
    elif pf:
        lines.append(f"prefetch ({s['predictor']}): {pf['completed']} arrived, {pf['timely']} timely hits, "
                     f"{pf['late']} late (waited {pf['late_wait_s']:.3f} s), {pf['wasted']} unused, "
                     f"{pf['dropped']} dropped")
    if s["compiles"]:
        lines.append("note: times include XLA compilation of this first run; "
                     "python -m emoe_jax.bench runtime reports warm figures")
    mem = s.get("memory")
    if mem:
        lines.append(f"memory ({mem['platform']}): slot buffers {mem['slot_buffer_bytes'] * mib:.1f} MiB, "
                     f"dense params {mem['dense_param_bytes'] * mib:.1f} MiB"
                     + (f", in use {mem['bytes_in_use'] * mib:.1f} MiB" if mem.get("bytes_in_use") else "")
                     + (f", compiled decode scratch per layer {mem['decode_layer_temp_bytes'] * mib:.2f} MiB"
                        if mem.get("decode_layer_temp_bytes") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
