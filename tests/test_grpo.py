"""GRPO: each loss type against numbers worked out by hand, advantages, the k3 KL, rewards that fail, the
log-probs training uses against the rollout policy's, and tiny end-to-end runs (metrics, checkpoints,
resume, the CLI, two processes under torchrun)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import procs
from grpo_worker import length_reward
from nanoseek.tasks import get_task
from nanoseek.tasks.rewards import REWARDS, accuracy_reward, format_reward, score_completions
from nanoseek.train.grpo import GRPOConfig, load_grpo_config, run_grpo
from nanoseek.train.grpo_loss import (
    clipped_loss,
    completion_logprobs,
    group_advantages,
    k3_kl,
    make_batch,
    token_weights,
)
from nanoseek.train.grpo_rollouts import render_prompt, rollout

# ---- the loss, by hand ---------------------------------------------------------------------------------
# Two completions: row 0 has two tokens with ratios 1.5 and 0.5 and advantage +1; row 1 has one real token
# with ratio 0.7 (and a padded one) and advantage -2. old log-probs are 0, so logp = log(ratio).
RATIOS = torch.tensor([[1.5, 0.5], [0.7, 1.1]])
MASK = torch.tensor([[True, True], [True, False]])
ADV = torch.tensor([1.0, -2.0])


def _loss(loss_type: str, eps_high: float, max_new_tokens: int = 4):
    logp = RATIOS.log().requires_grad_(True)
    w = token_weights(MASK, loss_type, max_new_tokens)
    out = clipped_loss(logp, torch.zeros(2, 2), ADV, w, eps_low=0.2, eps_high=eps_high)
    return out, logp


def test_grpo_loss_by_hand():
    # per token -min(r*A, clip(r, 0.8, 1.2)*A): row 0: -min(1.5, 1.2) = -1.2, -min(0.5, 0.8) = -0.5;
    # row 1: -min(-1.4, -1.6) = 1.6. GRPO: mean per completion, then over completions:
    # ((-1.2 - 0.5) / 2 + 1.6 / 1) / 2 = 0.375
    out, _ = _loss("grpo", 0.2)
    assert out.loss.item() == pytest.approx(0.375, abs=1e-6)
    # clipped terms active: row 0 token 0 (1.5 > 1.2, A > 0) and row 1 token 0 (0.7 < 0.8, A < 0): 2 of 3
    assert out.clip_fraction == pytest.approx(2 / 3)
    assert out.kl == 0.0


def test_dr_grpo_loss_by_hand():
    # sum over real tokens / (completions x max_new_tokens) = (-1.2 - 0.5 + 1.6) / (2 x 4) = -0.0125
    out, _ = _loss("dr_grpo", 0.2)
    assert out.loss.item() == pytest.approx(-0.0125, abs=1e-6)


def test_dapo_loss_by_hand():
    # clip-higher: 1.5 is clipped at 1.28; token-level mean over the batch's 3 tokens:
    # (-1.28 - 0.5 + 1.6) / 3 = -0.06
    out, _ = _loss("dapo", 0.28)
    assert out.loss.item() == pytest.approx(-0.06, abs=1e-6)


def test_loss_gradient_is_minus_advantage_times_weight_where_unclipped():
    # d/dlogp of -r*A = -r*A (r = exp(logp - old)); clipped tokens get no gradient; padding none
    out, logp = _loss("grpo", 0.2)
    out.loss.backward()
    expected = torch.tensor([[0.0, -0.5 * 1.0 * 0.25], [0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_ratio_one_gives_the_policy_gradient():
    # mu = 1: old = logp.detach(), ratio 1, gradient -A x weight for every real token
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    w = token_weights(MASK, "dapo", 4)
    out = clipped_loss(logp, logp.detach(), ADV, w, eps_low=0.2, eps_high=0.28)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    assert out.loss.item() == pytest.approx((-1 - 1 + 2) / 3)
    assert out.clip_fraction == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_whole_batch_loss(loss_type):
    # weights come from the whole batch, so any split of the rows gives the same loss and gradient
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=g) - 2
    old = logp + 0.3 * torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    adv = torch.randn(6, generator=g)
    w = token_weights(mask, loss_type, 5)
    whole = clipped_loss(logp, old, adv, w, eps_low=0.2, eps_high=0.28).loss
    parts = sum(clipped_loss(logp[s], old[s], adv[s], w[s], eps_low=0.2, eps_high=0.28).loss
                for s in (slice(0, 2), slice(2, 5), slice(5, 6)))  # fmt: skip
    torch.testing.assert_close(parts, whole)


def test_k3_kl_by_hand_and_in_the_loss():
    # pi = 0.5, ref = 0.25: exp(log 0.5) - log 0.5 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert k3_kl(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert k3_kl(logp, logp).item() == 0.0  # zero at equality, and never negative
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()
    w = token_weights(torch.ones(1, 1, dtype=torch.bool), "grpo", 1)
    out = clipped_loss(logp, logp, torch.zeros(1), w, eps_low=0.2, eps_high=0.2, beta=0.1, ref_logp=ref)
    assert out.loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1), abs=1e-6)
    assert out.kl == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    with pytest.raises(ValueError, match="reference"):
        clipped_loss(logp, logp, torch.zeros(1), w, eps_low=0.2, eps_high=0.2, beta=0.1)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.1, 0.1, 0.1]])
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.5 / (0.57735 + 1e-4)
    a = group_advantages(rewards)
    assert a[0].tolist() == pytest.approx([0.86588, -0.86588, -0.86588, 0.86588], abs=1e-4)
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal
    # group 2: mean 0.325, deviations 0.675 / -0.225, std = sqrt((0.675^2 + 3 x 0.225^2) / 3) = 0.45
    assert a[2].tolist() == pytest.approx([0.675 / 0.4501, -0.225 / 0.4501, -0.225 / 0.4501, -0.225 / 0.4501], abs=1e-4)
    assert group_advantages(rewards, scale=False)[0].tolist() == [0.5, -0.5, -0.5, 0.5]  # Dr. GRPO
    with pytest.raises(ValueError, match="generations"):
        group_advantages(torch.ones(3, 1))


# ---- rewards -------------------------------------------------------------------------------------------
def test_rewards_and_a_failing_reward_fn(caplog):
    task = get_task("add2")
    ex = task.generate(random.Random(0))
    good = f"<think>work</think><answer>{ex.answer}</answer>"
    wrong = "<think>work</think><answer>x</answer>"
    assert (format_reward(good, ex, task), accuracy_reward(good, ex, task)) == (1.0, 1.0)
    assert (format_reward(wrong, ex, task), accuracy_reward(wrong, ex, task)) == (1.0, 0.0)
    assert (format_reward(ex.answer, ex, task), accuracy_reward(ex.answer, ex, task)) == (0.0, 0.0)

    def broken(completion, example, task):
        raise KeyError("oops")

    def nan(completion, example, task):
        return float("nan")

    with caplog.at_level(logging.WARNING, logger="nanoseek.grpo"):
        totals, parts = score_completions(
            [accuracy_reward, broken, nan], [1.0, 1.0, 1.0], [good, wrong], [ex, ex], [task, task]
        )
    assert totals == [1.0, 0.0]
    assert parts["broken"] == [0.0, 0.0] and parts["nan"] == [0.0, 0.0]
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken raised KeyError" in m and "2 of 2" in m for m in messages), messages
    assert any("nan returned nan" in m for m in messages), messages


def test_math_verify_reward():
    from nanoseek.tasks import Example
    from nanoseek.tasks.rewards import math_verify_reward

    task = get_task("linear")
    ex = Example("q", "1/2", "linear")
    assert math_verify_reward("<think>t</think><answer>0.5</answer>", ex, task) == 1.0
    assert math_verify_reward("<think>t</think><answer>\\frac{2}{4}</answer>", ex, task) == 1.0
    assert math_verify_reward("<think>t</think><answer>3</answer>", ex, task) == 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="loss_type"):
        load_grpo_config(["loss_type=ppo"])
    with pytest.raises(ValueError, match="unknown config key 'betaa'.*did you mean 'beta'"):
        load_grpo_config(["betaa=0.1"])
    with pytest.raises(ValueError, match="unknown reward"):
        load_grpo_config(["rewards=[format,nope]"])
    with pytest.raises(ValueError, match="num_generations"):
        load_grpo_config(["num_generations=1"])
    cfg = load_grpo_config(["loss_type=dapo", "optim.lr=1e-4"])
    assert cfg.eps_high == 0.28 and cfg.optim.lr == 1e-4 and GRPOConfig().eps_high == 0.2


# ---- with a tiny model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny DeepSeek-V3 with the speedrun's kind of tokenizer (chat template, R1 markers)."""
    return _tiny_deepseek(tmp_path_factory, mtp_layers=0)


