"""Predictor ablation: every predictor x cache capacity x link bandwidth, plus MoE-Beyond's zero-latency protocol.

    python -m emoe_jax.bench predictors --traces out/puffin_traces --out out/ablation_puffin
    python -m emoe_jax.bench predictors --traces DIR --predictors prev-token,static-freq \
        --capacities 0.05,0.1,0.2 --bandwidths-gbps 25 --max-prompts 50 --json

Steps:
  1. Split the trace set by prompt id (``split_by_prompt_id``: lowest ids train,
     the last ``--train-split`` complement validates); optionally keep only the
     first N validation prompts.
  2. Predictors: the requested ones plus LRU, Belady/MIN and the oracle
     prefetcher, always. With the default ``all``, a registered predictor that
     cannot run on these traces (no router inputs, no checkpoint, wrong shape)
     is left out and the reason is recorded; a predictor named explicitly that
     cannot run is an error.
  3. Per predictor and protocol (timed: lookahead 1 layer; zero-latency:
     lookahead 0): build it, ``fit`` it on the training prompts once, and
     memoise its per-prompt predictions. Predictions never depend on the cache
     (a predictor sees routing, not residency) and every cell replays the same
     prompts in the same order, so the first cell's predictions serve all.
  4. Replay each cell with ``simulate``: timed cells (capacity x bandwidth,
     transfer = expert_bytes / bandwidth, ``--layer-compute-ms`` per layer), and
     zero-latency cells at every capacity. Both count the same tokens under the
     same cache protocol (one running cache over the prompts, empty at the start,
     so an oracle bound gets no free hits from a random fill; every token counted);
     zero latency only makes transfers free and sets lookahead 0. MoE-Beyond's own
     protocol (fresh random cache per prompt, 10 warm-up tokens) is
     ``--zero-latency-protocol moe-beyond``.
  5. Write ``results.json``, ``table.md`` (one table per bandwidth and one for
     zero latency; a predictor whose hit rate is below LRU's is marked, and in
     timed tables also one whose stall is above LRU's; with several tasks, hit
     rate per task at the capacity closest to 10%) and plots, each file written
     under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from emoe_jax.cli import USER_ERRORS, fail
from emoe_jax.atomic_io import write_atomic
from emoe_jax.errors import EmoeError
from emoe_jax.predict import available_predictors, get_predictor
from emoe_jax.predict.drive import MemoisedPredictor
from emoe_jax.predict.registry import UnknownPredictorError
from emoe_jax.sim.config import SimConfig
from emoe_jax.sim.simulate import simulate
from emoe_jax.traces.split import split_by_prompt_id

BASELINES = ("lru", "belady", "oracle-prefetch")  # always in the grid: the floor and two ceilings
ZERO_LATENCY = "zero-latency"
TIMED = "timed"
LOSES_HIT = "▼"  # hit rate below LRU's at the same cell
LOSES_STALL = "▲"  # stall per token above LRU's at the same cell


class AblationError(EmoeError):
    """The ablation cannot run as asked (bad grid, unusable predictor, empty traces)."""


# ---------------------------------------------------------------- grid


ZERO_LATENCY_PROTOCOLS = ("same", "moe-beyond")


def zero_latency_config(capacity: float, expert_bytes: float, protocol: str = "same") -> SimConfig:
    """The zero-latency cell: the timed cells' protocol with free transfers ("same"), or MoE-Beyond's."""
    if protocol == "moe-beyond":
        return SimConfig.moe_beyond(capacity=capacity, expert_bytes=expert_bytes)
    if protocol != "same":
        raise AblationError(f"zero-latency protocol must be one of {ZERO_LATENCY_PROTOCOLS}, got {protocol!r}")
    return SimConfig(capacity=capacity, expert_bytes=expert_bytes, zero_latency=True, lookahead_layers=0)


def _protocol_config(protocol: str, capacity: float, bandwidth: float | None, expert_bytes: float,
                     layer_compute_ms: float, zero_latency_protocol: str = "same") -> SimConfig:  # fmt: skip
    if protocol == ZERO_LATENCY:
        return zero_latency_config(capacity, expert_bytes, zero_latency_protocol)
    return SimConfig(capacity=capacity, bandwidth_gbps=bandwidth, expert_bytes=expert_bytes,
                     layer_compute_ms=layer_compute_ms)  # fmt: skip


def resolve_predictors(requested: list[str] | None, exclude: list[str]) -> tuple[list[str], bool]:
    """(names in grid order, explicit?): baselines first, then the rest; unknown names raise."""
    known = available_predictors()
    explicit = requested is not None
    names = list(known) if requested is None else list(requested)
    for n in [*names, *exclude]:
        if n not in known:
            raise UnknownPredictorError(f"unknown predictor {n!r}; available: {', '.join(known)}")
    rest = [n for n in names if n not in BASELINES and n not in exclude]
    return [*BASELINES, *dict.fromkeys(rest)], explicit


def run_grid(
    traces: Any,
    *,
    predictors: list[str] | None = None,
    exclude: tuple[str, ...] = (),
    capacities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5),
    bandwidths_gbps: tuple[float, ...] = (12.0, 25.0, 64.0),
    expert_bytes: float = 17.3e6,
    layer_compute_ms: float = 0.5,
    val_fraction: float = 0.2,
    max_prompts: int | None = None,
    predictor_kwargs: dict[str, Any] | None = None,
    per_task_capacities: tuple[float, ...] | None = None,
    progress: bool = True,
    train_traces: Any = None,
    zero_latency_protocol: str = "same",
) -> dict[str, Any]:
    """Run the whole grid on ``traces`` (a TraceSet); returns the results dict written to results.json.

    With ``train_traces``, predictors fit on them and ``traces`` is replayed whole (the
    test set); otherwise ``traces`` is split by prompt id (``val_fraction``).
    """
    if not capacities:
        raise AblationError("no capacities given")
    if any(c <= 0 for c in capacities) or any(b <= 0 for b in bandwidths_gbps):
        raise AblationError(f"capacities and bandwidths must be > 0, got {capacities} and {bandwidths_gbps}")
    if max_prompts is not None and max_prompts < 1:
        raise AblationError(f"--max-prompts must be >= 1, got {max_prompts}")
    missing = sorted(set(per_task_capacities or ()) - set(capacities))
    if missing:
        raise AblationError(f"per-task capacities {missing} are not in the grid's capacities {list(capacities)}")
    names, explicit = resolve_predictors(predictors, list(exclude))
    if zero_latency_protocol not in ZERO_LATENCY_PROTOCOLS:
        raise AblationError(f"zero-latency protocol must be one of {ZERO_LATENCY_PROTOCOLS}, got {zero_latency_protocol!r}")
    if train_traces is not None:
        if (train_traces.meta.num_layers, train_traces.meta.num_experts, train_traces.meta.top_k) != (
            traces.meta.num_layers, traces.meta.num_experts, traces.meta.top_k):  # fmt: skip
            raise AblationError("--train-traces and --test-traces are of different models (layers, experts, top-k)")
        train, val = train_traces, traces
    else:
        train, val = split_by_prompt_id(traces, val_fraction)
    if max_prompts is not None:
        val = val.select(slice(0, max_prompts))
    protocols = [(ZERO_LATENCY, None)] + [(TIMED, b) for b in bandwidths_gbps]
    kwargs = dict(predictor_kwargs or {})
    cells_per_predictor = len(capacities) * len(protocols)
    bar = tqdm(total=len(names) * cells_per_predictor, desc="ablation cells", unit="cell", disable=not progress)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    fit_seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name in names:
        built: dict[int, MemoisedPredictor] = {}
        try:
            for protocol, bandwidth in protocols:
                for capacity in capacities:
                    config = _protocol_config(protocol, capacity, bandwidth, expert_bytes, layer_compute_ms,
                                              zero_latency_protocol)  # fmt: skip
                    la = config.lookahead_layers
                    if la not in built:
                        t0 = time.perf_counter()
                        inner = get_predictor(name, ignore_unknown=True, lookahead=la, **kwargs)
                        inner.fit(train)
                        fit_seconds[f"{name}@lookahead{la}"] = time.perf_counter() - t0
                        built[la] = MemoisedPredictor(inner)
                    result = simulate(val, built[la], config).to_dict()
                    result.pop("config")
                    # The registry name (result["predictor"] is the class's name; aliases differ).
                    result.update(predictor=name, protocol=protocol, capacity=capacity, bandwidth_gbps=bandwidth)
                    rows.append(result)
                    bar.update(1)
        except (ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
            if explicit or name in BASELINES:
                bar.close()
                raise AblationError(f"predictor {name!r} cannot run on these traces: {exc}") from exc
            skipped[name] = f"{type(exc).__name__}: {exc}"
            done = sum(1 for r in rows if r["predictor"] == name)
            rows = [r for r in rows if r["predictor"] != name]
            bar.update(cells_per_predictor - done)  # its remaining cells will not run
        finally:
            built.clear()  # free the memoised predictions before the next predictor
    bar.close()
    _mark_losses(rows)
    return dict(
        traces=str(getattr(traces, "path", "") or ""),
        meta=dict(model=traces.meta.model, num_layers=traces.meta.num_layers, num_experts=traces.meta.num_experts,
                  top_k=traces.meta.top_k, has_router_inputs=traces.meta.hidden_size is not None),  # fmt: skip
        split=_split_info(train, val, val_fraction, max_prompts),
        grid=dict(predictors=[n for n in names if n not in skipped], capacities=list(capacities),
                  bandwidths_gbps=list(bandwidths_gbps), expert_bytes=expert_bytes,
                  layer_compute_ms=layer_compute_ms, timed_lookahead_layers=SimConfig().lookahead_layers,
                  per_task_capacities=list(per_task_capacities or [headline_capacity(list(capacities))]),
                  zero_latency=asdict(zero_latency_config(0.1, expert_bytes, zero_latency_protocol)),
                  zero_latency_protocol=zero_latency_protocol),  # fmt: skip
        skipped=skipped,
        fit_seconds=fit_seconds,
        wall_seconds=time.perf_counter() - start,
        host=platform.node(),
        rows=rows,
    )


def _split_info(train: Any, val: Any, val_fraction: float, max_prompts: int | None) -> dict[str, Any]:
    def ids(ts: Any) -> list[int]:
        p = np.asarray(ts.prompt_ids)
        return [int(p.min()), int(p.max())] if len(p) else []

    return dict(rule=f"by prompt id: lowest {1 - val_fraction:.0%} train, highest {val_fraction:.0%} validate",
                val_fraction=val_fraction, train_prompts=len(train), train_prompt_ids=ids(train),
                val_prompts=len(val), val_prompt_ids=ids(val), val_tokens=int(val.n_tokens),
                max_prompts=max_prompts)  # fmt: skip


def _mark_losses(rows: list[dict[str, Any]]) -> None:
    """Flag each row whose hit rate is below (or stall above) LRU's at the same protocol/bandwidth/capacity."""
    lru = {(r["protocol"], r["bandwidth_gbps"], r["capacity"]): r for r in rows if r["predictor"] == "lru"}
    for r in rows:
        base = lru.get((r["protocol"], r["bandwidth_gbps"], r["capacity"]))
        r["loses_to_lru_hit_rate"] = bool(base is not None and r["hit_rate"] < base["hit_rate"])
        r["loses_to_lru_stall"] = bool(
            base is not None and r["protocol"] == TIMED and r["stall_ms_per_token"] > base["stall_ms_per_token"]
        )


