"""MXFP4 expert weights (gpt-oss) dequantize to transformers' values, in the converter too;
quantization methods we do not implement are refused by name."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from emoe_jax.checkpoint.dequant_mxfp4 import dequantize_mxfp4

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402


def _random_mxfp4(rng, experts, rows, cols):
    """blocks [E, rows, cols/32, 16] uint8 (every FP4 code), scales [E, rows, cols/32] (exponents 2^-27..2^+8)."""
    blocks = rng.integers(0, 256, (experts, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(100, 136, (experts, rows, cols // 32), dtype=np.uint8)
    return blocks, scales


def _transformers(blocks, scales, dtype):
    """transformers' dequantization: [E, cols, rows] in `dtype`, as float32 numpy."""
    out = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
    return out.float().numpy()


def test_dequantize_equals_transformers_float32_and_bfloat16():
    blocks, scales = _random_mxfp4(np.random.default_rng(0), 3, 10, 64)
    ours = dequantize_mxfp4(blocks, scales).transpose(0, 2, 1)  # [E, cols, rows] like transformers
    np.testing.assert_array_equal(ours, _transformers(blocks, scales, torch.float32))
    np.testing.assert_array_equal(ours.astype(ml_dtypes.bfloat16).astype(np.float32),
                                  _transformers(blocks, scales, torch.bfloat16))


def test_dequantize_rejects_mismatched_shapes():
    blocks, scales = _random_mxfp4(np.random.default_rng(0), 1, 2, 32)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :0])


@pytest.fixture(scope="module")
def _write_quantized_gpt_oss(make_hf_model):
    def _write_quantized_gpt_oss(root, quant_method="mxfp4"):
        """A tiny gpt-oss checkpoint whose experts are stored as MXFP4 blocks + scales (built here),
        as openai/gpt-oss-* ship them. Returns the blocks/scales/biases written."""
        from safetensors.numpy import load_file, save_file

        model = make_hf_model("gpt_oss", intermediate_size=32)  # MXFP4 packs 32 values along each input
        model.save_pretrained(root)
        tensors = load_file(root / "model.safetensors")
        rng = np.random.default_rng(1)
        cfg = json.loads((root / "config.json").read_text())
        e, h, i = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
        packed = {}
        for layer in range(cfg["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.mlp.experts."
            for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
                del tensors[prefix + name]
                blocks, scales = _random_mxfp4(rng, e, rows, cols)
                tensors[prefix + name + "_blocks"], tensors[prefix + name + "_scales"] = blocks, scales
                packed[(layer, name)] = (blocks, scales, tensors[prefix + name + "_bias"])
        save_file(tensors, root / "model.safetensors")
        cfg["quantization_config"] = {"quant_method": quant_method,
                                      "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                 "model.embed_tokens", "lm_head"]}
        (root / "config.json").write_text(json.dumps(cfg))
        return packed, i

    return _write_quantized_gpt_oss


def _convert(src, out):
    return subprocess.run([sys.executable, "-m", "emoe_jax.convert", str(src), str(out), "--no-progress"],
                          capture_output=True, text=True)


def test_converter_dequantizes_mxfp4_experts_like_transformers(_write_quantized_gpt_oss, tmp_path):
    from emoe_jax.checkpoint import load_checkpoint

    packed, inter = _write_quantized_gpt_oss(tmp_path / "hf")
    proc = _convert(tmp_path / "hf", tmp_path / "ours")
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(tmp_path / "ours")
    assert ckpt.manifest["dtype"] == "bfloat16"  # 'auto' for MXFP4: transformers' gpt-oss dtype
    bf16 = lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    for ml in range(ckpt.config.num_moe_layers):
        got = {w: np.asarray(a, np.float32) for w, a in ckpt.experts.read_layer(ml).items()}
        gu_blocks, gu_scales, gu_bias = packed[(ml, "gate_up_proj")]
        d_blocks, d_scales, d_bias = packed[(ml, "down_proj")]
        gate_up = _transformers(gu_blocks, gu_scales, torch.bfloat16)  # [E, H, 2I], gate/up interleaved
        down = _transformers(d_blocks, d_scales, torch.bfloat16)  # [E, I, H]
        np.testing.assert_array_equal(got["gate"][:, :-1], gate_up[..., 0::2])
        np.testing.assert_array_equal(got["up"][:, :-1], gate_up[..., 1::2])
        np.testing.assert_array_equal(got["down"][:, :-1], down)
        # biases ride in the extra last row
        np.testing.assert_array_equal(got["gate"][:, -1], bf16(gu_bias[:, 0::2]))
        np.testing.assert_array_equal(got["up"][:, -1], bf16(gu_bias[:, 1::2]))
        np.testing.assert_array_equal(got["down"][:, -1], bf16(d_bias))
        assert got["gate"].shape[1:] == (ckpt.config.hidden_size + 1, inter)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes_4bit"])
def test_unsupported_quantization_is_refused_by_name(tmp_path, method):
    from emoe_jax.config import ConfigError, from_hf_config

    hf = {"model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4,
          "quantization_config": {"quant_method": method}}
    with pytest.raises(ConfigError, match=method):
        from_hf_config(hf)
    with pytest.raises(ConfigError, match="mxfp4"):  # MXFP4 is a gpt-oss format; refused elsewhere
        from_hf_config({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_local_experts": 4,
                        "num_experts_per_tok": 2, "quantization_config": {"quant_method": "mxfp4"}})


def test_cli_refuses_unsupported_quantization(_write_quantized_gpt_oss, tmp_path):
    _write_quantized_gpt_oss(tmp_path / "hf", quant_method="gptq")
    proc = _convert(tmp_path / "hf", tmp_path / "ours")
    assert proc.returncode != 0
    assert "gptq" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ours" / "manifest.json").exists()
