"""Hugging Face safetensors checkpoint -> emoe_jax checkpoint, streaming and resumable.

Steps:
  1. read config.json with `from_hf_config` (refuses unsupported fields, naming them);
  2. index the safetensors files (single, sharded with index.json, or a bare set) and
     validate every header (a corrupt or truncated file fails here, naming it);
  3. classify every tensor: routed-expert pieces (per-expert or fused layout) or dense;
     check expert shapes and completeness against the config;
  4. plan items in file order: per decoder layer its dense group then its experts,
     plus the embed/norm/lm_head groups; skip items the progress log marks done;
  5. stream: read one tensor (or, for fused tensors, one expert's rows) at a time,
     transpose experts to our orientation, cast, write, log (tqdm over bytes);
  6. finish: config.json, hf_config.json, tokenizer files, manifest.json last.
Peak memory is about one dense group or one expert (plus its transposed copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from emoe_jax.checkpoint.dense_store import set_nested
from emoe_jax.checkpoint import gpt_oss_experts
from emoe_jax.checkpoint.dequant_fp8 import open_converter_source
from emoe_jax.checkpoint.errors import CheckpointError
from emoe_jax.checkpoint.fingerprint import describe_difference
from emoe_jax.checkpoint.lock import conversion_lock
from emoe_jax.checkpoint.manifest import FORMAT_VERSION, MANIFEST, read_manifest
from emoe_jax.checkpoint.names import ExpertPiece, dense_path, group_of, parse_expert_name
from emoe_jax.checkpoint.safetensors_reader import HFSource
from emoe_jax.checkpoint.writer import TOKENIZER_CORE, CheckpointWriter, prepare_out_dir, target_dtype
from emoe_jax.config import MoEConfig, from_hf_config


@dataclass
class _Plan:
    # (moe_layer, expert) -> {'gate': name, 'up': name, 'down': name}
    per_expert: dict[tuple[int, int], dict[str, str]] = field(default_factory=dict)
    # moe_layer -> {'gate_up': name, 'down': name}
    fused: dict[int, dict[str, str]] = field(default_factory=dict)
    # group -> list of (hf_name, nested path)
    dense: dict[str, list[tuple[str, tuple[str, ...]]]] = field(default_factory=dict)


def _plan(source: HFSource, cfg: MoEConfig) -> _Plan:
    plan = _Plan()
    moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
    h, i_, e_ = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    implied = f"(config.json: hidden_size={h}, moe intermediate size={i_}, experts={e_})"
    for name in source.location:
        piece: ExpertPiece | None = parse_expert_name(name)
        if piece is None:
            path = dense_path(name, cfg.family)
            plan.dense.setdefault(group_of(path), []).append((name, path))
            continue
        if piece.layer not in moe_index:
            raise CheckpointError(
                f"tensor {name!r}: layer {piece.layer} is not an MoE layer of this config "
                f"(MoE layers: {list(cfg.moe_layers)})"
            )
        moe_layer = moe_index[piece.layer]
        shape = source.info(name).shape
        if piece.expert is not None:
            want = (i_, h) if piece.role in ("gate", "up") else (h, i_)
            if piece.expert >= e_:
                raise CheckpointError(f"tensor {name!r}: expert {piece.expert} >= num_experts {e_} {implied}")
            slot = plan.per_expert.setdefault((moe_layer, piece.expert), {})
        elif cfg.family == "gpt_oss":
            want = gpt_oss_experts.fused_shapes(cfg)[piece.role]
            slot = plan.fused.setdefault(moe_layer, {})
        else:
            if piece.role not in ("gate_up", "down"):
                raise CheckpointError(f"tensor {name!r}: expert biases / quantized experts are only known "
                                      "for gpt_oss checkpoints")
            want = (e_, 2 * i_, h) if piece.role == "gate_up" else (e_, h, i_)
            slot = plan.fused.setdefault(moe_layer, {})
        if shape != want:
            raise CheckpointError(f"expert tensor {name!r} has shape {shape}, expected {want} {implied}")
        if piece.role in slot:
            raise CheckpointError(f"expert tensors {slot[piece.role]!r} and {name!r} hold the same weight")
        slot[piece.role] = name
    missing = []
    for moe_layer, layer in enumerate(cfg.moe_layers):
        if moe_layer in plan.fused:
            if any((moe_layer, e) in plan.per_expert for e in range(e_)):
                raise CheckpointError(f"layer {layer} has both fused and per-expert tensors")
            roles = (gpt_oss_experts.missing_roles(set(plan.fused[moe_layer])) if cfg.family == "gpt_oss"
                     else [r for r in ("gate_up", "down") if r not in plan.fused[moe_layer]])
            missing += [f"model.layers.{layer}.mlp.experts.{r}_proj" for r in roles]
            continue
        if cfg.family == "gpt_oss":
            missing.append(f"model.layers.{layer}.mlp.experts.* (gpt_oss stores fused experts)")
            continue
        for e in range(e_):
            got = plan.per_expert.get((moe_layer, e), {})
            missing += [f"layer {layer} expert {e} {r}" for r in ("gate", "up", "down") if r not in got]
    if missing:
        raise CheckpointError(
            f"routed-expert tensors missing from {source.dir}: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''} ({len(missing)} in all); is a shard missing?"
        )
    return plan


def _read_expert(source: HFSource, plan: _Plan, moe_layer: int, e: int, inter: int,
                 cfg_family: str = "") -> dict[str, np.ndarray]:
    """One expert in our orientation: gate/up [H, I], down [I, H]."""
    if moe_layer in plan.fused and cfg_family == "gpt_oss":
        return gpt_oss_experts.read_expert(lambda name: source.read(name, e, e + 1)[0], plan.fused[moe_layer])
    if moe_layer in plan.fused:
        names = plan.fused[moe_layer]
        gate_up = source.read(names["gate_up"], e, e + 1)[0]  # [2I, H]: gate rows, then up rows
        down = source.read(names["down"], e, e + 1)[0]  # [H, I]
        return {"gate": gate_up[:inter].T, "up": gate_up[inter:].T, "down": down.T}
    names = plan.per_expert[(moe_layer, e)]
    return {"gate": source.read(names["gate"]).T, "up": source.read(names["up"]).T,
            "down": source.read(names["down"]).T}


def _group_order(group: str) -> tuple[int, int]:
    # embed_tokens first, then layers in order, then norm / lm_head (the usual file order).
    if group.startswith("layers_"):
        return (1, int(group.split("_", 1)[1]))
    return (0 if group == "embed_tokens" else 2, 0)


def convert_hf_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto",
                          overwrite: bool = False, progress: bool = True,
                          verify: bool = False) -> dict[str, Any]:
    """Convert a Hugging Face MoE checkpoint directory; return a summary dict.

    dtype: 'auto' (the routed experts' dtype in the source), 'bfloat16', 'float32' or
    'float16'. A rerun after an interruption resumes; a rerun on a finished
    conversion of the same source returns at once.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {hf_dir}")
    hf_config = hf_dir / "config.json"
    if not hf_config.is_file():
        raise FileNotFoundError(f"{hf_config} not found: a Hugging Face checkpoint needs its config.json")
    cfg = from_hf_config(hf_config)
    source = open_converter_source(hf_dir)  # FP8 weights dequantized on read, MTP layers skipped
    try:
        plan = _plan(source, cfg)
        if dtype == "auto":
            first = next(iter(plan.fused.values()), None) or next(iter(plan.per_expert.values()))
            # The weights' dtype (not a bias's or MXFP4 scale's); MXFP4 dequantizes to bfloat16 as transformers does.
            probe = [n for n in first.values() if not n.endswith(("_bias", "_scales"))] or list(first.values())
            dt = source.info(probe[0]).dtype
            dt = target_dtype("bfloat16" if probe[0].endswith("_blocks") else
                              dt.name if dt.name in ("bfloat16", "float32", "float16") else "float32")
        else:
            dt = target_dtype(dtype)
        source.output_dtype = dt  # FP8 weights dequantize straight to the target dtype (one rounding)
        fingerprint = {"format_version": FORMAT_VERSION, "source": source.fingerprint(), "dtype": dt.name}
        with conversion_lock(out_dir):
            prepare_out_dir(out_dir, overwrite)
            if (out_dir / MANIFEST).exists():
                manifest = read_manifest(out_dir)
                old = manifest["source"].get("fingerprint")
                if old != fingerprint:
                    raise CheckpointError(
                        f"{out_dir} already holds a finished conversion of another source or dtype "
                        f"({describe_difference(old, fingerprint)}); pass --overwrite to replace it, or "
                        "convert into another directory"
                    )
                return _summary(out_dir, manifest, cfg, written=0, status="already complete")
            dense_names = {g: [".".join(p) for _, p in items] for g, items in plan.dense.items()}
            writer = CheckpointWriter(out_dir, cfg, dt, fingerprint, dense_names)
            _stream(source, plan, cfg, writer, progress)
            manifest = writer.finish(source={"kind": "huggingface", "dir": str(hf_dir.resolve())},
                                     hf_config=hf_config, tokenizer_dir=hf_dir, verify=verify)
            return _summary(out_dir, manifest, cfg, written=writer.items_written,
                            status="resumed and completed" if writer.progress.resumed else "completed")
    finally:
        source.close()


def _stream(source: HFSource, plan: _Plan, cfg: MoEConfig, writer: CheckpointWriter, progress: bool) -> None:
    nbytes = lambda names: sum(source.info(n).nbytes for n in names)  # noqa: E731
    inter, e_ = cfg.moe_intermediate_size, cfg.num_experts
    # Work items: ('dense', group) or ('expert', moe_layer, expert), with their source bytes.
    items: list[tuple[tuple, int]] = []
    layer_to_ml = {layer: moe_layer for moe_layer, layer in enumerate(cfg.moe_layers)}
    groups = sorted(plan.dense, key=_group_order)
    for g in groups:
        items.append((("dense", g), nbytes(n for n, _ in plan.dense[g])))
        layer = _group_order(g)[1] if g.startswith("layers_") else None
        if layer is not None and layer in layer_to_ml:
            moe_layer = layer_to_ml[layer]
            for e in range(e_):
                names = plan.fused[moe_layer].values() if moe_layer in plan.fused else plan.per_expert[(moe_layer, e)].values()
                share = nbytes(names) // e_ if moe_layer in plan.fused else nbytes(names)
                items.append((("expert", moe_layer, e), share))
    # Expert layers whose decoder layer has no dense tensors at all (unusual) still get written.
    planned = {it[1:] for it, _ in items if it[0] == "expert"}
    for moe_layer in range(cfg.num_moe_layers):
        for e in range(e_):
            if (moe_layer, e) not in planned:
                names = plan.fused[moe_layer].values() if moe_layer in plan.fused else plan.per_expert[(moe_layer, e)].values()
                items.append((("expert", moe_layer, e), nbytes(names) // (e_ if moe_layer in plan.fused else 1)))

    def done(item: tuple) -> bool:
        return writer.dense_done(item[1]) if item[0] == "dense" else writer.expert_done(item[1], item[2])

    total = sum(b for _, b in items)
    initial = sum(b for it, b in items if done(it))
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
              desc="converting", disable=not progress) as bar:
        for item, b in items:
            if done(item):
                continue
            if item[0] == "dense":
                tree: dict[str, Any] = {}
                for name, path in plan.dense[item[1]]:
                    set_nested(tree, path, source.read(name))
                writer.save_dense_group(item[1], tree)
                del tree
            else:
                _, moe_layer, e = item
                writer.write_expert(moe_layer, e, _read_expert(source, plan, moe_layer, e, inter, cfg.family))
            bar.update(b)


def _summary(out_dir: Path, manifest: dict[str, Any], cfg: MoEConfig, *, written: int, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "out_dir": str(out_dir),
        "family": cfg.family,
        "dtype": manifest["dtype"],
        "num_moe_layers": manifest["num_moe_layers"],
        "num_experts": manifest["num_experts"],
        "expert_bytes": manifest["expert_bytes"],
        "all_expert_bytes": manifest["all_expert_bytes"],
        "dense_groups": len(manifest["dense_groups"]),
        "items_written": written,
        "tokenizer_files": manifest["tokenizer_files"],
        "warnings": checkpoint_warnings(manifest, out_dir),
    }


def checkpoint_warnings(manifest: dict[str, Any], out_dir: Path) -> list[str]:
    """What a user should know about a finished checkpoint (printed by the CLIs)."""
    if any(f in manifest["tokenizer_files"] for f in TOKENIZER_CORE):
        return []
    return [f"the source has no tokenizer.json or tokenizer.model, so {out_dir} has no tokenizer: "
            "text prompts will fail until you copy the model's tokenizer files into it (token-id "
            "prompts still work through the API: engine.generate([[ids]], ...))"]