@pytest.fixture(scope="module")
def tiny_mtp_model_dir(tmp_path_factory):
    """The same with one MTP module."""
    return _tiny_deepseek(tmp_path_factory, mtp_layers=1)


def _tiny_deepseek(tmp_path_factory, mtp_layers: int):
    from nanoseek.model.config import DeepseekV3Config
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
    from nanoseek.tasks import sample_texts
    from nanoseek.train.tokenizer import train_tokenizer
    from nanoseek.weights.hf_folder import save_pretrained

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tok = train_tokenizer(sample_texts([get_task("add2")], 300), vocab_size=300)
    bos, eos, pad = tok.special_ids()
    cfg = DeepseekV3Config(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
        max_position_embeddings=64, num_nextn_predict_layers=mtp_layers, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad,
    )  # fmt: skip
    torch.manual_seed(0)
    save_pretrained(DeepseekV3ForCausalLM(cfg), folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama_file(tmp_path_factory):
    """A tiny random Llama (a dense family) as a GGUF with a ChatML template."""
    from serve_helpers import tiny_llama_gguf

    return tiny_llama_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf")


SMALL = ["num_generations=4", "prompts_per_step=3", "max_new_tokens=8", "eval.examples=6", "optim.lr=1e-3",
         "system_prompt=", "log_every=1"]  # fmt: skip


@pytest.mark.parametrize("which", ["deepseek", "llama"])
def test_training_logprobs_equal_the_rollout_policy(tiny_model_dir, tiny_llama_file, which):
    import nanoseek
    from nanoseek.tokenizer import load_tokenizer

    path = tiny_model_dir if which == "deepseek" else tiny_llama_file
    model, tok = nanoseek.load(path), load_tokenizer(path)
    cfg = load_grpo_config([*SMALL, "temperature=1.0"])
    task = get_task("add2")
    prompts = [render_prompt(tok, task.generate(random.Random(i)), cfg) for i in range(3)]
    completions, _, engine_lps = rollout(model, tok, prompts, 4, cfg, seed=7, logprobs=True)
    flat = [p for p in prompts for _ in range(4)]
    model.train()  # training mode, as in the GRPO step
    batch = make_batch(flat, completions, tok.pad_token_id or 0)
    logp, entropy = completion_logprobs(model, batch, cfg.temperature, with_entropy=True)
    assert batch.mask.sum() > 0
    for i, lps in enumerate(engine_lps):
        assert len(lps) == len(completions[i])  # one per sampled token, the stop token included
        torch.testing.assert_close(logp[i, : len(lps)].detach(), torch.tensor(lps), atol=2e-5, rtol=0)
    assert (entropy[batch.mask] > 0).all()
    # the per-request seeds make the rollouts repeatable
    assert rollout(model.eval(), tok, prompts, 4, cfg, seed=7)[0] == completions


@pytest.mark.parametrize("loss_type,extra", [("grpo", ["beta=0.04"]), ("dapo", ["mu=2", "micro_batch_size=5"])])
def test_tiny_grpo_run_writes_metrics_and_model(tiny_model_dir, tmp_path, loss_type, extra):
    import nanoseek
    from nanoseek.tasks.rewards import format_reward

    out = tmp_path / "grpo"
    metrics = tmp_path / "all.jsonl"
    res = run_grpo(
        tiny_model_dir, ["add2"], out, [*SMALL, f"loss_type={loss_type}", "max_steps=2", *extra],
        show_progress=False, metrics_path=metrics, reward_fns=[format_reward, length_reward],
    )  # fmt: skip
    assert res.steps == 2 and len(res.history) == 2 and res.tokens > 0 and res.energy_j >= 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "accuracy", "completion_len", "kl", "clip_frac", "entropy", "reward_format"):
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    assert metrics.read_text() == (out / "metrics.jsonl").read_text()
    assert set(res.eval_before) == set(res.eval_after) == {"add2"}
    loaded = nanoseek.load(res.model_dir)
    assert loaded.config.vocab_size == nanoseek.load(tiny_model_dir).config.vocab_size
    assert (out / "checkpoints").is_dir()
    assert all(h["groups_kept"] == 3 and not h.get("skipped") for h in res.history)


