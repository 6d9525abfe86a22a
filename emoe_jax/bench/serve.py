"""Request-stream benchmark: eMoE serving vs an exact LRU engine, under Poisson arrivals.

    python -m emoe_jax.bench serve                       # embedded model, 25% device experts, both mixes
    python -m emoe_jax.bench serve --requests 80 --load 1,4,16 --json

Steps:
  1. Workload: prompts of several tasks from the corpus (validation split), each
     cut to W tokens (W uniform in [--min-prompt, --max-prompt]); every request
     asks for G tokens, G fixed per task (task-specific output lengths). Arrival
     times are a Poisson process of rate load / s1 for each --load (s1: the
     measured service time of one request alone on the exact engine). Two task mixes: ``uniform`` (each request's task
     drawn uniformly, as in the eMoE paper) and ``multitenant`` (tenants = tasks;
     two tenants at a time send alternating requests in sessions of --session
     requests each, then two others take over: interleaved, bursty locality).
  2. Configurations, each on a fresh engine with the same device budget:
     - ``fcfs-lru``: exact mode, LRU device cache, FCFS batches (no eMoE);
     - ``slo-lru``: the same engine with the SLO-aware scheduler (Alg. 1);
     - ``emoe-fcfs``: the eMoE loader (EMoESystem: restricted mode, periodic
       eMoE-A forecast + Eq. 2 selection) with FCFS batches;
     - ``emoe-slo``: the eMoE loader + the SLO-aware scheduler (Alg. 1 with the
       Eq. 3 estimate, calibrated online from measured runs).
  3. Serving loop on a virtual clock: arrivals happen at their virtual times;
     when the engine is free the policy picks a batch from the requests that
     have arrived; the batch (expert reloads included) runs for real and the
     clock advances by its measured wall time. TTFT and completion of every
     request come from per-token timestamps inside the run (``on_token``).
     Only service times are measured; queueing is computed. Compilation is
     done before the clock starts (every batch size is warmed up).
  4. Reported per configuration and mix: TTFT and end-to-end latency (mean,
     p50, p90), TTFT-SLO attainment, throughput (generated tokens and requests
     per second of virtual time), bytes of experts moved and reload time, and
     the token agreement of each request's output with the exact configuration's
     (all output tokens, and the first token alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from emoe_jax.cli import USER_ERRORS, fail
from ..atomic_io import write_json_atomic
from emoe_jax.errors import EmoeError
from emoe_jax.emoe.latency import LatencyModel
from emoe_jax.emoe.scheduler import Request, check_fits, fcfs, slo_admit
from emoe_jax.runtime.engine import prompt_bucket

CONFIGS = ("fcfs-lru", "slo-lru", "emoe-fcfs", "emoe-slo")
MIXES = ("uniform", "multitenant")
# Expected output tokens per task (task-specific output lengths) and TTFT SLO factors (x s1):
# chat-like tasks get tight SLOs, document-like ones loose.
DEFAULT_OUTPUT = {"dialogue": 8, "news": 16, "german": 12, "spanish": 12, "code": 24, "docs": 20, "math": 16}
DEFAULT_SLO_FACTOR = {"dialogue": 2.0, "news": 4.0, "german": 3.0, "spanish": 3.0, "code": 4.0, "docs": 8.0,
                      "math": 6.0}  # fmt: skip


class ServeError(EmoeError):
    """Bad serving benchmark settings."""


@dataclasses.dataclass(frozen=True)
class WorkItem:
    rid: int
    task: str  # the true task (the workload's label)
    text: str
    ids: tuple[int, ...]
    arrival: float
    output_tokens: int


# ---------------------------------------------------------------- workload


def task_sequence(mix: str, tasks: Sequence[str], n: int, rng: np.random.Generator, session: int = 6) -> list[str]:
    if mix == "uniform":
        return [tasks[int(i)] for i in rng.integers(0, len(tasks), n)]
    if mix == "multitenant":
        if len(tasks) < 2:
            raise ServeError("the multitenant mix needs at least two tasks")
        out: list[str] = []
        while len(out) < n:
            a, b = rng.choice(len(tasks), 2, replace=False)
            out.extend([tasks[int(a)], tasks[int(b)]] * session)  # two tenants interleaved
        return out[:n]
    raise ServeError(f"unknown mix {mix!r}; choose from {', '.join(MIXES)}")


def build_workload(prompts: Mapping[str, Sequence[tuple[str, Sequence[int]]]], mix: str, n: int, rate: float,
                   output_tokens: Mapping[str, int], seed: int = 0, session: int = 6) -> list[WorkItem]:
    """``n`` requests with Poisson arrivals of ``rate`` per second; prompts: {task: [(text, ids), ...]}."""
    if n < 1 or not rate > 0:
        raise ServeError(f"need at least one request and a positive rate, got {n} and {rate}")
    tasks = sorted(prompts)
    missing = [t for t in tasks if t not in output_tokens]
    if missing:
        raise ServeError(f"no output length for task(s) {missing}; give --new-tokens task=G,...")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))  # [n] seconds
    items = []
    for rid, (task, t) in enumerate(zip(task_sequence(mix, tasks, n, rng, session), arrivals)):
        text, ids = prompts[task][int(rng.integers(0, len(prompts[task])))]
        items.append(WorkItem(rid, task, text, tuple(int(x) for x in ids), float(t), int(output_tokens[task])))
    return items


# ---------------------------------------------------------------- serving loop


@dataclasses.dataclass
class Served:
    rid: int
    task: str
    scheduled_as: str
    arrival: float
    start: float
    ttft: float
    e2e: float
    slo: float
    tokens: list[int]


def _run_batch(engine, system, batch: Sequence[WorkItem]) -> tuple[Any, list[float], float]:
    """Run one batch for real; returns (result, per-step token times from the call's start, reload seconds)."""
    max_new = max(w.output_tokens for w in batch)
    prompts = [list(w.ids) for w in batch]
    times: list[float] = []
    t0 = time.perf_counter()
    on_token = lambda step, ids: times.append(time.perf_counter() - t0)  # noqa: E731
    if system is None:
        result = engine.generate(prompts, max_new, stop_at_eos=False, on_token=on_token)
    else:
        result = system.generate(prompts, max_new, output_limits=[w.output_tokens for w in batch],
                                 stop_at_eos=False, on_token=on_token)  # fmt: skip
    return result, times, time.perf_counter() - t0


def serve(items: Sequence[WorkItem], engine, *, policy: str, system=None, classify: Callable[[str], str],
          slo: Mapping[str, float], token_cap: int, max_batch: int, latency: LatencyModel,
          progress: bool = False) -> dict:
    """Serve ``items`` (sorted by arrival) on ``engine`` (or ``system``, an EMoESystem around it)."""
    from tqdm.auto import tqdm

    if policy not in ("fcfs", "slo"):
        raise ServeError(f"unknown policy {policy!r}; choose fcfs or slo")
    items = sorted(items, key=lambda w: (w.arrival, w.rid))
    by_rid = {w.rid: w for w in items}
    # The server knows a request's prompt and its requested output length (max tokens); its task,
    # and so the SLO it schedules for, only through task extraction.
    tasks = {w.rid: classify(w.text) for w in items}
    requests = {w.rid: Request(w.rid, tasks[w.rid], w.arrival, len(w.ids), w.output_tokens,
                               float(slo.get(tasks[w.rid], min(slo.values()))))
                for w in items}  # fmt: skip
    check_fits(list(requests.values()), token_cap, max_batch)
    now, nxt, waiting = 0.0, 0, []
    served: list[Served] = []
    totals = {"busy_s": 0.0, "reload_s": 0.0, "expert_bytes_moved": 0, "experts_loaded": 0, "forecasts": 0,
              "compiles_while_serving": 0}  # fmt: skip
    with tqdm(total=len(items), desc=f"serve {policy}", unit="req", disable=not progress) as bar:
        while nxt < len(items) or waiting:
            while nxt < len(items) and items[nxt].arrival <= now:
                waiting.append(requests[items[nxt].rid])
                nxt += 1
            if not waiting:
                now = items[nxt].arrival
                continue
            if policy == "fcfs":
                chosen = fcfs(waiting, token_cap, max_batch)
            else:
                def loads(batch, waiting=waiting):
                    return system.expected_experts_to_load(_scheduled(batch, waiting, system)) if system else 0
                chosen = slo_admit(waiting, now, latency, token_cap, max_batch, loads)
            ids = {r.rid for r in chosen}
            rest = [r for r in waiting if r.rid not in ids]
            batch = [by_rid[r.rid] for r in chosen]
            t0 = time.perf_counter()
            reload = system.prepare(_scheduled(chosen, rest, system)) if system is not None else None
            load_s = time.perf_counter() - t0
            waiting = rest
            result, times, run_s = _run_batch(engine, system, batch)
            service = load_s + run_s
            for w, r, toks in zip(batch, chosen, result.tokens):
                waited = now - w.arrival
                served.append(Served(w.rid, w.task, r.task, w.arrival, now, waited + load_s + times[0],
                                     waited + load_s + times[w.output_tokens - 1], float(slo[w.task]),
                                     toks[: w.output_tokens]))  # fmt: skip
            st = result.stats
            latency.observe(prefill_s=st["prefill_s"], prefill_tokens=sum(len(w.ids) for w in batch),
                            decode_s=st["decode_s"], decode_tokens=st["decode_tokens"], load_s=load_s,
                            experts_loaded=reload.experts_loaded if reload else 0)  # fmt: skip
            if reload is not None:
                totals["reload_s"] += reload.seconds
                totals["expert_bytes_moved"] += reload.bytes_moved
                totals["experts_loaded"] += reload.experts_loaded
                totals["forecasts"] += reload.forecasts
            totals["expert_bytes_moved"] += int(st.get("h2d_bytes") or 0)  # exact mode: misses fetched on demand
            totals["compiles_while_serving"] += int(st.get("compiles") or 0)
            totals["busy_s"] += service
            now += service
            bar.update(len(batch))
    return _summary(served, totals, latency)


def _scheduled(batch: Sequence[Request], waiting: Sequence[Request], system) -> list[tuple[str, int]]:
    """The requests Eq. 2 plans for: the batch, then the waiting queue, up to p prompts."""
    ids = {r.rid for r in batch}
    rest = sorted((r for r in waiting if r.rid not in ids), key=lambda r: (r.arrival, r.rid))
    upto = max(system.period if system is not None else 0, len(batch))
    return [(r.task, r.prompt_tokens) for r in [*batch, *rest][:upto]]


def _pct(x: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(x, np.float64), q)) if len(x) else float("nan")


