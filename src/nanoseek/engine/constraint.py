"""Constrained decoding: a per-request hook that says which tokens a request may take next.

A request's `SamplingParams.constraint` is a `Constraint`, immutable and shareable (the n choices of one API
request share it); `start()` gives each request its own `ConstraintState`, which the engine asks for the
allowed tokens before every sampling step (`sample_batch` sets the others to -inf, row by row, so a
constrained request leaves its batch neighbours' tokens untouched) and advances with every token the
request keeps. The engine knows nothing of grammars, JSON or APIs: `GrammarConstraint` below is one
implementation, on llguidance (a maintained grammar engine: JSON schema, Lark, regex), which the server uses
for `response_format`.

A state that allows a model's end-of-sequence id says "the grammar may end here"; when it allows nothing
else, the request ends with that id (finish_reason "stop"). Constrained requests never take speculative
drafts (drafts would need the mask at every draft position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch


class ConstraintState(Protocol):
    def allowed(self, vocab_size: int) -> torch.Tensor:
        """bool [vocab_size]: the tokens the request may take next."""
        ...

    def advance(self, token_id: int) -> None:
        """The request kept `token_id` (a token `allowed` permitted)."""
        ...


class Constraint(Protocol):
    def start(self) -> ConstraintState:
        """A fresh state at the start of a reply."""
        ...


def bitmask_to_bool(bitmask: bytes, vocab_size: int) -> torch.Tensor:
    """A little-endian bitmask (bit t of byte t // 8 set: token t allowed) as bool [vocab_size]; ids beyond the
    mask (a model vocabulary padded past the tokenizer's) are not allowed."""
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little").astype(bool)
    out = np.zeros(vocab_size, dtype=bool)
    n = min(vocab_size, bits.size)
    out[:n] = bits[:n]
    return torch.from_numpy(out)


class GrammarError(ValueError):
    """A grammar or JSON schema that is malformed or that no text can satisfy."""


class GrammarTokenizer:
    """A tokenizer as llguidance sees it (token bytes, EOS ids): built once per model, and slow for a large
    vocabulary (measured on 2 busy cores: 1.7 s for SmolLM2's 49k tokens, 15 s for Gemma 3's 262k).

    `tokenizer`: nanoseek's Tokenizer (a `tokenizers` backend); `eos_ids`: the ids that end a reply, allowed by
    the mask once the grammar is complete."""

    def __init__(self, tokenizer, eos_ids: Sequence[int]):
        import llguidance

        self.eos_ids = list(eos_ids)
        self.ll = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=self.eos_ids or None
        )

    def json_schema(self, schema: dict[str, Any] | bool) -> GrammarConstraint:
        """A constraint to JSON text valid under `schema` (compact separators: no free whitespace a model could
        pad with forever). GrammarError when the schema is invalid or unsatisfiable."""
        import llguidance

        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            )
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
        return self.grammar(grammar)

    def lark(self, lark: str) -> GrammarConstraint:
        """A constraint from a Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema)."""
        import llguidance

        return self.grammar(llguidance.LLMatcher.grammar_from_lark(lark))

    def grammar(self, grammar: str) -> GrammarConstraint:
        """A constraint from llguidance's grammar text (e.g. `LLMatcher.grammar_from_lark(...)`)."""
        import llguidance

        try:
            problem = llguidance.LLMatcher.validate_grammar(grammar, self.ll)
        except (ValueError, TypeError, RuntimeError) as exc:  # llguidance's API errors, e.g. a grammar not JSON
            problem = str(exc)
        if problem:
            raise GrammarError(f"invalid grammar or schema: {problem}")
        matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar or schema: {matcher.get_error()}")
        return GrammarConstraint(matcher)


class GrammarConstraint:
    """A compiled grammar; every `start()` copies its initial matcher (cheap: the grammar is compiled once)."""

    def __init__(self, matcher):
        self._matcher = matcher

    def start(self) -> GrammarState:
        return GrammarState(self._matcher.deep_copy())


class GrammarState:
    def __init__(self, matcher):
        self.matcher = matcher

    def allowed(self, vocab_size: int) -> torch.Tensor:
        return bitmask_to_bool(self.matcher.compute_bitmask(), vocab_size)

    def advance(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)  # a refused token puts it in its error state, which allows EOS only