def test_grpo_on_a_dense_gguf_model_writes_a_loadable_folder(tiny_llama_file, tmp_path):
    import nanoseek

    res = run_grpo(tiny_llama_file, ["add2"], tmp_path / "llama", [*SMALL, "max_steps=2", "eval.examples=0"],
                   show_progress=False, reward_fns=[length_reward])  # fmt: skip
    assert res.steps == 2 and not res.history[-1].get("skipped")
    before, after = nanoseek.load(tiny_llama_file), nanoseek.load(res.model_dir)
    assert type(after).__name__ == type(before).__name__ == "DenseForCausalLM"
    changed = [not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values())]
    assert any(changed)  # trained, and written back as a HF folder nanoseek.load reads


def test_dapo_drops_groups_with_equal_rewards(tiny_model_dir, tmp_path):
    # a random model never writes the R1 format: every reward is 0, every group is dropped, no update
    import nanoseek

    res = run_grpo(tiny_model_dir, ["add2"], tmp_path / "d", [*SMALL, "loss_type=dapo", "max_steps=1",
                   "eval.examples=0"], show_progress=False)  # fmt: skip
    assert res.history[0]["groups_kept"] == 0 and res.history[0]["skipped"]
    before, after = nanoseek.load(tiny_model_dir), nanoseek.load(res.model_dir)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_resume_continues_from_the_checkpoint(tiny_model_dir, tmp_path):
    import nanoseek

    out = tmp_path / "r"
    sets = [*SMALL, "max_steps=2", "ckpt_every=1", "eval.examples=0"]
    kw = dict(show_progress=False, reward_fns=[length_reward])
    run_grpo(tiny_model_dir, ["add2"], out, sets, **kw)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_grpo(tiny_model_dir, ["add2"], out, sets, **kw)
    more = run_grpo(tiny_model_dir, ["add2"], out, [*SMALL, "max_steps=3", "eval.examples=0"], resume=True, **kw)
    assert more.steps == 3 and [h["step"] for h in more.history] == [3]
    full = run_grpo(tiny_model_dir, ["add2"], tmp_path / "full", [*SMALL, "max_steps=3", "eval.examples=0"], **kw)
    # the same rollouts (seeded per step and request) and the same optimizer state: the same run
    assert more.history[0]["reward"] == full.history[2]["reward"]
    a, b = nanoseek.load(more.model_dir).state_dict(), nanoseek.load(full.model_dir).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def test_long_prompts_are_skipped_with_a_warning(tiny_model_dir, tmp_path, caplog):
    from nanoseek.tasks import Addition

    with caplog.at_level(logging.WARNING, logger="nanoseek.grpo"):
        res = run_grpo(tiny_model_dir, [Addition(12)], tmp_path / "long",
                       [*SMALL, "max_steps=1", "eval.examples=0", f"system_prompt={'x' * 80}"],
                       show_progress=False)  # fmt: skip
    assert res.steps == 1 and res.history[0]["skipped"]
    assert any("skipping a prompt" in r.getMessage() for r in caplog.records)


