// Threadline's chat page. It talks only to Threadline's public HTTP API (Dify-style routes plus
// the `engine` and `include_reasoning` extensions), so everything it does a script can do too.
// Answers are Markdown rendered by marked, sanitized by DOMPurify, highlighted by highlight.js;
// everything else the page shows is set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const store = window.localStorage;
const S = {
  key: store.getItem("threadline.key") || "",
  user: store.getItem("threadline.user") || "",
  open: false,
  conv: null,            // {id, name, engine} of the open conversation, null for a new chat
  convLast: null,        // last_id for the next conversation page
  oldestId: null,        // first_id for the next (older) message page
  lastEngine: null,      // engine of the newest rendered answer, for the switch marker
  pending: [],           // attachments for the next message: {kind: "url"|"upload", url, id, name, preview}
  running: null,         // {taskId, controller, stopped}
  engines: [],
  appEngine: "",
};

// ---- HTTP ---------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (S.key) h.Authorization = `Bearer ${S.key}`;
  return h;
}

async function api(method, path, body, { raw = false } = {}) {
  const opts = { method, headers: headers() };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, opts);
  if (raw) return res;
  if (!res.ok) throw await toError(res);
  if (res.status === 204) return null;
  return res.json();
}

async function toError(res) {
  let code = `http_${res.status}`, message = res.statusText || "Request failed";
  try {
    const j = await res.json();
    code = j.code || j.error?.code || code;
    message = j.message || j.error?.message || message;
  } catch { /* not JSON */ }
  if (res.status === 401 && !S.open) showSignin("Your app key was not accepted. Sign in again.");
  return new ApiError(res.status, code, message);
}

const q = (params) => new URLSearchParams({ user: S.user, ...params }).toString();

// ---- sign-in ------------------------------------------------------------------------------------

async function boot() {
  if (window.marked) marked.use({ gfm: true, breaks: true });
  if (window.DOMPurify) {
    DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
    });
  }
  wire();
  const probe = await fetch("/v1/info", { headers: headers() }).catch(() => null);
  if (probe && probe.ok) {
    S.open = !S.key;
    if (!S.user) S.user = S.open ? "local" : "";
    if (S.user) return enter(await probe.json());
  }
  showSignin(S.key ? "Your app key was not accepted." : "");
}

function showSignin(message) {
  $("shell").hidden = true;
  $("signin").hidden = false;
  $("signin-key").value = S.key;
  $("signin-user").value = S.user || "web";
  $("signin-error").textContent = message || "";
  $("signin-error").hidden = !message;
}

async function signin(ev) {
  ev.preventDefault();
  const key = $("signin-key").value.trim(), user = $("signin-user").value.trim();
  const res = await fetch("/v1/info", { headers: { Authorization: `Bearer ${key}` } }).catch(() => null);
  if (!res || !res.ok) return showSignin("That app key was not accepted.");
  S.key = key; S.user = user; S.open = false;
  store.setItem("threadline.key", key); store.setItem("threadline.user", user);
  enter(await res.json());
}

function signout() {
  store.removeItem("threadline.key"); store.removeItem("threadline.user");
  S.key = ""; S.user = "";
  location.reload();
}

async function enter(info) {
  $("signin").hidden = true;
  $("shell").hidden = false;
  $("whoami").textContent = `${S.user} · ${info.name}${S.open ? " (local)" : ""}`;
  $("signout").hidden = S.open;
  S.appEngine = info.engine || "";
  await loadEngines();
  newChat();
  await loadConversations(true);
}

async function loadEngines() {
  const sel = $("engine");
  sel.replaceChildren();
  try {
    const j = await api("GET", "/v1/models");
    S.engines = j.data.filter((m) => String(m.owned_by).startsWith("threadline-engine")).map((m) => m.id);
  } catch { S.engines = []; }
  const def = new Option(S.appEngine ? `app default (${S.appEngine})` : "app default", "");
  sel.append(def, ...S.engines.map((e) => new Option(e, e)));
}

// ---- conversations ------------------------------------------------------------------------------

async function loadConversations(reset) {
  if (reset) { $("conv-list").replaceChildren(); S.convLast = null; }
  const params = { limit: "20" };
  if (S.convLast) params.last_id = S.convLast;
  let page;
  try { page = await api("GET", `/v1/conversations?${q(params)}`); } catch (e) { return flash(e); }
  for (const c of page.data) $("conv-list").append(convItem(c));
  S.convLast = page.data.length ? page.data[page.data.length - 1].id : S.convLast;
  $("conv-more").hidden = !page.has_more;
  markActive();
}

