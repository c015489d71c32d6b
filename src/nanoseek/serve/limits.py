"""What one client may ask of the server, so that no client can slow or starve another.

    limits = Limits(max_logit_bias=300)              # `nanoseek serve --max-logit-bias 300`
    limits.check_chat(request)                       # a 400 naming the limit and its flag, before any work

The HTTP limits (body size and time, the request head's time) are enforced by the app's middleware and its uvicorn
protocol (app.py, connection.py); the per-request ones here, on the parsed request, before the prompt is rendered or
anything reaches the engine. Each bounds a cost that one request would otherwise put on every other request's
tokens: the engine's step runs all sequences together, and per step it walks each sequence's logit_bias in Python,
decodes a tail as long as its longest stop string and scans its stop ids; echo+logprobs runs a plain forward of the
whole prompt beside the engine; an embeddings request's forwards take the engine's thread between its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.serve.errors import APIError


@dataclass(frozen=True)
class Limits:
    # HTTP (app.py's middleware, connection.py's protocol)
    max_body_bytes: int = 4 << 20  # a long-context prompt is well under this; more is a 413
    header_timeout: float = 10.0  # seconds for a request's head to arrive (from connect or the last reply): else closed
    body_timeout: float = 60.0  # seconds for the whole body to arrive once the head has: else a 408
    # per request (400)
    max_sequences: int = 16  # n, and prompts x n on /v1/completions: sequences one request adds to the batch
    max_logit_bias: int = 300  # logit_bias entries (OpenAI's own cap)
    max_stop: int = 16  # stop strings, and stop_token_ids, each
    max_stop_chars: int = 256  # characters in one stop string
    max_echo_logprobs_tokens: int = 16384  # prompt tokens one /v1/completions request scores with echo + logprobs
    # connections and slow readers (connection.py; serving.Generation and app.EventStream)
    max_connections: int = 512  # open connections; a request on one past it: 503 + Retry-After, closed
    max_stream_buffer: int = 64  # outputs a choice may have waiting for its reader before its generation pauses
    stream_stall_timeout: float = 60.0  # seconds one write of a reply may wait for its client to read: else ended
    max_embedding_inputs: int = 2048  # inputs in one /v1/embeddings request (OpenAI's own cap)
    max_embedding_tokens: int = 65536  # their tokens in all (each input is also capped at the model's context)

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{flag(name)} must be > 0, got {value}")

    def check_chat(self, req) -> None:
        """An OpenAI chat completion request (protocol_openai.ChatCompletionRequest)."""
        self._check_sampling(req, prompts=1)

    def check_completion(self, req) -> None:
        """An OpenAI completion request (protocol_openai.CompletionRequest): n choices for each prompt."""
        self._check_sampling(req, prompts=len(req.prompts()))

    def check_messages(self, req) -> None:
        """An Anthropic messages request (protocol_anthropic.MessagesRequest)."""
        self._check_stops(req.stop_sequences or [], "stop_sequences")

    def check_echo_logprobs(self, prompt_tokens: int) -> None:
        """The prompt tokens a completion request would score (echo + logprobs), before any is scored."""
        self._at_most("max_echo_logprobs_tokens", prompt_tokens, "prompt",
                      f"echo with logprobs would score {prompt_tokens} prompt tokens")  # fmt: skip

    def check_embedding_inputs(self, inputs: int) -> None:
        """The inputs of one /v1/embeddings request, before they are tokenized."""
        self._at_most("max_embedding_inputs", inputs, "input", f"input has {inputs} entries")

    def check_embedding_tokens(self, tokens: int) -> None:
        """The tokens of all the inputs of one /v1/embeddings request, before any forward."""
        self._at_most("max_embedding_tokens", tokens, "input", f"the inputs have {tokens} tokens in all")

    def _check_sampling(self, req, prompts: int) -> None:
        sequences = req.n * prompts
        what = f"n is {req.n}" if prompts == 1 else f"{prompts} prompts x n={req.n} make {sequences} sequences"
        self._at_most("max_sequences", sequences, "n", what)
        bias = len(req.logit_bias or {})
        self._at_most("max_logit_bias", bias, "logit_bias", f"logit_bias has {bias} entries")
        self._check_stops([req.stop] if isinstance(req.stop, str) else req.stop or [], "stop")
        ids = len(req.stop_token_ids or [])
        self._at_most("max_stop", ids, "stop_token_ids", f"stop_token_ids has {ids} entries")

    def _check_stops(self, stops: list[str], param: str) -> None:
        self._at_most("max_stop", len(stops), param, f"{param} has {len(stops)} entries")
        longest = max((len(s) for s in stops), default=0)
        self._at_most("max_stop_chars", longest, param, f"a stop string in {param} has {longest} characters")

    def _at_most(self, name: str, value: int, param: str, what: str) -> None:
        limit = getattr(self, name)
        if value > limit:
            raise APIError(400, f"{what}; this server allows at most {limit} (nanoseek serve {flag(name)})", param)


def flag(name: str) -> str:
    """The `nanoseek serve` option that sets the limit `name`."""
    return "--max-body-mib" if name == "max_body_bytes" else "--" + name.replace("_", "-")
