"""Expert store, write_checkpoint and the pread safetensors reader against plain references."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from emoe_jax.checkpoint import (CheckpointError, ExpertIntegrityError, IncompleteCheckpointError, SafetensorsError,
                                 expert_crc32, load_checkpoint, write_checkpoint)
from emoe_jax.checkpoint.safetensors_reader import SafetensorsFile
from emoe_jax.config import tiny_config


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    lm, e, h, i = cfg.num_moe_layers, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    experts = {"gate": rng.standard_normal((lm, e, h, i), np.float32),
               "up": rng.standard_normal((lm, e, h, i), np.float32),
               "down": rng.standard_normal((lm, e, i, h), np.float32)}
    dense = {"embed_tokens": {"weight": rng.standard_normal((cfg.vocab_size, h), np.float32)},
             "norm": {"weight": np.ones(h, np.float32)},
             "layers": {str(l): {"self_attn": {"q_proj": {"weight": rng.standard_normal((h, h), np.float32)}},
                                 "input_layernorm": {"weight": rng.standard_normal(h).astype(np.float32)}}
                        for l in range(cfg.num_layers)}}
    return dense, experts


def test_write_checkpoint_roundtrip_and_reads(tmp_path):
    cfg = tiny_config("deepseek_v2")  # dense layer 0: MoE layer index != decoder layer index
    dense, experts = _random_params(cfg)
    manifest = write_checkpoint(tmp_path / "ck", cfg, dense, experts)
    assert manifest["num_moe_layers"] == cfg.num_moe_layers == 2
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.config == cfg
    np.testing.assert_array_equal(ckpt.dense["layers"]["2"]["self_attn"]["q_proj"]["weight"],
                                  dense["layers"]["2"]["self_attn"]["q_proj"]["weight"])
    np.testing.assert_array_equal(ckpt.dense["embed_tokens"]["weight"], dense["embed_tokens"]["weight"])
    assert set(ckpt.load_dense_groups(["layers_1"])["layers"]) == {"1"}
    store = ckpt.experts
    futures = store.read_async([(1, 7), (0, 3), (1, 0)])
    for f, (l, e) in zip(futures, [(1, 7), (0, 3), (1, 0)]):
        got = f.result()
        for w in ("gate", "up", "down"):
            np.testing.assert_array_equal(got[w], experts[w][l, e])
        assert expert_crc32(got) == manifest["expert_crc32"][l][e]
    assert store.reads == 3 and store.bytes_read == 3 * store.expert_bytes
    layer = store.read_layer(1)
    np.testing.assert_array_equal(layer["down"], experts["down"][1])
    assert store.reads == 3 + cfg.num_experts
    assert store.verify_all() == cfg.num_moe_layers * cfg.num_experts
    with pytest.raises(IndexError):
        store.read(2, 0)


def test_write_checkpoint_bf16_and_refusals(tmp_path):
    cfg = tiny_config("mixtral")
    dense, experts = _random_params(cfg)
    write_checkpoint(tmp_path / "ck", cfg, dense, experts, dtype="bfloat16")
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.experts.dtype == ml_dtypes.bfloat16 and ckpt.manifest["dtype"] == "bfloat16"
    np.testing.assert_array_equal(ckpt.experts.read(2, 5)["up"], experts["up"][2, 5].astype(ml_dtypes.bfloat16))
    assert ckpt.dense["norm"]["weight"].dtype == ml_dtypes.bfloat16
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        write_checkpoint(tmp_path / "ck", cfg, dense, experts)
    bad = dict(experts, down=experts["down"][:, :, :4])
    with pytest.raises(CheckpointError, match="down"):
        write_checkpoint(tmp_path / "ck2", cfg, dense, bad)


def test_incomplete_and_corrupt_manifest(tmp_path):
    cfg = tiny_config("olmoe")
    dense, experts = _random_params(cfg)
    write_checkpoint(tmp_path / "ck", cfg, dense, experts)
    m = tmp_path / "ck" / "manifest.json"
    text = m.read_text()
    m.unlink()
    with pytest.raises(IncompleteCheckpointError, match="incomplete conversion"):
        load_checkpoint(tmp_path / "ck")
    manifest = json.loads(text)
    manifest["expert_crc32"][0][0] ^= 1
    m.write_text(json.dumps(manifest))
    with pytest.raises(ExpertIntegrityError, match="MoE layer 0 expert 0"):
        load_checkpoint(tmp_path / "ck").experts.verify(0, 0)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope")


def test_reader_matches_safetensors_reference(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"bf": torch.randn(5, 3, 4, generator=g).bfloat16(), "f16": torch.randn(7, 2, generator=g).half(),
               "f32": torch.randn(3, generator=g), "i64": torch.arange(6).reshape(2, 3),
               "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    f = SafetensorsFile(path)
    with safe_open(str(path), "pt") as ref:
        for name in tensors:
            want = ref.get_tensor(name)
            got = f.read(name)
            assert got.shape == tuple(want.shape)
            if want.dtype == torch.bfloat16:
                assert got.dtype == ml_dtypes.bfloat16
                np.testing.assert_array_equal(got.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))
            else:
                np.testing.assert_array_equal(got, want.numpy())
        np.testing.assert_array_equal(f.read("bf", 1, 4).view(np.uint16),
                                      ref.get_tensor("bf")[1:4].view(torch.int16).numpy().view(np.uint16))
    with pytest.raises(SafetensorsError, match="rows"):
        f.read("bf", 3, 9)
    with pytest.raises(SafetensorsError, match="not in"):
        f.read("missing")
    raw = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-3])
    with pytest.raises(SafetensorsError, match="short.safetensors.*truncated"):
        SafetensorsFile(tmp_path / "short.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(raw[:5])
    with pytest.raises(SafetensorsError, match="tiny.safetensors"):
        SafetensorsFile(tmp_path / "tiny.safetensors")
