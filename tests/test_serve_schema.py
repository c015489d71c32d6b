"""schemathesis against the server's own /openapi.json: generated requests (valid and not) to every operation
never get a 5xx, and the server keeps serving.

The server is the real app under uvicorn on a loopback port, on a tiny random model whose context (64 tokens)
bounds every generation, so each case stays fast. Hypothesis runs derandomized with no example database: the
same cases on every run, and no files left behind.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from procs import still_running
from serve_helpers import serve, tiny_llama_gguf

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (`pip install -e .[dev]`)")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("transformers")

EXAMPLES = 15  # per operation and generation mode


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with serve(tiny_llama_gguf(tmp_path_factory.mktemp("schema") / "tiny.gguf", context=64)) as r:
        yield r


def _operations(url: str) -> list:
    return [result.ok() for result in schemathesis.openapi.from_url(url + "/openapi.json").get_all_operations()]


# schemathesis' own pytest integration (`from_fixture`) reads a private pytest attribute that pytest 9 no longer
# has, so the cases come from its Hypothesis strategies, one operation and generation mode at a time.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(running, mode):
    from schemathesis.generation.modes import GenerationMode

    operations = _operations(running.url)
    assert len(operations) >= 10  # every API route is in the schema (the web chat's page is not)
    for operation in operations:
        if mode == "negative" and not len(operation.body):
            continue  # nothing can be invalid in a bare GET, nor in /v1/models/{model_id} (any string is an id)

        @hypothesis.given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @hypothesis.settings(
            max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, phases=[hypothesis.Phase.generate],
            suppress_health_check=list(hypothesis.HealthCheck),
        )  # fmt: skip
        def no_5xx(case):
            response = case.call(base_url=running.url, timeout=60)
            assert response.status_code < 500, f"{case.as_curl_command()}\n-> {response.status_code} {response.text}"

        no_5xx()
        assert httpx.get(running.url + "/health", timeout=10).status_code == 200  # and it keeps serving


def test_schema_documents_the_400_the_server_sends(running):
    """Found by schemathesis (`--checks all`): FastAPI's schema promised 422 for invalid requests."""
    paths = httpx.get(running.url + "/openapi.json").json()["paths"]
    responses = {f"{m.upper()} {p}": set(op["responses"]) for p, ops in paths.items() for m, op in ops.items()}
    assert responses["POST /v1/chat/completions"] == {"200", "400"}
    assert responses["GET /v1/models/{model_id}"] == {"200", "400", "404"}
    assert not any("422" in codes for codes in responses.values())
    assert httpx.post(running.url + "/v1/chat/completions", json={"messages": 1}).status_code == 400


def test_wrong_method_is_405_with_allow(running):
    """Found by schemathesis (`--checks all`): a 405 must say which methods the route has (RFC 9110)."""
    resp = httpx.request("TRACE", running.url + "/v1/models", timeout=10)
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.slow
def test_schemathesis_cli_every_phase_finds_no_5xx(running, tmp_path):
    """The CLI's whole run: examples, coverage (boundary and malformed values of every field), fuzzing and
    stateful sequences, checked for server errors only (about 2 minutes: slow)."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", running.url + "/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", "30", "--seed", "1", "--generation-deterministic",
           "--workers", "1", "--no-color"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(still_running(cmd, 900, exc.stdout, exc.stderr))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout
