"""Embeddings: `Engine.embed` on every family the engine loads, quantized or not, and `POST /v1/embeddings` through
the official `openai` SDK on a tiny served model.

What holds: each vector is the mean of the input's final-normed hidden states over its tokens, L2-normalised (equal
to a plain forward's, to float rounding); an input's vector alone and inside a batch is the same bit for bit with
quantized weights on the dense families, and within EMBEDDING_TOLERANCE otherwise; the server's vectors equal the
engine's, base64 decodes to the float values, usage counts the tokens, an embedding request during a chat stream
leaves the stream's tokens as they were, and bad input is a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import base64
import threading

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.engine.async_engine import AsyncEngine
from nanoseek.engine.embeddings import EMBEDDING_TOLERANCE, embedding_batches
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.quant import int4_kernel_available, quantize_model
from nanoseek.serve.limits import Limits
from serve_helpers import serve, tiny_llama_gguf
from test_engine import FAMILIES, _model

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

INPUTS = [[5, 6, 7, 8, 9], [17, 3], list(range(20, 67)), [42], list(range(100, 113)), list(range(1, 90))]
NO_INT4 = pytest.mark.skipif(not int4_kernel_available(), reason="nanoseek's int4 kernel needs AVX2")
MODES = [None, "int8", pytest.param("int4", marks=NO_INT4)]


def _plain(model, ids: list[int]) -> torch.Tensor:
    """The definition, from the model's own forward without the engine: mean of the final hidden states, L2-normed."""
    with torch.inference_mode():
        return F.normalize(model.forward_hidden(torch.tensor([ids]))[0].float().mean(0), dim=-1)


# ---- the engine ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_alone_equals_in_a_batch_and_the_definition(family, mode):
    model = _model(family)
    if mode is not None:
        model = quantize_model(model, mode)
    engine = Engine(model, EngineConfig(max_step_tokens=512))  # every input in one forward
    batch = engine.embed(INPUTS)
    alone = torch.cat([engine.embed([ids]) for ids in INPUTS])
    assert batch.shape == (len(INPUTS), model.config.hidden_size) and batch.dtype == torch.float32
    assert torch.allclose(batch.norm(dim=-1), torch.ones(len(INPUTS)), atol=1e-6)
    if mode is not None and family != "deepseek_v3":  # the paged attention kernel and row-wise quantized linears
        assert torch.equal(batch, alone)
    else:
        assert (batch - alone).abs().max() <= EMBEDDING_TOLERANCE
    if mode is None:  # (quantized: the engine's forward rounds activations where the plain one may not)
        plain = torch.stack([_plain(model, ids) for ids in INPUTS])
        assert (alone - plain).abs().max() <= 1e-5
    # and in forwards of several sizes (the server's plan): the same vectors
    small = Engine(model, EngineConfig(max_step_tokens=32)).embed(INPUTS)
    assert (small - batch).abs().max() <= (0 if mode is not None and family != "deepseek_v3" else EMBEDDING_TOLERANCE)


def test_forwards_group_similar_lengths_within_the_budget():
    groups = embedding_batches([5, 2, 47, 1, 13, 89, 3], max_tokens=32)
    assert sorted(i for g in groups for i in g) == list(range(7))
    lengths = [5, 2, 47, 1, 13, 89, 3]
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) == 1 or longest * len(g) <= 32
    assert [5] in groups and [2] in groups  # the two long inputs go alone


def test_bad_engine_input_is_a_value_error():
    engine = Engine(_model("llama"))
    for bad, words in [([[]], "empty"), ([[1, 256]], "vocabulary"), ([list(range(97))], "context"), ([], "no inputs")]:
        with pytest.raises(ValueError, match=words):
            engine.embed(bad)
    assert engine.embed([list(range(96))]).shape == (1, 64)  # the whole context (no room for a reply needed)


def test_a_job_runs_on_the_engine_thread_between_steps():
    import asyncio

    engine = AsyncEngine(Engine(_model("llama")))
    try:
        assert engine.call(lambda e: threading.current_thread().name).result(timeout=30) == "nanoseek-engine"
        failing = engine.call(lambda e: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=30)
        assert engine.healthy  # a job's failure is its caller's, not the engine's
        offline = engine.engine.embed(INPUTS)
        assert torch.equal(asyncio.run(engine.embed(INPUTS)), offline)
    finally:
        engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.call(lambda e: None)


# ---- the server -----------------------------------------------------------------------------------------------

LIMITS = Limits(max_embedding_inputs=8, max_embedding_tokens=200)
TEXTS = ["the cat sat", "on the mat", "a", "then it ran off to the garden"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("embeddings") / "tiny.gguf", context=64)


