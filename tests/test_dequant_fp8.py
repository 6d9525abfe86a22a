"""FP8 block-quantized checkpoints (DeepSeek-V3/R1, Kimi-K2): the converter dequantizes them while
streaming to values equal to transformers' dequantization, skips the multi-token-prediction layer,
and refuses quantizations it does not implement, by name."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight  # noqa: E402


from emoe_jax.checkpoint import load_checkpoint  # noqa: E402
from emoe_jax.checkpoint.dequant_fp8 import dequantize_fp8_blocks  # noqa: E402
from emoe_jax.checkpoint.errors import CheckpointError  # noqa: E402
from emoe_jax.config import ConfigError, from_hf_config  # noqa: E402
from emoe_jax.model.hf_params import dense_from_converted  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block FP8: per-block scale = amax / 448, weight / scale in e4m3 (ragged edges allowed)."""
    br, bc = block
    rows, cols = w.shape
    nr, nc = -(-rows // br), -(-cols // bc)
    scale = torch.empty(nr, nc, dtype=torch.float32)
    for i in range(nr):
        for j in range(nc):
            scale[i, j] = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max().clamp(min=1e-12) / 448.0
    expanded = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (w / expanded).to(torch.float8_e4m3fn), scale


def _ours(q: torch.Tensor, s: torch.Tensor, block, out_dtype) -> np.ndarray:
    qn = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return dequantize_fp8_blocks(qn, s.numpy(), block, np.dtype(out_dtype))


def _as_np(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("shape", [(256, 384), (576, 200)])  # whole 128x128 blocks; ragged (kv_a_proj-like)
def test_block_dequantization_equals_transformers(shape):
    torch.manual_seed(0)
    q, s = _quantize(torch.randn(*shape) * 0.05, (128, 128))
    for dtype, np_dtype in ((torch.bfloat16, BF16), (torch.float32, np.float32)):
        ref = _dequantize_fp8_weight(q, s, [128, 128], torch.float32).to(dtype)
        got = _ours(q, s, (128, 128), np_dtype)
        assert got.dtype == np_dtype
        np.testing.assert_array_equal(got, _as_np(ref))
        if shape[0] % 128 == 0 and shape[1] % 128 == 0:  # the loader's op (whole blocks only)
            np.testing.assert_array_equal(got, _as_np(Fp8Dequantize(None)._dequantize_one(q, s, dtype)))


def test_scale_grid_of_wrong_shape_is_refused():
    q, s = _quantize(torch.randn(256, 256), (128, 128))
    with pytest.raises(CheckpointError, match="scale tensor has shape"):
        _ours(q, s[:1], (128, 128), np.float32)


BLOCK = (16, 16)  # tiny shapes: several blocks per tensor, ragged edges (24, 48 wide)


@pytest.fixture(scope="module")
def fp8_checkpoint(make_hf_model, tmp_path_factory):
    """A tiny DeepSeek-V3 saved the way FP8 releases are: 2-D linear weights as e4m3 + weight_scale_inv,
    everything else unquantized, plus a multi-token-prediction layer after num_hidden_layers."""
    root = tmp_path_factory.mktemp("fp8")
    model = make_hf_model("deepseek_v3")
    model.save_pretrained(root / "plain")
    from safetensors.torch import load_file

    plain = load_file(root / "plain" / "model.safetensors")
    tensors, reference = {}, {}
    for name, w in plain.items():
        if name.endswith("proj.weight") and w.ndim == 2:
            q, s = _quantize(w, BLOCK)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            reference[name] = _dequantize_fp8_weight(q, s, list(BLOCK), torch.float32).to(torch.bfloat16)
        else:
            tensors[name] = w
    # The MTP module (DeepSeek-V3's layer 61): a decoder layer plus projections, FP8 too.
    layers = model.config.num_hidden_layers
    mtp_q, mtp_s = _quantize(torch.randn(32, 64), BLOCK)
    tensors.update({f"model.layers.{layers}.eh_proj.weight": mtp_q,
                    f"model.layers.{layers}.eh_proj.weight_scale_inv": mtp_s,
                    f"model.layers.{layers}.mlp.experts.0.gate_proj.weight": torch.randn(16, 32),
                    f"model.layers.{layers}.enorm.weight": torch.ones(32)})
    hf = root / "hf"
    hf.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, hf / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    config["num_nextn_predict_layers"] = 1
    (hf / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "emoe_jax.convert", str(hf), str(root / "ours"),
                           "--dtype", "bfloat16", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return plain, reference, load_checkpoint(root / "ours"), proc.stderr


def test_fp8_checkpoint_converts_to_transformers_dequantized_values(fp8_checkpoint):
    plain, reference, ckpt, _ = fp8_checkpoint
    cfg = ckpt.config
    dense = dense_from_converted(ckpt.dense)
    experts_checked = dense_checked = 0
    for name, ref in reference.items():
        ref = _as_np(ref)
        if ".mlp.experts." in name:
            layer, expert, proj = int(name.split(".")[2]), int(name.split(".")[5]), name.split(".")[6]
            role = proj.replace("_proj", "")
            got = ckpt.experts.read_layer(cfg.moe_layers.index(layer))[role][expert]  # ours: [in, out]
            np.testing.assert_array_equal(np.asarray(got), ref.T, err_msg=name)
            experts_checked += 1
        else:
            np.testing.assert_array_equal(np.asarray(dense[name]), ref, err_msg=name)
            dense_checked += 1
    assert experts_checked == 3 * cfg.num_experts * cfg.num_moe_layers and dense_checked > 10
    # Unquantized tensors pass through; the router's correction bias stays float32.
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert np.asarray(dense[bias]).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(dense[bias]), plain[bias].numpy())
    assert not any(k.endswith("_scale_inv") for k in dense)


def test_mtp_layer_is_skipped_with_a_note(fp8_checkpoint):
    _, _, ckpt, stderr = fp8_checkpoint
    assert "skipping 4 tensors of decoder layer(s) [3]" in stderr and "multi-token-prediction" in stderr
    assert not any(k.startswith("model.layers.3.") for k in dense_from_converted(ckpt.dense))


@pytest.mark.parametrize("qc, named", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
    ({"quant_method": "compressed-tensors"}, "quant_method='compressed-tensors'"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt='e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "activation_scheme='static'"),
])
def test_unsupported_quantization_is_refused_by_name(make_hf_model, qc, named, tmp_path):
    hf = json.loads(make_hf_model("deepseek_v3").config.to_json_string())
    hf["quantization_config"] = qc
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        from_hf_config(hf)
    if qc["quant_method"] != "gptq":
        return
    # And through the CLI (once: a subprocess costs seconds): a clear one-line error, no traceback.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    proc = subprocess.run([sys.executable, "-m", "emoe_jax.convert", str(tmp_path / "hf"), str(tmp_path / "out"),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode != 0 and named in proc.stderr and "Traceback" not in proc.stderr


def test_converter_source_reads_fused_and_row_sliced_fp8(tmp_path):
    """Fused [E, R, C] expert tensors are dequantized per expert slice, 2-D ones sliced after."""
    from emoe_jax.checkpoint.dequant_fp8 import ConverterSource
    from emoe_jax.checkpoint.safetensors_reader import HFSource

    torch.manual_seed(0)
    fused, fused_s = torch.randn(3, 40, 24).to(torch.float8_e4m3fn), torch.rand(3, 3, 2) + 0.5
    flat, flat_s = torch.randn(40, 24).to(torch.float8_e4m3fn), torch.rand(3, 2) + 0.5
    save_file({"a.weight": fused, "a.weight_scale_inv": fused_s, "b.weight": flat, "b.weight_scale_inv": flat_s,
               "c.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    notes = []
    source = ConverterSource(HFSource(tmp_path), {"quantization_config": {"quant_method": "fp8",
                                                                          "weight_block_size": [16, 16]}},
                             note=notes.append)
    source.output_dtype = np.dtype(np.float32)
    assert sorted(source.location) == ["a.weight", "b.weight", "c.weight"] and not notes
    for name, q, s in (("a.weight", fused, fused_s), ("b.weight", flat, flat_s)):
        ref = _dequantize_fp8_weight(q, s, [16, 16], torch.float32).numpy()
        np.testing.assert_array_equal(source.read(name), ref)
        np.testing.assert_array_equal(source.read(name, 1, 3), ref[1:3])
    assert source.info("a.weight").dtype == np.float32 and source.read("c.weight").dtype == np.float32
    source.close()


def test_fp8_tensor_without_scale_is_refused(tmp_path):
    from emoe_jax.checkpoint.dequant_fp8 import ConverterSource
    from emoe_jax.checkpoint.safetensors_reader import HFSource

    save_file({"w.weight": torch.randn(4, 4).to(torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no 'w.weight_scale_inv'"):
        ConverterSource(HFSource(tmp_path), {"quantization_config": {"quant_method": "fp8",
                                                                     "weight_block_size": [128, 128]}})
