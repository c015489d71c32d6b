"""The web chat at `/` in headless Chromium (Debian's `chromium`, driven by playwright; no browser download).

The served model is scripted: the real tiny model runs over the engine's paged cache, then its logits are
replaced so that reply token k is always the k-th token of SCRIPT (reasoning, markdown, and HTML that would run
script if it reached the page unsanitized). A gate in the model holds the second reply mid-stream, so the stop
button is pressed while tokens are still coming, on any machine speed. The test types messages, sees the reply
streamed and rendered as markdown, checks that the injected HTML ran nothing, presses stop, and takes a
screenshot.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import nanoseek
from gguf_writer import IM_END
from serve_helpers import serve, tiny_llama_gguf

pytest.importorskip("transformers")
CHROMIUM = Path("/usr/bin/chromium")
VENDOR = Path(nanoseek.__file__).parent / "serve" / "static" / "vendor"


def _browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (`pip install -e .[dev]`)"
    if not CHROMIUM.exists():
        return f"Debian's chromium is not installed ({CHROMIUM}): `make setup` installs it where it can (root with apt)"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))

# A template that ignores the conversation: every prompt has the same length, so the scripted model knows
# which reply token it is choosing from a position alone. The request bodies are checked in the browser.
FIXED_PROMPT = "{{ '<|im_start|>assistant\n' }}"
REASONING = "The user says hello: greet them."
INJECTED = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
BEFORE_HOLD = f"<think>{REASONING}</think>Hello! Here is **bold** text and a list:\n\n- one\n- two\n\n{INJECTED}\n\n"
AFTER_HOLD = "```python\nprint(42)\n```\n\nThe end."
SCRIPT = BEFORE_HOLD + AFTER_HOLD
API_KEY = "web-secret"


class ScriptedModel(nn.Module):
    """Wraps a real model: its forward runs (filling the paged cache as the engine expects), then the logits at
    position p choose SCRIPT token p + 1 - prompt_len (then EOS). When `hold_at` is set, the forward that would
    choose that token waits for `release` (bounded) and sets `held` first: a reply paused mid-stream."""

    def __init__(self, inner: nn.Module, script_ids: list[int], prompt_len: int, eos: int):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.script = torch.tensor([*script_ids, eos])
        self.prompt_len = prompt_len
        self.hold_at: int | None = None
        self.held, self.release = threading.Event(), threading.Event()

    def forward(self, ids, cache=None, logits_index=None, **kwargs):
        logits = self.inner(ids, cache=cache, logits_index=logits_index, **kwargs)
        positions = torch.gather(cache.positions, 1, logits_index.to(cache.positions.device))  # [B, n]
        step = (positions + 1 - self.prompt_len).clamp(0, len(self.script) - 1).cpu()
        if self.hold_at is not None and bool((step == self.hold_at).any()):
            self.held.set()
            self.release.wait(timeout=60)  # bounded: a broken test fails instead of hanging the engine thread
        forced = torch.full_like(logits, -1e4)  # finite: every sampler setting sees one token with all the mass
        forced.scatter_(-1, self.script[step].to(logits.device)[..., None], 0.0)
        return forced


def _metric(url: str, name: str, **labels: str) -> float:
    """The /metrics sample `name` with exactly these labels (0 while it has not been counted)."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def _chats_ok(url: str) -> float:
    return _metric(url, "nanoseek_requests_total", endpoint="/v1/chat/completions", status="200")


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Poll until `condition()`; the bound only turns a broken server into a failure instead of a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    gguf = tiny_llama_gguf(tmp_path_factory.mktemp("webchat") / "scripted.gguf", FIXED_PROMPT, context=512)
    tok = nanoseek.load_tokenizer(gguf)
    script_ids = tok.encode(SCRIPT, add_special_tokens=False)
    assert tok.decode(script_ids) == SCRIPT
    prompt_len = len(tok.encode_chat([{"role": "user", "content": "anything"}]))
    hold_at = len(tok.encode(BEFORE_HOLD, add_special_tokens=False))
    models = []

    def wrap(model):
        models.append(ScriptedModel(model, script_ids, prompt_len, eos=IM_END))
        return models[0]

    with serve(gguf, api_key=API_KEY, wrap_model=wrap) as running:
        try:
            yield running, models[0], hold_at, len(script_ids)
        finally:
            models[0].release.set()  # never leave the engine thread waiting at shutdown


def _last_request(requests: list) -> dict:
    chats = [r for r in requests if r.url.endswith("/v1/chat/completions")]
    return json.loads(chats[-1].post_data)


