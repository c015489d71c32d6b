"""`nanoseek chat MODEL`: an interactive chat in the terminal.

The conversation is kept as a message list and re-rendered through the model's chat template each
turn. /reset forgets it, /exit (or Ctrl-D) leaves; Ctrl-C while the model answers stops that answer
(what was printed stays in the history) and Ctrl-C at the prompt just clears the line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from nanoseek.commands._textgen import add_model_args, add_sampling_args, load_model_and_tokenizer, sampling_params

HELP = "commands: /reset (forget the conversation), /exit (quit); Ctrl-C stops a reply"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message that starts every conversation")
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    model, tok = load_model_and_tokenizer(args)
    if not tok.chat_template:
        raise ValueError(
            f"{args.model}: the model has no chat template (a base model?); use `nanoseek generate --prompt`"
        )
    print(f"nanoseek chat — {args.model}\n{HELP}", file=sys.stderr)
    chat_loop(model, tok, params, args.max_tokens, system=args.system, compile=args.compile)
    return 0


CHAT_CACHE_TOKENS = 4096


def chat_loop(
    model,
    tok,
    params,
    max_tokens: int,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], object] | None = None,
    compile: bool = False,
) -> None:
    """The REPL; `read`/`write` are injectable so it can be driven without a terminal."""
    write = write or _stdout_write
    from nanoseek.engine.generate import context_length, engine_for, generate_tokens, stream_text

    # One engine for the whole conversation: its prefix cache holds the history, so each turn prefills only
    # the new message. Its cache holds up to CHAT_CACHE_TOKENS (or the model's context, when smaller).
    limit = min(context_length(model) or CHAT_CACHE_TOKENS, CHAT_CACHE_TOKENS)
    engine = engine_for(model, limit, stop_ids=tok.stop_token_ids, compile=compile)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(/exit to quit)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            write("(conversation reset)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        ids = _fit_context(tok, history, len(start), limit, max_tokens)
        if ids is None:
            history.pop()
            write("(that message alone is longer than the model's context)\n")
            continue
        reply = []
        try:
            budget = min(max_tokens, limit - len(ids))
            for delta in stream_text(tok, generate_tokens(model, ids, budget, params, engine=engine)):
                reply.append(delta)
                write(delta)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def _fit_context(tok, history: list[dict], keep: int, limit: int | None, max_tokens: int) -> list[int] | None:
    """Prompt ids for `history`, dropping the oldest exchanges (never the system message) until the prompt
    leaves room for a reply; None if even the last message alone does not fit."""
    while True:
        ids = tok.encode_chat(history)
        if limit is None or len(ids) + min(max_tokens, 16) <= limit:
            return ids
        if len(history) - keep <= 1:
            return None
        del history[keep : keep + 2]  # the oldest user message and its reply


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
