"""Device check: host->device expert fetches, copy/compute overlap, decode tokens/s per path.

    python -m emoe_jax.bench device-check --json --out device_check.json   # on a GPU (~5 min on an H100)
    python -m emoe_jax.bench device-check --small                           # tiny shapes, any backend (CPU: ~1 min)

The questions DESIGN.md leaves open until a GPU is lent, measured on whatever backend runs it:
  1. fetch: bandwidth of in-graph expert fetches, the one-jit step's exact form
     (`dynamic_index_in_dim(pinned_host stack, traced expert)`, at once `device_put(...,
     Space.Device)`, donated `dynamic_update_index_in_dim` at a traced slot), n experts one by one,
     unrolled / each under a `lax.cond` / in a `fori_loop`; against one in-graph slice of the same
     n experts and a plain `jax.device_put` of the same bytes from pinned_host and from NumPy.
     The fetched slots are compared byte for byte with NumPy.
  2. overlap: (a) only the fetches, (b) only expert compute (SwiGLU over resident slots, repeated
     until it takes about as long as (a)), (c) both in one executable with no data dependence;
     overlap = (t_a + t_b - t_c) / min(t_a, t_b): 1 = the copies hide under compute, 0 = serial.
  3. decode: tokens/s of a random DeepSeek-V2-Lite-shaped model (real layer shapes, fewer layers)
     at each device-expert fraction: fused all-resident, staged, onejit, onejit + in-graph
     speculative gating; ratio to fused and device hit rate.
Each section runs on its own: a failure is reported with its message and the others still run.
"""

from __future__ import annotations

import os

# Must precede the first use of a GPU backend, or JAX grabs 75% of device memory up front and
# memory_stats() says nothing about what this check uses. No effect once a backend is up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from emoe_jax.cli import fail
from ..config import PRESETS, tiny_config  # noqa: E402
from ..atomic_io import write_json_atomic  # noqa: E402
from .timing import median_time  # noqa: E402

FETCH_FORMS = ("unrolled", "cond", "fori_loop")
DECODE_CONFIGS = ("fused", "staged", "onejit", "onejit+spec-gating")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section measures; `small` fits a 2-core CPU in about a minute."""

    stack: tuple[int, int, int]  # fetch/overlap host stack [E, H, I]
    dtype: str
    fetch_counts: tuple[int, ...]  # n experts fetched per call
    overlap_n: int
    overlap_tokens: int  # rows of x in the overlap compute
    repeats: int
    decode_model: str  # "deepseek-v2-lite" (preset shapes) or "tiny"
    decode_layers: int
    fractions: tuple[float, ...]
    batch: int
    prompt_len: int
    new_tokens: int
    decode_repeats: int
    decode_budget_s: float  # rows not started by then are reported as skipped


def default_sizes(small: bool) -> Sizes:
    if small:
        return Sizes(stack=(16, 128, 256), dtype="float32", fetch_counts=(4, 16), overlap_n=8, overlap_tokens=4,
                     repeats=5, decode_model="tiny", decode_layers=3, fractions=(1.0, 0.25), batch=1,
                     prompt_len=8, new_tokens=6, decode_repeats=1, decode_budget_s=120.0)
    # One DeepSeek-V2-Lite expert matrix: 2048 x 1408 bf16 = 5.8 MB; 64 experts per layer.
    return Sizes(stack=(64, 2048, 1408), dtype="bfloat16", fetch_counts=(8, 16, 32, 64), overlap_n=32,
                 overlap_tokens=8, repeats=5, decode_model="deepseek-v2-lite", decode_layers=6,
                 fractions=(1.0, 0.5, 0.25, 0.1), batch=1, prompt_len=32, new_tokens=32, decode_repeats=2,
                 decode_budget_s=180.0)


def _on(device, kind: str) -> SingleDeviceSharding:
    return SingleDeviceSharding(device, memory_kind=kind)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}


# ---- 1. fetch bandwidth ---------------------------------------------------------------------------

def _fetch_one(slots, host, expert, slot):
    """The one-jit step's fetch: slice of the host stack feeding device_put at once (the only form
    XLA's host offloader accepts), then a donated in-place write of the slot."""
    w = jax.device_put(lax.dynamic_index_in_dim(host, expert, keepdims=False), jax.memory.Space.Device)
    return lax.dynamic_update_index_in_dim(slots, w, slot, 0)