def test_chat_page_and_vendored_files_are_served_without_the_key(scripted):
    running = scripted[0]
    page = httpx.get(running.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline script can run
    assert httpx.get(running.url + "/v1/models").status_code == 401  # while the API itself needs the key
    for asset in ["chat.js", "chat.css", "vendor/marked.umd.js", "vendor/purify.min.js"]:
        assert httpx.get(f"{running.url}/static/{asset}").status_code == 200, asset
    # the vendored files are the released ones the README names
    readme = (VENDOR / "README.md").read_text()
    for name in ["marked.umd.js", "purify.min.js"]:
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() in readme, name


@needs_browser
@pytest.mark.timeout(180)
def test_web_chat_streams_sanitized_markdown_and_stops(scripted, tmp_path):
    from playwright import sync_api

    expect = sync_api.Expect()  # our own instance: its timeout is set here, not on playwright's shared `expect`
    expect.set_options(timeout=30_000)  # a bound against a hang; the waits end as soon as the page is there
    running, model, hold_at, script_len = scripted
    url = running.url
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            # CSP bypassed: the sanitizer alone must keep the injected HTML from running (the page's CSP, a
            # second line of defence, is checked in the test above)
            page = browser.new_context(bypass_csp=True, viewport={"width": 1000, "height": 900}).new_page()
            page.set_default_timeout(30_000)
            errors, requests = [], []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda request: requests.append(request))
            page.goto(url + "/")

            # the server needs a key: the page says so and opens the settings at the key field
            expect(page.locator("#model")).to_have_text("API key needed")
            expect(page.locator("#api_key")).to_be_focused()
            page.fill("#api_key", API_KEY)
            page.locator("#api_key").dispatch_event("change")
            expect(page.locator("#model")).to_have_text("tiny")
            page.fill("#system", "be brief")
            page.fill("#temperature", "0.5")
            page.fill("#top_p", "0.9")
            page.fill("#max_tokens", "300")

            # turn 1: a whole reply, rendered as markdown, with the reasoning folded once the answer starts
            page.fill("#prompt", "hello")
            page.press("#prompt", "Enter")
            first = page.locator(".message.assistant").nth(0)
            expect(first).to_have_attribute("data-done", "complete")
            assert _last_request(requests) == {
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
                "stream": True, "temperature": 0.5, "top_p": 0.9, "max_tokens": 300, "model": "tiny",
            }  # fmt: skip
            expect(first.locator(".answer strong")).to_have_text("bold")
            expect(first.locator(".answer li")).to_have_text(["one", "two"])
            expect(first.locator(".answer pre code")).to_have_text("print(42)\n")
            reasoning = first.locator("details.reasoning")
            expect(reasoning).to_contain_text(REASONING)
            assert reasoning.evaluate("d => d.open") is False
            reasoning.locator("summary").click()
            assert reasoning.evaluate("d => d.open") is True
            # the injected HTML reached the renderer (its <img> is there) but nothing of it can run
            expect(first.locator(".answer img")).to_have_count(1)
            page.wait_for_function("document.querySelector('.answer img').complete")  # its error event is past
            assert page.evaluate("window.__pwned") is None
            assert first.locator(".answer img").get_attribute("onerror") is None
            assert first.locator(".answer script").count() == 0 and page.locator("main script").count() == 0

            # turn 2: the model is held mid-reply; what came so far is on the page; stop ends the stream
            tokens_before = _metric(url, "nanoseek_generation_tokens_total")
            model.hold_at = hold_at
            page.fill("#prompt", "and more?")
            page.press("#prompt", "Enter")
            second = page.locator(".message.assistant").nth(1)
            expect(second.locator(".answer strong")).to_have_text("bold")  # streamed: the reply is not over
            assert model.held.wait(timeout=30)
            expect(page.locator("#stop")).to_be_visible()
            expect(page.locator("#send")).to_be_hidden()
            assert second.get_attribute("aria-busy") == "true"
            page.screenshot(path=str(tmp_path / "webchat-streaming.png"))
            history = _last_request(requests)["messages"]
            assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
            assert history[2]["content"] == SCRIPT.split("</think>")[1]  # the answer, without the reasoning
            page.click("#stop")
            expect(second).to_have_attribute("data-done", "stopped")
            expect(page.locator("#send")).to_be_visible()
            # the server saw the client leave (its request is counted once the stream ended) before the model
            # may go on: the abort is queued first, so the reply never reaches its end
            _wait_for(lambda: _chats_ok(url) == 2, "the stopped request to end on the server")
            model.hold_at = None
            model.release.set()
            engine = running.server.engine.engine
            _wait_for(lambda: not engine.requests and not engine.has_work(), "the engine to go idle")
            generated = _metric(url, "nanoseek_generation_tokens_total") - tokens_before
            assert hold_at <= generated <= hold_at + 1 < script_len
            assert page.evaluate("window.__pwned") is None

            # a new chat starts from the system prompt alone
            page.click("#new-chat")
            expect(page.locator(".message")).to_have_count(0)
            page.fill("#prompt", "again")
            page.press("#prompt", "Enter")
            expect(page.locator(".message.assistant")).to_have_attribute("data-done", "complete")
            assert _last_request(requests)["messages"] == [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}
            ]  # fmt: skip
            page.screenshot(path=str(tmp_path / "webchat.png"))
            assert page.evaluate("window.__pwned") is None
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / "webchat.png").stat().st_size > 0
