// blockrag web UI: asks /v1/chat/completions with stream=true and renders the server-sent events.
// Every text that comes from the server (answers, titles, passages, errors) goes through textContent or
// text nodes, never through HTML parsing.
"use strict";

const $ = (id) => document.getElementById(id);
let model = "blockrag";
let controller = null;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function apiKeyHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status + " " + response.statusText;
}

function fmt(value, digits = 0) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "–";
}

// One passage: its number, title, document and chunk ids, score, and its text with the cited span marked.
function renderCitations(citations) {
  const list = $("citations");
  list.replaceChildren();
  for (const c of citations) {
    const li = document.createElement("li");
    li.id = "cite-" + c.index;
    const head = document.createElement("div");
    head.className = "cite-head";
    head.textContent = c.title || c.doc_id;
    const meta = document.createElement("div");
    meta.className = "cite-meta";
    meta.textContent = c.doc_id + " · chunk " + c.chunk_id + " · score " + fmt(c.score, 3);
    const text = document.createElement("p");
    text.className = "cite-text";
    const t = c.text || "";
    if (Array.isArray(c.span) && c.span.length === 2) {
      const [a, b] = c.span;
      const mark = document.createElement("mark");
      mark.textContent = t.slice(a, b);
      text.append(document.createTextNode(t.slice(0, a)), mark, document.createTextNode(t.slice(b)));
    } else {
      text.textContent = t;
    }
    li.append(head, meta, text);
    list.append(li);
  }
}

function renderTimings(t, clientTtft) {
  if (!t) return;
  const parts = ["retrieve " + fmt(t.retrieve_ms, 1) + " ms"];
  if (t.queue_ms !== undefined) parts.push("queue " + fmt(t.queue_ms) + " ms");
  if (clientTtft !== null) parts.push("TTFT " + fmt(clientTtft) + " ms (browser)");
  if (t.ttft_ms !== undefined) parts.push("TTFT " + fmt(t.ttft_ms) + " ms (model)");
  if (t.tokens_per_s !== undefined) parts.push(fmt(t.tokens_per_s, 1) + " tok/s");
  if (t.cached_tokens !== undefined) {
    parts.push(t.cached_tokens + " cached / " + t.prefilled_tokens + " prefilled tokens");
  }
  if (t.mode) parts.push("mode " + t.mode);
  $("timings").textContent = parts.join(" · ");
}

function setBusy(busy) {
  $("ask").disabled = busy;
  $("stop").disabled = !busy;
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  clearError();
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "streaming";
  $("citations").replaceChildren();
  $("timings").textContent = "";
  $("status").textContent = "retrieving…";
  setBusy(true);
  controller = new AbortController();
  const started = performance.now();
  let clientTtft = null;
  let finished = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        model, stream: true, messages: [{ role: "user", content: question }],
        mode: $("mode").value, k: Number($("k").value) || undefined,
        max_tokens: Number($("max-tokens").value) || undefined,
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const raw = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = raw.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") { finished = true; break; }
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "server error");
        if (event.citations) renderCitations(event.citations);
        const choice = event.choices && event.choices[0];
        const piece = choice && choice.delta && choice.delta.content;
        if (piece) {
          if (clientTtft === null) {
            clientTtft = performance.now() - started;
            $("status").textContent = "generating…";
          }
          answer.append(document.createTextNode(piece));
        } else if (event.citations && !choice.finish_reason) {
          $("status").textContent = "waiting for the model…";
        }
        if (event.timings) renderTimings(event.timings, clientTtft);
        if (choice && choice.finish_reason) {
          $("status").textContent = "done" + (choice.finish_reason === "length" ? " (token limit)" : "");
        }
      }
    }
    if (!finished) throw new Error("the connection closed before the answer was complete");
    answer.dataset.state = "done";
  } catch (err) {
    answer.dataset.state = "error";
    if (err.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      $("status").textContent = "failed";
      showError(String(err.message || err));
    }
  } finally {
    setBusy(false);
    controller = null;
  }
}

async function loadDocuments() {
  try {
    const response = await fetch("/v1/documents");
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    const list = $("documents");
    list.replaceChildren();
    for (const doc of body.data) {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = (doc.title ? doc.title + " — " : "") + doc.id;
      const del = document.createElement("button");
      del.type = "button";
      del.textContent = "Delete";
      del.addEventListener("click", () => deleteDocument(doc.id));
      li.append(name, del);
      list.append(li);
    }
    $("docs-count").textContent = body.data.length + " documents";
  } catch (err) {
    showError("could not list documents: " + err.message);
  }
}

async function deleteDocument(id) {
  clearError();
  const response = await fetch("/v1/documents/" + encodeURIComponent(id), {
    method: "DELETE", headers: apiKeyHeaders(),
  });
  if (!response.ok) return showError("delete failed: " + await errorMessage(response));
  const body = await response.json();
  $("docs-status").textContent = "deleted " + id + " (" + body.chunks_removed + " chunks)";
  loadDocuments();
}

async function upload() {
  clearError();
  const files = Array.from($("upload").files);
  if (!files.length) return showError("choose one or more .txt or .md files first");
  $("docs-status").textContent = "indexing " + files.length + " file(s)…";
  const documents = [];
  for (const f of files) documents.push({ id: f.name, text: await f.text() });
  const response = await fetch("/v1/documents", {
    method: "POST", headers: { "Content-Type": "application/json", ...apiKeyHeaders() },
    body: JSON.stringify({ documents }),
  });
  if (!response.ok) {
    $("docs-status").textContent = "";
    return showError("upload failed: " + await errorMessage(response));
  }
  const r = await response.json();
  $("docs-status").textContent = r.documents_added + " added (" + r.chunks_added + " chunks), "
    + r.documents_unchanged + " unchanged";
  loadDocuments();
}

async function init() {
  $("ask-form").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("upload-btn").addEventListener("click", upload);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
  });
  try {
    const response = await fetch("/health");
    if (!response.ok) throw new Error(await errorMessage(response));
    const h = await response.json();
    model = h.model;
    $("server-info").textContent = h.model + " · " + h.documents + " documents · " + h.chunks + " chunks"
      + (h.generate ? "" : " · retrieval only");
    $("mode").value = h.default_mode;
    $("k").value = h.k;
    $("token-row").hidden = !h.writes_need_token;
  } catch (err) {
    $("server-info").textContent = "server unreachable";
    showError("could not reach the server: " + err.message);
  }
  loadDocuments();
}

init();