def test_cli(tiny_model_dir, tmp_path, capsys):
    from nanoseek.cli import main

    out = tmp_path / "cli"
    sets = [x for s in [*SMALL, "max_steps=1", "eval.examples=0"] for x in ("--set", s)]
    assert main(["grpo", str(tiny_model_dir), "--tasks", "add2", "--out", str(out), "--quiet", *sets]) == 0
    assert (out / "model" / "config.json").is_file()
    assert main(["grpo", str(tiny_model_dir), "--tasks", "nope", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["grpo", str(tmp_path / "missing"), "--tasks", "add2", "--out", str(tmp_path / "y")]) == 2


def test_cli_system_prompt_is_evals_option(tmp_path, monkeypatch):
    """--system-prompt sets system_prompt as nanoseek eval's option does ('' for none), over --set; the R1 format
    is the only --format."""
    from types import SimpleNamespace

    import nanoseek.train.grpo as grpo_mod
    from nanoseek.cli import main

    seen = []

    def fake_run_grpo(model, tasks, out, overrides, **_):
        seen.append(load_grpo_config(overrides).system_prompt)
        return SimpleNamespace(steps=0, wall_s=0.0, model_dir=out, eval_after={}, eval_before={})

    monkeypatch.setattr(grpo_mod, "run_grpo", fake_run_grpo)
    base = ["grpo", "m", "--tasks", "add2", "--out", str(tmp_path), "--quiet"]
    assert main(base) == 0
    assert main([*base, "--format", "r1", "--system-prompt", ""]) == 0
    assert main([*base, "--set", "system_prompt=x", "--system-prompt", "Be brief."]) == 0
    assert seen == [GRPOConfig().system_prompt, "", "Be brief."] and seen[0]  # the default: the R1 prompt
    with pytest.raises(SystemExit):
        main([*base, "--format", "chat"])


def test_mtp_distillation_loss_is_compute_losss_mtp_loss_on_completion_targets_and_trains_only_the_module():
    """The MTP module's GRPO loss is compute_loss's depth-1 loss with targets on the completion's tokens only,
    and its gradient reaches the module alone (trunk, embedding and head detached)."""
    from nanoseek.model.config import from_name
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
    from nanoseek.model.loss import IGNORE_INDEX
    from nanoseek.train.grpo_loss import mtp_distillation_loss

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny", num_nextn_predict_layers=1)).train()
    prompt, completion = [5, 9, 14, 3, 7], [11, 2, 8, 6, 4, 13]
    loss = mtp_distillation_loss(model, make_batch([prompt], [completion]))
    ids = torch.tensor([prompt + completion])
    targets = torch.full_like(ids, IGNORE_INDEX)  # next-token targets of the completion tokens only
    targets[0, len(prompt) - 1 : -1] = torch.tensor(completion)
    with torch.no_grad():
        want = model.compute_loss(ids, targets, mtp_weight=1.0).mtp_losses[0]
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith("mtp.") for n in trained), sorted(trained)[:5]
    assert mtp_distillation_loss(DeepseekV3ForCausalLM(from_name("test-tiny")), make_batch([prompt], [completion])) \
        is None  # fmt: skip