def _summary(served: list[Served], totals: dict, latency: LatencyModel) -> dict:
    served = sorted(served, key=lambda s: s.rid)
    ttft = [s.ttft for s in served]
    e2e = [s.e2e for s in served]
    first = min(s.arrival for s in served)
    end = max(s.arrival + s.e2e for s in served)
    tokens = sum(len(s.tokens) for s in served)
    return {
        "requests": len(served),
        "ttft_mean_s": float(np.mean(ttft)), "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90),
        "e2e_mean_s": float(np.mean(e2e)), "e2e_p50_s": _pct(e2e, 50), "e2e_p90_s": _pct(e2e, 90),
        "slo_attainment": float(np.mean([s.ttft <= s.slo for s in served])),
        "makespan_s": end - first, "generated_tokens": tokens,
        "throughput_tokens_per_s": tokens / (end - first), "throughput_requests_per_s": len(served) / (end - first),
        **totals,
        "task_extraction_accuracy": float(np.mean([s.task == s.scheduled_as for s in served])),
        "latency_model": latency.as_dict(),
        "per_request": [dataclasses.asdict(s) for s in served],
    }  # fmt: skip


def agreement(run: dict, reference: dict) -> tuple[float, float]:
    """(mean fraction of output tokens equal to the reference run's, fraction of equal first tokens).
    Greedy outputs: after the first difference the continuations differ too; the first token is the
    model's next-token choice on the same prompt."""
    ref = {r["rid"]: r["tokens"] for r in reference["per_request"]}
    pairs = [(r["tokens"], ref[r["rid"]]) for r in run["per_request"] if len(ref[r["rid"]])]
    if not pairs:
        return float("nan"), float("nan")
    return (float(np.mean([np.mean([a == b for a, b in zip(x, y)]) for x, y in pairs])),
            float(np.mean([x[0] == y[0] for x, y in pairs])))  # fmt: skip


