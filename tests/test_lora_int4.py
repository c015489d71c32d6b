"""LoRA on a 4-bit base (lora.base_format=int4, model/lora.py): the frozen base's forward is nanoseek's 4-bit
kernel's output, the backward the fp32 node's exactly (the same upstream gradients give the same A, B and input
gradients), the packed copies are not saved, linears the kernel cannot take stay fp32 (DeepSeek-V3's kv_b_proj),
SFT trains and writes the same PEFT folder, --merge works. Tiny random models; skipped without the kernel."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek.model.lora import DENSE_TARGETS, LoRAConfig, apply_lora, lora_forward, lora_modules
from nanoseek.quant import int4_kernel_available, pack_lora_bases, q4_kernel
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.sft import run_sft
from nanoseek.weights.peft_lora import attach_adapter, peft_config
from test_sft import CHATML, DATA, deepseek_model, llama_folder, make_tokenizer

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="nanoseek's 4-bit kernel cannot run here")
transformers = pytest.importorskip("transformers")

X = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(CHATML)


def _random_b(model, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)


def _pair(load, **cfg):
    """The same model wrapped twice, fp32 and int4 base, with the same adapter (A seeded alike, B random)."""
    fp32, int4 = load(), load()
    apply_lora(fp32, LoRAConfig(**cfg), seed=0)
    apply_lora(int4, LoRAConfig(**cfg, base_format="int4"), seed=0)
    pack_lora_bases(int4)
    _random_b(fp32), _random_b(int4)
    return fp32, int4


def test_int4_base_forward_is_the_kernels_and_its_backward_the_fp32_nodes(tok, tmp_path):
    folder = llama_folder(tmp_path / "base", tok)
    fp32, int4 = _pair(lambda: nanoseek.load(folder), dropout=0.3)
    # the packed copies are non-persistent buffers: the state dict (checkpoints, adapters) is the fp32 one's
    assert int4.state_dict().keys() == fp32.state_dict().keys()
    assert not any("base_packed" in k for k in int4.state_dict())
    layers = lora_modules(int4)
    assert len(layers) == 2 * len(DENSE_TARGETS) and all(m.base_packed is not None for m in layers.values())
    assert all(m.base_packed is None for m in lora_modules(fp32).values())
    gen = torch.Generator().manual_seed(5)
    for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj")):
        owner = "self_attn" if group[0] in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        parts = {name: [getattr(getattr(m.model.layers[1], owner), p) for p in group] for name, m in
                 (("fp32", fp32), ("int4", int4))}  # fmt: skip
        width = parts["fp32"][0].in_features
        x0 = torch.randn(2, 7, width, generator=gen)
        upstream = [torch.randn(2, 7, p.out_features, generator=gen) for p in parts["fp32"]]
        for training in (True, False):  # with and without dropout's mask
            grads, outs = {}, {}
            for name, ps in parts.items():
                for p in ps:
                    p.train(training)
                    p.lora_A.weight.grad = p.lora_B.weight.grad = None
                x = x0.clone().requires_grad_(True)
                torch.manual_seed(4)  # the same mask on both sides
                ys = lora_forward(ps, x)
                sum((y * g).sum() for y, g in zip(ys, upstream)).backward()
                outs[name] = [y.detach() for y in ys]
                grads[name] = [x.grad] + [t.grad for p in ps for t in (p.lora_A.weight, p.lora_B.weight)]
            # the backward uses the fp32 W (the rounding passed straight through): the same numbers, exactly
            for a, b in zip(grads["fp32"], grads["int4"]):
                assert torch.equal(a, b)
            if not training:  # the forward: the kernel's output plus the LoRA term
                for p, y in zip(parts["int4"], outs["int4"]):
                    base = q4_kernel.q4_linear(x0, p.base_packed, p.out_features, p.base_layer.bias)
                    lora = p.lora_B(p.lora_A(x0)) * p.scaling
                    torch.testing.assert_close(y, base + lora, rtol=1e-5, atol=1e-5)
                    # ... which is near the fp32 forward (the random weights are off the grid, so not exactly)
                    ref = p.base_layer(x0) + lora
                    assert 0 < (y - ref).abs().max() <= 0.05 * ref.abs().max()


def test_int4_base_deepseek_v3_packs_what_the_kernel_takes(tok):
    fp32, int4 = _pair(lambda: deepseek_model(tok))
    layers = lora_modules(int4)
    packed = {p for p, m in layers.items() if m.base_packed is not None}
    # kv_b_proj reads the kv_lora_rank (16) latent: not a multiple of the kernel's 32, so it stays fp32
    assert packed == {p for p, m in layers.items() if m.in_features % 32 == 0} and packed
    assert any(p.endswith("kv_b_proj") for p in set(layers) - packed)
    assert int4.state_dict().keys() == fp32.state_dict().keys()
    fp32.train(), int4.train()
    losses = {}
    for name, m in (("fp32", fp32), ("int4", int4)):
        loss = m(X).logsumexp(-1).mean()
        loss.backward()
        losses[name] = loss.item()
        assert all(p.grad is not None and p.grad.isfinite().all() for n, p in m.named_parameters() if ".lora_" in n)
    assert abs(losses["int4"] - losses["fp32"]) <= 1e-2 * abs(losses["fp32"]), losses


def test_int4_base_sft_trains_writes_the_same_peft_folder_and_merges(tok, tmp_path):
    base = llama_folder(tmp_path / "base", tok)
    sets = ["max_steps=8", "ckpt_every=4", "optim.lr=1e-2", "lora.rank=8", "lora.alpha=16", "lora.base_format=int4"]
    res = run_sft(base, DATA, tmp_path / "out", sets, show_progress=False, lora=True, merge=True)
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.3, res.losses
    # the checkpoint records the setting (a resume must keep it) and holds the adapter, no packed weights
    ckpt = list_checkpoints(tmp_path / "out/checkpoints")[-1]
    assert json.loads((ckpt / "train_config.json").read_text())["lora"]["base_format"] == "int4"
    assert not any("packed" in k for k in load_file(str(ckpt / "model_state.safetensors")))
    # the adapter's folder is the fp32 base's format: the same config, the same tensors' names
    written = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert written == peft_config(LoRAConfig(8, 16), sorted(DENSE_TARGETS), str(base.resolve()))
    from safetensors import safe_open

    with safe_open(str(res.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 2 * 14 and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert not any("packed" in k for k in keys)
    # --merge folds the adapter into the fp32 weights: the merged folder is the fp32 base plus the adapter
    ours = attach_adapter(nanoseek.load(base), res.adapter_dir)
    with torch.no_grad():
        assert (nanoseek.load(res.model_dir)(X) - ours(X)).abs().max().item() <= 1e-5


def test_int4_base_settings():
    with pytest.raises(ValueError, match="lora.base_format must be one of auto, fp32, int4"):
        LoRAConfig(base_format="int8").validate()
    model = torch.nn.Sequential()
    model.q_proj = torch.nn.Linear(64, 32, dtype=torch.float64)
    apply_lora(model, LoRAConfig(base_format="int4", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="an fp32 base"):
        pack_lora_bases(model)


def test_sft_lora_benchmark_measures_the_int4_base(capsys):
    from nanoseek.cli import main

    argv = ["bench", "sft", "--lora", "--model", "tiny", "--conversations", "16", "--reps", "1", "--memory-steps",
            "0", "--set", "lora.base_format=int4"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "base int4" in out and "LoRA / full SFT" in out
    # step 0's losses agree within the int4 tolerance (checked by the benchmark), not as fp32's would
    first = out.split("losses per step (full / LoRA): ")[1].split()[0]
    full, lora = map(float, first.split("/"))
    assert full != lora and abs(full - lora) <= 2e-2 * full


def test_auto_base_is_int4_only_where_the_weights_are_on_the_4bit_grid(tok, tmp_path):
    """lora.base_format=auto (the default) packs the base when every wrapped weight is on the 4-bit grid already
    (a 4-bit GGUF file's: nothing of the weights is lost), and leaves an off-grid base (a random one) fp32."""
    from nanoseek.quant import int4_dequantize, int4_grid

    folder = llama_folder(tmp_path / "base", tok)
    off_grid, on_grid = nanoseek.load(folder), nanoseek.load(folder)
    for model in (off_grid, on_grid):
        apply_lora(model, LoRAConfig(), seed=0)
    with torch.no_grad():  # the wrapped weights put on the grid, as a 4-bit GGUF file's are
        for m in lora_modules(on_grid).values():
            m.base_layer.weight.copy_(int4_dequantize(*int4_grid(m.base_layer.weight)))
    assert LoRAConfig().base_format == "auto"
    assert pack_lora_bases(off_grid, only_if_exact=True) == 0
    assert all(m.base_packed is None for m in lora_modules(off_grid).values())
    assert pack_lora_bases(on_grid, only_if_exact=True) == len(lora_modules(on_grid)) == 2 * len(DENSE_TARGETS)
    # the packed copy is the weight exactly: the 4-bit forward of a row differs only by the activations' rounding
    layer = lora_modules(on_grid)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = layer.base_layer(x)
        got = q4_kernel.q4_linear(x, layer.base_packed, layer.out_features, layer.base_layer.bias)
    assert (got - ref).norm() <= 2e-2 * ref.norm()
    # through SFT: the default run on an off-grid base says fp32, and trains
    res = run_sft(folder, DATA, tmp_path / "out", ["max_steps=2", "ckpt_every=0"], show_progress=False, lora=True)
    assert res.steps == 2