function convItem(c) {
  const li = document.createElement("li");
  li.dataset.id = c.id;
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = c.name || "New conversation";
  b.title = b.textContent;
  b.addEventListener("click", () => { openConversation(c); closeSidebar(); });
  li.append(b);
  li._conv = c;
  return li;
}

function markActive() {
  for (const li of $("conv-list").children) li.classList.toggle("active", S.conv?.id === li.dataset.id);
}

function newChat() {
  S.conv = null; S.oldestId = null; S.lastEngine = null;
  $("turns").replaceChildren();
  $("older").hidden = true;
  $("empty").hidden = false;
  $("conv-title").textContent = "New chat";
  $("rename").hidden = $("delete").hidden = true;
  $("engine").value = "";
  markActive();
  $("input").focus();
}

async function openConversation(c) {
  if (S.running) return;
  S.conv = { ...c }; S.oldestId = null; S.lastEngine = null;
  $("turns").replaceChildren();
  $("empty").hidden = true;
  $("conv-title").textContent = c.name || "New conversation";
  $("rename").hidden = $("delete").hidden = false;
  $("engine").value = S.engines.includes(c.engine) && c.engine !== S.appEngine ? c.engine : "";
  markActive();
  await loadOlder(true);
}

async function loadOlder(first) {
  if (!S.conv) return;
  const params = { conversation_id: S.conv.id, limit: "20" };
  if (S.oldestId) params.first_id = S.oldestId;
  let page;
  try { page = await api("GET", `/v1/messages?${q(params)}`); } catch (e) { return flash(e); }
  const thread = $("thread");
  const before = thread.scrollHeight - thread.scrollTop;
  const frag = document.createDocumentFragment();
  let prevEngine = null;
  for (const m of page.data) {
    if (prevEngine && m.engine && m.engine !== prevEngine) frag.append(switchMarker(prevEngine, m.engine));
    const files = (m.message_files || []).map((f) => f.url);
    // A question that only carried function outputs (an OpenAI client's tool round) shows them alone.
    if (m.query || files.length || !(m.tool_results || []).length) frag.append(userBubble(m.query, files));
    for (const t of m.tool_results || []) frag.append(toolBlock("tool-result", `${t.name || t.call_id} → ${t.output}`));
    const a = answerBubble();
    a.setAnswer(m.answer || "");
    a.setTools(m.tool_calls || []);
    if (m.reasoning) a.setReasoning(m.reasoning);
    a.setMeta({ engine: m.engine, status: m.threadline_status, prompt: m.message_tokens, completion: m.answer_tokens,
                price: m.total_price, currency: m.currency, latency: m.provider_response_latency });
    if (m.status === "error" && m.error) a.setError("upstream_error", m.error);
    frag.append(a.el);
    prevEngine = m.engine || prevEngine;
  }
  // A marker between this page's newest answer and the older first answer already on screen.
  const firstShown = $("turns").querySelector(".msg.assistant");
  if (prevEngine && firstShown?.dataset.engine && firstShown.dataset.engine !== prevEngine) {
    frag.append(switchMarker(prevEngine, firstShown.dataset.engine));
  }
  $("turns").prepend(frag);
  if (first) {
    S.lastEngine = page.data.length ? page.data[page.data.length - 1].engine : null;
    thread.scrollTop = thread.scrollHeight;
  } else {
    thread.scrollTop = thread.scrollHeight - before;
  }
  if (page.data.length) S.oldestId = page.data[0].id;
  $("older").hidden = !page.has_more;
}

async function renameConversation() {
  if (!S.conv) return;
  const li = [...$("conv-list").children].find((x) => x.dataset.id === S.conv.id);
  const name = window.prompt("Rename conversation", S.conv.name || "");
  if (name === null || !name.trim()) return;
  try {
    const c = await api("POST", `/v1/conversations/${S.conv.id}/name`, { name: name.trim(), user: S.user });
    S.conv.name = c.name;
    $("conv-title").textContent = c.name;
    if (li) { li.firstChild.textContent = c.name; li.firstChild.title = c.name; }
  } catch (e) { flash(e); }
}

