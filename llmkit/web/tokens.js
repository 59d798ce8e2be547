// Token view, shared by the chat page (/web/tokens.js) and the pages `llmkit explain` writes (inlined there).
// Each token is one <span class="tok">, coloured by its probability (or entropy); hovering shows the alternatives.
"use strict";

function tokenEscape(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

// Entropy (nats) of the top-k alternatives, the rest of the mass counted as one more outcome: a lower bound
// when only top-k logprobs are known (the chat API); explain computes the exact entropy itself.
function topkEntropy(top) {
  let h = 0, mass = 0;
  for (const [, lp] of top) { const p = Math.exp(lp); mass += p; if (p > 0) h -= p * lp; }
  const rest = 1 - mass;
  if (rest > 1e-9) h -= rest * Math.log(rest);
  return h;
}

// tokens: [{token, logprob, entropy?, top: [[token, logprob], ...], generated?}]; mode: "prob" | "entropy"
function renderTokens(container, tokens, mode) {
  container.innerHTML = "";
  let tip = document.getElementById("tok-tip");
  if (!tip) {
    tip = document.createElement("div");
    tip.id = "tok-tip";
    tip.hidden = true;
    document.body.appendChild(tip);
  }
  let hsum = 0, hn = 0;
  for (const t of tokens) {
    const span = document.createElement("span");
    span.className = "tok" + (t.generated ? " gen" : "");
    span.textContent = t.token;
    const h = t.entropy != null ? t.entropy : (t.top && t.top.length ? topkEntropy(t.top) : null);
    if (t.logprob != null) {
      const p = Math.exp(t.logprob);
      const v = mode === "entropy" && h != null ? Math.max(0, 1 - h / 4) : p;  // 0 = red (unsure) .. 1 = green
      span.style.background = `hsl(${Math.round(120 * v)}, 75%, 82%)`;
    }
    if (h != null && t.logprob != null) { hsum += h; hn += 1; }
    span.addEventListener("mouseenter", () => {
      const rows = (t.top || []).map(([tok, lp]) =>
        `<tr><td>${tokenEscape(JSON.stringify(tok))}</td><td>${Math.exp(lp).toFixed(3)}</td></tr>`).join("");
      tip.innerHTML = `<b>${tokenEscape(JSON.stringify(t.token))}</b>` +
        (t.logprob != null ? ` p=${Math.exp(t.logprob).toFixed(3)} logprob=${t.logprob.toFixed(3)}` : " (first token)") +
        (h != null ? ` entropy=${h.toFixed(3)}` : "") + (rows ? `<table>${rows}</table>` : "");
      const r = span.getBoundingClientRect();
      tip.style.left = `${r.left + window.scrollX}px`;
      tip.style.top = `${r.bottom + window.scrollY + 4}px`;
      tip.hidden = false;
    });
    span.addEventListener("mouseleave", () => { tip.hidden = true; });
    container.appendChild(span);
  }
  return hn ? hsum / hn : null;  // mean entropy
}
