"""HF checkpoint conversion: tiny random transformers models of every family, built offline.

Checks experts (transposed HF weights) and dense params read back exactly, for the
per-expert (save_pretrained) and fused (raw state_dict) layouts, single and sharded
files, bf16; resume after a crash; clear CLI errors for bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from emoe_jax.checkpoint import (ExpertIntegrityError, IncompleteCheckpointError, convert_hf_checkpoint,  # noqa: E402
                                 load_checkpoint)
from emoe_jax.config import from_hf_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2)


def _family_model(family: str):
    T = transformers
    if family == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_local_experts=4))
    if family == "qwen2_moe":
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=24))
    if family == "qwen3_moe":
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=16))
    if family == "olmoe":
        return T.OlmoeForCausalLM(T.OlmoeConfig(**SMALL, num_experts=4, eos_token_id=2, pad_token_id=1))
    if family == "deepseek_v2":
        return T.DeepseekV2ForCausalLM(T.DeepseekV2Config(
            **SMALL, n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
            n_group=1, topk_group=1))
    raise ValueError(family)


def make_hf(tmp: Path, family: str = "mixtral", *, fused: bool = False, shard: str | None = None,
            dtype=torch.float32, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Save a tiny random model; return its dir and its per-expert-layout tensors as numpy (fp32)."""
    torch.manual_seed(seed)
    model = _family_model(family).to(dtype)
    d = tmp / f"hf_{family}_{'fused' if fused else 'per'}_{shard}_{str(dtype)[6:]}_{seed}"
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    if fused:
        # transformers 5's in-memory layout: gate_up_proj [E, 2I, H], down_proj [E, H, I].
        for f in d.glob("model*.safetensors*"):
            f.unlink()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    ref = {}
    from safetensors import safe_open
    tmp_ref = tmp / f"ref_{d.name}"
    model.save_pretrained(tmp_ref)  # per-expert layout as reference names
    with safe_open(str(tmp_ref / "model.safetensors"), "pt") as f:
        for k in f.keys():
            ref[k] = f.get_tensor(k).float().numpy()
    return d, ref


