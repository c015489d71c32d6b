"""Log-probabilities of a prompt's own tokens, for `/v1/completions` with `echo: true` and `logprobs`.

This is how log-likelihood evaluators (EleutherAI's lm-evaluation-harness `local-completions`) score a
continuation: they send context + continuation with echo, max_tokens 1 and logprobs 1, and sum the echoed
prompt tokens' logprobs past the context. The first token has none (nothing precedes it): null, as OpenAI and
vLLM answer.

The engine computes logprobs for the tokens it samples only, so the prompt goes through one plain forward of the
served model, on a worker thread. The model is in eval mode (its forward changes no state), so this may run
beside the engine's steps; a lock keeps these forwards one at a time, so a burst of scoring requests does not
oversubscribe the cores the engine also uses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from nanoseek.serve.serving import TokenLogprob

_ONE_AT_A_TIME = threading.Lock()


def prompt_logprobs(
    model: torch.nn.Module, ids: Sequence[int], top_n: int, token_text: Callable[[int], str]
) -> list[TokenLogprob]:
    """One entry per prompt token: log p(token i | tokens before it) and the top_n most likely tokens at i.
    The first entry's logprob is None."""
    ids = list(ids)
    device = next(model.parameters()).device
    with _ONE_AT_A_TIME, torch.inference_mode():
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        logprobs = model(tokens)[0, :-1].float().log_softmax(-1)
        chosen = logprobs.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist()
        top_lp, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], logprobs[:, :0].long())
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    items = [TokenLogprob(ids[0], token_text(ids[0]), None, [])]  # type: ignore[arg-type]
    for i, token in enumerate(ids[1:]):
        top = [(token_text(t), lp) for t, lp in zip(top_ids[i], top_lp[i])]
        items.append(TokenLogprob(token, token_text(token), chosen[i], top))
    return items
