"""`nanoseek serve` through the official `openai` and `anthropic` SDKs, on a tiny chat model under a real
uvicorn on a loopback port: replies equal the engine's own, streaming equals non-streaming, and the sampling
parameters (n, seed, stop, logprobs, logit_bias, max tokens, ignore_eos) do what the APIs say."""

from __future__ import annotations

import httpx
import pytest

import nanoseek
from gguf_writer import CHATML
from nanoseek.engine.generate import generate_tokens
from nanoseek.engine.sampling import SamplingParams
from serve_helpers import serve, tiny_llama_gguf

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("transformers")

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the theme"}]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf")


@pytest.fixture(scope="module")
def running(gguf):
    with serve(gguf) as r:
        yield r


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(running):
    return anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0, timeout=60)


def _engine_reply(gguf, messages, max_tokens: int, **params) -> str:
    tok, model = nanoseek.load_tokenizer(gguf), nanoseek.load(gguf)
    ids = tok.encode_chat(messages)
    out = generate_tokens(model, ids, max_tokens, SamplingParams(temperature=0, **params), tok.stop_token_ids)
    return tok.decode(list(out))


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_greedy_equals_the_engine_and_streaming_equals_whole(client, gguf):
    want = _engine_reply(gguf, MESSAGES, 10)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert reply.object == "chat.completion" and reply.usage.prompt_tokens == len(
        nanoseek.load_tokenizer(gguf).encode_chat(MESSAGES)
    )
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(running):
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert '"object": "chat.completion.chunk"' in events[0] and '"usage"' not in raw  # no include_usage: no field


def test_completions_stop_string_is_cut_whole_and_streamed(client):
    args = dict(model="tiny", prompt="the theme", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    i = next(i for i, ch in enumerate(full) if i > 0 and ch.isascii() and ch.isprintable())
    stop = full[i]
    cut = client.completions.create(**args, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_n_and_seed_choice_i_draws_from_seed_plus_i(client):
    args = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.2, extra_body={"ignore_eos": True})
    two = client.chat.completions.create(**args, n=2, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 16
    one = client.chat.completions.create(**args, seed=7)
    again = client.chat.completions.create(**args, seed=7)
    assert one.choices[0].message.content == again.choices[0].message.content == two.choices[0].message.content
    assert client.chat.completions.create(**args, seed=8).choices[0].message.content == two.choices[1].message.content


def test_logprobs_of_greedy_tokens_are_their_top_alternative(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
    legacy = client.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and lp.text_offset[0] == 0


def test_logit_bias_and_max_tokens_and_ignore_eos(client, gguf):
    a = nanoseek.load_tokenizer(gguf).encode("A", add_special_tokens=False)[0]
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0.8,
                                           logit_bias={str(a): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert reply.choices[0].message.content == "AAAAA" and reply.choices[0].finish_reason == "length"
    args = dict(model="tiny", messages=MESSAGES, max_tokens=6)
    greedy = client.chat.completions.create(**args, temperature=0, extra_body={"ignore_eos": True})
    for only_the_top in ({"top_k": 1}, {"min_p": 1.0}):  # vLLM's extras reach the sampler: both leave one token
        got = client.chat.completions.create(**args, temperature=1.5, seed=3,
                                             extra_body={**only_the_top, "ignore_eos": True})  # fmt: skip
        assert got.choices[0].message.content == greedy.choices[0].message.content
    penalties = dict(presence_penalty=1.0, frequency_penalty=0.5, extra_body={"repetition_penalty": 1.2})
    penalized = client.chat.completions.create(**args, temperature=0.9, top_p=0.9, **penalties)
    assert penalized.usage.completion_tokens <= 6


def test_completions_token_prompts_and_echo(client, gguf):
    tok = nanoseek.load_tokenizer(gguf)
    ids = tok.encode("the theme", add_special_tokens=False)
    by_text = client.completions.create(model="tiny", prompt="the theme", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=5, temperature=0, echo=True)
    assert [c.text for c in by_ids.choices] == ["the theme" + by_text.choices[0].text] * 2


def test_anthropic_messages_whole_stream_and_count_tokens(claude, gguf):
    system, messages = "be brief", [{"role": "user", "content": "the theme"}]
    want = _engine_reply(gguf, MESSAGES, 8)
    greedy = {"extra_body": {"temperature": 0}}  # this SDK version has no temperature argument; the API has it
    reply = claude.messages.create(model="tiny", system=system, messages=messages, max_tokens=8, **greedy)
    assert reply.type == "message" and reply.role == "assistant"
    assert [b.type for b in reply.content] == ["text"] and reply.content[0].text == want
    assert reply.stop_reason in ("end_turn", "max_tokens")
    count = claude.messages.count_tokens(model="tiny", system=system, messages=messages)
    assert reply.usage.input_tokens == count.input_tokens
    with claude.messages.stream(model="tiny", system=system, messages=messages, max_tokens=8, **greedy) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == want and final.content[0].text == want
    assert final.usage.output_tokens == reply.usage.output_tokens and final.stop_reason == reply.stop_reason


def test_anthropic_stream_event_order(running):
    body = {"model": "tiny", "max_tokens": 3, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", running.url + "/v1/messages", json=body, timeout=60) as resp:
        raw = resp.read().decode()
    kinds = [e.split("\n")[0].removeprefix("event: ") for e in raw.split("\n\n") if e]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    middle = kinds[1:-2]
    if middle:
        assert middle[0] == "content_block_start" and middle[-1] == "content_block_stop"
        assert set(middle[1:-1]) == {"content_block_delta"}


def test_anthropic_stop_sequence(claude):
    args = dict(model="tiny", messages=[{"role": "user", "content": "the theme"}], max_tokens=12)
    args["extra_body"] = {"temperature": 0}
    full = claude.messages.create(**args).content[0].text
    i = next((i for i, ch in enumerate(full) if i > 0 and ch.isascii() and ch.isprintable()), None)
    if i is None:
        pytest.skip("the tiny model's reply has no printable ASCII character to stop at")
    reply = claude.messages.create(**args, stop_sequences=[full[i]])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == full[i]
    assert reply.content[0].text == full[: full.index(full[i])]


def test_tokenize_and_detokenize_round_trip(running, gguf):
    tok = nanoseek.load_tokenizer(gguf)
    got = httpx.post(running.url + "/tokenize", json={"prompt": "the theme"}).json()
    assert got["tokens"] == tok.encode("the theme") and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 64
    chat = httpx.post(running.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == tok.encode_chat(MESSAGES)
    assert httpx.post(running.url + "/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": "the theme"}
    assert httpx.get(running.url + "/health").json() == {"status": "ok"}


THINKING = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")


def test_reasoning_goes_to_reasoning_content_and_thinking_blocks(tmp_path):
    """A template that opens <think> for the model: the reply (no </think> from a random model) is reasoning."""
    path = tiny_llama_gguf(tmp_path / "think.gguf", chat_template=THINKING)
    with serve(path) as r:
        oai = openai.OpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
        args = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        reply = oai.chat.completions.create(**args).choices[0].message
        assert reply.content is None and reply.model_extra["reasoning_content"]
        chunks = list(oai.chat.completions.create(**args, stream=True))
        streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
        assert streamed == reply.model_extra["reasoning_content"]
        claude = anthropic.Anthropic(base_url=r.url, api_key="x", max_retries=0)
        msg = claude.messages.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
        assert [b.type for b in msg.content] == ["thinking"]
        with claude.messages.stream(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6) as s:
            final = s.get_final_message()
        assert [b.type for b in final.content] == ["thinking"] and final.content[0].thinking
