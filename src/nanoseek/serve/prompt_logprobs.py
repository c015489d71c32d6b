"""Log-probabilities of a prompt's own tokens, for `/v1/completions` with `echo: true` and `logprobs`.

This is how log-likelihood evaluators (EleutherAI's lm-evaluation-harness `local-completions`) score a
continuation: they send context + continuation with echo, max_tokens 1 and logprobs 1, and sum the echoed
prompt tokens' logprobs past the context. The first token has none (nothing precedes it): null, as OpenAI and
vLLM answer.

The engine computes logprobs for the tokens it samples only, so the prompt goes through one plain forward of the
served model, on a worker thread. The model is in eval mode (its forward changes no state), so this may run
beside the engine's steps; a lock keeps these forwards one at a time, so a burst of scoring requests does not
oversubscribe the cores the engine also uses. Logits are made from the final hidden states `CHUNK` positions at
a time: a whole prompt's [T, vocab] logits and their log-softmax would be gigabytes (8k tokens x 49k vocabulary:
two 1.6 GB tensors), where a chunk's are a few tens of MB. The request's prompt tokens are capped too
(`Limits.max_echo_logprobs_tokens`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence

import torch

from nanoseek.serve.serving import TokenLogprob

_ONE_AT_A_TIME = threading.Lock()
CHUNK = 256  # positions whose logits exist at once


def prompt_logprobs(
    model: torch.nn.Module,
    ids: Sequence[int],
    top_n: int,
    token_text: Callable[[int], str],
    chunk: int = CHUNK,
    lora: str | None = None,
) -> list[TokenLogprob]:
    """One entry per prompt token: log p(token i | tokens before it) and the top_n most likely tokens at i.
    The first entry's logprob is None. `lora`: the LoRA adapter to score with (engine/lora.py), None: the base."""
    ids = list(ids)
    device = next(model.parameters()).device
    chosen, top_lp, top_ids = [], [], []
    adapter = model.lora_adapters.rows([lora], device) if lora is not None else contextlib.nullcontext()
    with _ONE_AT_A_TIME, torch.inference_mode(), adapter:
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        hidden, head = _hidden_and_head(model, tokens)
        for start in range(0, len(ids) - 1, chunk):  # position t's logits predict token t + 1
            logprobs = head(hidden[:, start : start + chunk])[0].float().log_softmax(-1)
            targets = tokens[0, start + 1 : start + 1 + chunk]
            chosen += logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
            if top_n:
                lp, top = logprobs.topk(top_n, dim=-1)
                top_lp, top_ids = top_lp + lp.tolist(), top_ids + top.tolist()
            else:
                top_lp, top_ids = top_lp + [[]] * len(targets), top_ids + [[]] * len(targets)
    items = [TokenLogprob(ids[0], token_text(ids[0]), None, [])]  # type: ignore[arg-type]
    for i, token in enumerate(ids[1:]):
        top = [(token_text(t), lp) for t, lp in zip(top_ids[i], top_lp[i])]
        items.append(TokenLogprob(token, token_text(token), chosen[i], top))
    return items


def _hidden_and_head(model: torch.nn.Module, tokens: torch.Tensor):
    """The final hidden states [1, T, d] and the function that makes logits of them. nanoseek's models split
    their forward so (`forward_hidden`, then `logits` or `lm_head`); any other model gives its whole logits at once,
    with the identity as its head."""
    if hasattr(model, "forward_hidden"):
        head = model.logits if hasattr(model, "logits") else model.lm_head
        return model.forward_hidden(tokens), head
    return model(tokens), lambda logits: logits
