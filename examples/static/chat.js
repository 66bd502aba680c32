// The demo chat page's script (served as /chat.js: the page's Content-Security-Policy
// allows no inline script).
"use strict";
(function () {
  const KEY = "cmz.demo";
  const $ = (id) => document.getElementById(id);

  // ---- State (persisted in sessionStorage so a reload keeps the user logged in) ----
  let state = load() || {};
  let animals = [];
  let streaming = false;
  let es = null;

  function load() {
    try { return JSON.parse(sessionStorage.getItem(KEY) || "null"); } catch (_) { return null; }
  }
  function save() { sessionStorage.setItem(KEY, JSON.stringify(state)); }
  function clearState() { state = {}; sessionStorage.removeItem(KEY); }

  // ---- Small DOM helpers (text only, never innerHTML with data) ----
  function el(tag, attrs, ...children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null) continue;
      if (k === "class") n.className = v;
      else if (k === "text") n.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "type" || k === "role") n.setAttribute(k, v);
      else n[k] = v;
    }
    for (const c of children) if (c != null) n.append(c);
    return n;
  }
  function uuid() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }
  function fmtTime(t) {
    if (!t) return "";
    const d = new Date(t);
    return isNaN(d) ? String(t) : d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  }

  // ---- API ----
  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `Request failed (${status})`);
      this.status = status; this.code = body && body.code;
    }
  }
  async function api(path, opts = {}) {
    const headers = { Accept: "application/json" };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    if (opts.auth !== false && state.token) headers.Authorization = `Bearer ${state.token}`;
    let res;
    try {
      res = await fetch(path, {
        method: opts.method || "GET", headers,
        body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
      });
    } catch (e) {
      throw new ApiError(0, { message: "Could not reach the server. Please try again." });
    }
    let body = null;
    const text = await res.text();
    if (text) { try { body = JSON.parse(text); } catch (_) { body = null; } }
    if (!res.ok) {
      const err = new ApiError(res.status, body);
      if (res.status === 401 && opts.auth !== false && state.token) expired();
      throw err;
    }
    return body;
  }
  function expired() {
    closeStream();
    clearState();
    showLogin();
    showLoginError("Your session has ended. Please log in again.");
  }

  // ---- Views ----
  function showLogin() {
    $("app-view").hidden = true;
    $("login-view").hidden = false;
    $("logout").hidden = true;
    $("who").hidden = true;
    $("chat-log").replaceChildren();
    $("sessions-list").replaceChildren();
    $("animal-select").replaceChildren();
    $("about").hidden = true;
    $("family-view").hidden = true;
    $("family-list").replaceChildren();
    $("review-view").hidden = true;
    $("review-list").replaceChildren();
    setStatus("");
  }
  function showLoginError(msg) {
    const e = $("login-error");
    e.textContent = msg; e.hidden = !msg;
  }
  async function showApp() {
    $("login-view").hidden = true;
    $("app-view").hidden = false;
    $("logout").hidden = false;
    const u = state.user || {};
    $("who").textContent = `Hi, ${u.displayName || u.email || "friend"}!`;
    $("who").hidden = false;
    updateSend();
    await loadAnimals();
    if (state.sessionId) await openSession(state.sessionId, { quiet: true });
    else greet();
    loadSessions();
    loadFamily();
    loadReview();
  }

  // ---- Health / model label ----
  async function loadHealth() {
    const label = $("model-label");
    try {
      const h = await api("/chatgpt/health", { auth: false });
      if (h && h.offline === true) {
        label.textContent = "Offline demo model";
        label.className = "pill offline";
        label.title = h.model ? `Model: ${h.model}` : "";
        label.hidden = false;
      } else if (h && h.status && h.status !== "ok") {
        label.textContent = `Model ${h.status}`;
        label.className = "pill";
        label.hidden = false;
      } else {
        label.hidden = true;
      }
    } catch (_) {
      label.hidden = true;
    }
  }

  // ---- Login / logout ----
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const email = $("login-email").value.trim();
    const password = $("login-password").value;
    showLoginError("");
    if (!email || !password) { showLoginError("Please enter your email and password."); return; }
    const btn = $("login-submit");
    btn.disabled = true; btn.textContent = "Logging in…";
    try {
      const r = await api("/auth", { method: "POST", auth: false, body: { username: email, password } });
      state = { token: r.token, refreshToken: r.refreshToken, user: r.user || {}, sessionId: null, animalId: null };
      save();
      $("login-password").value = "";
      await showApp();
    } catch (e) {
      showLoginError(e.message || "Login failed.");
    } finally {
      btn.disabled = false; btn.textContent = "Log in";
    }
  });

  $("logout").addEventListener("click", async () => {
    closeStream();
    const token = state.token;
    if (token) {
      try {
        await fetch("/auth/logout", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
      } catch (_) { /* logging out locally anyway */ }
    }
    clearState();
    showLogin();
    showLoginError("");
    $("login-email").focus();
  });

  // ---- Animals ----
  async function loadAnimals() {
    const sel = $("animal-select");
    try {
      const r = await api("/animals");
      animals = (r && r.animals) || [];
    } catch (e) {
      animals = [];
      sysNote(`Could not load the animals: ${e.message}`, true);
    }
    sel.replaceChildren(...animals.map((a) => el("option", { value: a.animalId, text: a.name || a.animalId })));
    if (state.animalId && animals.some((a) => a.animalId === state.animalId)) sel.value = state.animalId;
    state.animalId = sel.value || null; save();
    showAbout();
    updateSend();
  }
  function currentAnimal() { return animals.find((a) => a.animalId === $("animal-select").value) || null; }
  function showAbout() {
    const a = currentAnimal(), box = $("about");
    if (!a) { box.hidden = true; return; }
    const facts = Array.isArray(a.facts) ? a.facts : [];
    const fact = facts.length ? facts[Math.floor(Math.random() * facts.length)] : null;
    box.replaceChildren(
      el("b", { text: a.name || a.animalId }),
      a.personality ? el("span", { text: a.personality }) : null,
      fact ? el("div", { text: `Fun fact: ${fact}` }) : null,
    );
    box.hidden = false;
  }
  $("animal-select").addEventListener("change", () => {
    state.animalId = $("animal-select").value; save();
    showAbout();
    newConversation();
  });

  // ---- Chat log ----
  function greet() {
    const a = currentAnimal();
    $("chat-log").replaceChildren(el("div", { class: "sys",
      text: a ? `Say hello to ${a.name || a.animalId}!` : "Pick an animal to start chatting." }));
  }
  function sysNote(text, isErr) {
    const log = $("chat-log");
    log.append(el("div", { class: isErr ? "sys err" : "sys", text }));
    log.scrollTop = log.scrollHeight;
  }
  function animalName(id) {
    const a = animals.find((x) => x.animalId === id);
    return (a && a.name) || id || "Animal";
  }
  function addBubble(role, text, speaker) {
    const log = $("chat-log");
    const bubble = el("div", { class: "bubble", "data-testid": role === "user" ? "msg-user" : "msg-assistant", text: text || "" });
    const row = el("div", { class: `row ${role === "user" ? "user" : "assistant"}` },
      el("span", { class: "speaker", text: speaker }), bubble);
    log.append(row);
    log.scrollTop = log.scrollHeight;
    return { row, bubble };
  }
  // Thumbs up / down on one of the animal's replies (one vote each; a second replaces it).
  function addThumbs(row, sessionId, messageId) {
    if (!sessionId || !messageId || row.querySelector(".thumbs")) return;
    const box = el("span", { class: "thumbs" });
    for (const [vote, label, face] of [["up", "Good answer", "\u{1F44D}"], ["down", "Not a good answer", "\u{1F44E}"]]) {
      const b = el("button", { type: "button", class: "thumb", "data-testid": `thumb-${vote}`,
        "aria-label": label, "aria-pressed": "false", title: label, text: face });
      b.addEventListener("click", async () => {
        try {
          await api(`/conversations/sessions/${encodeURIComponent(sessionId)}/messages/${encodeURIComponent(messageId)}/feedback`,
            { method: "POST", body: { vote } });
          for (const other of box.querySelectorAll(".thumb")) other.setAttribute("aria-pressed", String(other === b));
          if (isStaff()) loadReview();
        } catch (e) {
          sysNote(`Could not save your vote: ${e.message}`, true);
        }
      });
      box.append(b);
    }
    row.append(box);
  }
  // Why a turn was refused before it started (the stream cannot read the 429's body): the
  // caller's limits, said the way the animal would.
  async function explainRefusal(animalId) {
    try {
      const limits = await api("/me/limits");
      if (!limits || !limits.limited) return false;
      const name = animalName(animalId);
      const budget = (limits.tokenBudgets || []).find((b) => b.used >= b.budget);
      const when = budget ? "tomorrow" : "in a little while";
      const log = $("chat-log");
      log.append(el("div", { class: "sys limit", "data-testid": "limit-note",
        text: `${name} is taking a nap now \u2014 we talked a lot today! Come back ${when} and we can chat again.` }));
      log.scrollTop = log.scrollHeight;
      return true;
    } catch (_) {
      return false;
    }
  }
  function setStatus(text) { $("stream-status").textContent = text; }
  function updateSend() {
    $("send-button").disabled = streaming || !$("animal-select").value;
    $("animal-select").disabled = streaming;
    $("new-convo").disabled = streaming;
  }

  function newConversation() {
    closeStream();
    state.sessionId = null; save();
    greet();
    setStatus("");
    markActive();
  }
  $("new-convo").addEventListener("click", () => { newConversation(); $("message-input").focus(); });

  // ---- Streaming a turn ----
  function closeStream() {
    if (es) { es.close(); es = null; }
    if (streaming) { streaming = false; updateSend(); }
  }

  $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("message-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });

  function send() {
    if (streaming) return;
    const input = $("message-input");
    const message = input.value.trim();
    const animalId = $("animal-select").value;
    if (!message || !animalId || !state.token) return;

    const log = $("chat-log");
    if (log.querySelector(".sys") && !log.querySelector(".row")) log.replaceChildren();
    addBubble("user", message, "You");
    const { row, bubble } = addBubble("assistant", "", animalName(animalId));
    bubble.classList.add("pending");
    input.value = "";

    const params = new URLSearchParams({ animalId, message });
    if (state.sessionId) params.set("sessionId", state.sessionId);
    params.set("turnKey", uuid());
    params.set("token", state.token);

    streaming = true; updateSend();
    setStatus("streaming…");
    let text = "";
    let finished = false;
    let started = false;
    const status = () => $("stream-status").textContent;
    const source = new EventSource(`/convo_turn/stream?${params}`);
    es = source;

    const parse = (e) => { try { return JSON.parse(e.data); } catch (_) { return null; } };
    const finish = (status) => {
      finished = true;
      source.close();
      if (es === source) es = null;
      streaming = false; updateSend();
      bubble.classList.remove("pending");
      setStatus(status);
      input.focus();
    };
    const rememberSession = (id) => {
      if (id && id !== state.sessionId) { state.sessionId = id; save(); markActive(); }
    };

    source.addEventListener("session", (e) => { const d = parse(e); if (d) rememberSession(d.sessionId); });
    source.addEventListener("metadata", (e) => { const d = parse(e); if (d) { started = true; rememberSession(d.sessionId); } });
    source.addEventListener("message", (e) => {
      const d = parse(e);
      if (status() !== "streaming…") setStatus("streaming…");
      if (d && typeof d.content === "string") {
        text += d.content;
        bubble.textContent = text;
        log.scrollTop = log.scrollHeight;
      }
    });
    source.addEventListener("complete", (e) => {
      const d = parse(e) || {};
      if (typeof d.fullResponse === "string" && d.fullResponse) { text = d.fullResponse; bubble.textContent = text; }
      rememberSession(d.sessionId);
      if (d.fallback) row.append(el("span", { class: "note", text: "(The animal is resting — a backup reply was used.)" }));
      if (d.interrupted) row.append(el("span", { class: "note", text: "(The reply was cut short.)" }));
      addThumbs(row, d.sessionId || state.sessionId, d.messageId);
      finish("done");
      loadSessions();
    });
    // Fires both for a server-sent `event: error` (has data) and for a connection
    // failure (no data). Either way close, so the browser does not reconnect.
    source.addEventListener("error", async (e) => {
      if (finished) { source.close(); return; }
      const d = e && e.data ? parse(e) : null;
      // The connection dropped mid-reply: the browser reconnects by itself with the last
      // event's id, and the server sends the rest of the same reply (nothing twice).
      if (!d && started && source.readyState === EventSource.CONNECTING) {
        setStatus("reconnecting…");
        return;
      }
      // Could not resume (the reply ended too long ago): show what was stored.
      if (!d && started && text && state.sessionId) {
        finish("done");
        openSession(state.sessionId, { quiet: true });
        return;
      }
      const msg = d && d.error ? d.error : "The connection was lost. Please try again.";
      if (!text) row.remove();
      // The final status only once it is known why (a limit is said in character).
      finish("…");
      if (!d && !text && await explainRefusal(animalId)) { setStatus("limited"); return; }
      setStatus("error");
      sysNote(`Oops: ${msg}`, true);
      if (d && (d.code === "unauthorized" || d.code === 401 || d.code === "token_expired")) expired();
      else if (text) loadSessions();
    });
  }

  // ---- Past conversations ----
  async function loadSessions() {
    const list = $("sessions-list");
    const u = state.user || {};
    if (!state.token || !u.userId) return;
    let sessions;
    try {
      const r = await api(`/conversations/sessions?${new URLSearchParams({ userId: u.userId, limit: "20" })}`);
      sessions = (r && r.sessions) || [];
    } catch (e) {
      list.replaceChildren(el("li", { class: "empty", text: `Could not load conversations: ${e.message}` }));
      return;
    }
    if (!sessions.length) {
      list.replaceChildren(el("li", { class: "empty", text: "No conversations yet. Say hello to an animal!" }));
      return;
    }
    list.replaceChildren(...sessions.map((s) => {
      const count = Number(s.messageCount) || 0;
      const btn = el("button", { type: "button", class: "session", "data-testid": "session-item", "data-session-id": s.sessionId },
        el("span", { class: "name", text: s.animalName || animalName(s.animalId) }),
        el("span", { class: "meta", text: `${fmtTime(s.lastMessageTime || s.startTime)} · ${count} message${count === 1 ? "" : "s"}` }),
        s.summary ? el("span", { class: "summary", text: s.summary }) : null);
      btn.addEventListener("click", () => { if (!streaming) openSession(s.sessionId); });
      return el("li", {}, btn);
    }));
    markActive();
  }
  function markActive() {
    for (const b of document.querySelectorAll("#sessions-list .session")) {
      b.classList.toggle("active", b.dataset.sessionId === state.sessionId);
    }
  }

  async function openSession(sessionId, opts = {}) {
    closeStream();
    setStatus("");
    let h;
    try {
      h = await api(`/convo_history?${new URLSearchParams({ sessionId })}`);
    } catch (e) {
      if (opts.quiet) { state.sessionId = null; save(); greet(); return; }
      sysNote(`Could not open that conversation: ${e.message}`, true);
      return;
    }
    state.sessionId = h.sessionId || sessionId;
    if (h.animalId && animals.some((a) => a.animalId === h.animalId)) {
      $("animal-select").value = h.animalId;
      state.animalId = h.animalId;
      showAbout();
    }
    save();
    const log = $("chat-log");
    log.replaceChildren();
    const turns = Array.isArray(h.turns) ? h.turns : [];
    if (!turns.length) sysNote("This conversation is empty.");
    for (const t of turns) {
      const { row } = addBubble(t.role === "user" ? "user" : "assistant", t.content || "",
        t.role === "user" ? "You" : animalName(h.animalId));
      if (t.role === "assistant") addThumbs(row, state.sessionId, t.messageId);
    }
    markActive();
    updateSend();
  }

  // ---- A parent's view: their children's conversations, to read, export or delete ----
  function isParent() { return ((state.user || {}).role || "") === "parent"; }
  async function loadFamily() {
    const view = $("family-view");
    view.hidden = !isParent();
    if (view.hidden) return;
    const list = $("family-list");
    let sessions;
    try {
      const r = await api(`/convo_history?${new URLSearchParams({ parentUserId: state.user.userId, limit: "50" })}`);
      sessions = (r && r.sessions) || [];
    } catch (e) {
      list.replaceChildren(el("li", { class: "empty", text: `Could not load your family's conversations: ${e.message}` }));
      return;
    }
    if (!sessions.length) {
      list.replaceChildren(el("li", { class: "empty", "data-testid": "family-empty", text: "Your children have no conversations." }));
      return;
    }
    list.replaceChildren(...sessions.map((s) => {
      const child = s.userName || s.userId;
      const count = Number(s.messageCount) || 0;
      const open = el("button", { type: "button", class: "session", "data-testid": "family-item", "data-session-id": s.sessionId },
        el("span", { class: "name", text: `${child} with ${s.animalName || animalName(s.animalId)}` }),
        el("span", { class: "meta", text: `${fmtTime(s.lastMessageTime || s.startTime)} · ${count} message${count === 1 ? "" : "s"}` }),
        s.lastMessage ? el("span", { class: "summary", text: s.lastMessage }) : null);
      open.addEventListener("click", () => readChildSession(s.sessionId, child));
      const del = el("button", { type: "button", class: "btn ghost small danger", "data-testid": "family-delete",
        "aria-label": `Delete ${child}'s conversation`, text: "Delete" });
      del.addEventListener("click", () => deleteChildSession(s.sessionId, child));
      return el("li", { class: "family-item" }, open, del);
    }));
  }
  async function readChildSession(sessionId, child) {
    closeStream();
    let h;
    try {
      h = await api(`/convo_history?${new URLSearchParams({ sessionId })}`);
    } catch (e) {
      sysNote(`Could not open that conversation: ${e.message}`, true);
      return;
    }
    // Read only: a parent never writes into a child's conversation.
    state.sessionId = null; save();
    const log = $("chat-log");
    log.replaceChildren(el("div", { class: "sys", "data-testid": "reading-child", text: `${child}'s conversation (read only)` }));
    for (const t of Array.isArray(h.turns) ? h.turns : []) {
      addBubble(t.role === "user" ? "user" : "assistant", t.content || "", t.role === "user" ? child : animalName(h.animalId));
    }
    markActive();
  }
  async function deleteChildSession(sessionId, child) {
    if (!window.confirm(`Delete ${child}'s conversation? This cannot be undone.`)) return;
    try {
      await api(`/convo_history?${new URLSearchParams({ sessionId })}`, { method: "DELETE" });
      sysNote(`${child}'s conversation was deleted.`);
    } catch (e) {
      sysNote(`Could not delete that conversation: ${e.message}`, true);
    }
    loadFamily();
  }
  async function exportFamily(format) {
    // The export needs the token, so it is fetched and handed to the browser as a file.
    try {
      const res = await fetch(`/conversations/export?${new URLSearchParams({ format })}`, {
        headers: { Authorization: `Bearer ${state.token}` },
      });
      if (!res.ok) throw new Error(`the export failed (${res.status})`);
      const url = URL.createObjectURL(await res.blob());
      const a = el("a", { href: url, download: `conversations.${format}` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (e) {
      sysNote(`Could not export: ${e.message}`, true);
    }
  }
  $("export-json").addEventListener("click", () => exportFamily("json"));
  $("export-html").addEventListener("click", () => exportFamily("html"));

  // ---- Staff: the replies to review (thumbs down, refusals, fallbacks, redactions) ----
  function isStaff() { return ["admin", "administrator", "zookeeper"].includes(((state.user || {}).role || "")); }
  const REASONS = { thumbs_down: "thumbs down", moderated: "refused", fallback: "fallback",
    interrupted: "cut short", redacted: "personal details" };
  async function loadReview() {
    const view = $("review-view");
    view.hidden = !isStaff();
    if (view.hidden) return;
    const list = $("review-list");
    let items;
    try {
      items = ((await api("/review/queue?limit=20")) || {}).items || [];
    } catch (e) {
      list.replaceChildren(el("li", { class: "empty", text: `Could not load the queue: ${e.message}` }));
      return;
    }
    if (!items.length) {
      list.replaceChildren(el("li", { class: "empty", "data-testid": "review-empty", text: "Nothing to review." }));
      return;
    }
    list.replaceChildren(...items.map((item) => {
      const reasons = (item.reasons || []).map((r) => REASONS[r] || r).join(", ");
      const open = el("button", { type: "button", class: "session", "data-testid": "review-item", "data-item-id": item.id },
        el("span", { class: "name", text: `${animalName(item.animalId)} \u00b7 ${reasons}` }),
        el("span", { class: "meta", text: `${item.ownerId} \u00b7 ${fmtTime(item.flaggedAt)}` }));
      open.addEventListener("click", () => openReview(item));
      const done = el("button", { type: "button", class: "btn ghost small", "data-testid": "review-done",
        "aria-label": "Mark reviewed", text: "Reviewed" });
      done.addEventListener("click", async () => {
        try {
          await api(`/review/queue/${encodeURIComponent(item.id)}/reviewed`, { method: "POST", body: {} });
        } catch (e) {
          sysNote(`Could not mark it reviewed: ${e.message}`, true);
        }
        loadReview();
      });
      return el("li", { class: "family-item" }, open, done);
    }));
  }
  async function openReview(item) {
    closeStream();
    let opened;
    try {
      opened = await api(`/review/queue/${encodeURIComponent(item.id)}?around=2`);
    } catch (e) {
      sysNote(`Could not open it: ${e.message}`, true);
      return;
    }
    state.sessionId = null; save();
    const log = $("chat-log");
    log.replaceChildren(el("div", { class: "sys", "data-testid": "reviewing",
      text: `Reviewing ${item.ownerId}'s conversation with ${animalName(item.animalId)} (read only)` }));
    for (const m of opened.messages || []) {
      const { bubble } = addBubble(m.role === "user" ? "user" : "assistant", m.content || "",
        m.role === "user" ? item.ownerId : animalName(item.animalId));
      if (m.messageId === item.messageId) bubble.classList.add("flagged");
    }
    markActive();
  }

  // ---- Start ----
  loadHealth();
  if (state.token) showApp(); else showLogin();
})();
