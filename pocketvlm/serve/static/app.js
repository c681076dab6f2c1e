// pocketvlm web chat: plain JavaScript, no build step. Talks to the same OpenAI-compatible API as any client.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), modelSel = $("model"), errorBox = $("error"), pendingBox = $("pending");
let messages = [];       // the conversation, OpenAI format (images as data URLs)
let pending = [];        // data URLs of images attached to the next message
let controller = null;   // AbortController of the answer being streamed

function apiKey() { return $("api-key").value || localStorage.getItem("pocketvlm-key") || ""; }
function headers() {
  const h = { "Content-Type": "application/json" };
  const k = apiKey();
  if (k) h["Authorization"] = "Bearer " + k;
  return h;
}

function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = !text;
}

async function errorText(resp) {
  let msg = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) msg = body.error.message;
  } catch (_) { /* not JSON */ }
  if (resp.status === 401) {
    $("key-box").hidden = false;
    msg += " (enter the server's API key at the top)";
  }
  return `Error ${resp.status}: ${msg}`;
}

function sampling() {
  const out = {};
  const t = parseFloat($("temperature").value), n = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(t)) out.temperature = t;
  if (!Number.isNaN(n)) out.max_tokens = n;
  return out;
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { showError(await errorText(resp)); return; }
    const data = await resp.json();
    const keep = modelSel.value;
    modelSel.innerHTML = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id + (m.assistant ? " (assistant: " + m.assistant.vision + " looks, " + m.assistant.chat +
                                " answers)" : m.vision ? " (vision)" : "");
      modelSel.appendChild(opt);
    }
    if (keep) modelSel.value = keep;
    showError("");
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
  }
}

function addBubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const src of images || []) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "attached image";
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return span;
}

function renderPending() {
  pendingBox.innerHTML = "";
  pending.forEach((src, i) => {
    const t = document.createElement("div");
    t.className = "thumb";
    const img = document.createElement("img");
    img.src = src;
    img.alt = "image to send";
    const x = document.createElement("button");
    x.type = "button";
    x.textContent = "\u00d7";
    x.title = "remove";
    x.onclick = () => { pending.splice(i, 1); renderPending(); };
    t.append(img, x);
    pendingBox.appendChild(t);
  });
}

function attachFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) { showError(`${f.name || "That file"} is not an image.`); continue; }
    const reader = new FileReader();
    reader.onload = () => { pending.push(reader.result); renderPending(); };
    reader.readAsDataURL(f);
  }
}

// An assistant model (a VLM looks, a chat model answers) sends what its VLM said about each image: shown
// folded above the answer, so the user can see why the answer says what it says.
function showDescriptions(span, info) {
  const box = document.createElement("details");
  box.className = "description";
  const head = document.createElement("summary");
  head.textContent = "What the vision model saw";
  box.appendChild(head);
  for (const d of info.descriptions) {
    const p = document.createElement("div");
    p.textContent = "Image " + d.image + (d.cached ? " (remembered)" : "") + ": " + d.description;
    box.appendChild(p);
  }
  for (const w of info.warnings || []) {
    const p = document.createElement("div");
    p.textContent = "Warning: " + w;
    box.appendChild(p);
  }
  span.parentElement.insertBefore(box, span);
}

// Server-Sent Events over fetch: "data: {...}" lines separated by blank lines, ending with "data: [DONE]".
async function streamAnswer(resp, span) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return text;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        if (obj.pocketvlm && obj.pocketvlm.descriptions && obj.pocketvlm.descriptions.length) {
          showDescriptions(span, obj.pocketvlm);
        }
        const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
        if (delta && delta.content) {
          text += delta.content;
          span.textContent = text;
          log.scrollTop = log.scrollHeight;
        }
      }
    }
  }
  return text;
}

async function send(ev) {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text && !pending.length) return;
  if (controller) return;  // one answer at a time
  showError("");
  const content = pending.length
    ? [...pending.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  const userBubble = addBubble("user", text, pending).parentElement;
  const turn = { role: "user", content };
  const images = pending;
  pending = [];
  renderPending();
  input.value = "";
  const span = addBubble("assistant", "");
  const bubble = span.parentElement;
  bubble.classList.add("streaming");
  controller = new AbortController();
  $("send").disabled = true;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(Object.assign(
        { model: modelSel.value, messages: [...messages, turn], stream: true }, sampling())),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const answer = await streamAnswer(resp, span);
    messages.push(turn, { role: "assistant", content: answer });
  } catch (e) {
    if (e.name !== "AbortError") {
      showError(e.message.startsWith("Error") ? e.message : "Error: " + e.message);
      bubble.remove();
      userBubble.remove();
      // give the user their question and images back to fix and resend
      input.value = text;
      pending = images;
      renderPending();
    }
  } finally {
    bubble.classList.remove("streaming");
    controller = null;
    $("send").disabled = false;
  }
}

function newChat() {
  if (controller) controller.abort();  // also stops the generation on the server
  messages = [];
  pending = [];
  renderPending();
  log.innerHTML = "";
  showError("");
  input.focus();
}

$("composer").addEventListener("submit", send);
$("new-chat").addEventListener("click", newChat);
$("file").addEventListener("change", (e) => { attachFiles(e.target.files); e.target.value = ""; });
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData ? e.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) { e.preventDefault(); attachFiles(files); }
});
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) document.body.classList.remove("dragging"); });
document.addEventListener("drop", (e) => {
  e.preventDefault();
  document.body.classList.remove("dragging");
  attachFiles(e.dataTransfer ? e.dataTransfer.files : []);
});
$("api-key").addEventListener("change", (e) => { localStorage.setItem("pocketvlm-key", e.target.value); loadModels(); });
loadModels();