def warm_up(engine, prompts: Sequence[Sequence[int]], max_new: int, max_batch: int, repeats: int = 2,
            seed: int = 0) -> None:
    """Compile before the clock starts: every batch size with every prompt-length bucket of the workload
    (prompts of that bucket only; the KV length follows from the bucket), ``repeats`` times with different
    prompts so that exact mode meets both its paths (needed experts fit the slots, or stream through in
    waves). Then the device cache is emptied: every configuration starts cold. Compilations that still
    happen while serving are counted and reported."""
    rng = np.random.default_rng(seed)
    cache = engine.device_cache
    if engine.mode == "restricted":  # routing needs resident experts
        for layer in range(engine.cfg.num_moe_layers):
            engine.preload(layer, range(cache.slots[layer]))
    groups: dict[int, list[Sequence[int]]] = {}
    for ids in prompts:
        groups.setdefault(prompt_bucket(len(ids)), []).append(ids)
    for _ in range(repeats):
        for group in groups.values():
            for b in range(1, max_batch + 1):
                batch = [list(group[int(i)]) for i in rng.integers(0, len(group), b)]
                engine.generate(batch, max_new, stop_at_eos=False)
    engine.residency.evict_all()


def markdown(results: dict) -> str:
    head = ("| mix | load | config | TTFT mean / p90 (s) | e2e mean / p90 (s) | TTFT SLO met | tokens/s | busy s "
            "| experts moved (MiB) | reload s | agreement: all / first token |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in results["runs"]:
        lines.append(f"| {r['mix']} | {r['load']:g} | {r['config']} | {r['ttft_mean_s']:.3f} / {r['ttft_p90_s']:.3f} | "
                     f"{r['e2e_mean_s']:.3f} / {r['e2e_p90_s']:.3f} | {100 * r['slo_attainment']:.0f}% | "
                     f"{r['throughput_tokens_per_s']:.1f} | {r['busy_s']:.1f} | "
                     f"{r['expert_bytes_moved'] / 2**20:.1f} | {r['reload_s']:.3f} | "
                     f"{100 * r['agreement_vs_exact']:.0f}% / {100 * r['first_token_agreement_vs_exact']:.0f}% |")  # fmt: skip
    return "\n".join(lines)


def run_benchmark(prompts, make_engine: Callable[[str], Any], predictor, *, classify, sensitivity=None,
                  mixes=MIXES, configs=CONFIGS, requests: int = 40, loads: Sequence[float] = (2.0,),
                  period: int = 40, max_batch: int = 4, token_cap: int = 512,
                  output_tokens: Mapping[str, int] | None = None, slo_factor: Mapping[str, float] | None = None,
                  slo: Mapping[str, float] | None = None, session: int = 6, seed: int = 0, warmup_repeats: int = 2,
                  progress: bool = False) -> dict:
    """Every configuration on every (mix, load). prompts {task: [(text, ids)]}; make_engine(mode) -> a fresh
    engine. Returns {"runs": [{"mix", "load", "config", metrics...}], ...}."""
    from emoe_jax.emoe.system import EMoESystem

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ServeError(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    tasks = sorted(prompts)
    output_tokens = {t: int((output_tokens or DEFAULT_OUTPUT).get(t, 16)) for t in tasks}
    all_prompts = [ids for v in prompts.values() for _, ids in v]
    max_new = max(output_tokens.values())
    warmed: set[str] = set()

    def fresh(config):
        mode = "exact" if config.endswith("lru") else "restricted"
        engine = make_engine(mode)
        # Compiled code is shared by engines of one model and mode: warm each mode once.
        warm_up(engine, all_prompts, max_new, max_batch, 0 if mode in warmed else warmup_repeats, seed)
        warmed.add(mode)
        system = None if mode == "exact" else EMoESystem(engine, predictor, sensitivity=sensitivity,
                                                         period=period, output_tokens=output_tokens)
        return engine, system

    # s1: one request alone on the exact engine, second (warm) run: the unit of the arrival rate and SLOs.
    engine, _ = fresh("fcfs-lru")
    some = list(next(iter(prompts.values()))[0][1])
    for _ in range(2):
        t0 = time.perf_counter()
        engine.generate([some], int(np.median(list(output_tokens.values()))), stop_at_eos=False)
        s1 = time.perf_counter() - t0
    slos = dict(slo) if slo else {t: (slo_factor or DEFAULT_SLO_FACTOR).get(t, 4.0) * s1 for t in tasks}
    out = {"s1_s": s1, "slo_s": slos, "output_tokens": output_tokens, "runs": []}
    for mix in mixes:
        for load in loads:
            rate = load / s1
            items = build_workload(prompts, mix, requests, rate, output_tokens, seed, session)
            results = {}
            for config in configs:
                engine, system = fresh(config)
                lat = LatencyModel(1e-3, 1e-3, 1e-2)  # starting guesses; calibrated from the runs
                policy = "slo" if "slo" in config.split("-") else "fcfs"
                res = serve(items, engine, policy=policy, system=system, classify=classify, slo=slos,
                            token_cap=token_cap, max_batch=max_batch, latency=lat, progress=progress)
                res.update(mix=mix, load=load, rate_per_s=rate, config=config,
                           device_expert_bytes=engine.device_cache.device_bytes)
                results[config] = res
            ref = results.get("fcfs-lru", results.get("slo-lru"))
            for r in results.values():
                r["agreement_vs_exact"], r["first_token_agreement_vs_exact"] = (
                    agreement(r, ref) if ref is not None else (float("nan"), float("nan")))
            out["runs"].extend(results.values())
    return out


def _parse_map(text: str | None, cast) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if not value:
            raise ServeError(f"expected task=value pairs separated by commas, got {part!r}")
        out[key.strip()] = cast(value)
    return out



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emoe_jax.bench serve", description=__doc__.split("\n\n")[0] +
                                " Service times are measured for real; arrivals run on a virtual clock (see "
                                "docs/emoe.md).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="checkpoints/embedded")
    p.add_argument("--corpus", default="out/corpus", help="task-labelled corpus (python -m emoe_jax.data build)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--device-experts", default="0.25", help="device expert budget per layer (fraction or count)")
    p.add_argument("--requests", type=int, default=40, help="requests per (mix, load)")
    p.add_argument("--load", default="2,8", help="arrival rates, comma-separated, in units of 1/s1 (s1: one "
                   "request alone on the exact engine)")  # fmt: skip
    p.add_argument("--mix", default=",".join(MIXES), help="task mixes: uniform, multitenant")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configurations to run")
    p.add_argument("--period", type=int, default=10, help="eMoE: forecast and reselect every p prompts (the paper's "
                   "p = 40 is the system's default; the short streams here use 10 so that forecasts recur)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--token-cap", type=int, default=512, help="KV tokens (prompt + output) per batch")
    p.add_argument("--min-prompt", type=int, default=33, help="shortest prompt (tokens)")
    p.add_argument("--max-prompt", type=int, default=64, help="longest prompt (tokens)")
    p.add_argument("--prompts-per-task", type=int, default=8, help="distinct corpus documents per task")
    p.add_argument("--new-tokens", default=None, help="output tokens per task, e.g. dialogue=8,code=24 "
                   f"(default {DEFAULT_OUTPUT})")  # fmt: skip
    p.add_argument("--slo", default=None, help="TTFT SLO seconds per task, e.g. dialogue=0.5,docs=2 "
                   f"(default: factor x s1, factors {DEFAULT_SLO_FACTOR})")  # fmt: skip
    p.add_argument("--session", type=int, default=6, help="multitenant: requests per tenant session")
    p.add_argument("--sensitivity", default="checkpoints/predictors/emoe-sensitivity.json",
                   help="s(task, layer) profile (python -m emoe_jax.emoe.sensitivity); 'none' for s = 1")
    p.add_argument("--classifier", default="checkpoints/predictors/task-nb.npz",
                   help="naive-Bayes task classifier (.npz), or 'keywords' for the keyword matcher")
    p.add_argument("--train-traces", default=None, help="trace set to fit eMoE's profiles and eMoE-A on "
                   "(default: trace --profile-prompts train-split prompts per task now)")  # fmt: skip
    p.add_argument("--profile-prompts", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the full results JSON here (atomically)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (per-request records included)")
    args = p.parse_args(argv)
    try:
        results = _main(args)
    except USER_ERRORS as exc:
        return fail(exc)
    if args.out:
        write_json_atomic(Path(args.out), results)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"# serve: {results['machine']}, {results['model']}, device experts {results['device_experts']}")
        print(f"s1 = {results['s1_s']:.3f} s (arrival rate = load / s1), {results['requests']} requests per "
              f"(mix, load)\n")
        print(markdown(results))
    return 0


def _main(args) -> dict:
    from emoe_jax.emoe.prompts import corpus_texts, encode_cut
    from emoe_jax.emoe.system import fit_emoe_predictor
    from emoe_jax.predict.emoe import load_sensitivity
    from emoe_jax.predict.emoe_task import CORPUS_KEYWORDS, KeywordTaskMatcher, NaiveBayesTaskClassifier
    from emoe_jax.runtime.engine import OffloadedEngine

    if not 1 <= args.min_prompt <= args.max_prompt:
        raise ServeError(f"need 1 <= --min-prompt <= --max-prompt, got {args.min_prompt}, {args.max_prompt}")
    try:
        loads = [float(x) for x in str(args.load).split(",")]
    except ValueError:
        raise ServeError(f"--load takes comma-separated numbers, got {args.load!r}") from None
    if args.requests < 1 or min(loads) <= 0 or args.period < 1:
        raise ServeError("--requests and --period must be >= 1 and every --load > 0")
    mixes = args.mix.split(",")
    bad = [m for m in mixes if m not in MIXES]
    if bad:
        raise ServeError(f"unknown mix(es) {bad}; choose from {', '.join(MIXES)}")
    tasks = args.tasks.split(",") if args.tasks else None
    if not Path(args.model).is_dir():
        raise ServeError(f"model checkpoint {args.model} does not exist (a converted checkpoint directory)")
    texts = corpus_texts(args.corpus, "validation", args.prompts_per_task, tasks, args.seed)

    def make_engine(mode):
        return OffloadedEngine.from_checkpoint(args.model, device_experts=args.device_experts, mode=mode)

    probe = OffloadedEngine.from_checkpoint(args.model, device_experts=1.0)
    tok = probe.checkpoint.tokenizer
    rng = np.random.default_rng(args.seed)
    prompts = {}
    for task, xs in texts.items():
        prompts[task] = []
        for x in xs:
            ids = encode_cut(tok, x, int(rng.integers(args.min_prompt, args.max_prompt + 1)))
            prompts[task].append((tok.decode(ids), ids))
    if args.train_traces:
        from emoe_jax.traces import TraceSet

        predictor = fit_emoe_predictor(TraceSet.load(args.train_traces), period=args.period)
    else:
        train = corpus_texts(args.corpus, "train", args.profile_prompts, tasks, args.seed)
        spec = [(t, encode_cut(tok, x, args.max_prompt)) for t, xs in train.items() for x in xs]
        predictor = fit_emoe_predictor(engine=probe, prompts=spec, max_new_tokens=8, period=args.period,
                                       progress=not args.json)  # fmt: skip
    num_layers = probe.cfg.num_moe_layers
    sensitivity = None if args.sensitivity in (None, "none") else load_sensitivity(args.sensitivity, num_layers)
    if args.classifier == "keywords":
        extractor = KeywordTaskMatcher(CORPUS_KEYWORDS, default="dialogue")
    else:
        extractor = NaiveBayesTaskClassifier.load(args.classifier)
    results = run_benchmark(prompts, make_engine, predictor, classify=extractor.classify, sensitivity=sensitivity,
                            mixes=mixes, configs=args.configs.split(","), requests=args.requests, loads=loads,
                            period=args.period, max_batch=args.max_batch, token_cap=args.token_cap,
                            output_tokens=_parse_map(args.new_tokens, int), slo=_parse_map(args.slo, float),
                            session=args.session, seed=args.seed, progress=not args.json)  # fmt: skip
    results.update(model=str(args.model), device_experts=args.device_experts, requests=args.requests,
                   load=args.load, period=args.period, max_batch=args.max_batch, token_cap=args.token_cap,
                   sensitivity=args.sensitivity, classifier=args.classifier,
                   machine=f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), JAX CPU backend")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
