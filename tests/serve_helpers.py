"""Test helper: a tiny chat model served by the real app on a loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import nanoseek
from gguf_writer import CHATML, tiny_llama, write_gguf


def tiny_llama_gguf(path, chat_template: str | None = CHATML, context: int = 64):
    """A tiny random Llama as a GGUF with a byte-level tokenizer and a ChatML template."""
    return write_gguf(path, tiny_llama(context), "llama", chat_template=chat_template)


@dataclass
class Running:
    url: str
    server: object  # nanoseek.serve.serving.ModelServer
    app: object


@contextlib.contextmanager
def serve(
    gguf_path,
    name: str = "tiny",
    api_key: str | None = None,
    engine_config=None,
    model=None,
    wrap_model=None,
    limits=None,
    **app_kwargs,
) -> Iterator[Running]:
    """The app on 127.0.0.1:<free port> under a real uvicorn, stopped (lifespan shutdown included) on exit.
    `model`: serve this model with the file's tokenizer instead of the file's own weights.
    `wrap_model`: a function of the model that returns the model to serve (e.g. a scripted one).
    `limits`: the server's serve.limits.Limits (default: `nanoseek serve`'s defaults)."""
    import uvicorn

    from nanoseek.serve.app import create_app
    from nanoseek.serve.connection import uvicorn_config
    from nanoseek.serve.serving import make_server

    tok = nanoseek.load_tokenizer(gguf_path)
    model = nanoseek.load(gguf_path) if model is None else model
    if wrap_model is not None:
        model = wrap_model(model)
    server = make_server(model, tok, name, engine_config, limits)
    app = create_app(server, api_key=api_key, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{port}", server, app)
    finally:
        uv.should_exit = True
        thread.join(timeout=60)
        sock.close()