# ---------------------------------------------------------------- outputs


def _label(row: dict[str, Any]) -> str:
    return f"{row['predictor']} (ORACLE)" if row["oracle"] else row["predictor"]


def to_markdown(results: dict[str, Any]) -> str:
    """One table per bandwidth and one for zero latency; rows predictors, columns capacities."""
    rows, grid, s = results["rows"], results["grid"], results["split"]
    caps = grid["capacities"]
    limit = "" if s["max_prompts"] is None else f", first {s['max_prompts']} validation prompts only"
    L, E = results["meta"]["num_layers"], results["meta"]["num_experts"]
    out = [
        f"# Predictor ablation: {results['meta']['model']}",
        "",
        f"Traces `{results['traces']}`; split {s['rule']}: train {s['train_prompts']} prompts "
        f"(ids {s['train_prompt_ids']}), validation {s['val_prompts']} prompts (ids {s['val_prompt_ids']}, "
        f"{s['val_tokens']} tokens){limit}.",
        f"Capacity is a fraction of all {L}x{E} = {L * E} layer-experts (one global pool). Expert "
        f"{grid['expert_bytes'] / 1e6:.1f} MB, {grid['layer_compute_ms']} ms compute per layer, "
        f"prefetch lookahead {grid['timed_lookahead_layers']} layer in timed tables.",
        f"{LOSES_HIT} = hit rate below LRU's in the same cell; {LOSES_STALL} = stall per token above LRU's. "
        "ORACLE rows read the future (upper bounds).",
    ]
    if results["skipped"]:
        out.append("")
        out.append("Left out: " + "; ".join(f"`{k}` ({v})" for k, v in results["skipped"].items()) + ".")
    predictors = list(dict.fromkeys(r["predictor"] for r in rows))
    tables = [(ZERO_LATENCY, None)] + [(TIMED, b) for b in grid["bandwidths_gbps"]]
    for protocol, bw in tables:
        cell = {(r["predictor"], r["capacity"]): r for r in rows if r["protocol"] == protocol and r["bandwidth_gbps"] == bw}
        out.append("")
        if protocol == ZERO_LATENCY:
            if grid.get("zero_latency_protocol", "moe-beyond") == "moe-beyond":
                out.append("## Zero latency (MoE-Beyond protocol: free transfers, fresh random cache per prompt, "
                           "10 warm-up tokens, lookahead 0): hit rate %")  # fmt: skip
            else:
                out.append("## Zero latency (free transfers, lookahead 0; same tokens and cache protocol as the "
                           "timed tables: one cache, empty at the start, every token counted): hit rate %")  # fmt: skip
            out.append("")
            out.append("| predictor | " + " | ".join(f"{c:g}" for c in caps) + " |")
            out.append("|---|" + "---:|" * len(caps))
        else:
            out.append(f"## {bw:g} GB/s: hit rate % / stall ms per token")
            out.append("")
            out.append("| predictor | " + " | ".join(f"{c:g}" for c in caps) + " |")
            out.append("|---|" + "---:|" * len(caps))
        for name in predictors:
            cells = []
            label = name
            for c in caps:
                r = cell.get((name, c))
                if r is None:
                    cells.append("-")
                    continue
                label = _label(r)
                text = f"{100 * r['hit_rate']:.1f}{' ' + LOSES_HIT if r['loses_to_lru_hit_rate'] else ''}"
                if protocol == TIMED:
                    text += f" / {r['stall_ms_per_token']:.2f}{' ' + LOSES_STALL if r['loses_to_lru_stall'] else ''}"
                cells.append(text)
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.extend(per_task_markdown(results))
    out.append("")
    out.append(f"Grid run time {results['wall_seconds']:.0f} s on {results['host']}.")
    return "\n".join(out) + "\n"