def test_grpo_trains_the_mtp_module_and_leaves_the_policy_as_without_it(tiny_mtp_model_dir, tmp_path):
    """mtp_weight > 0 moves the MTP module and nothing else: every other weight ends the step as it would with
    mtp_weight=0 (the same rollouts, the policy gradient clipped apart from the module's)."""
    import nanoseek

    runs = {}
    for weight in (0.0, 0.3):
        res = run_grpo(tiny_mtp_model_dir, ["add2"], tmp_path / f"w{weight}", [*SMALL, "max_steps=1",
                       "eval.examples=0", f"mtp_weight={weight}"], show_progress=False,
                       reward_fns=[length_reward])  # fmt: skip
        assert not res.history[-1].get("skipped")
        assert ("mtp_loss" in res.history[-1]) == (weight > 0)
        runs[weight] = nanoseek.load(res.model_dir).state_dict()
    start = nanoseek.load(tiny_mtp_model_dir).state_dict()
    for name, value in runs[0.3].items():
        if name.startswith("mtp."):
            assert torch.equal(runs[0.0][name], start[name]), name  # mtp_weight=0: left as it was
        else:
            assert torch.equal(value, runs[0.0][name]), name
    assert any(not torch.equal(runs[0.3][n], start[n]) for n in start if n.startswith("mtp."))


