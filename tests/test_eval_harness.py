"""lm-evaluation-harness's `local-completions` against `nanoseek serve`: `/v1/completions` with `echo: true` and
`logprobs` returns the prompt tokens' log-probabilities, equal to a direct forward of the model. The fast tests
send the exact request lm-eval sends; the slow one runs lm-eval's own client (when lm-eval is installed)."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

import nanoseek
from nanoseek.engine.generate import generate_tokens
from nanoseek.engine.sampling import SamplingParams
from nanoseek.eval.runner import choice_loglikelihoods, encode_pair
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.tasks import get_task, sample_texts
from nanoseek.train.tokenizer import train_tokenizer
from nanoseek.weights.hf_folder import save_pretrained
from serve_helpers import serve

CONTEXT = 96
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random DeepSeek-V3 and its trained tokenizer as a HF folder (transformers' AutoTokenizer reads it)."""
    rng = random.Random(0)
    texts = list(sample_texts([get_task("add2")], 300)) + [" ".join(rng.choices(WORDS, k=8)) for _ in range(200)]
    tok = train_tokenizer(texts, vocab_size=300, model_max_length=CONTEXT)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny", vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT))
    path = tmp_path_factory.mktemp("harness") / "model"
    save_pretrained(model, path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def running(folder):
    with serve(folder, name="tiny") as r:
        yield r


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().log_softmax(-1)


def test_echo_logprobs_equal_a_direct_forward_in_lm_eval_s_request_shape(folder, running):
    tok, model = nanoseek.load_tokenizer(folder), nanoseek.load(folder)
    pairs = [("the cat sat on", " the mat"), ("12+34=", "64"), ("the dog", " ran far away")]
    requests = [tok.encode(c, add_special_tokens=False) + tok.encode(x, add_special_tokens=False) for c, x in pairs]
    ctxlens = [len(tok.encode(c, add_special_tokens=False)) for c, _ in pairs]
    # exactly what lm_eval.models.openai_completions.LocalCompletionsAPI._create_payload sends for loglikelihood
    body = {"model": "tiny", "prompt": requests, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # fmt: skip
    reply = httpx.post(running.url + "/v1/completions", json=body, timeout=60).json()
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    assert len(choices) == 3
    for ids, ctxlen, choice in zip(requests, ctxlens, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's tokens and the one reply token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        direct = _direct_logprobs(model, ids)
        want = [float(direct[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
        assert lp["tokens"][: len(ids)] == [tok.decode([t], skip_special_tokens=False) for t in ids]
        for i in range(1, len(ids)):  # top-1 alternative: the most likely token at that position
            (value,) = lp["top_logprobs"][i].values()
            assert value == pytest.approx(float(direct[i - 1].max()), abs=1e-4)
        # lm-eval's parse_logprobs: the continuation's sum and whether each token was the greedy one
        total = sum(lp["token_logprobs"][ctxlen:-1])
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                             lp["top_logprobs"][ctxlen:-1]))  # fmt: skip
        assert total == pytest.approx(sum(want[ctxlen - 1 :]), abs=1e-4)
        want_greedy = all(direct[i - 1].argmax() == ids[i] for i in range(ctxlen, len(ids)))
        assert greedy == bool(want_greedy)
        # the same number as nanoseek eval's multiple-choice scorer (one batched forward)
        assert total == pytest.approx(choice_loglikelihoods(model, ids[:ctxlen], [ids[ctxlen:]])[0], abs=1e-4)


def test_echo_logprobs_with_a_text_prompt_streamed_and_whole(folder, running):
    tok, model = nanoseek.load_tokenizer(folder), nanoseek.load(folder)
    body = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 1, "logprobs": 0, "echo": True, "temperature": 0}
    whole = httpx.post(running.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    ids = tok.encode("the cat sat", add_special_tokens=False)
    assert whole["text"].startswith("the cat sat")
    direct = _direct_logprobs(model, ids)
    assert whole["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(
        [float(direct[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4
    )
    assert whole["logprobs"]["top_logprobs"][1:] == [{}] * len(ids)  # logprobs 0: no alternatives
    with httpx.stream("POST", running.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        events = [e.removeprefix("data: ") for e in resp.read().decode().split("\n\n") if e]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    streamed = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert streamed == whole["logprobs"]["token_logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_echo_logprobs_of_a_one_token_prompt(folder, running):
    tok = nanoseek.load_tokenizer(folder)
    body = {"model": "tiny", "prompt": [tok.bos_token_id], "max_tokens": 1, "logprobs": 2, "echo": True}
    lp = httpx.post(running.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == 2 and len(lp["top_logprobs"][1]) == 2


def test_without_logprobs_echo_only_prepends_the_text(running):
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 2, "echo": True, "temperature": 0}
    choice = httpx.post(running.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"].startswith("the cat") and choice["logprobs"] is None


@pytest.mark.slow
def test_lm_eval_local_completions_against_the_server(folder, running, monkeypatch):
    """lm-eval's own client: log-likelihoods equal a direct forward, generations equal the engine's greedy ones."""
    monkeypatch.setenv("HF_XET_HIGH_PERFORMANCE", "1")  # importing lm-eval sets it: put back what was there
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tok, model = nanoseek.load_tokenizer(folder), nanoseek.load(folder)
    lm = LocalCompletionsAPI(
        model="tiny", base_url=running.url + "/v1/completions", tokenizer=str(folder), tokenizer_backend="huggingface",
        max_length=CONTEXT - 1, batch_size=2, max_retries=1,
    )  # fmt: skip
    pairs = [("the cat sat on", " the mat"), ("12+34=", "64"), ("the dog", " ran far away")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (ll, _greedy) in zip(pairs, got):
        context_ids, continuation_ids = encode_pair(tok, context, continuation)
        context_ids = context_ids[1:]  # lm-eval adds no <bos> here (add_bos_token is off)
        assert ll == pytest.approx(choice_loglikelihoods(model, context_ids, [continuation_ids])[0], abs=1e-4)
    gen = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": ["\n"], "max_gen_toks": 5}), 0)],
                            disable_tqdm=True)  # fmt: skip
    ids = tok.encode("the cat", add_special_tokens=False)
    want = tok.decode(list(generate_tokens(model, ids, 5, SamplingParams(temperature=0), tok.stop_token_ids)))
    assert gen == [want.split("\n")[0]]
