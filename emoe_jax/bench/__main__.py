"""python -m emoe_jax.bench SUITE ...: benchmark suites, each with --help and --json."""

from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {
    "runtime": ("emoe_jax.bench.runtime", "decode tokens/s and memory vs device-expert fraction"),
    "predictors": ("emoe_jax.bench.predictors", "predictor ablation: hit rate and stall over capacity x bandwidth"),
    "serve": ("emoe_jax.bench.serve", "request streams: TTFT, latency, SLO attainment, throughput with/without eMoE"),
    "e2e": ("emoe_jax.bench.e2e", "end to end: tokens/s, memory, stall vs fraction per predictor; eMoE's claims"),
    "replay": ("emoe_jax.bench.replay", "forced-routing replay of real traces: decode tokens/s and hit rate vs device fraction"),
    "device-check": ("emoe_jax.bench.device_check",
                     "GPU check: in-graph host->device fetch GB/s, copy/compute overlap, decode tok/s per path"),
    "layer-time": ("emoe_jax.bench.layer_time", "a checkpoint's decode compute ms per MoE layer (the simulator's --layer-compute-ms)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        parser = argparse.ArgumentParser(prog="python -m emoe_jax.bench",
                                         description="Benchmark suites (each has its own --help).")
        parser.add_argument("suite", choices=sorted(SUITES),
                            help="; ".join(f"{k}: {v[1]}" for k, v in SUITES.items()))
        parser.parse_args(argv)
        return 2
    module = importlib.import_module(SUITES[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
