// nanoseek's web chat: streams /v1/chat/completions (SSE) and renders the reply as sanitized markdown.
//
// A model's reply is untrusted HTML: it goes through marked (markdown -> HTML) and then DOMPurify, and only
// the purified HTML reaches the page. The page's Content-Security-Policy (set by the server) forbids inline
// scripts and remote images as a second line of defence.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "api_key"];
const STORE = "nanoseek-chat-settings";

const state = {
  history: [], // {role, content}: what the next request sends
  controller: null, // the AbortController of the reply being streamed
  model: null,
  chat: 0, // bumped by "New chat": a reply still finishing then leaves the new conversation alone
};

// ---- rendering ----------------------------------------------------------------------------------------------

marked.setOptions({ gfm: true, breaks: true });

function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text), { USE_PROFILES: { html: true } });
}

function addMessage(role) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  $("messages").append(node);
  return node;
}

function addUserMessage(text) {
  const node = addMessage("user");
  node.textContent = text; // the user's own text is shown as typed, never parsed as HTML
  scrollDown();
}

// One assistant reply: a collapsible reasoning section (made when the first reasoning delta comes) and the
// answer, both re-rendered at most once per animation frame while deltas arrive.
class Reply {
  constructor() {
    this.node = addMessage("assistant");
    this.node.setAttribute("aria-busy", "true");
    this.reasoning = "";
    this.content = "";
    this.reasoningBox = null;
    this.answer = document.createElement("div");
    this.answer.className = "answer";
    this.status = document.createElement("div");
    this.status.className = "status muted";
    this.node.append(this.answer, this.status);
    this.pending = false;
  }

  add(reasoning, content) {
    if (reasoning) {
      if (!this.reasoningBox) this.makeReasoningBox();
      this.reasoning += reasoning;
    }
    if (content) {
      if (this.reasoningBox && !this.content) this.reasoningBox.open = false; // the answer began: fold it
      this.content += content;
    }
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.render());
    }
  }

  makeReasoningBox() {
    this.reasoningBox = document.createElement("details");
    this.reasoningBox.className = "reasoning";
    this.reasoningBox.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    this.reasoningBody = document.createElement("div");
    this.reasoningBox.append(summary, this.reasoningBody);
    this.node.prepend(this.reasoningBox);
  }

  render() {
    this.pending = false;
    if (this.reasoningBox) this.reasoningBody.innerHTML = renderMarkdown(this.reasoning);
    this.answer.innerHTML = renderMarkdown(this.content);
    scrollDown();
  }

  finish(status, isError = false) {
    this.render();
    this.node.removeAttribute("aria-busy");
    this.node.dataset.done = status || "complete";
    this.status.textContent = status || "";
    this.status.classList.toggle("error", isError);
  }
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

// ---- the request and its SSE stream ----------------------------------------------------------------------

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const body = { messages, stream: true, temperature: number("temperature"), top_p: number("top_p"),
                 max_tokens: number("max_tokens") };
  if (state.model) body.model = state.model;
  return body;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// Yields the parsed JSON of each `data:` event until `data: [DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addUserMessage(text);
  const reply = new Reply();
  const chat = state.chat;
  const controller = new AbortController();
  setStreaming(controller);
  let status = "", isError = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) showSettings($("api_key"));
      throw new Error(await errorMessage(response));
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      reply.add(choice.delta?.reasoning_content, choice.delta?.content);
      if (choice.finish_reason === "length") status = "stopped at max tokens";
    }
  } catch (err) {
    if (err.name === "AbortError") status = "stopped";
    else [status, isError] = [`error: ${err.message}`, true];
  } finally {
    setStreaming(null);
    reply.finish(status, isError);
    if (chat !== state.chat) return;
    // the partial answer of a stopped reply stays in the conversation, as it is shown
    if (reply.content) state.history.push({ role: "assistant", content: reply.content });
    else state.history.pop(); // nothing came back: the question is sent again with the next message
  }
}

function setStreaming(controller) {
  state.controller = controller;
  $("send").hidden = !!controller;
  $("stop").hidden = !controller;
  document.body.classList.toggle("streaming", !!controller);
}

// ---- settings, model and wiring ---------------------------------------------------------------------------

function showSettings(focus) {
  $("settings").hidden = false;
  $("toggle-settings").setAttribute("aria-expanded", "true");
  if (focus) focus.focus();
}

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORE) || "{}");
  } catch {}
  for (const id of SETTINGS) if (typeof saved[id] === "string") $(id).value = saved[id];
}

function saveSettings() {
  const values = Object.fromEntries(SETTINGS.map((id) => [id, $(id).value]));
  try {
    localStorage.setItem(STORE, JSON.stringify(values));
  } catch {}
}

async function loadModel() {
  const response = await fetch("v1/models", { headers: headers() });
  if (response.status === 401) {
    $("model").textContent = "API key needed";
    showSettings($("api_key"));
    return;
  }
  if (!response.ok) return;
  const body = await response.json();
  state.model = body.data?.[0]?.id ?? null;
  $("model").textContent = state.model || "";
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.chat += 1;
  state.history = [];
  $("messages").replaceChildren();
  $("prompt").focus();
}

function init() {
  loadSettings();
  $("settings").addEventListener("input", saveSettings);
  $("api_key").addEventListener("change", () => loadModel().catch(() => {}));
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  $("toggle-settings").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("toggle-settings").setAttribute("aria-expanded", String(open));
  });
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  loadModel().catch(() => {});
  $("prompt").focus();
}

init();
