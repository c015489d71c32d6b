"""`nanoseek generate MODEL --prompt TEXT | --chat TEXT`: stream one completion to stdout."""

from __future__ import annotations

import argparse
import sys

from nanoseek.commands._textgen import add_model_args, add_sampling_args, load_model_and_tokenizer, sampling_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (raw) or one chat message")
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="raw text to continue")
    what.add_argument("--chat", help="one user message, sent through the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.engine.generate import GenerationResult, context_length, engine_for, generate_tokens, stream_text

    params = sampling_params(args)
    model, tok = load_model_and_tokenizer(args)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}
        ]
        ids = tok.encode_chat(messages)
    else:
        ids = tok.encode(args.prompt)
        if not ids and tok.bos_token_id is not None:
            ids = [tok.bos_token_id]
    result = GenerationResult([], "")
    limit = context_length(model) or len(ids) + args.max_tokens
    span = min(len(ids) + args.max_tokens, limit)
    engine = engine_for(model, span, stop_ids=tok.stop_token_ids, compile=args.compile)
    tokens = generate_tokens(model, ids, args.max_tokens, params, tok.stop_token_ids, result=result, engine=engine)
    for delta in stream_text(tok, tokens):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if result.finish_reason == "context":
        print("[stopped: the model's context is full]", file=sys.stderr)
    return 0