async function deleteConversation() {
  if (!S.conv || !window.confirm("Delete this conversation?")) return;
  try {
    await api("DELETE", `/v1/conversations/${S.conv.id}`, { user: S.user });
    [...$("conv-list").children].find((x) => x.dataset.id === S.conv.id)?.remove();
    newChat();
  } catch (e) { flash(e); }
}

// ---- rendering ----------------------------------------------------------------------------------

function renderMarkdown(el, text) {
  if (window.marked && window.DOMPurify) {
    el.innerHTML = DOMPurify.sanitize(marked.parse(text), { USE_PROFILES: { html: true } });
    if (window.hljs) el.querySelectorAll("pre code").forEach((c) => hljs.highlightElement(c));
  } else {
    el.textContent = text; // the libraries failed to load: still safe, just plain
  }
}

function userBubble(text, imageUrls) {
  const d = document.createElement("div");
  d.className = "msg user";
  d.textContent = text;
  if (imageUrls.length) {
    const row = document.createElement("div");
    row.className = "images";
    for (const u of imageUrls) row.append(image(u));
    d.append(row);
  }
  return d;
}

function image(url) {
  const img = document.createElement("img");
  img.alt = "attached image";
  // Uploaded files come from /v1/messages as signed URLs (/files/<id>/file-preview?...&sign=), which
  // load without the app key; blob: is the preview of this page's own upload before it is sent.
  if (/^(https?:|data:image\/|blob:)/i.test(url)) img.src = url;
  return img;
}

// Function calls and outputs of an OpenAI client's tools (Responses or Chat Completions), as text only.
function toolBlock(cls, text) {
  const d = document.createElement("div");
  d.className = `tool ${cls}`;
  d.textContent = text;
  return d;
}

function switchMarker(from, to) {
  const d = document.createElement("div");
  d.className = "engine-switch";
  d.textContent = `engine changed: ${from} → ${to}`;
  return d;
}

function answerBubble() {
  const el = document.createElement("div");
  el.className = "msg assistant";
  const details = document.createElement("details");
  details.className = "reasoning";
  details.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const rtext = document.createElement("div");
  rtext.className = "reasoning-text";
  details.append(summary, rtext);
  const answer = document.createElement("div");
  answer.className = "answer";
  const tools = document.createElement("div");
  tools.className = "tools";
  const meta = document.createElement("div");
  meta.className = "meta";
  el.append(details, answer, tools, meta);
  let text = "", reasoning = "", scheduled = false;
  const paint = () => { scheduled = false; renderMarkdown(answer, text); rtext.textContent = reasoning; };
  const schedule = () => { if (!scheduled) { scheduled = true; requestAnimationFrame(paint); } };
  return {
    el,
    get text() { return text; },
    append(t) { text += t; schedule(); },
    setAnswer(t) { text = t; paint(); },
    appendReasoning(t) { reasoning += t; details.hidden = false; schedule(); },
    setReasoning(t) { reasoning = t; details.hidden = !t; paint(); },
    setTools(calls) {
      tools.replaceChildren(...calls.map((c) => toolBlock("tool-call", `${c.name}(${c.arguments})`)));
    },
    streaming(on) { answer.classList.toggle("cursor", on); },
    setMeta(m) {
      el.dataset.engine = m.engine || "";
      const bits = [];
      if (m.engine) bits.push(m.engine);
      if (m.status && m.status !== "completed") bits.push({ badge: m.status });
      if (m.prompt || m.completion) bits.push(`${m.prompt || 0} + ${m.completion || 0} tokens`);
      if (m.price && Number(m.price) > 0) bits.push(`${Number(m.price).toFixed(6)} ${m.currency || ""}`.trim());
      if (m.latency) bits.push(`${Number(m.latency).toFixed(2)} s`);
      if (m.ttft) bits.push(`first token ${Number(m.ttft).toFixed(2)} s`);
      meta.replaceChildren(...bits.map((b) => {
        const s = document.createElement("span");
        if (typeof b === "string") s.textContent = b;
        else { s.className = `badge ${b.badge}`; s.textContent = b.badge; }
        return s;
      }));
    },
    setError(code, message) {
      const e = document.createElement("div");
      e.className = "turn-error";
      e.setAttribute("role", "alert");
      e.textContent = `${message} (${code})`;
      el.append(e);
    },
  };
}

function flash(e) {
  const box = document.createElement("div");
  box.className = "turn-error";
  box.setAttribute("role", "alert");
  box.textContent = `${e.message}${e.code ? ` (${e.code})` : ""}`;
  $("turns").append(box);
  $("empty").hidden = true;
}

// ---- attachments --------------------------------------------------------------------------------

function renderAttachments() {
  $("attachments").replaceChildren(...S.pending.map((a, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    const img = document.createElement("img");
    img.alt = "";
    img.src = a.preview;
    const name = document.createElement("span");
    name.textContent = a.name;
    const x = document.createElement("button");
    x.type = "button"; x.textContent = "✕"; x.setAttribute("aria-label", `Remove ${a.name}`);
    x.addEventListener("click", () => { S.pending.splice(i, 1); renderAttachments(); });
    chip.append(img, name, x);
    return chip;
  }));
}

async function uploadFiles(fileList) {
  for (const f of fileList) {
    if (!f.type.startsWith("image/")) { flash(new ApiError(400, "unsupported_file_type", `${f.name} is not an image`)); continue; }
    const fd = new FormData();
    fd.append("file", f, f.name);
    fd.append("user", S.user);
    try {
      const j = await api("POST", "/v1/files/upload", fd);
      S.pending.push({ kind: "upload", id: j.id, name: f.name, preview: URL.createObjectURL(f) });
      renderAttachments();
    } catch (e) { flash(e); }
  }
}

function addImageUrl() {
  const url = $("image-url").value.trim();
  if (!/^https?:\/\//i.test(url)) return;
  S.pending.push({ kind: "url", url, name: url.split("/").pop() || url, preview: url });
  $("image-url").value = "";
  $("url-row").hidden = true;
  renderAttachments();
}

// ---- a turn -------------------------------------------------------------------------------------

async function send(ev) {
  ev?.preventDefault();
  const text = $("input").value;
  if (!text.trim() || S.running) return;
  const files = S.pending.map((a) => a.kind === "url"
    ? { type: "image", transfer_method: "remote_url", url: a.url }
    : { type: "image", transfer_method: "local_file", upload_file_id: a.id });
  const previews = S.pending.map((a) => a.preview);
  S.pending = []; renderAttachments();
  $("input").value = ""; autosize();
  $("empty").hidden = true;
  const engine = $("engine").value;
  const body = { inputs: {}, query: text, user: S.user, response_mode: "streaming", conversation_id: S.conv?.id || "",
                 files, include_reasoning: true };
  if (engine) body.engine = engine;
  const used = engine || S.appEngine;
  if (S.lastEngine && used && S.lastEngine !== used) $("turns").append(switchMarker(S.lastEngine, used));
  $("turns").append(userBubble(text, previews));
  const a = answerBubble();
  a.streaming(true);
  $("turns").append(a.el);
  scrollDown();
  const controller = new AbortController();
  S.running = { taskId: null, controller, stopped: false };
  setBusy(true);
  const wasNew = !S.conv;
  try {
    const res = await fetch("/v1/chat-messages", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!res.ok) {
      // A first turn that fails still made a conversation (the question is kept); its id comes in a header.
      const cid = res.headers.get("X-Threadline-Conversation-Id");
      if (cid && !S.conv) S.conv = { id: cid, name: "", engine: "" };
      const e = await toError(res); a.setError(e.code, e.message); return;
    }
    await readEvents(res, (e) => onEvent(e, a));
  } catch (e) {
    if (e.name === "AbortError") a.setMeta({ engine: used, status: "stopped" });
    else a.setError("network_error", "The connection to Threadline was lost.");
  } finally {
    a.streaming(false);
    S.running = null;
    setBusy(false);
    // A failed first turn still made a conversation (the question is kept), so the list shows it too.
    if (wasNew && S.conv) loadConversations(true).then(syncTitle);
    else if (S.conv) moveToTop();
    $("input").focus();
  }
}

async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) { try { onEvent(JSON.parse(data)); } catch { /* a malformed frame is skipped */ } }
    }
  }
}