@pytest.fixture(scope="module")
def running(gguf):
    with serve(gguf, limits=LIMITS) as r:
        yield r


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_sdk_texts_token_ids_base64_and_usage(client, running, gguf):
    tok = nanoseek.load_tokenizer(gguf)
    ids = [tok.encode(t) for t in TEXTS]
    engine = Engine(nanoseek.load(gguf))
    expected = engine.embed(ids).numpy()

    one = client.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="float", user="u1")
    assert one.model == "tiny" and one.object == "list" and one.data[0].object == "embedding"
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids[0])
    assert np.abs(_vectors(one)[0] - expected[0]).max() <= EMBEDDING_TOLERANCE

    listed = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    vectors = _vectors(listed)
    assert vectors.shape == (len(TEXTS), 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    assert np.abs(vectors - expected).max() <= EMBEDDING_TOLERANCE
    assert listed.usage.prompt_tokens == listed.usage.total_tokens == sum(map(len, ids))

    # the SDK asks for base64 when no format is given and decodes it: the same float32 values
    assert np.array_equal(_vectors(client.embeddings.create(model="tiny", input=TEXTS)), vectors)
    by_ids = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
    assert np.array_equal(_vectors(by_ids), vectors)
    one_ids = client.embeddings.create(model="tiny", input=ids[1], encoding_format="float")
    # alone it is a forward of other shape: fp32 weights (this file's) agree within the tolerance, not bit for bit
    # (MKL's sgemm sums in an order that depends on the rows; README "Embeddings")
    assert np.abs(_vectors(one_ids)[0] - vectors[1]).max() <= EMBEDDING_TOLERANCE
    assert one_ids.usage.prompt_tokens == len(ids[1])

    raw = httpx.post(running.url + "/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    assert np.array_equal(np.stack(decoded), vectors[:2])
    assert raw["usage"] == {"prompt_tokens": len(ids[0]) + len(ids[1]), "total_tokens": len(ids[0]) + len(ids[1])}


def test_an_input_alone_equals_it_inside_a_batch(client):
    batch = _vectors(client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float"))
    for i, text in enumerate(TEXTS):
        alone = _vectors(client.embeddings.create(model="tiny", input=text, encoding_format="float"))[0]
        assert np.abs(alone - batch[i]).max() <= EMBEDDING_TOLERANCE


def test_quantized_served_vectors_are_bitwise_the_same_alone_and_in_a_batch(gguf):
    with serve(gguf, model=nanoseek.load(gguf, quant="int8")) as r:
        sdk = openai.OpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        batch = _vectors(sdk.embeddings.create(model="tiny", input=TEXTS))
        for i, text in enumerate(TEXTS):
            assert np.array_equal(_vectors(sdk.embeddings.create(model="tiny", input=text))[0], batch[i])


def test_embeddings_during_a_chat_stream_leave_its_tokens_alone(client):
    messages = [{"role": "user", "content": "tell me"}]
    settings = dict(model="tiny", messages=messages, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    alone = client.chat.completions.create(**settings).choices[0].message.content
    pieces, embedded = [], []
    for chunk in client.chat.completions.create(**settings, stream=True):
        pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if len(pieces) == 3:  # mid-stream
            embedded.append(_vectors(client.embeddings.create(model="tiny", input=TEXTS)))
    assert "".join(pieces) == alone and len(embedded) == 1 and len(pieces) > 3


BAD = {
    "empty list": ({"input": []}, "input"),
    "empty string": ({"input": ""}, "input"),
    "an empty string in a list": ({"input": ["a", ""]}, "input[1]"),
    "an empty token list": ({"input": [[1], []]}, "input[1]"),
    "a number": ({"input": 5}, "input"),
    "a float token": ({"input": [1.5]}, "input"),
    "a bool token": ({"input": [True, 2]}, "input"),
    "texts and ids mixed": ({"input": ["a", 1]}, "input"),
    "an object": ({"input": {"a": 1}}, "input"),
    "no input": ({"model": "tiny"}, "input"),
    "an id outside the vocabulary": ({"input": [1, 262]}, "input"),
    "a negative id": ({"input": [[1], [-1]]}, "input[1]"),
    "dimensions": ({"input": "a", "dimensions": 16}, "dimensions"),
    "an unknown encoding": ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    "too long for the context": ({"input": [1] * 65}, "input"),
    "too many inputs": ({"input": ["a"] * 9}, "input"),
    "too many tokens in all": ({"input": [[1] * 60] * 4}, "input"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_400_in_openai_shape(running, case):
    body, param = BAD[case]
    resp = httpx.post(running.url + "/v1/embeddings", json={"model": "tiny", **body}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param or error["param"].startswith(param), error


def test_limit_errors_name_the_limit_and_its_flag(running):
    def message(body) -> str:
        return httpx.post(running.url + "/v1/embeddings", json=body, timeout=60).json()["error"]["message"]

    assert "context is 64 tokens" in message({"input": [1] * 65})
    assert "--max-embedding-inputs" in message({"input": ["a"] * 9})
    assert "--max-embedding-tokens" in message({"input": [[1] * 60] * 4})
    assert "dimensions is not supported" in message({"input": "a", "dimensions": 32})


def test_unknown_model_is_a_404_and_the_sdk_raises(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="a")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="a", dimensions=8)


def test_the_api_key_guards_the_route(gguf):
    with serve(gguf, api_key="secret") as r:
        assert httpx.post(r.url + "/v1/embeddings", json={"input": "a"}).status_code == 401
        sdk = openai.OpenAI(base_url=r.url + "/v1", api_key="secret", max_retries=0, timeout=60)
        assert len(sdk.embeddings.create(model="tiny", input="a").data) == 1
