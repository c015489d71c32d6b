"""The server under load and when clients leave: concurrent streams share the engine's steps and /metrics agrees
with what the clients received; a client that disconnects (streaming or not, running or still waiting) aborts
its generation and frees its cache blocks; SIGTERM stops `nanoseek serve` cleanly with a stream in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoseek.engine.engine import EngineConfig
from serve_helpers import serve, tiny_llama_gguf

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

USER = [{"role": "user", "content": "the theme"}]
ENDLESS = 4000  # tokens: minutes of decoding, so only an abort ends such a request within the test


@pytest.fixture(scope="module")
def long_gguf(tmp_path_factory):
    return tiny_llama_gguf(tmp_path_factory.mktemp("serve_load") / "long.gguf", context=4096)


def _metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. 'nanoseek_requests_total{endpoint=...,status=200}'."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll until `condition()`; the bound only turns a broken abort into a failure instead of a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _idle(engine) -> bool:
    return not engine.requests and not engine.has_work() and engine.pool.num_free == engine.pool.num_blocks - 1


def test_concurrent_streams_share_steps_and_metrics_agree(long_gguf):
    clients, max_tokens = 32, 12
    with serve(long_gguf) as r:
        engine = r.server.engine.engine
        rows_per_step = []
        step = engine.step

        def counting_step():  # runs on the engine thread: record how many requests each step served
            outputs = step()
            rows_per_step.append(len(outputs))
            return outputs

        engine.step = counting_step
        before = _metrics(r.url)

        async def one(client, i: int) -> tuple[str, int, str]:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=max_tokens,
                temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            text, finish, usage = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            return "".join(text), usage.completion_tokens, finish

        async def main():
            client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0, timeout=120)
            return await asyncio.gather(*(one(client, i) for i in range(clients)))

        results = asyncio.run(main())
        after = _metrics(r.url)
        assert all(finish == "length" and n == max_tokens for _, n, finish in results)
        assert max(rows_per_step) > 1  # requests were decoded together, not one after another

        def grew(name: str) -> float:
            return after.get(name, 0) - before.get(name, 0)

        received = sum(n for _, n, _ in results)
        assert grew("nanoseek_generation_tokens_total") == received == clients * max_tokens
        assert grew("nanoseek_time_to_first_token_seconds_count") == clients
        assert grew("nanoseek_inter_token_latency_seconds_count") == received - clients
        assert grew("nanoseek_requests_total{endpoint=/v1/chat/completions,status=200}") == clients
        assert after["nanoseek_requests_running"] == after["nanoseek_requests_waiting"] == 0
        assert after["nanoseek_kv_cache_usage_ratio"] == 0
        engine.step = step


def test_disconnects_abort_and_free_blocks(long_gguf):
    """A streaming client, a non-streaming one, and a streaming one still waiting for a slot all leave."""
    body = {"model": "tiny", "messages": USER, "max_tokens": ENDLESS, "ignore_eos": True}
    with serve(long_gguf, engine_config=EngineConfig(max_num_seqs=1)) as r:
        engine = r.server.engine.engine
        url = r.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if '"content"' in line and '"role"' not in line)
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as waiting:
                assert waiting.status_code == 200
                _wait_for(lambda: len(engine.scheduler.waiting) == 1, "the second request to queue")
            # the waiting client left before its first token: it is gone from the queue while the first still runs
            _wait_for(lambda: not engine.scheduler.waiting, "the waiting request to be aborted")
            assert engine.scheduler.running
        _wait_for(lambda: _idle(engine), "the streaming request's blocks to be freed")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=httpx.Timeout(60, read=1.0))
        _wait_for(lambda: _idle(engine), "the non-streaming request's blocks to be freed")
        m = _metrics(r.url)
        assert m["nanoseek_generation_tokens_total"] < 2 * ENDLESS  # nothing ran to its end
        assert m["nanoseek_time_to_first_token_seconds_count"] == 2  # the waiting one never got a token
        assert httpx.get(r.url + "/health").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_the_server_cleanly_with_a_stream_in_flight(long_gguf):
    port = _free_port()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(long_gguf), "--port", str(port), "--served-model-name",
           "tiny", "--shutdown-timeout", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _up(url) or proc.poll() is not None, "the server to start", timeout=120)
        assert proc.poll() is None, proc.stderr.read()
        received, ended = [], threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "messages": USER, "max_tokens": ENDLESS, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
                    for line in resp.iter_lines():
                        received.append(line)
            except httpx.HTTPError:
                pass  # the server closed the connection mid-stream: that is the cancellation
            ended.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        _wait_for(lambda: len(received) > 3, "tokens to stream")
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status says "SIGTERM"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert ended.wait(timeout=30)
        events = [line for line in received if line]
        assert '"finish_reason": "abort"' in events[-2] and events[-1] == "data: [DONE]"  # ended, not cut
        _, err = proc.communicate()
        assert "Application shutdown complete" in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