def fetch_fn(form: str):
    """fetch(slots [n, H, I], host [E, H, I] pinned_host, experts [n], slots_at [n]) -> slots."""
    if form not in FETCH_FORMS:
        raise ValueError(f"unknown fetch form {form!r}; choose {', '.join(FETCH_FORMS)}")

    def fetch(slots, host, experts, slots_at):
        n = experts.shape[0]
        if form == "fori_loop":  # what onejit uses past UNROLL_FETCHES guarded fetches
            return lax.fori_loop(0, n, lambda j, s: _fetch_one(s, host, experts[j], slots_at[j]), slots)
        for j in range(n):
            if form == "cond":  # onejit guards each fetch (a miss or not); the predicate is traced
                slots = lax.cond(experts[j] >= 0, lambda s, j=j: _fetch_one(s, host, experts[j], slots_at[j]),
                                 lambda s: s, slots)
            else:
                slots = _fetch_one(slots, host, experts[j], slots_at[j])
        return slots

    return fetch


def make_fetch(form: str):
    return jax.jit(fetch_fn(form), donate_argnums=0)  # donated: the write lands in the slot buffer


def _host_stack(sizes: Sizes, device):
    e, h, i = sizes.stack
    rng = np.random.default_rng(0)
    host_np = rng.standard_normal((e, h, i), dtype=np.float32).astype(jnp.dtype(sizes.dtype))
    return host_np, jax.device_put(host_np, _on(device, "pinned_host"))


