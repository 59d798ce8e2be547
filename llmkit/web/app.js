// llmkit chat page: streams /v1/chat/completions (SSE) and renders the reply as markdown. No build step, no network
// beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, needsKey: false };

// ---------------------------------------------------------------------------------------------------------------
// Markdown: a small renderer for what chat models write. Everything is HTML-escaped first, so model output can
// never inject markup; only the tags produced below reach the page.

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function inline(s) {
  // s is already escaped; code spans are cut out first so their contents stay literal
  return s.split(/(`[^`\n]+`)/g).map((part) => {
    if (part.length > 1 && part.startsWith("`") && part.endsWith("`")) return `<code>${part.slice(1, -1)}</code>`;
    return part
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
      .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  }).join("");
}

function renderMarkdown(text) {
  const out = [];
  const lines = text.split("\n");
  let para = [], list = null, i = 0;
  const flushPara = () => { if (para.length) out.push(`<p>${inline(escapeHtml(para.join("\n"))).replace(/\n/g, "<br>")}</p>`); para = []; };
  const flushList = () => { if (list) out.push(`<${list.tag}>${list.items.map((x) => `<li>${inline(escapeHtml(x))}</li>`).join("")}</${list.tag}>`); list = null; };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {  // a code block runs to the closing fence, or to the end while it is still streaming
      flushPara(); flushList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      const lang = fence[1] ? ` class="language-${escapeHtml(fence[1])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
      i++;
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)/);
    if (heading) {
      flushPara(); flushList();
      const n = heading[1].length;
      out.push(`<h${n}>${inline(escapeHtml(heading[2]))}</h${n}>`);
    } else if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push((bullet || numbered)[1]);
    } else if (!line.trim()) {
      flushPara(); flushList();
    } else {
      flushList();
      para.push(line);
    }
    i++;
  }
  flushPara(); flushList();
  return out.join("");
}

// ---------------------------------------------------------------------------------------------------------------
// Page

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

// An assistant bubble shows markdown, or with the token view on, one span per token coloured by its probability
// (the logprobs every request asks for; null when the server withholds them, e.g. under an output guard).
function renderReply(div) {
  if ($("token-view").checked && div.tokens && div.tokens.length) {
    const h = renderTokens(div, div.tokens, "prob");
    const note = document.createElement("span");
    note.className = "mean-entropy";
    note.textContent = `mean entropy of the top-5 (lower bound): ${h == null ? "n/a" : h.toFixed(3)} nats`;
    div.appendChild(note);
  } else {
    div.innerHTML = renderMarkdown(div.text || "");
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (role === "assistant") { div.text = text; div.tokens = []; renderReply(div); }
  else div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function loadModels() {
  try {
    const health = await fetch("/health");
    if (health.status === 503) { $("status").textContent = "model loading…"; setTimeout(loadModels, 1000); return; }
    const info = await health.json();
    state.needsKey = info.api_key_required;
    $("key-row").hidden = !state.needsKey;
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) { $("status").textContent = "enter the API key"; return; }
    const data = await r.json();
    const select = $("model");
    select.innerHTML = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      select.appendChild(opt);
    }
    $("model-row").hidden = data.data.length < 2;
    $("status").textContent = `ready: ${data.data.map((m) => m.id).join(", ")}`;
  } catch (e) {
    $("status").textContent = `cannot reach the server: ${e}`;
  }
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const body = {
    model: $("model").value || undefined, messages, stream: true,
    temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max-tokens").value, 10) || 512,
    logprobs: true, top_logprobs: 5,
  };
  state.controller = new AbortController();
  setBusy(true);
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      throw new Error(`${r.status}: ${err.error.message}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const ev of events) {
        const data = ev.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices.length ? chunk.choices[0] : null;
        const piece = choice ? choice.delta.content : "";
        if (choice && choice.logprobs && choice.logprobs.content) {
          for (const e of choice.logprobs.content) {
            bubble.tokens.push({ token: e.token, logprob: e.logprob, top: e.top_logprobs.map((x) => [x.token, x.logprob]) });
          }
        }
        if (piece) {
          reply += piece;
          bubble.text = reply;
          renderReply(bubble);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") addMessage("error", String(e.message || e));
  } finally {
    state.history.push({ role: "assistant", content: reply });
    state.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").innerHTML = "";
  $("input").focus();
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("api-key").addEventListener("change", loadModels);
$("token-view").addEventListener("change", () => document.querySelectorAll(".msg.assistant").forEach(renderReply));
loadModels();