def headline_capacity(capacities: list[float]) -> float:
    """The capacity closest to 10% (MoE-Beyond's headline setting)."""
    return min(capacities, key=lambda c: abs(c - 0.1))


def per_task_markdown(results: dict[str, Any]) -> list[str]:
    """Hit rate % per task at the grid's per-task capacities (default: the one closest to 10%):
    one table per capacity and protocol, one row per predictor, one column per task.

    Each cell is the task's share of the one replay (``SimResult.per_task``): the cache carries
    over between prompts of different tasks exactly as in the totals. Empty for a single task.
    """
    rows, grid = results["rows"], results["grid"]
    tasks = sorted({t for r in rows for t in r.get("per_task", {})})
    if len(tasks) < 2:
        return []
    caps = grid.get("per_task_capacities") or [headline_capacity(grid["capacities"])]
    predictors = list(dict.fromkeys(r["predictor"] for r in rows))
    out = []
    tables = [(cap, protocol, bw) for cap in caps
              for protocol, bw in [(ZERO_LATENCY, None)] + [(TIMED, b) for b in grid["bandwidths_gbps"]]]  # fmt: skip
    for cap, protocol, bw in tables:
        cell = {r["predictor"]: r for r in rows
                if r["protocol"] == protocol and r["bandwidth_gbps"] == bw and r["capacity"] == cap}  # fmt: skip
        if not cell:
            continue
        lru = cell.get("lru")
        title = "zero latency" if protocol == ZERO_LATENCY else f"{bw:g} GB/s"
        out += ["", f"## Per task, capacity {cap:g}, {title}: hit rate %", ""]
        prompts = next(iter(cell.values()))["per_task"]
        out.append("| predictor | " + " | ".join(f"{t} ({prompts[t]['prompts']})" for t in tasks) + " | all |")
        out.append("|---|" + "---:|" * (len(tasks) + 1))
        for name in predictors:
            r = cell.get(name)
            if r is None:
                continue
            cells = []
            for t in tasks:
                c = r["per_task"].get(t)
                if c is None:
                    cells.append("-")
                    continue
                worse = lru is not None and c["hit_rate"] < lru["per_task"][t]["hit_rate"]
                cells.append(f"{100 * c['hit_rate']:.1f}{' ' + LOSES_HIT if worse else ''}")
            cells.append(f"{100 * r['hit_rate']:.1f}{' ' + LOSES_HIT if r['loses_to_lru_hit_rate'] else ''}")
            out.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    return out



