"""Test helper: a tiny chat model served by the real app on a loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

import nanoseek
from gguf_writer import CHATML, VOCAB_SIZE, write_gguf


def tiny_llama_gguf(path, chat_template: str | None = CHATML, context: int = 64):
    """A tiny random Llama as a GGUF with a byte-level tokenizer and a ChatML template."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                                   tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return write_gguf(path, model, "llama", chat_template=chat_template)


@dataclass
class Running:
    url: str
    server: object  # nanoseek.serve.serving.ModelServer
    app: object


@contextlib.contextmanager
def serve(
    gguf_path, name: str = "tiny", api_key: str | None = None, engine_config=None, **app_kwargs
) -> Iterator[Running]:
    """The app on 127.0.0.1:<free port> under a real uvicorn, stopped (lifespan shutdown included) on exit."""
    import uvicorn

    from nanoseek.serve.app import create_app
    from nanoseek.serve.serving import make_server

    tok, model = nanoseek.load_tokenizer(gguf_path), nanoseek.load(gguf_path)
    server = make_server(model, tok, name, engine_config)
    app = create_app(server, api_key=api_key, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
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