def expected_expert(ref: dict[str, np.ndarray], family: str, layer: int, e: int) -> dict[str, np.ndarray]:
    if family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
        names = {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        p = f"model.layers.{layer}.mlp.experts.{e}."
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    return {w: ref[p + n + ".weight"].T for w, n in names.items()}


def assert_matches(out: Path, ref: dict[str, np.ndarray], family: str, dtype=np.float32) -> None:
    ckpt = load_checkpoint(out)
    cfg = ckpt.config
    assert ckpt.experts.dtype == np.dtype(dtype)
    for ml, layer in enumerate(cfg.moe_layers):
        layer_arrays = ckpt.experts.read_layer(ml)
        for e in range(cfg.num_experts):
            want = expected_expert(ref, family, layer, e)
            got = ckpt.experts.read(ml, e)
            for w in ("gate", "up", "down"):
                np.testing.assert_array_equal(got[w].astype(np.float32), want[w].astype(dtype).astype(np.float32))
                np.testing.assert_array_equal(layer_arrays[w][e], got[w])
            ckpt.experts.verify(ml, e)
    n_dense = 0
    for name, value in ref.items():
        if ".experts." in name and ".shared_experts." not in name:
            continue
        path = name.split(".")[1:] if name.startswith("model.") else name.split(".")
        node = ckpt.dense
        for p in path:
            node = node[p]
        np.testing.assert_array_equal(node.astype(np.float32), value.astype(dtype).astype(np.float32))
        n_dense += 1
    assert n_dense == sum(len(v) for v in ckpt.manifest["dense_groups"].values())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"])
def test_per_expert_layout_every_family(tmp_path, family):
    hf, ref = make_hf(tmp_path, family)
    summary = convert_hf_checkpoint(hf, tmp_path / "out", progress=False)
    assert summary["status"] == "completed"
    assert_matches(tmp_path / "out", ref, family)
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt.config == from_hf_config(hf / "config.json")
    m = ckpt.manifest
    cfg = ckpt.config
    assert m["expert_bytes"] == 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert m["all_expert_bytes"] == m["expert_bytes"] * cfg.num_moe_layers * cfg.num_experts
    assert json.loads((tmp_path / "out" / "hf_config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert not (tmp_path / "out" / "progress.jsonl").exists()
    if family == "deepseek_v2":  # layer 0 is dense: its FFN is a dense param, not an expert
        assert cfg.moe_layers == (1,) and "gate_proj" in ckpt.dense["layers"]["0"]["mlp"]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_fused_layout_equals_per_expert(tmp_path, family):
    hf, ref = make_hf(tmp_path, family, fused=True)
    from safetensors import safe_open
    with safe_open(str(hf / "model.safetensors"), "np") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    convert_hf_checkpoint(hf, tmp_path / "out", progress=False)
    assert_matches(tmp_path / "out", ref, family)


def test_sharded_equals_single(tmp_path):
    hf, ref = make_hf(tmp_path, "mixtral", shard="20KB")
    assert (hf / "model.safetensors.index.json").exists() and len(list(hf.glob("*.safetensors"))) > 2
    convert_hf_checkpoint(hf, tmp_path / "out", progress=False)
    assert_matches(tmp_path / "out", ref, "mixtral")


def test_bf16_source_and_bf16_target(tmp_path):
    hf, ref = make_hf(tmp_path, "qwen3_moe", dtype=torch.bfloat16)
    convert_hf_checkpoint(hf, tmp_path / "auto", progress=False)  # auto keeps bf16
    assert_matches(tmp_path / "auto", ref, "qwen3_moe", dtype=ml_dtypes.bfloat16)
    # fp32 source cast to bf16 must round like torch's .to(bfloat16) (nearest even).
    hf32, ref32 = make_hf(tmp_path, "mixtral")
    convert_hf_checkpoint(hf32, tmp_path / "cast", dtype="bfloat16", progress=False)
    got = load_checkpoint(tmp_path / "cast").experts.read(0, 1)["gate"]
    want = torch.from_numpy(ref32["model.layers.0.block_sparse_moe.experts.1.w1.weight"].T.copy()).bfloat16()
    np.testing.assert_array_equal(got.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    """The real `python -m emoe_jax.convert` (the crash tests need a process to kill)."""
    return subprocess.run([sys.executable, "-m", "emoe_jax.convert", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture
def cli(run_main):
    """The CLI in this process: cli(*args) -> (returncode, stdout, stderr)."""
    from emoe_jax.convert import main

    return lambda *args: run_main(main, *args, "--no-progress")


def test_interrupted_conversion_resumes(cli, tmp_path):
    hf, ref = make_hf(tmp_path, "mixtral", shard="20KB")
    out = tmp_path / "out"
    crashed = _cli(hf, out, env={"EMOE_JAX_CONVERT_CRASH_AFTER": "5"})
    assert crashed.returncode == 86, crashed.stderr
    assert not (out / "manifest.json").exists() and (out / "progress.jsonl").exists()
    with pytest.raises(IncompleteCheckpointError, match="rerun python -m emoe_jax.convert"):
        load_checkpoint(out)
    done = cli(hf, out, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    total_items = 5 + 2 * 4  # embed, 2 layers, norm, lm_head + 8 experts
    assert summary["status"] == "resumed and completed" and summary["items_written"] == total_items - 5
    convert_hf_checkpoint(hf, tmp_path / "clean", progress=False)
    a, b = load_checkpoint(out), load_checkpoint(tmp_path / "clean")
    assert a.manifest["expert_crc32"] == b.manifest["expert_crc32"]
    assert_matches(out, ref, "mixtral")
    again = cli(hf, out, "--json")
    assert json.loads(again.stdout)["status"] == "already complete"


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_cli_errors_name_the_problem(cli, tmp_path):
    hf, _ = make_hf(tmp_path, "mixtral")
    # Truncated safetensors file.
    bad = tmp_path / "trunc"
    shutil.copytree(hf, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_clean_error(cli(bad, tmp_path / "o1"), "model.safetensors", "truncated")
    # Garbage header.
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:200])
    _assert_clean_error(cli(bad, tmp_path / "o2"), "model.safetensors", "not JSON")
    # Missing config.json.
    noconf = tmp_path / "noconf"
    shutil.copytree(hf, noconf)
    (noconf / "config.json").unlink()
    _assert_clean_error(cli(noconf, tmp_path / "o3"), "config.json")
    # Unsupported and unknown config fields.
    for field, value in (("quantization_config", {"quant_method": "gptq"}), ("frobnicate_experts", True)):
        d = tmp_path / f"field_{field}"
        shutil.copytree(hf, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        _assert_clean_error(cli(d, tmp_path / f"o_{field}"), field)
    # Expert shape disagreeing with the config.
    d = tmp_path / "shape"
    shutil.copytree(hf, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_clean_error(cli(d, tmp_path / "o_shape"), "block_sparse_moe.experts", "shape")
    # JSON error output for scripts.
    proc = cli(d, tmp_path / "o_shape", "--json")
    assert json.loads(proc.stdout)["status"] == "error"


def test_missing_shard_is_named(cli, tmp_path):
    hf, _ = make_hf(tmp_path, "mixtral", shard="20KB")
    victim = sorted(hf.glob("model-*.safetensors"))[1]
    victim.unlink()
    _assert_clean_error(cli(hf, tmp_path / "out"), victim.name, "missing")


def test_refuses_foreign_out_dir_and_detects_corruption(cli, tmp_path):
    hf, _ = make_hf(tmp_path, "mixtral")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _assert_clean_error(cli(hf, foreign), "not empty")
    out = tmp_path / "out"
    convert_hf_checkpoint(hf, out, progress=False)
    # Flip bytes of one expert chunk: verify names the layer and expert.
    chunk = out / "experts" / "up" / "c.1.2.0.0"  # flat chunk keys: one file per expert weight
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    ckpt = load_checkpoint(out)
    ckpt.experts.verify(1, 1)
    with pytest.raises(ExpertIntegrityError, match="MoE layer 1 expert 2"):
        ckpt.experts.verify(1, 2)
    # A missing chunk is an error, never silent zeros.
    chunk.unlink()
    with pytest.raises(ExpertIntegrityError, match="MoE layer 1 expert 2"):
        ckpt.experts.read(1, 2)


def test_overwrite_verify_and_mismatched_resume(cli, tmp_path):
    hf, ref = make_hf(tmp_path, "olmoe")
    out = tmp_path / "out"
    crashed = _cli(hf, out, env={"EMOE_JAX_CONVERT_CRASH_AFTER": "2"})
    assert crashed.returncode == 86
    # Resuming with another dtype would mix two jobs: refused.
    _assert_clean_error(cli(hf, out, "--dtype", "bfloat16"), "partial conversion", "--overwrite")
    proc = cli(hf, out, "--dtype", "bfloat16", "--overwrite", "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "completed"
    assert_matches(out, ref, "olmoe", dtype=ml_dtypes.bfloat16)
    # A finished conversion of the same source with another dtype: refused without --overwrite.
    _assert_clean_error(cli(hf, out, "--dtype", "float32"), "already holds a finished conversion")