def _choice(e: int, n: int, seed: int):
    """n distinct experts and a permutation of n slots (neither in order, so a fetch that ignores
    its indices fails the check)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(e)[:n].astype(np.int32), rng.permutation(n).astype(np.int32)


def bench_fetch(sizes: Sizes, device, host_np, host) -> dict:
    e, h, i = sizes.stack
    dev = _on(device, "device")
    expert_bytes = h * i * host_np.dtype.itemsize
    rows, all_ok = [], True
    for n in sizes.fetch_counts:
        if n > e:
            raise ValueError(f"fetch count {n} exceeds the {e} experts of the stack")
        nbytes = n * expert_bytes
        experts, slots_at = _choice(e, n, seed=n)
        want = np.empty((n, h, i), host_np.dtype)
        want[slots_at] = host_np[experts]
        experts, slots_at = jax.device_put((experts, slots_at), dev)  # indices live on the device, as in the step
        row = {"n": n, "bytes": nbytes}
        for form in FETCH_FORMS:
            try:
                fn = make_fetch(form)
                box = [jnp.zeros((n, h, i), host_np.dtype, device=dev)]  # donated: allocated on device

                def run(fn=fn, box=box):
                    box[0] = fn(box[0], host, experts, slots_at)
                    box[0].block_until_ready()

                t, _ = median_time(run, sizes.repeats, warmup=2)
                ok = bool(np.array_equal(np.asarray(box[0]).view(np.uint8), want.view(np.uint8)))
                all_ok &= ok
                row[form] = {"s": t, "gbps": _gbps(nbytes, t), "correct": ok}
            except Exception as err:  # one form failing (say fori_loop on some backend) is a finding
                all_ok = False
                row[form] = _error(err)
        row["ingraph_slice"] = _time_copy(lambda: _bulk_slice(host, np.int32(0), n), nbytes, sizes.repeats)
        bulk_host = jax.device_put(host_np[:n], _on(device, "pinned_host"))
        row["device_put_pinned"] = _time_copy(lambda: jax.device_put(bulk_host, dev), nbytes, sizes.repeats)
        row["device_put_numpy"] = _time_copy(lambda: jax.device_put(host_np[:n], dev), nbytes, sizes.repeats)
        del bulk_host
        rows.append(row)
    return {"stack_shape": list(sizes.stack), "dtype": sizes.dtype, "expert_bytes": expert_bytes,
            "correct": all_ok, "rows": rows}


_BULK: dict = {}  # n -> jitted slice copy (n is a shape, so one executable per n)


def _bulk_slice(host, start, n: int):
    """n consecutive experts as one in-graph slice + device_put: the copy without per-expert calls."""
    if n not in _BULK:
        _BULK[n] = jax.jit(lambda hs, s: jax.device_put(lax.dynamic_slice_in_dim(hs, s, n, 0),
                                                        jax.memory.Space.Device))
    return _BULK[n](host, start)


def _time_copy(make, nbytes: int, repeats: int) -> dict:
    """Median time of a copy that returns a fresh array (dropped after each run)."""
    try:
        t, _ = median_time(lambda: make().block_until_ready(), repeats, warmup=2)
        return {"s": t, "gbps": _gbps(nbytes, t)}
    except Exception as err:
        return _error(err)


# ---- 2. overlap of in-graph copies with expert compute ---------------------------------------------

def _swiglu_passes(x, gate, up, down, passes: int):
    """`passes` SwiGLU passes of x [T, H] over every slot, gate/up [E, H, I], down [E, I, H] (E slots).
    Each pass feeds the next, so XLA can neither hoist nor merge them."""

    def body(_, x):
        hidden = jax.nn.silu(jnp.einsum("TH,EHI->ETI", x, gate)) * jnp.einsum("TH,EHI->ETI", x, up)
        y = jnp.einsum("ETI,EIH->TH", hidden, down, preferred_element_type=jnp.float32)
        return (x.astype(jnp.float32) + 1e-3 * y).astype(x.dtype)

    return lax.fori_loop(0, passes, body, x)


def make_overlap_fns(passes: int):
    fetch = fetch_fn("unrolled")

    def compute(x, gate, up, down):
        return _swiglu_passes(x, gate, up, down, passes)

    def both(slots, host, experts, slots_at, x, gate, up, down):
        # No data dependence between the two halves: XLA is free to run the copies under the matmuls.
        return fetch(slots, host, experts, slots_at), compute(x, gate, up, down)

    return jax.jit(fetch, donate_argnums=0), jax.jit(compute), jax.jit(both, donate_argnums=0)


def bench_overlap(sizes: Sizes, device, host_np, host, profile_dir: str | None = None) -> dict:
    e, h, i = sizes.stack
    n = min(sizes.overlap_n, e)
    dev = _on(device, "device")
    dtype = host_np.dtype
    experts, slots_at = jax.device_put(_choice(e, n, seed=1000 + n), dev)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    # Resident expert weights for the compute half: n slots, like a layer's slot buffer.
    gate = jax.device_put((jax.random.normal(keys[0], (n, h, i)) * h ** -0.5).astype(dtype), dev)
    up = jax.device_put((jax.random.normal(keys[1], (n, h, i)) * h ** -0.5).astype(dtype), dev)
    down = jax.device_put((jax.random.normal(keys[2], (n, i, h)) * i ** -0.5).astype(dtype), dev)
    x = jax.device_put(jax.random.normal(keys[3], (sizes.overlap_tokens, h)).astype(dtype), dev)
    box = [jnp.zeros((n, h, i), dtype, device=dev)]

    def timed(passes: int, width: int):
        fetch, compute, both = make_overlap_fns(passes)
        g, u, dn = gate[:width], up[:width], down[:width]

        def run_a():
            box[0] = fetch(box[0], host, experts, slots_at)
            box[0].block_until_ready()

        def run_b():
            compute(x, g, u, dn).block_until_ready()

        def run_c():
            box[0], y = both(box[0], host, experts, slots_at, x, g, u, dn)
            jax.block_until_ready((box[0], y))

        return run_a, run_b, run_c

    # Calibrate the compute so t_b ~ t_a: overlap is only measurable when neither half dwarfs the
    # other. More passes when compute is short (the GPU case: HBM is ~100x the host link), fewer
    # slots when a single pass over all n is already too long (a CPU).
    run_a, _, _ = timed(1, n)
    t_a, _ = median_time(run_a, sizes.repeats, warmup=2)
    passes, width = 1, n
    for _ in range(4):
        _, run_b, _ = timed(passes, width)
        t_b, _ = median_time(run_b, sizes.repeats, warmup=1)
        ratio = t_a / t_b
        if 0.7 <= ratio <= 1.4:
            break
        if ratio < 1 and passes == 1:
            width = max(1, min(n, round(width * ratio)))
        else:
            passes = int(min(100_000, max(1, round(passes * ratio))))
    run_a, run_b, run_c = timed(passes, width)
    t_a, _ = median_time(run_a, sizes.repeats, warmup=1)
    t_b, _ = median_time(run_b, sizes.repeats, warmup=1)
    t_c, _ = median_time(run_c, sizes.repeats, warmup=2)
    out = {"n": n, "bytes": n * h * i * dtype.itemsize, "tokens": sizes.overlap_tokens, "compute_passes": passes,
           "compute_slots": width,
           "t_a_fetch_s": t_a, "t_b_compute_s": t_b, "t_c_both_s": t_c,
           "overlap": (t_a + t_b - t_c) / min(t_a, t_b),
           # False when calibration could not bring t_b near t_a (one pass of one slot is already
           # longer, as on a CPU where dispatch dominates): then overlap is bounded by the ratio.
           "balanced": bool(0.7 <= t_b / t_a <= 1.4)}
    if profile_dir:
        try:
            with jax.profiler.trace(profile_dir):
                for _ in range(3):
                    run_a(), run_b(), run_c()
            out["profile_dir"] = profile_dir
        except Exception as err:
            out["profile"] = _error(err)
    return out


# ---- 3. decode tokens/s per path and fraction ----------------------------------------------------

def decode_config(sizes: Sizes):
    """The decode model's config: DeepSeek-V2-Lite's real layer shapes with fewer layers (the
    per-layer costs are what the paths differ in), or a tiny model of the same family."""
    if sizes.decode_model == "tiny":
        base = tiny_config("deepseek_v2", num_experts=16, top_k=2, vocab_size=256)
        layers = sizes.decode_layers
    else:
        base = PRESETS[sizes.decode_model]
        layers = min(sizes.decode_layers, base.num_layers)
    if layers < len(base.dense_layers) + 2:
        raise ValueError(f"{layers} layers: need at least {len(base.dense_layers) + 2} so that two MoE layers "
                         "exist (speculative gating predicts the next MoE layer)")
    return dataclasses.replace(base, num_layers=layers)


def _engine_row(cfg, graphdef, params, source, dtype, frac: float, config: str, sizes: Sizes, fused: float) -> dict:
    from ..runtime.engine import OffloadedEngine
    from ..runtime.ingraph_predictors import SpecGatingInGraph
    from .runtime import _prompts

    # The in-graph predictor object goes in as `predictor=` directly: the one-jit path uses it
    # as it is (in_graph_predictor passes it through); decode_path="onejit" errors rather than
    # silently falling back to the staged loop, where a host predictor would be needed.
    predictor = SpecGatingInGraph(cfg) if config == "onejit+spec-gating" else None
    path = "staged" if config == "staged" else "onejit"
    engine = OffloadedEngine(cfg, graphdef, params, source, device_experts=frac, dtype=dtype,
                             decode_path=path, predictor=predictor)
    try:
        engine.generate(_prompts(cfg.vocab_size, sizes.batch, sizes.prompt_len, 0), sizes.new_tokens,
                        stop_at_eos=False)  # compiles every stage
        runs = [engine.generate(_prompts(cfg.vocab_size, sizes.batch, sizes.prompt_len, r + 1), sizes.new_tokens,
                                stop_at_eos=False).stats for r in range(sizes.decode_repeats)]
    finally:
        slots = engine.num_slots
        del engine  # frees its pinned host stacks before the next engine allocates its own
        gc.collect()
    rates = [s["decode_tokens_per_s"] for s in runs]
    mid = runs[int(np.argsort(rates)[len(rates) // 2])]
    return {"decode_tokens_per_s": mid["decode_tokens_per_s"], "ratio_vs_fused": mid["decode_tokens_per_s"] / fused,
            "device_hit_rate": mid["device_hit_rate"], "slots": slots, "decode_path": mid["decode_path"],
            "compiles_after_warmup": mid["compiles"], "prefetch": mid["prefetch"]}


def bench_decode(sizes: Sizes) -> dict:
    from ..model.random_init import random_model
    from ..model.resident import ResidentModel
    from ..runtime.tiers import InMemoryExperts
    from .runtime import _prompts, fused_decode_rate

    t_start = time.perf_counter()
    cfg = decode_config(sizes)
    dtype = jnp.dtype(sizes.dtype)
    graphdef, params, experts = random_model(cfg, seed=0, dtype=dtype, router_scale=3.0)
    expert_bytes = int(sum(a.nbytes for a in experts[0])) // cfg.num_experts
    info = {"model": sizes.decode_model, "family": cfg.family, "layers": cfg.num_layers,
            "moe_layers": cfg.num_moe_layers, "experts": cfg.num_experts, "top_k": cfg.top_k,
            "hidden": cfg.hidden_size, "moe_intermediate": cfg.moe_intermediate_size, "dtype": sizes.dtype,
            "expert_bytes": expert_bytes, "all_expert_bytes": expert_bytes * cfg.num_experts * cfg.num_moe_layers,
            "batch": sizes.batch, "prompt_len": sizes.prompt_len, "new_tokens": sizes.new_tokens,
            "repeats": sizes.decode_repeats, "budget_s": sizes.decode_budget_s}
    rm = ResidentModel(cfg, graphdef, params, experts, dtype)
    fused_decode_rate(rm, _prompts(cfg.vocab_size, sizes.batch, sizes.prompt_len, 0), sizes.new_tokens)  # compile
    fused = float(np.median([fused_decode_rate(rm, _prompts(cfg.vocab_size, sizes.batch, sizes.prompt_len, r + 1),
                                               sizes.new_tokens) for r in range(sizes.decode_repeats)]))
    # One NumPy copy of the experts serves every engine (each still builds its own host tier);
    # the device copy is only the fused baseline's, so free it before the engines allocate.
    source = InMemoryExperts(experts)
    del rm, experts
    gc.collect()
    rows = []
    for frac in sizes.fractions:
        for config in DECODE_CONFIGS:
            row = {"fraction": frac, "config": config}
            if config == "fused":  # all resident: one figure, repeated per fraction for the table
                row.update(decode_tokens_per_s=fused, ratio_vs_fused=1.0, device_hit_rate=1.0,
                           slots=cfg.num_experts, decode_path="fused")
            elif time.perf_counter() - t_start > sizes.decode_budget_s:
                row["skipped"] = f"decode budget of {sizes.decode_budget_s:g} s spent"
            else:
                try:
                    row.update(_engine_row(cfg, graphdef, params, source, dtype, frac, config, sizes, fused))
                except Exception as err:
                    row.update(_error(err))
            rows.append(row)
    info["seconds"] = time.perf_counter() - t_start
    return {**info, "fused_decode_tokens_per_s": fused, "rows": rows}


# ---- report ----------------------------------------------------------------------------------------

def device_meta(device) -> dict:
    import jaxlib

    stats = None
    try:
        stats = device.memory_stats()  # None on CPU; allocator counters on GPU/TPU
    except Exception as err:
        stats = {"error": str(err)}
    return {"backend": jax.default_backend(), "device": str(device), "device_kind": device.device_kind,
            "platform": device.platform, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "memory_kinds": sorted(m.kind for m in device.addressable_memories()),
            "default_memory_kind": device.default_memory().kind,
            "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
            "memory_stats": stats}


def run_check(sizes: Sizes, sections=("fetch", "overlap", "decode"), profile_dir: str | None = None) -> dict:
    device = jax.devices()[0]
    result: dict = {"meta": device_meta(device), "sizes": dataclasses.asdict(sizes)}
    host_np = host = None
    if "fetch" in sections or "overlap" in sections:
        try:
            host_np, host = _host_stack(sizes, device)
        except Exception as err:  # no pinned_host kind, out of host memory, ...
            result["fetch"] = result["overlap"] = {"error": f"host stack: {_error(err)['error']}"}
    for name, run in (("fetch", lambda: bench_fetch(sizes, device, host_np, host)),
                      ("overlap", lambda: bench_overlap(sizes, device, host_np, host, profile_dir)),
                      ("decode", lambda: bench_decode(sizes))):
        if name not in sections or name in result:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception as err:
            result[name] = _error(err)
        result[name]["section_s"] = time.perf_counter() - t0
        if name == "overlap":
            host_np = host = None  # the decode engines build their own host stacks
            gc.collect()
    result["meta"]["memory_stats_after"] = device_meta(device)["memory_stats"]
    return result


def _fmt(cell, key="gbps") -> str:
    if not isinstance(cell, dict):
        return "-"
    if "error" in cell:
        return "ERR"
    ok = "" if cell.get("correct", True) else " (WRONG)"
    return f"{cell[key]:.2f}{ok}"


def to_text(result: dict) -> str:
    m = result["meta"]
    lines = [f"backend {m['backend']} ({m['device_kind']}), jax {m['jax']}, memory kinds {', '.join(m['memory_kinds'])}",
             f"memory_stats: {m['memory_stats_after'] or 'none (this backend has no allocator stats)'}", ""]
    f = result.get("fetch")
    if f and "error" not in f:
        lines += [f"## 1. host->device fetches, GB/s (stack {f['stack_shape']} {f['dtype']}, one expert "
                  f"{f['expert_bytes'] / 2**20:.2f} MiB; fetched slots {'match' if f['correct'] else 'DO NOT match'} "
                  "NumPy)", "",
                  "| n | MiB | in-graph unrolled | in-graph cond | in-graph fori_loop | in-graph one slice "
                  "| device_put pinned | device_put numpy |", "|---|---|---|---|---|---|---|---|"]
        for r in f["rows"]:
            lines.append(f"| {r['n']} | {r['bytes'] / 2**20:.1f} | " + " | ".join(
                _fmt(r[k]) for k in (*FETCH_FORMS, "ingraph_slice", "device_put_pinned", "device_put_numpy")) + " |")
        lines.append("")
    elif f:
        lines += [f"## 1. fetch: {f['error']}", ""]
    o = result.get("overlap")
    if o and "error" not in o:
        lines += [f"## 2. overlap ({o['n']} experts fetched, {o['compute_passes']} SwiGLU passes over {o['compute_slots']} "
                  f"resident slots, {o['tokens']} tokens)", "",
                  f"t_a fetch {o['t_a_fetch_s'] * 1e3:.3f} ms, t_b compute {o['t_b_compute_s'] * 1e3:.3f} ms, "
                  f"t_c both {o['t_c_both_s'] * 1e3:.3f} ms: overlap {o['overlap']:.2f} (1 = full, 0 = serial)"
                  + ("" if o["balanced"] else "; t_a and t_b unbalanced, read with care"), ""]
    elif o:
        lines += [f"## 2. overlap: {o['error']}", ""]
    d = result.get("decode")
    if d and "error" not in d:
        lines += [f"## 3. decode ({d['model']}: {d['layers']} layers, {d['experts']} experts, top-{d['top_k']}, "
                  f"H {d['hidden']}, I {d['moe_intermediate']}, {d['dtype']}; batch {d['batch']}, "
                  f"{d['new_tokens']} new tokens)", "",
                  "| fraction | config | slots | decode tok/s | vs fused | device hit rate | path |",
                  "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            if "decode_tokens_per_s" in r:
                lines.append(f"| {r['fraction']:g} | {r['config']} | {r['slots']} | {r['decode_tokens_per_s']:.1f} | "
                             f"{r['ratio_vs_fused']:.2f} | {100 * r['device_hit_rate']:.1f}% | {r['decode_path']} |")
            else:
                lines.append(f"| {r['fraction']:g} | {r['config']} | | {r.get('skipped') or r.get('error')} | | | |")
    elif d:
        lines += [f"## 3. decode: {d['error']}"]
    return "\n".join(lines)


def failures(result: dict) -> list[str]:
    """What went wrong, one line each (empty: every section ran and the fetched slots matched)."""
    bad = [f"{k}: {result[k]['error']}" for k in ("fetch", "overlap", "decode") if "error" in result.get(k, {})]
    if "rows" in result.get("fetch", {}) and not result["fetch"]["correct"]:
        bad.append("fetch: fetched slots differ from NumPy (or a fetch form failed)")
    for r in result.get("decode", {}).get("rows", []):
        if "error" in r:
            bad.append(f"decode {r['config']} at {r['fraction']:g}: {r['error']}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emoe_jax.bench device-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes and model (CPU, tests)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON to this file (atomically)")
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of the overlap runs to DIR")
    p.add_argument("--sections", default="fetch,overlap,decode", help="comma list of fetch, overlap, decode")
    p.add_argument("--layers", type=int, help="decoder layers of the decode model (default 6; 3 with --small)")
    p.add_argument("--fractions", help="device-expert fractions (default 1,0.5,0.25,0.1; 1,0.25 with --small)")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--decode-budget-s", type=float,
                   help="start no decode row after this many seconds of the decode section (default 180; 120 small)")
    args = p.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - {"fetch", "overlap", "decode"}
    if unknown:
        return fail(f"unknown section(s) {sorted(unknown)}; choose fetch, overlap, decode")
    sizes = default_sizes(args.small)
    try:
        if args.fractions:
            sizes = dataclasses.replace(sizes, fractions=tuple(float(x) for x in args.fractions.split(",")))
    except ValueError:
        return fail(f"--fractions {args.fractions!r} must be comma-separated numbers")
    for field, value in (("decode_layers", args.layers), ("new_tokens", args.new_tokens),
                         ("decode_budget_s", args.decode_budget_s)):
        if value is not None:
            sizes = dataclasses.replace(sizes, **{field: value})
    result = run_check(sizes, sections, args.profile)
    result["failures"] = failures(result)
    if args.out:
        write_json_atomic(Path(args.out), result)
    if args.json:
        print(json.dumps(result))
    else:
        print(to_text(result))
        for line in result["failures"]:
            print(f"FAILED {line}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
