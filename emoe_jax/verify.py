"""Check a converted checkpoint end to end, before a run depends on it.

    python -m emoe_jax.verify OUT_DIR [--json] [--no-progress]

Expert reads are checksummed when they happen, but an expert that is never routed
to is never read, so a truncated or damaged one goes unnoticed until the day it is
needed. Steps:
  1. the manifest: readable, of this format version, and consistent with itself
     (config, MoE layers, checksum table shape, byte counts) and with the expert
     arrays on disk (shapes, dtype);
  2. every dense group restores, holding exactly the tensors the manifest lists;
  3. the tokenizer loads (text prompts need it);
  4. every routed expert is read and its crc32 compared with the manifest
     (tqdm over bytes).
Every fault is listed (not only the first); exit status 0 when none, 1 otherwise,
2 when the folder is not a checkpoint at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from emoe_jax.cli import USER_ERRORS, fail


def verify_checkpoint(path: str | Path, progress: bool = True, max_faults: int = 100) -> dict[str, Any]:
    """Run every check on a converted checkpoint; return {'ok', 'faults', 'checked'}."""
    from tqdm.auto import tqdm

    from emoe_jax.checkpoint import dense_store
    from emoe_jax.checkpoint.errors import CheckpointError
    from emoe_jax.checkpoint.expert_store import ExpertStore, expert_crc32
    from emoe_jax.checkpoint.manifest import read_manifest
    from emoe_jax.config import MoEConfig

    path = Path(path).expanduser().resolve()
    faults: list[str] = []
    checked = {"dense_groups": 0, "experts": 0, "tokenizer": False}
    manifest = read_manifest(path)  # not a checkpoint: raises, exit 2
    # 1. manifest consistency.
    try:
        cfg = MoEConfig.from_dict(manifest["config"])
        lm, e = manifest["num_moe_layers"], manifest["num_experts"]
        crcs = manifest["expert_crc32"]
        if list(manifest["moe_layers"]) != list(cfg.moe_layers) or lm != cfg.num_moe_layers or e != cfg.num_experts:
            faults.append("manifest: moe_layers/num_moe_layers/num_experts disagree with its config")
        if len(crcs) != lm or any(len(row) != e for row in crcs):
            faults.append(f"manifest: expert_crc32 is not a {lm} x {e} table")
        if manifest["all_expert_bytes"] != manifest["expert_bytes"] * lm * e:
            faults.append("manifest: all_expert_bytes != expert_bytes * layers * experts")
    except (KeyError, TypeError, ValueError) as err:
        faults.append(f"manifest: unreadable field ({err})")
        return {"ok": False, "faults": faults, "checked": checked, "path": str(path)}
    store = None
    try:
        store = ExpertStore(path / "experts", crcs)
        info = store.info
        if (info.num_layers, info.num_experts, info.hidden, info.inter) != (
                lm, e, cfg.hidden_size, cfg.moe_intermediate_size):
            faults.append(f"experts: arrays hold {info.num_layers} x {info.num_experts} experts of "
                          f"{info.hidden} x {info.inter}; the manifest says {lm} x {e} of "
                          f"{cfg.hidden_size} x {cfg.moe_intermediate_size}")
            store = None
        elif info.dtype.name != manifest.get("dtype"):
            faults.append(f"experts: arrays are {info.dtype.name}, the manifest says {manifest.get('dtype')}")
    except Exception as err:  # noqa: BLE001 - TensorStore open errors vary
        faults.append(f"experts: cannot open the expert arrays ({err})")
        store = None
    for name in manifest.get("tokenizer_files", []):
        if not (path / name).is_file():
            faults.append(f"tokenizer: {name} is listed in the manifest but missing")
    # 2. dense groups.
    for group, names in manifest["dense_groups"].items():
        try:
            tree = dense_store.load_groups(path / "dense", [group])
            got = sorted(".".join(p) for p, _ in dense_store.flatten(tree))
            if got != sorted(names):
                faults.append(f"dense group {group!r}: holds {len(got)} tensors, the manifest lists {len(names)}")
        except CheckpointError as err:
            faults.append(str(err))
        checked["dense_groups"] += 1
    # 3. tokenizer.
    try:
        from emoe_jax.tokenizer import load_tokenizer

        load_tokenizer(path, cfg)
        checked["tokenizer"] = True
    except USER_ERRORS as err:
        faults.append(f"tokenizer: {err}")
    # 4. every expert, layer by layer (one batch of reads per layer).
    if store is not None:
        with tqdm(total=lm * e * store.expert_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc="verifying experts", disable=not progress) as bar:
            for layer in range(lm):
                store.verify_reads = False  # compare here, so every bad expert is listed
                for fut in store.read_async((layer, x) for x in range(e)):
                    try:
                        got = expert_crc32(fut.result())
                        if got != crcs[layer][fut.expert]:
                            faults.append(f"MoE layer {layer} expert {fut.expert}: crc32 {got:#010x} != "
                                          f"manifest {crcs[layer][fut.expert]:#010x}")
                    except CheckpointError as err:
                        faults.append(str(err).split(". The expert store")[0])
                    checked["experts"] += 1
                    bar.update(store.expert_bytes)
                if len(faults) >= max_faults:
                    faults.append(f"stopped after {max_faults} faults")
                    break
    return {"ok": not faults, "faults": faults, "checked": checked, "path": str(path)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m emoe_jax.verify",
        description="Check a converted checkpoint: manifest consistency, every dense group readable, the "
                    "tokenizer present, and the crc32 of every routed expert. Exit 0 when all is well, 1 on "
                    "any fault (each is listed), 2 when the folder is not a checkpoint.")
    p.add_argument("checkpoint", help="converted checkpoint directory (python -m emoe_jax.convert made it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        report = verify_checkpoint(args.checkpoint, progress=not (args.no_progress or args.json))
    except USER_ERRORS as err:
        if args.json:
            print(json.dumps({"ok": False, "faults": [str(err)], "path": args.checkpoint}))
        return fail(err)
    if args.json:
        print(json.dumps(report))
    else:
        c = report["checked"]
        for f in report["faults"]:
            print(f"FAULT: {f}")
        fix = ("" if report["ok"] else "; convert the model again (python -m emoe_jax.convert HF_DIR OUT_DIR "
               "--overwrite)")
        print(f"{'ok' if report['ok'] else 'damaged'}: {report['path']}: {c['experts']} experts, "
              f"{c['dense_groups']} dense groups, tokenizer {'ok' if c['tokenizer'] else 'missing'}, "
              f"{len(report['faults'])} faults{fix}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