def test_a_prompts_completions_depend_on_its_index_not_on_its_batch(tiny_model_dir):
    """Rollouts are seeded per (step seed, prompt index, completion): a rank that samples prompts 1 and 2 alone gets
    the completions one process gets for them among all three."""
    import nanoseek
    from nanoseek.tokenizer import load_tokenizer

    model, tok = nanoseek.load(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    cfg = load_grpo_config(SMALL)
    prompts = [render_prompt(tok, get_task("add2").generate(random.Random(i)), cfg) for i in range(3)]
    together = rollout(model, tok, prompts, 4, cfg, seed=11)[0]
    assert rollout(model, tok, prompts[1:], 4, cfg, seed=11, prompt_indices=[1, 2])[0] == together[4:]
    assert rollout(model, tok, prompts[1:], 4, cfg, seed=11)[0] != together[4:]  # (the index, not the position)


# ---- exact resume ----------------------------------------------------------------------------------------
DETERMINISTIC = ("loss", "reward", "reward_std", "kl", "clip_frac", "entropy", "mtp_loss", "grad_norm", "groups_kept")


def test_a_run_stopped_and_resumed_is_the_uninterrupted_run_bit_for_bit(tiny_mtp_model_dir, tmp_path):
    """Killed while saving step 2 of 3 (what is left: the checkpoint of step 1 and an unfinished save) and resumed:
    steps 2-3 repeat the uninterrupted run's exactly, and so do the final weights (policy, MTP module), with the
    KL to the reference model, the optimizer state and the rollouts (seeded per prompt) in play."""
    import nanoseek

    sets = [*SMALL, "max_steps=3", "ckpt_every=1", "eval.examples=0", "beta=0.04"]
    kw = dict(show_progress=False, reward_fns=[length_reward])
    full = run_grpo(tiny_mtp_model_dir, ["add2"], tmp_path / "full", sets, **kw)
    out = tmp_path / "stopped"
    first = run_grpo(tiny_mtp_model_dir, ["add2"], out, sets, stop_after=2, **kw)
    assert first.steps == 2 and first.model_dir is None and not (out / "model").exists()
    ckpts = out / "checkpoints"
    (ckpts / "step-00000002").rename(ckpts / ".tmp-step-00000002")  # the save the kill cut short
    resumed = run_grpo(tiny_mtp_model_dir, ["add2"], out, sets, resume=True, **kw)
    assert [h["step"] for h in resumed.history] == [2, 3]
    for h, want in zip([first.history[0], *resumed.history], full.history):
        assert {k: h.get(k) for k in DETERMINISTIC} == {k: want.get(k) for k in DETERMINISTIC}, h["step"]
    assert full.history[-1]["kl"] > 0 and "mtp_loss" in full.history[-1]
    a, b = nanoseek.load(resumed.model_dir).state_dict(), nanoseek.load(full.model_dir).state_dict()
    assert a.keys() == b.keys() and any(n.startswith("mtp.") for n in a)
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])][:5]