function onEvent(e, a) {
  if (e.task_id && S.running && !S.running.taskId) {
    S.running.taskId = e.task_id;
    if (S.running.stopped) stop();
  }
  if (e.conversation_id && !S.conv) {
    S.conv = { id: e.conversation_id, name: "", engine: "" };
    $("rename").hidden = $("delete").hidden = false;
  }
  switch (e.event) {
    case "message": a.append(e.answer || ""); break;
    case "reasoning": a.appendReasoning(e.reasoning || ""); break;
    case "message_replace": a.setAnswer(e.answer || ""); break;
    case "workflow_finished": // a stopped turn ends as Dify ends it; Threadline adds the same metadata
      if (!e.metadata) break;
      // falls through
    case "message_end": {
      const u = e.metadata?.usage || {};
      const engine = e.metadata?.engine || $("engine").value || S.appEngine;
      a.setMeta({ engine, status: e.metadata?.status, prompt: u.prompt_tokens, completion: u.completion_tokens,
                  price: u.total_price, currency: u.currency, latency: u.latency, ttft: u.time_to_first_token });
      S.lastEngine = engine;
      S.conv.engine = engine;
      break;
    }
    case "error": a.setError(e.code, e.message); break;
    default: break;
  }
  scrollDown(true);
}

function syncTitle() {
  const li = [...$("conv-list").children].find((x) => x.dataset.id === S.conv?.id);
  if (li) { S.conv.name = li._conv.name; $("conv-title").textContent = li._conv.name || "New conversation"; }
  markActive();
}

function moveToTop() {
  const li = [...$("conv-list").children].find((x) => x.dataset.id === S.conv?.id);
  if (li) $("conv-list").prepend(li);
}

async function stop() {
  const r = S.running;
  if (!r) return;
  r.stopped = true;
  if (!r.taskId) return; // stopped as soon as the task id arrives
  try {
    await api("POST", `/v1/chat-messages/${r.taskId}/stop`, { user: S.user });
  } catch {
    r.controller.abort(); // the server keeps the partial answer when the client goes away, too
  }
}

function setBusy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

function scrollDown(onlyIfNear) {
  const t = $("thread");
  if (!onlyIfNear || t.scrollHeight - t.scrollTop - t.clientHeight < 160) t.scrollTop = t.scrollHeight;
}

function autosize() {
  const t = $("input");
  t.style.height = "auto";
  t.style.height = `${Math.min(t.scrollHeight, 192)}px`;
}

function closeSidebar() { $("sidebar").classList.remove("open"); }

// ---- wiring -------------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", signin);
  $("signout").addEventListener("click", signout);
  $("new-chat").addEventListener("click", () => { if (!S.running) { newChat(); closeSidebar(); } });
  $("conv-more").addEventListener("click", () => loadConversations(false));
  $("conv-list").addEventListener("scroll", (e) => {
    const l = e.target;
    if (!$("conv-more").hidden && l.scrollTop + l.clientHeight >= l.scrollHeight - 40) $("conv-more").click();
  });
  $("older").addEventListener("click", () => loadOlder(false));
  $("thread").addEventListener("scroll", () => {
    if ($("thread").scrollTop < 40 && !$("older").hidden && !$("older").disabled) {
      $("older").disabled = true;
      loadOlder(false).finally(() => { $("older").disabled = false; });
    }
  });
  $("rename").addEventListener("click", renameConversation);
  $("delete").addEventListener("click", deleteConversation);
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("input").addEventListener("input", autosize);
  $("input").addEventListener("keydown", (e) => {
    // Enter sends; Shift+Enter is a newline; Enter while an IME is composing (Chinese, Japanese) is not a send.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) { e.preventDefault(); send(); }
  });
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", (e) => { uploadFiles([...e.target.files]); e.target.value = ""; });
  $("attach-url").addEventListener("click", () => { $("url-row").hidden = !$("url-row").hidden; $("image-url").focus(); });
  $("image-url-add").addEventListener("click", addImageUrl);
  $("image-url").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addImageUrl(); } });
  $("input").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) { e.preventDefault(); uploadFiles(files); }
  });
  const composer = $("composer");
  let depth = 0;
  document.addEventListener("dragenter", (e) => { if (e.dataTransfer?.types.includes("Files")) { depth++; composer.classList.add("dragging"); $("drop-hint").hidden = false; } });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; composer.classList.remove("dragging"); $("drop-hint").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0; composer.classList.remove("dragging"); $("drop-hint").hidden = true;
    if (e.dataTransfer?.files?.length) uploadFiles([...e.dataTransfer.files]);
  });
  $("open-sidebar").addEventListener("click", () => $("sidebar").classList.add("open"));
  $("close-sidebar").addEventListener("click", closeSidebar);
}

document.addEventListener("DOMContentLoaded", boot);