def _styles(names: list[str]) -> dict[str, dict[str, Any]]:
    """One colour and marker per predictor, the same in every panel (tab20 has room for 20 lines)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    markers = "os^vDP*Xh<>"
    return {n: dict(color=cmap(i % 20), marker=markers[i % len(markers)]) for i, n in enumerate(names)}


def _plot_capacity_sweep(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, grid = results["rows"], results["grid"]
    panels = [(ZERO_LATENCY, None, "zero latency")] + [(TIMED, b, f"{b:g} GB/s") for b in grid["bandwidths_gbps"]]
    names = list(dict.fromkeys(r["predictor"] for r in rows))
    style = _styles(names)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.6, 3.2), sharey=True, squeeze=False)
    for ax, (protocol, bw, title) in zip(axes[0], panels):
        for name in names:
            pts = sorted((r["capacity"], r["hit_rate"], r["oracle"]) for r in rows
                         if r["predictor"] == name and r["protocol"] == protocol and r["bandwidth_gbps"] == bw)  # fmt: skip
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], ms=3, lw=1.2,
                        ls="--" if pts[0][2] else "-", label=name, **style[name])  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("capacity (fraction of experts)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit rate %", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def _plot_bandwidth_sweep(results: dict[str, Any], path: Path, capacity: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["protocol"] == TIMED and r["capacity"] == capacity]
    names = list(dict.fromkeys(r["predictor"] for r in results["rows"]))
    style = _styles(names)
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for name in names:
        pts = sorted((r["bandwidth_gbps"], r["stall_ms_per_token"], r["oracle"]) for r in rows if r["predictor"] == name)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=3, lw=1.2, ls="--" if pts[0][2] else "-",
                    label=name, **style[name])  # fmt: skip
    ax.set_xlabel("link bandwidth GB/s", fontsize=8)
    ax.set_ylabel("stall ms per token", fontsize=8)
    ax.set_title(f"stall vs bandwidth at capacity {capacity:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def _plot_per_task(results: dict[str, Any], path: Path, capacities: list[float]) -> None:
    """Grouped bars: hit rate per task and predictor at each capacity, zero latency and ~25 GB/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, grid = results["rows"], results["grid"]
    tasks = sorted({t for r in rows for t in r.get("per_task", {})})
    names = list(dict.fromkeys(r["predictor"] for r in rows))
    style = _styles(names)
    # Zero latency and the bandwidth closest to PCIe 4.0's 25 GB/s.
    bws = sorted(grid["bandwidths_gbps"], key=lambda b: abs(b - 25.0))[:1]
    protocols = [(ZERO_LATENCY, None, "zero latency")] + [(TIMED, b, f"{b:g} GB/s") for b in bws]
    panels = [(protocol, bw, title, cap) for cap in capacities for protocol, bw, title in protocols]
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(14.0, 3.0 + 1.3 * len(tasks)), 2.3 * len(panels)),
                             sharex=True, squeeze=False)  # fmt: skip
    width = 0.8 / max(len(names), 1)
    for ax, (protocol, bw, title, capacity) in zip(axes[:, 0], panels):
        cell = {r["predictor"]: r for r in rows
                if r["protocol"] == protocol and r["bandwidth_gbps"] == bw and r["capacity"] == capacity}  # fmt: skip
        for i, name in enumerate(names):
            if name not in cell:
                continue
            heights = [100 * cell[name]["per_task"].get(t, {}).get("hit_rate", 0.0) for t in tasks]
            ax.bar(np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * width, heights, width,
                   color=style[name]["color"], label=name, hatch="//" if cell[name]["oracle"] else None)  # fmt: skip
        ax.set_title(f"{title}, capacity {capacity:g}", fontsize=9)
        ax.set_ylabel("hit rate %", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xticks(np.arange(len(tasks)), tasks, fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """results.json, table.md, hit_rate_vs_capacity.png, stall_vs_bandwidth.png in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {
        "results": out_dir / "results.json",
        "table": out_dir / "table.md",
        "hit_rate_plot": out_dir / "hit_rate_vs_capacity.png",
        "stall_plot": out_dir / "stall_vs_bandwidth.png",
    }
    write_atomic(paths["results"], lambda p: p.write_text(json.dumps(results, indent=1)))
    write_atomic(paths["table"], lambda p: p.write_text(to_markdown(results)))
    _plot_capacity_sweep(results, paths["hit_rate_plot"])
    caps = results["grid"]["capacities"]
    if results["grid"]["bandwidths_gbps"]:
        _plot_bandwidth_sweep(results, paths["stall_plot"], headline_capacity(caps))
    else:
        paths.pop("stall_plot")
    if len({t for r in results["rows"] for t in r.get("per_task", {})}) > 1:
        paths["per_task_plot"] = out_dir / "hit_rate_per_task.png"
        per_task_caps = results["grid"].get("per_task_capacities") or [headline_capacity(caps)]
        _plot_per_task(results, paths["per_task_plot"], per_task_caps)
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------- CLI


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emoe_jax.bench predictors",
        description=(
            "Ablation of expert-activation predictors: replay the validation prompts of a trace set for every "
            "predictor x cache capacity x link bandwidth (timed: transfers cost expert_bytes / bandwidth, "
            "prefetch 1 layer ahead) and at every capacity under MoE-Beyond's zero-latency protocol. LRU, "
            "Belady/MIN and the oracle prefetcher are always included. Writes OUT/results.json, OUT/table.md "
            "(with several task labels also hit rate per task at the capacity closest to 10%%) and plots. "
            "See docs/ablations.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--traces", type=Path, default=None,
                   help="trace-set directory (python -m emoe_jax.traces), split by prompt id (--train-split)")
    p.add_argument("--train-traces", type=Path, default=None, help="trace set to fit predictors on (with --test-traces)")
    p.add_argument("--test-traces", type=Path, default=None, help="trace set to replay, whole (with --train-traces)")
    p.add_argument("--zero-latency-protocol", choices=ZERO_LATENCY_PROTOCOLS, default="same",
                   help="same: the timed cells' cache protocol with free transfers; moe-beyond: fresh random cache "
                   "per prompt and 10 warm-up tokens")  # fmt: skip
    p.add_argument("--train-split", type=float, default=0.8,
                   help="fraction of prompts (lowest prompt ids) to fit predictors on; the rest is replayed")  # fmt: skip
    p.add_argument("--predictors", type=_names, default=None,
                   help="comma-separated names (python -m emoe_jax.sim --list); default: every registered "
                   "predictor that can run on these traces")  # fmt: skip
    p.add_argument("--exclude", type=_names, default=[], help="comma-separated names to leave out")
    p.add_argument("--capacities", type=_floats, default=(0.05, 0.1, 0.2, 0.3, 0.5),
                   help="cache sizes: fractions of all layer-experts (<= 1) or counts")  # fmt: skip
    p.add_argument("--bandwidths-gbps", type=_floats, default=(12.0, 25.0, 64.0),
                   help="link bandwidths for the timed cells, GB/s (1 GB = 1e9 bytes)")  # fmt: skip
    p.add_argument("--expert-bytes", type=float, default=17.3e6, help="bytes per expert (DeepSeek-V2-Lite bf16)")
    p.add_argument("--layer-compute-ms", type=float, default=0.5,
                   help="compute time per MoE layer with experts resident (an assumption; see docs/ablations.md)")  # fmt: skip
    p.add_argument("--model-checkpoint", type=Path, default=None,
                   help="converted model checkpoint whose routers spec-gating applies (traces need router inputs)")  # fmt: skip
    p.add_argument("--per-task-capacities", type=_floats, default=None,
                   help="capacities (from --capacities) of the per-task tables; default: the one closest to 0.1")  # fmt: skip
    p.add_argument("--max-prompts", type=int, default=None, help="replay only the first N validation prompts")
    p.add_argument("--out", type=Path, default=None, help="output directory (results.json, table.md, plots)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from emoe_jax.traces import TraceSet

    try:
        if not 0.0 < args.train_split < 1.0:
            raise AblationError(f"--train-split must be in (0, 1), got {args.train_split}")
        if (args.train_traces is None) != (args.test_traces is None):
            raise AblationError("--train-traces and --test-traces go together")
        if (args.traces is None) == (args.test_traces is None):
            raise AblationError("give --traces DIR (split by prompt id) or --train-traces DIR --test-traces DIR")
        traces = TraceSet.load(args.traces if args.traces is not None else args.test_traces)
        train_traces = None if args.train_traces is None else TraceSet.load(args.train_traces)
        kwargs = {} if args.model_checkpoint is None else {"model_checkpoint": str(args.model_checkpoint)}
        results = run_grid(
            traces, predictors=args.predictors, exclude=tuple(args.exclude), capacities=args.capacities,
            bandwidths_gbps=args.bandwidths_gbps, expert_bytes=args.expert_bytes,
            layer_compute_ms=args.layer_compute_ms, val_fraction=round(1.0 - args.train_split, 10),
            max_prompts=args.max_prompts, predictor_kwargs=kwargs, progress=not args.no_progress,
            per_task_capacities=args.per_task_capacities, train_traces=train_traces,
            zero_latency_protocol=args.zero_latency_protocol,
        )  # fmt: skip
        results["traces"] = str(args.traces if args.traces is not None else args.test_traces)
        if train_traces is not None:
            results["train_traces"] = str(args.train_traces)
        paths = write_outputs(results, args.out) if args.out is not None else {}
    except (*USER_ERRORS, RuntimeError) as exc:
        return fail(exc)
    results["outputs"] = paths
    if args.json:
        print(json.dumps(results))
    else:
        print(to_markdown(results), end="")
        for path in paths.values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
