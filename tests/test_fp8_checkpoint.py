"""Block-scaled FP8 checkpoints (the format of the official DeepSeek-V3/R1 weights): a tiny model quantized
here to float8_e4m3fn with per-block `weight_scale_inv`, loaded with `nanoseek.load`, must be the model the
FP8 values and scales describe; other quantization methods are refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nanoseek
from deepseek_reference import randomize_nanoseek
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.weights.deepseek_v3_hf import native_to_hf
from nanoseek.weights.fp8 import open_checkpoint
from nanoseek.weights.hf_folder import save_pretrained
from nanoseek.weights.safetensors_io import SafetensorsReader, WeightsError, save_safetensors_folder

E4M3_MAX = 448.0


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block, as DeepSeek's fp8 cast does: scale = amax / 448, values = w / scale in e4m3."""
    bo, bi = block
    rows, cols = math.ceil(w.shape[0] / bo), math.ceil(w.shape[1] / bi)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / E4M3_MAX
            q[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_tile_by_tile(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bo, bi = block
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bo, (i + 1) * bo), slice(j * bi, (j + 1) * bi)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def is_quantized_in_deepseek_checkpoints(name: str, t: torch.Tensor) -> bool:
    """Linear weights of attention and MLPs; not embeddings, head, norms or the router."""
    return t.dim() == 2 and name.endswith("proj.weight")


def write_fp8_and_reference(tmp_path, cfg, block: tuple[int, int]):
    """(FP8 folder, folder of the same model with the FP8 weights dequantized tile by tile, original model)."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomize_nanoseek(model)
    tensors = native_to_hf(model)
    fp8, dequantized = {}, {}
    for name, t in tensors.items():
        if is_quantized_in_deepseek_checkpoints(name, t):
            q, scale = quantize(t.float(), block)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            dequantized[name] = dequantize_tile_by_tile(q, scale, block)
        else:
            fp8[name] = dequantized[name] = t
    config = cfg.to_dict()
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    save_safetensors_folder(tmp_path / "fp8", fp8, {**config, "quantization_config": quant})
    save_safetensors_folder(tmp_path / "ref", dequantized, config)
    return tmp_path / "fp8", tmp_path / "ref", model


# [16, 16]: several blocks per weight, and partial edge blocks (kv_a_proj_with_mqa has 16 + 8 = 24 rows);
# [128, 128], the official size: every tiny weight is one partial block.
@pytest.mark.parametrize("block", [(16, 16), (128, 128)], ids=["16x16", "128x128"])
@pytest.mark.parametrize("variant", [{}, {"q_lora_rank": None, "num_nextn_predict_layers": 1}], ids=["tiny", "mtp"])
def test_fp8_checkpoint_loads_dequantized(tmp_path, block, variant):
    cfg = from_name("test-tiny", **variant)
    fp8_dir, ref_dir, original = write_fp8_and_reference(tmp_path, cfg, block)
    ours, ref = nanoseek.load(fp8_dir), nanoseek.load(ref_dir)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected, unquantized = ours(x), ref(x), original(x)
    assert torch.equal(got, expected)
    # Sanity of the test itself: the FP8 model is near the original (measured relative error 0.03-0.06)...
    # ...and the FP8 values read without their scales (what loading did before) are far off (measured 1.4).
    assert relative_error(got, unquantized) < 0.1
    raw = SafetensorsReader(fp8_dir)  # the tensors as stored
    unscaled = {k: raw[k].float() for k in raw if not k.endswith("_scale_inv")}
    save_safetensors_folder(tmp_path / "unscaled", unscaled, cfg.to_dict())
    with torch.no_grad():
        wrong = nanoseek.load(tmp_path / "unscaled")(x)
    assert relative_error(wrong, unquantized) > 0.5


def test_scale_tensors_are_hidden_from_the_loader(tmp_path):
    cfg = from_name("test-tiny")
    fp8_dir, ref_dir, _ = write_fp8_and_reference(tmp_path, cfg, (16, 16))
    config = json.loads((fp8_dir / "config.json").read_text())
    tensors = open_checkpoint(fp8_dir, config)
    names = set(tensors)
    assert not any("scale_inv" in n for n in names)
    assert names == set(open_checkpoint(ref_dir, {}))  # the names of an unquantized checkpoint, no more
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" not in tensors
    assert tensors["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32


def test_fp8_without_scales_is_a_clear_error(tmp_path):
    cfg = from_name("test-tiny")
    fp8_dir, _, _ = write_fp8_and_reference(tmp_path, cfg, (16, 16))
    from safetensors.torch import load_file, save_file

    tensors = load_file(fp8_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"]
    save_file(tensors, fp8_dir / "model.safetensors")
    with pytest.raises(WeightsError, match=r"'model.layers.1.self_attn.kv_b_proj.weight' has no .*weight_scale_inv"):
        nanoseek.load(fp8_dir)


def test_fp8_scale_of_the_wrong_shape_is_a_clear_error(tmp_path):
    cfg = from_name("test-tiny")
    fp8_dir, _, _ = write_fp8_and_reference(tmp_path, cfg, (16, 16))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]  # the scales were written for 16x16
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"weight_scale_inv' has shape .* in 32x32 blocks needs"):
        nanoseek.load(fp8_dir)


def test_fp8_scales_without_quantization_config_are_refused(tmp_path):
    cfg = from_name("test-tiny")
    fp8_dir, _, _ = write_fp8_and_reference(tmp_path, cfg, (16, 16))
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"holds FP8 scales .* but config.json has no quantization_config"):
        nanoseek.load(fp8_dir)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "llama"])
def test_unknown_quantization_method_is_refused_by_name(tmp_path, model_type):
    cfg = from_name("test-tiny")
    torch.manual_seed(0)
    save_pretrained(DeepseekV3ForCausalLM(cfg), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = model_type
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"quant_method 'gptq' is not supported"):
        nanoseek.load(tmp_path)