def test_resume_refuses_another_starting_model_when_the_kl_needs_it(tiny_model_dir, tmp_path):
    """With beta > 0 the reference policy is rebuilt from the starting model: a resume from another is an error."""
    import nanoseek
    from nanoseek.tokenizer import load_tokenizer

    sets = [*SMALL, "max_steps=1", "eval.examples=0", "beta=0.04"]
    run_grpo(tiny_model_dir, ["add2"], tmp_path / "r", sets, show_progress=False, reward_fns=[length_reward])
    other = nanoseek.load(tiny_model_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    with pytest.raises(ValueError, match="another starting model"):
        run_grpo(other, ["add2"], tmp_path / "r", [*SMALL, "max_steps=2", "eval.examples=0", "beta=0.04"],
                 tokenizer=load_tokenizer(tiny_model_dir), resume=True, show_progress=False)  # fmt: skip


# ---- under torchrun: 2 CPU processes (gloo) ------------------------------------------------------------------
# The same settings in one process and in two: prompts_per_step=3 splits 2 + 1 over the ranks. ddp: the KL to the
# reference, micro-batches of 3 completions (3 on one rank, 2 on the other: a dummy fills the gap); fsdp: DAPO's
# token-level loss and dropped groups, two inner iterations. Both train the MTP module.
TORCHRUN_SETS = [*SMALL, "max_steps=3", "eval.examples=0", "ckpt_every=0", "rewards=[length]"]
MODE_SETS = {"ddp": ["beta=0.04", "micro_batch_size=3"], "fsdp": ["loss_type=dapo", "mu=2"]}
COMPARED = ("loss", "reward", "reward_std", "kl", "entropy", "mtp_loss", "grad_norm", "groups_kept")


def grpo_torchrun(model_dir: Path, out: Path, mode: str, sets: list[str]):
    """`nanoseek grpo --parallel MODE` in 2 processes (tests/grpo_worker.py: the CLI with the `length` reward)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(Path(__file__).with_name("grpo_worker.py")), str(model_dir), "--tasks", "add2", "--out", str(out),
        "--parallel", mode, "--quiet", *[x for s in sets for x in ("--set", s)],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return procs.run(cmd, env=env)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny_mtp_model_dir, tmp_path, monkeypatch, mode):
    import nanoseek
    from test_distributed import step_losses

    sets = [*TORCHRUN_SETS, *MODE_SETS[mode]]
    monkeypatch.setitem(REWARDS, "length", length_reward)
    one = run_grpo(tiny_mtp_model_dir, ["add2"], tmp_path / "one", sets, show_progress=False)
    proc = grpo_torchrun(tiny_mtp_model_dir, tmp_path / mode, mode, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("grpo: 3 steps") == 1  # rank 0 reports (and writes) alone
    records = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    two = [r for r in records if r["event"] == "step"]
    assert step_losses(tmp_path / mode) == [r["loss"] for r in two] and len(two) == 3
    for key in COMPARED:
        want = torch.tensor([h[key] for h in one.history], dtype=torch.float64)
        got = torch.tensor([r[key] for r in two], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=key)
    assert mode != "fsdp" or min(h["groups_kept"] for h in one.history) < 3  # DAPO dropped a group
    assert abs(one.history[-1]["loss"]) > 1e-4 or one.history[-1]["kl"] > 0
    # the exported model (gathered from the shards under FSDP2) is the single-process one, up to rounding
    a, b = nanoseek.load(one.model_dir).state_dict(), nanoseek.load(tmp_path / mode / "model").state_dict()
    start = nanoseek.load(tiny_mtp_model_dir).state_dict()
    assert any(not torch.equal(a[n], start[n]) for n in a if n.startswith("mtp.")), "the MTP module trained"
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
