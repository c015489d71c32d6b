"""`POST /v1/embeddings`: a request's inputs as token ids, checked, embedded by the engine, and the response.

    response = await create_embeddings(server, request)     # protocol_embeddings.EmbeddingResponse

Texts are tokenized as /v1/completions tokenizes a prompt (with the tokenizer's special tokens, e.g. BOS), on a
worker thread. Every check comes before any forward: the model name, the number of inputs and their tokens in all
(limits.py), each input within the model's context (an embedding needs no room for a reply, so the whole context
may be used) and within the vocabulary. The vectors come from `AsyncEngine.embed` (engine/embeddings.py): each
forward runs as a job on the engine's thread between its steps, so running streams keep their cache and their
tokens. A client that disconnects cancels the forwards not started yet.
"""

from __future__ import annotations

import asyncio

from nanoseek.serve.errors import APIError
from nanoseek.serve.protocol_embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    encode_vector,
)
from nanoseek.serve.serving import ModelServer


async def create_embeddings(server: ModelServer, req: EmbeddingRequest) -> EmbeddingResponse:
    server.check_model(req.model)
    inputs = req.inputs()
    server.limits.check_embedding_inputs(len(inputs))
    ids = await _token_ids(server, inputs)
    total = sum(len(x) for x in ids)
    server.limits.check_embedding_tokens(total)
    try:
        vectors = await server.engine.embed(ids)
    except ValueError as exc:  # (checked above; the engine's own check, should one differ)
        raise APIError(400, str(exc), "input") from None
    except RuntimeError as exc:  # the engine is shut down or failed
        raise APIError(503, str(exc)) from None
    server.metrics.prompt_tokens.inc(total)
    data = [Embedding(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors.numpy())]
    usage = EmbeddingUsage(prompt_tokens=total, total_tokens=total)
    return EmbeddingResponse(data=data, model=server.name, usage=usage)


async def _token_ids(server: ModelServer, inputs: list[str | list[int]]) -> list[list[int]]:
    """Each input's token ids; a 400 naming the first input that is empty, outside the vocabulary or longer than
    the model's context."""
    texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
    encoded = await asyncio.to_thread(lambda: [server.tokenizer.encode(text) for _, text in texts]) if texts else []
    ids = [x if not isinstance(x, str) else [] for x in inputs]
    for (i, _), tokens in zip(texts, encoded):
        ids[i] = tokens
    context = server.context_length
    for i, tokens in enumerate(ids):
        param = "input" if len(inputs) == 1 else f"input[{i}]"
        if not tokens:
            raise APIError(400, f"{param} has no tokens; every input needs at least one", param)
        if len(tokens) > context:
            raise APIError(400, f"{param} has {len(tokens)} tokens; the model's context is {context} tokens, the most "
                           "one input may have", param, "context_length_exceeded")  # fmt: skip
        server.check_tokens(tokens, param)
    return ids
