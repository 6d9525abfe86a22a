"""Measure peak resident memory and time of `python -m emoe_jax.convert` on a mid-size model.

    python -m emoe_jax.checkpoint.measure_ram [--workdir DIR] [--hidden 1024 --layers 8 --experts 8
        --intermediate 1024 --vocab 32000 --dtype bfloat16] [--layouts per_expert,fused,sharded,mxfp4] [--json]

Steps:
  1. build a random Mixtral with transformers (needs torch) and save it: per-expert
     layout (save_pretrained), fused layout (raw state_dict), and sharded (100 MB shards);
     `mxfp4`: a gpt-oss-shaped checkpoint (same sizes) whose experts are MXFP4 blocks + scales
     (tensor names and shapes from transformers' GptOss on the meta device, values random);
  2. measure the baseline peak RSS of a process that only imports the converter's
     dependencies (jax, orbax, tensorstore);
  3. run the converter CLI in a child process per layout and read the child's peak
     RSS (`resource.getrusage(RUSAGE_CHILDREN)`, the figure `/usr/bin/time -v` prints
     as "Maximum resident set size") and wall time;
  4. report them next to the checkpoint size and its largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 2**20


def _child_peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """Run `cmd` in a fresh child (via a tiny wrapper so RUSAGE_CHILDREN covers only it)."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "if p.returncode: sys.stderr.write(p.stderr); sys.exit(p.returncode)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, dt)\n"
        "sys.stderr.write(p.stdout)\n"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    kib, seconds = p.stdout.split()
    return int(kib) * 1024, float(seconds), p.stderr


def build_models(workdir: Path, args) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    dirs = {}
    if "mxfp4" in args.layouts:
        dirs["mxfp4"] = build_mxfp4_gpt_oss(workdir, args)
    if not {"per_expert", "sharded", "fused"} & set(args.layouts):
        return dirs
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                        num_local_experts=args.experts, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).to(getattr(torch, args.dtype))
    if "per_expert" in args.layouts:
        dirs["per_expert"] = workdir / "hf_per_expert"
        model.save_pretrained(dirs["per_expert"])
    if "sharded" in args.layouts:
        dirs["sharded"] = workdir / "hf_sharded"
        model.save_pretrained(dirs["sharded"], max_shard_size="100MB")
    if "fused" in args.layouts:
        d = dirs["fused"] = workdir / "hf_fused"
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
        model.config.save_pretrained(d)
    return dirs


def build_mxfp4_gpt_oss(workdir: Path, args) -> Path:
    """A gpt-oss checkpoint with MXFP4 experts, written tensor by tensor (no full model in RAM)."""
    import ml_dtypes
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                       num_local_experts=args.experts, num_experts_per_tok=2)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GptOssForCausalLM(cfg).state_dict().items()}
    rng = np.random.default_rng(0)
    d = workdir / "hf_mxfp4"
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = shape  # [E, in, out] in memory; MXFP4 stores [E, out, in/32, 16]
            tensors[name + "_blocks"] = rng.integers(0, 256, (e, n_out, n_in // 32, 16), dtype=np.uint8)
            tensors[name + "_scales"] = rng.integers(118, 124, (e, n_out, n_in // 32), dtype=np.uint8)
        else:
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    save_file(tensors, str(d / "model.safetensors"))
    cfg.quantization_config = {"quant_method": "mxfp4"}
    cfg.save_pretrained(d)
    return d


def checkpoint_stats(hf_dir: Path) -> dict[str, int]:
    from emoe_jax.checkpoint.safetensors_reader import HFSource

    src = HFSource(hf_dir)
    sizes = [src.info(n).nbytes for n in src.location]
    largest_name = max(src.location, key=lambda n: src.info(n).nbytes)
    src.close()
    return {"checkpoint_bytes": sum(sizes), "num_tensors": len(sizes), "largest_tensor_bytes": max(sizes),
            "largest_tensor": largest_name,
            "files_bytes": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emoe_jax.checkpoint.measure_ram", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="where to build models and outputs (default: a temporary dir, removed)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layouts", default="per_expert,fused,sharded")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.layouts = args.layouts.split(",")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="emoe_measure_"))
    try:
        dirs = build_models(workdir, args)
        base_rss, base_s, _ = _child_peak_rss([sys.executable, "-c",
                                               "import emoe_jax.checkpoint.convert_hf, tensorstore, jax.numpy; "
                                               "from orbax.checkpoint import v1"])
        report = {"model": {k: getattr(args, k) for k in ("hidden", "layers", "experts", "intermediate", "vocab",
                                                          "dtype")},
                  "baseline_import_rss_bytes": base_rss, "cpu_count": os.cpu_count(), "runs": {}}
        for layout, hf in dirs.items():
            out = workdir / f"out_{layout}"
            shutil.rmtree(out, ignore_errors=True)
            rss, seconds, _ = _child_peak_rss([sys.executable, "-m", "emoe_jax.convert", str(hf), str(out),
                                               "--json", "--no-progress"])
            stats = checkpoint_stats(hf)
            report["runs"][layout] = {**stats, "peak_rss_bytes": rss, "seconds": round(seconds, 2),
                                      "peak_minus_baseline_bytes": rss - base_rss,
                                      "MB_per_s": round(stats["checkpoint_bytes"] / MiB / seconds, 1)}
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"baseline (imports only) peak RSS: {base_rss / MiB:.0f} MiB")
        for layout, r in report["runs"].items():
            print(f"{layout:>10}: checkpoint {r['checkpoint_bytes'] / MiB:.0f} MiB, largest tensor "
                  f"{r['largest_tensor_bytes'] / MiB:.1f} MiB ({r['largest_tensor']}); peak RSS "
                  f"{r['peak_rss_bytes'] / MiB:.0f} MiB (+{r['peak_minus_baseline_bytes'] / MiB:.0f} over baseline); "
                  f"{r['seconds']} s ({r['MB_per_s']} MiB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
