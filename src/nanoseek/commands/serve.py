"""`nanoseek serve MODEL`: the model behind OpenAI- and Anthropic-compatible HTTP APIs.

    nanoseek serve smollm2 --port 8000 --api-key secret
    curl localhost:8000/v1/chat/completions -H 'Authorization: Bearer secret' \
         -d '{"messages": [{"role": "user", "content": "hi"}], "stream": true}'

Binds 127.0.0.1 unless --host says otherwise. On SIGTERM or Ctrl-C the server stops taking requests and those in
flight get --shutdown-timeout seconds to finish; then the engine aborts them (their streams end normally, with
finish_reason "abort") and stops.

What one client may ask is bounded (serve/limits.py), so no client can slow or starve another: the flags below
under "limits" set the bounds; a request over one gets a 400 (408, 413) naming it.
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
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter folder beside the base model, under NAME (a request's \"model\"); "
                   "repeatable")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "model", "fp16"), default="auto",
                   help="the KV cache's dtype: auto (default) fp16 for quantized models on CPU (half the cache's "
                   "memory; llama.cpp's default too), else the weights'; model: the weights' dtype (fp32 on CPU); "
                   "fp16: also for fp32 weights")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="most intra-op threads a step uses (default: torch's: OMP_NUM_THREADS or the cores); each "
                   "step runs on 1 thread or all of them by its size, as a calibration at start measured")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown (default 30)")  # fmt: skip
    p.add_argument("--docs", action="store_true",
                   help="serve Swagger's /docs page (off by default: it loads its assets from a CDN)")  # fmt: skip
    add_limit_args(p.add_argument_group("limits (what one client may ask; past one: a 400, 408 or 413)"))
    p.set_defaults(func=run)


def add_limit_args(group) -> None:
    from nanoseek.serve.limits import Limits

    d = Limits()
    group.add_argument(
        "--max-body-mib",
        type=float,
        default=d.max_body_bytes / (1 << 20),
        help=f"largest request body in MiB (default {d.max_body_bytes >> 20}; more: 413)",
    )
    group.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help=f"seconds for a request's headers to arrive, else the connection is closed (default {d.header_timeout:g})",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help=f"seconds for a request's body to arrive (default {d.body_timeout:g}; more: 408)",
    )
    group.add_argument("--max-connections", type=int, default=d.max_connections,
                       help=f"open connections (default {d.max_connections}); a request on one more gets a 503 with "
                       "Retry-After and the connection is closed")  # fmt: skip
    group.add_argument("--max-stream-buffer", type=int, default=d.max_stream_buffer,
                       help=f"tokens a stream may have waiting for a slow reader before its generation pauses "
                       f"(default {d.max_stream_buffer})")  # fmt: skip
    group.add_argument("--stream-stall-timeout", type=float, default=d.stream_stall_timeout,
                       help=f"seconds a reply's write may wait for its client to read, else the request is aborted "
                       f"and the connection closed (default {d.stream_stall_timeout:g})")  # fmt: skip
    group.add_argument(
        "--max-sequences",
        type=int,
        default=d.max_sequences,
        help=f"sequences one request may start: n, or prompts x n on /v1/completions (default {d.max_sequences})",
    )
    group.add_argument(
        "--max-logit-bias",
        type=int,
        default=d.max_logit_bias,
        help=f"logit_bias entries (default {d.max_logit_bias}, as OpenAI)",
    )
    group.add_argument(
        "--max-stop",
        type=int,
        default=d.max_stop,
        help=f"stop strings, and stop_token_ids, per request (default {d.max_stop})",
    )
    group.add_argument(
        "--max-stop-chars",
        type=int,
        default=d.max_stop_chars,
        help=f"characters in one stop string (default {d.max_stop_chars})",
    )
    group.add_argument("--max-echo-logprobs-tokens", type=int, default=d.max_echo_logprobs_tokens,
                       help=f"prompt tokens one /v1/completions request may score with echo + logprobs (default "
                       f"{d.max_echo_logprobs_tokens})")  # fmt: skip
    group.add_argument("--max-embedding-inputs", type=int, default=d.max_embedding_inputs,
                       help=f"inputs in one /v1/embeddings request (default {d.max_embedding_inputs}, "
                       "as OpenAI)")  # fmt: skip
    group.add_argument("--max-embedding-tokens", type=int, default=d.max_embedding_tokens,
                       help=f"tokens of all the inputs of one /v1/embeddings request (default "
                       f"{d.max_embedding_tokens}; each input also at most the model's context)")  # fmt: skip


def limits_from_args(args: argparse.Namespace):
    """The serve.limits.Limits the flags ask for (a bad value: ValueError naming its flag)."""
    from nanoseek.serve.limits import Limits

    return Limits(
        max_body_bytes=int(args.max_body_mib * (1 << 20)), header_timeout=args.header_timeout,
        max_connections=args.max_connections, max_stream_buffer=args.max_stream_buffer,
        stream_stall_timeout=args.stream_stall_timeout,
        body_timeout=args.body_timeout, max_sequences=args.max_sequences, max_logit_bias=args.max_logit_bias,
        max_stop=args.max_stop, max_stop_chars=args.max_stop_chars,
        max_echo_logprobs_tokens=args.max_echo_logprobs_tokens, max_embedding_inputs=args.max_embedding_inputs,
        max_embedding_tokens=args.max_embedding_tokens,
    )  # fmt: skip


def lora_args(specs: list[str], base_name: str) -> dict[str, str]:
    """--lora NAME=PATH flags as {name: path}; ValueError for a malformed one, a repeated name or the base's name,
    FileNotFoundError for a folder that is not there (each before the model loads)."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--lora takes NAME=PATH (an adapter name and a PEFT adapter folder), got {spec!r}")
        if name == base_name or name in adapters:
            raise ValueError(f"--lora {spec}: the name {name!r} is taken (by the base model or another adapter)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--lora {spec}: {path}: no such adapter folder")
        adapters[name] = path
    return adapters


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
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    limits = limits_from_args(args)  # before the model loads: a bad flag fails at once
    import torch

    from nanoseek.engine.engine import EngineConfig
    from nanoseek.engine.threads import cap_threads, off_main_thread
    from nanoseek.serve.app import create_app
    from nanoseek.serve.connection import uvicorn_config
    from nanoseek.serve.serving import make_server

    adapters = lora_args(args.lora, served_name(args))  # before the model loads: a bad flag fails at once

    def load():
        model, tok = load_model_and_tokenizer(args)
        if adapters:
            from nanoseek.loading import load_lora

            load_lora(model, adapters)
        return model, tok

    # Only the engine's thread may keep a pool of OpenMP workers (threads.off_main_thread says why): the model
    # loads on a thread that ends, and the main thread (the event loop) runs torch on one thread from here on.
    cap = cap_threads(args.threads)
    model, tok = off_main_thread(load, cap)
    torch.set_num_threads(1)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, compile=args.compile, threads=cap, adaptive_threads=True,
                          kv_cache_dtype=args.kv_cache_dtype)  # fmt: skip
    server = make_server(model, tok, served_name(args), config, limits)
    print(server.engine.engine.thread_plan.describe(), file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    print(f"serving {server.name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    app = create_app(server, api_key=args.api_key, docs=args.docs)
    # uvicorn's own deadline is a backstop only: by then the engine has ended every stream
    config = uvicorn_config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout + 10,
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
