"""Measure a checkpoint's decode compute time per MoE layer, for the simulator's ``--layer-compute-ms``.

    python -m emoe_jax.bench.layer_time --model checkpoints/embedded --json

The simulator charges a fixed compute time per layer (default 0.5 ms, an
assumption for DeepSeek-V2-Lite on a GPU). This tool measures the figure for a
model we have, on the machine it runs on, with every expert resident (so no
transfer is in the time):

1. The fused all-resident decoder (one jit per decode step, next token fed back
   on the device): the fastest this model decodes here.
2. The offloaded engine with all experts preloaded on the device (exact mode): the
   per-layer Python loop a prefetcher would hook into; its layer time is the
   window a prefetch issued one layer ahead really gets.

For each, a warm-up generation compiles every shape, then ``repeats``
generations of ``new_tokens`` tokens on different random prompts are timed
(``block_until_ready``) and the median decode rate kept. Per-layer time =
1 / (decode tokens per second) / num_moe_layers at batch 1 (the simulator's layers are
MoE layers; decoder layers without experts count into their time): it includes the
embedding, final norm, LM head and sampling spread over the layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from emoe_jax.cli import USER_ERRORS, fail


def measure_layer_time(model: str | os.PathLike, *, new_tokens: int = 64, prompt_len: int = 32, repeats: int = 5,
                       seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """{'fused': {...}, 'engine': {...}} with decode tokens/s and ms per layer (median of ``repeats``)."""
    import jax

    from emoe_jax.bench.runtime import fused_decode_rate
    from emoe_jax.model.resident import ResidentModel
    from emoe_jax.runtime.engine import OffloadedEngine
    from emoe_jax.runtime.tiers import InMemoryExperts

    if new_tokens < 2 or repeats < 1 or prompt_len < 1:
        raise ValueError("need --new-tokens >= 2, --repeats >= 1 and --prompt-len >= 1")
    path = Path(model).resolve()  # Orbax refuses relative paths
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path} is not a converted checkpoint (no manifest.json); see python -m emoe_jax.convert")
    resident = ResidentModel.from_checkpoint(path)
    cfg, graphdef, params, experts, dtype = (resident.cfg, resident.graphdef, resident.params, resident.experts,
                                             resident.dtype)
    rng = np.random.default_rng(seed)

    def prompts() -> list[list[int]]:
        return [rng.integers(3, cfg.vocab_size, size=prompt_len).tolist()]

    num_moe_layers = cfg.num_moe_layers

    def summary(rates: list[float]) -> dict[str, Any]:
        rate = float(np.median(rates))
        return {"decode_tokens_per_s": rate, "ms_per_token": 1e3 / rate, "ms_per_layer": 1e3 / rate / num_moe_layers,
                "rates": [round(r, 2) for r in rates]}  # fmt: skip

    fused_decode_rate(resident, prompts(), new_tokens)  # compile
    fused = [fused_decode_rate(resident, prompts(), new_tokens) for _ in range(repeats)]
    engine = OffloadedEngine(cfg, graphdef, params, InMemoryExperts(experts), device_experts=1.0, dtype=dtype)
    for moe_layer in range(cfg.num_moe_layers):  # every expert resident before timing: no transfer in the time
        engine.preload(moe_layer, range(cfg.num_experts))
    engine.generate(prompts(), new_tokens, stop_at_eos=False)  # compile every stage
    stats = [engine.generate(prompts(), new_tokens, stop_at_eos=False).stats for _ in range(repeats)]
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - platforms without load averages
        load = None
    return {
        "model": str(model), "family": cfg.family, "num_layers": cfg.num_layers, "num_moe_layers": num_moe_layers, "num_experts": cfg.num_experts,
        "top_k": cfg.top_k, "hidden_size": cfg.hidden_size, "dtype": str(dtype), "batch": 1,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "fused": summary(fused),
        "engine": summary([s["decode_tokens_per_s"] for s in stats])
        | {"device_hit_rate": float(np.median([s["device_hit_rate"] for s in stats]))},
        "backend": jax.default_backend(), "device": str(jax.devices()[0]), "cpus": os.cpu_count(),
        "machine": platform.machine(), "load_average": load, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emoe_jax.bench.layer_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, default=Path("checkpoints/embedded"), help="converted checkpoint directory")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per timed generation")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length")
    p.add_argument("--repeats", type=int, default=5, help="timed generations (the median is kept)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        out = measure_layer_time(args.model, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                                 repeats=args.repeats)  # fmt: skip
    except USER_ERRORS as exc:
        return fail(exc)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['model']}: {out['num_layers']} layers, batch 1, {out['new_tokens']} new tokens, "
          f"median of {out['repeats']} ({out['backend']}, {out['cpus']} CPUs, load {out['load_average']})")  # fmt: skip
    for name in ("fused", "engine"):
        r = out[name]
        print(f"  {name:7s} {r['decode_tokens_per_s']:8.1f} tok/s  {r['ms_per_token']:7.3f} ms/token  "
              f"{r['ms_per_layer']:7.3f} ms/layer")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
