"""`nanoseek serve MODEL`: the model behind OpenAI- and Anthropic-compatible HTTP APIs.

    nanoseek serve smollm2 --port 8000 --api-key secret
    curl localhost:8000/v1/chat/completions -H 'Authorization: Bearer secret' \
         -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'

Binds 127.0.0.1 unless --host says otherwise. On SIGTERM or Ctrl-C the server stops taking requests and those in
flight get --shutdown-timeout seconds to finish; then the engine aborts them (their streams end normally, with
finish_reason "abort") and stops.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nanoseek.commands._textgen import add_model_args, load_model_and_tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model behind the OpenAI and Anthropic APIs")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
        help="require this key (Authorization: Bearer KEY or x-api-key: KEY); default $NANOSEEK_API_KEY",
    )  # fmt: skip
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL's name)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown (default 30)")  # fmt: skip
    p.set_defaults(func=run)


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    path = Path(args.model)
    return path.stem if path.suffix == ".gguf" else path.name or str(args.model)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    import uvicorn

    from nanoseek.engine.engine import EngineConfig
    from nanoseek.serve.app import create_app
    from nanoseek.serve.serving import make_server

    model, tok = load_model_and_tokenizer(args)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, compile=args.compile)
    server = make_server(model, tok, served_name(args), config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    print(f"serving {server.name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    app = create_app(server, api_key=args.api_key)
    # uvicorn's own deadline is a backstop only: by then the engine has ended every stream
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout + 10,
                            log_level="info")  # fmt: skip
    _draining_server(config, server.engine.shutdown, args.shutdown_timeout).run()
    return 0


def _draining_server(config, stop_engine, timeout: float):
    """uvicorn's Server, plus: on SIGTERM/Ctrl-C, stop the engine after `timeout` seconds, which ends the streams
    still running (uvicorn alone would wait for them, then cancel their tasks mid-write)."""
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                timer = threading.Timer(timeout, stop_engine)
                timer.daemon = True  # an idle server exits at once, without waiting for it
                timer.start()
            super().handle_exit(sig, frame)

    return DrainingServer(config)
