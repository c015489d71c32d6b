"""OpenAI's embeddings API: the request and response models (https://platform.openai.com/docs/api-reference/embeddings).

`input` is a string, a list of strings, a list of token ids, or a list of such lists, as OpenAI takes it. Token ids
must be JSON integers (not true, not 1.0) and texts JSON strings: a list mixing the two is refused rather than
guessed at. `encoding_format` "float" (default) or "base64" (each vector's float32 values, little-endian, as
OpenAI sends them and its SDK decodes them). `dimensions` is refused: the vectors have the model's hidden size, and
no model served here was trained to be cut shorter (Matryoshka-style). `user` is accepted and ignored.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, StrictInt, StrictStr, model_validator

from nanoseek.serve.protocol_openai import RequestBody, body_error


class EmbeddingRequest(RequestBody):
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.dimensions is not None:
            raise body_error("dimensions is not supported: the embeddings have the model's hidden size (leave "
                             "dimensions out)", "dimensions")  # fmt: skip
        if isinstance(self.input, list) and not self.input:
            raise body_error("input must not be an empty list", "input")
        for i, item in enumerate(self.inputs()):
            if len(item) == 0:
                param = "input" if isinstance(self.input, str) else f"input[{i}]"
                what = "an empty string" if isinstance(item, str) else "an empty list of token ids"
                raise body_error(f"{param} is {what}; every input needs at least one token", param)
        return self

    def inputs(self) -> list[str | list[int]]:
        """The inputs, each a text or a list of token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(x, int) for x in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a base64 string with encoding_format "base64"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage = Field(description="prompt_tokens = total_tokens: every token of every input")


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One vector as the response carries it: JSON numbers (float32 values, printed exactly as Python floats), or
    base64 of its little-endian float32 bytes."""
    values = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(values.tobytes()).decode("ascii")
    return values.tolist()
