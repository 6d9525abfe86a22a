"""Convert a Hugging Face MoE checkpoint into an emoe_jax checkpoint.

    python -m emoe_jax.convert HF_DIR OUT_DIR [--dtype auto|bfloat16|float32|float16] [--json]

Dense parameters go to OUT_DIR/dense (Orbax), routed experts to OUT_DIR/experts
(TensorStore zarr3, one chunk per expert), manifest.json is written last. The
conversion streams one tensor at a time and resumes where an interrupted run stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emoe_jax.convert",
        description="Convert a Hugging Face MoE checkpoint (config.json + safetensors) into an emoe_jax "
        "checkpoint: dense params saved with Orbax, routed experts in a TensorStore store with one chunk "
        "per expert, manifest.json written last. Rerun the same command to resume an interrupted "
        "conversion. Supported families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2.",
    )
    parser.add_argument("hf_dir", help="directory with config.json and model.safetensors (or shards + index)")
    parser.add_argument("out_dir", help="output directory (created; resumed if a conversion was interrupted)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                        help="stored dtype of every floating tensor; auto = the routed experts' source dtype")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard an existing (finished or partial) conversion in OUT_DIR")
    parser.add_argument("--verify", action="store_true",
                        help="re-read every expert and check its crc32 before writing the manifest")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    # Imported after argument parsing so --help is instant.
    from emoe_jax.checkpoint import convert_hf_checkpoint
    from emoe_jax.config import ConfigError

    t0 = time.perf_counter()
    try:
        summary = convert_hf_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                                        progress=not args.no_progress, verify=args.verify)
    except KeyboardInterrupt:
        print("emoe_jax.convert: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:  # CheckpointError, ConfigError are ValueErrors
        kind = "config error" if isinstance(e, ConfigError) else "error"
        if args.json:
            print(json.dumps({"status": "error", "error": str(e)}))
        print(f"emoe_jax.convert: {kind}: {e}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    for w in summary.get("warnings", []):
        print(f"emoe_jax.convert: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['status']}: {args.hf_dir} -> {args.out_dir} ({summary['family']}, {summary['dtype']}, "
              f"{summary['num_moe_layers']} MoE layers x {summary['num_experts']} experts, "
              f"{summary['all_expert_bytes'] / 2**20:.1f} MiB of experts) in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
