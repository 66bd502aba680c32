// End-to-end check of the demo chat page (examples/static/index.html) in a real browser:
// a wrong password shows an error, logging in works, a reply streams in, and after a
// reload the conversation is still there in "Past conversations". Then a parent logs in,
// reads their child's conversation, downloads it (JSON and a printable page) and deletes it.
//
//   CMZ_DEMO_URL    base URL of a running server (default http://127.0.0.1:8080)
//   CMZ_SCREENSHOT  where to save the final screenshot (default target/screenshots/chat.png)
//
// The page is served with a Content-Security-Policy; any violation of it (reported by the
// page's `securitypolicyviolation` events or the browser console) fails the check, and a
// probe at the end (an inline script injected into the page) proves violations are seen.
//
// Prints `1 passed, 0 failed` and exits 0 on success; otherwise says why, saves the
// screenshot anyway and exits 1.
import { mkdirSync } from "node:fs";
import net from "node:net";
import { dirname } from "node:path";
import { chromium } from "playwright-core";

const BASE = (process.env.CMZ_DEMO_URL || "http://127.0.0.1:8080").replace(/\/+$/, "");
const SHOT = process.env.CMZ_SCREENSHOT || "target/screenshots/chat.png";
const TIMEOUT = 15_000;
const EMAIL = "admin@cmz.org";
const PASSWORD = "admin123";
const MESSAGE = "Hello! What do you eat?";

const tid = (id) => `[data-testid="${id}"]`;
const log = (msg) => console.log(`- ${msg}`);

class CheckError extends Error {}
function check(cond, msg) {
  if (!cond) throw new CheckError(msg);
}

async function screenshot(page) {
  if (!page) return;
  try {
    mkdirSync(dirname(SHOT), { recursive: true });
    await page.screenshot({ path: SHOT, fullPage: true });
    log(`screenshot saved to ${SHOT}`);
  } catch (e) {
    console.log(`  (could not save the screenshot: ${e.message})`);
  }
}

// Content-Security-Policy violations seen so far: from the page's events and the console.
const violations = [];

// Reports every violation of the page's policy, in every document the page loads (the
// init script runs before the page's own; it is the browser's, not subject to the policy).
async function watchPolicy(page) {
  await page.exposeFunction("__cmzReportViolation", (v) => violations.push(`event: ${v}`));
  await page.addInitScript(() => {
    document.addEventListener("securitypolicyviolation", (e) => {
      window.__cmzReportViolation(`${e.effectiveDirective} blocked ${e.blockedURI || "(inline)"} at ${e.sourceFile || "?"}:${e.lineNumber}`);
    });
  });
  page.on("console", (m) => {
    if (/Content Security Policy/i.test(m.text())) violations.push(`console: ${m.text()}`);
  });
}

async function run(page) {
  log(`open ${BASE}/`);
  const resp = await page.goto(`${BASE}/`, { waitUntil: "domcontentloaded" });
  check(resp && resp.ok(), `GET / answered ${resp ? resp.status() : "nothing"}`);
  const policy = (await resp.allHeaders())["content-security-policy"];
  check(policy && /script-src 'self'/.test(policy) && !/unsafe/.test(policy), `GET / has no strict Content-Security-Policy: ${policy}`);
  log(`  Content-Security-Policy: ${policy}`);
  await page.locator(tid("login-email")).waitFor({ state: "visible" });

  log("log in with a wrong password: expect an error");
  await page.locator(tid("login-email")).fill(EMAIL);
  await page.locator(tid("login-password")).fill("not-the-password");
  await page.locator(tid("login-submit")).click();
  const loginError = page.locator(tid("login-error"));
  await loginError.waitFor({ state: "visible" });
  const errText = (await loginError.textContent())?.trim();
  check(errText, "login-error is visible but empty");
  log(`  error shown: "${errText}"`);

  log(`log in as ${EMAIL}`);
  await page.locator(tid("login-password")).fill(PASSWORD);
  await page.locator(tid("login-submit")).click();
  await page.locator(tid("logout")).waitFor({ state: "visible" });
  check(!(await loginError.isVisible()), "login-error still visible after a good login");

  log("pick the first animal");
  const select = page.locator(tid("animal-select"));
  await page.waitForFunction(
    (sel) => { const s = document.querySelector(sel); return s && s.options.length > 0 && s.options[0].value; },
    tid("animal-select"),
  );
  const first = await select.evaluate((s) => ({ value: s.options[0].value, label: s.options[0].textContent }));
  await select.selectOption(first.value);
  log(`  animal: ${first.label} (${first.value})`);
  const modelLabel = page.locator(tid("model-label"));
  if (await modelLabel.isVisible()) log(`  model label: "${(await modelLabel.textContent()).trim()}"`);

  log(`send "${MESSAGE}" and wait for the streamed reply`);
  await page.locator(tid("message-input")).fill(MESSAGE);
  await page.locator(tid("send-button")).click();
  await page.waitForFunction(
    ([assistant, status]) => {
      const bubbles = document.querySelectorAll(assistant);
      const last = bubbles[bubbles.length - 1];
      const st = document.querySelector(status);
      return last && last.textContent.trim() !== "" && st && st.textContent.trim() === "done";
    },
    [tid("msg-assistant"), tid("stream-status")],
  ).catch(async (e) => {
    const status = await page.locator(tid("stream-status")).textContent().catch(() => "?");
    const chat = await page.locator(tid("chat-log")).innerText().catch(() => "?");
    throw new CheckError(`no complete reply within ${TIMEOUT / 1000}s (stream-status "${status}"; chat log: ${JSON.stringify(chat)}): ${e.message.split("\n")[0]}`);
  });
  const reply = (await page.locator(tid("msg-assistant")).last().textContent()).trim();
  check(await page.locator(tid("send-button")).isEnabled(), "send button still disabled after the reply");
  log(`  reply: "${reply.length > 100 ? `${reply.slice(0, 100)}…` : reply}"`);

  log("thumbs down on the reply: it goes to the staff review queue");
  const lastRow = page.locator(`${tid("chat-log")} .row.assistant`).last();
  await lastRow.locator(tid("thumb-down")).click();
  await page.waitForFunction(
    (sel) => { const rows = document.querySelectorAll(sel); const b = rows[rows.length - 1]?.querySelector('[data-testid="thumb-down"]'); return b && b.getAttribute("aria-pressed") === "true"; },
    `${tid("chat-log")} .row.assistant`,
  );
  const queued = page.locator(`${tid("review-list")} ${tid("review-item")}`).filter({ hasText: "thumbs down" }).first();
  await queued.waitFor({ state: "visible" });
  log(`  queued: "${(await queued.innerText()).replace(/\s+/g, " ").trim()}"`);
  await queued.click();
  await page.locator(tid("reviewing")).waitFor({ state: "visible" });
  check(await page.locator(`${tid("chat-log")} .bubble.flagged`).count() === 1, "the reviewed reply is not marked in the conversation");
  check((await page.locator(`${tid("chat-log")} .bubble.flagged`).textContent()).trim() === reply, "the marked reply is not the one voted on");
  const before = await page.locator(tid("review-item")).count();
  await page.locator(`${tid("review-list")} li`).filter({ hasText: "thumbs down" }).first().locator(tid("review-done")).click();
  await page.waitForFunction(([sel, n]) => document.querySelectorAll(sel).length < n, [tid("review-item"), before]);
  log("  opened with the reply marked, then marked reviewed: gone from the queue");

  log("reload: expect to stay logged in, with the conversation listed");
  await page.reload({ waitUntil: "domcontentloaded" });
  await page.locator(tid("logout")).waitFor({ state: "visible" });
  check(!(await page.locator(tid("login-submit")).isVisible()), "the login form is shown after a reload");
  const item = page.locator(`${tid("sessions-list")} ${tid("session-item")}`).first();
  await item.waitFor({ state: "visible" });
  const count = await page.locator(tid("session-item")).count();
  const sessionId = await item.getAttribute("data-session-id");
  check(sessionId, "the session item has no data-session-id");
  log(`  ${count} session(s) listed; opening ${sessionId}`);

  log("open the first past conversation: expect the message and the same reply");
  await item.click();
  await page.waitForFunction(
    ([user, assistant, msg, rep]) => {
      const texts = (sel) => Array.from(document.querySelectorAll(sel), (n) => n.textContent.trim());
      return texts(user).includes(msg) && texts(assistant).includes(rep);
    },
    [`${tid("chat-log")} ${tid("msg-user")}`, `${tid("chat-log")} ${tid("msg-assistant")}`, MESSAGE, reply],
  ).catch(async (e) => {
    const chat = await page.locator(tid("chat-log")).innerText().catch(() => "?");
    throw new CheckError(`the opened conversation does not show the message and reply (chat log: ${JSON.stringify(chat)}): ${e.message.split("\n")[0]}`);
  });
  log("  history shows the message and the reply");

  check(violations.length === 0, `the page violated its Content-Security-Policy:\n  ${violations.join("\n  ")}`);
  log("no Content-Security-Policy violations");
  log("probe: an injected inline script must be blocked and reported");
  const ran = await page.evaluate(() => {
    const script = document.createElement("script");
    script.textContent = "window.__cmzInlineRan = true;";
    document.head.append(script);
    return window.__cmzInlineRan === true;
  });
  check(!ran, "an inline script ran: the policy does not block inline code");
  // Both channels must see it, or a violation could go unseen.
  const seen = (kind) => violations.some((v) => v.startsWith(kind));
  const deadline = Date.now() + 5_000;
  while (!(seen("event:") && seen("console:")) && Date.now() < deadline) await page.waitForTimeout(50);
  check(seen("event:"), `the page's securitypolicyviolation event did not report the blocked script (${violations.join("; ")})`);
  check(seen("console:"), `the console did not report the blocked script (${violations.join("; ")})`);
  log(`  reported: ${violations.find((v) => v.startsWith("event:"))}`);
}

// A parent's controls: the child's conversation is listed, readable, exported and deleted.
async function runParent(page) {
  const CHILD_MESSAGE = `Do <b>lions</b> & tigers nap? ${Date.now()}`;
  log("as the child student1@cmz.org (over the API): one turn");
  const auth = await (await fetch(`${BASE}/auth`, {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ username: "student1@cmz.org", password: "student123" }),
  })).json();
  const turn = await fetch(`${BASE}/convo_turn`, {
    method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${auth.token}` },
    body: JSON.stringify({ animalId: "cougar", message: CHILD_MESSAGE }),
  });
  check(turn.ok, `the child's turn answered ${turn.status}`);

  log("log out, log in as parent@cmz.org");
  await page.locator(tid("logout")).click();
  await page.locator(tid("login-email")).waitFor({ state: "visible" });
  await page.locator(tid("login-email")).fill("parent@cmz.org");
  await page.locator(tid("login-password")).fill("parent123");
  await page.locator(tid("login-submit")).click();
  await page.locator(tid("family-view")).waitFor({ state: "visible" });
  const item = page.locator(tid("family-item")).filter({ hasText: "Ana Rivera" }).first();
  await item.waitFor({ state: "visible" });
  log(`  listed: "${(await item.innerText()).replace(/\s+/g, " ").trim()}"`);

  log("read the child's conversation");
  await item.click();
  await page.locator(tid("reading-child")).waitFor({ state: "visible" });
  await page.waitForFunction(
    ([sel, msg]) => Array.from(document.querySelectorAll(sel), (n) => n.textContent).includes(msg),
    [`${tid("chat-log")} ${tid("msg-user")}`, CHILD_MESSAGE],
  );
  log("  the child's message is shown, as text");

  log("download the export (JSON) and the printable copy");
  const [json] = await Promise.all([page.waitForEvent("download"), page.locator(tid("export-json")).click()]);
  const exported = JSON.parse(await streamText(await json.createReadStream()));
  const messages = exported.sessions.flatMap((s) => s.messages.map((m) => m.text));
  check(messages.includes(CHILD_MESSAGE), `the JSON export lacks the child's message: ${JSON.stringify(messages).slice(0, 300)}`);
  const [html] = await Promise.all([page.waitForEvent("download"), page.locator(tid("export-html")).click()]);
  const printable = await streamText(await html.createReadStream());
  check(printable.includes("Do &lt;b&gt;lions&lt;/b&gt; &amp; tigers nap?"), "the printable copy lacks the escaped message");
  log(`  ${exported.sessions.length} conversation(s) exported; the printable copy escapes the text`);

  log("delete the child's conversation");
  page.once("dialog", (d) => d.accept());
  const count = await page.locator(tid("family-item")).count();
  await page.locator(`${tid("family-list")} li`).filter({ hasText: "Ana Rivera" }).first().locator(tid("family-delete")).click();
  await page.waitForFunction(
    ([sel, before]) => document.querySelectorAll(sel).length < before,
    [tid("family-item"), count],
  );
  const after = await fetch(`${BASE}/conversations/sessions/${(await turn.json()).sessionId}`, {
    headers: { authorization: `Bearer ${auth.token}` },
  });
  check(after.status === 404, `the deleted conversation still answers ${after.status}`);
  log("  deleted: gone from the list and from the server");
}

// A child over the daily token budget (a server started with a 1-token budget): the second
// message is refused before it starts, and the page says so in the animal's voice.
async function runBudget(context) {
  const url = (process.env.CMZ_DEMO_BUDGET_URL || "").replace(/\/+$/, "");
  if (!url) { log("no CMZ_DEMO_BUDGET_URL: the budget check is skipped"); return; }
  const page = await context.newPage();
  await watchPolicy(page);
  log(`a child over the daily budget, at ${url}`);
  await page.goto(`${url}/`, { waitUntil: "domcontentloaded" });
  await page.locator(tid("login-email")).fill("student1@cmz.org");
  await page.locator(tid("login-password")).fill("student123");
  await page.locator(tid("login-submit")).click();
  await page.locator(tid("logout")).waitFor({ state: "visible" });
  await page.waitForFunction((sel) => { const s = document.querySelector(sel); return s && s.options.length > 0 && s.value; }, tid("animal-select"));
  const say = async (text) => {
    await page.locator(tid("message-input")).fill(text);
    await page.locator(tid("send-button")).click();
    await page.waitForFunction((sel) => ["done", "error", "limited"].includes(document.querySelector(sel)?.textContent.trim()), tid("stream-status"));
    return (await page.locator(tid("stream-status")).textContent()).trim();
  };
  check(await say("Hello!") === "done", "the first message (within the budget) was not answered");
  check(await say("Tell me more!") === "limited", "the message over the budget was not refused as limited");
  const note = (await page.locator(tid("limit-note")).textContent()).trim();
  check(/nap/.test(note) && /tomorrow/.test(note), `the refusal is not said in character: "${note}"`);
  check(await page.locator(tid("msg-assistant")).count() === 1, "a reply bubble was left for the refused message");
  log(`  said: "${note}"`);
  await page.close();
}

// A proxy in front of a server that cuts the first streamed reply after two pieces, as a
// phone walking out of Wi-Fi would; everything else passes through.
function cuttingProxy(target) {
  const { hostname, port } = new URL(target);
  let cut = false;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    let victim = false;
    let pieces = 0;
    client.on("data", (chunk) => {
      const head = chunk.toString("latin1");
      if (!cut && /^GET \/convo_turn\/stream/.test(head) && !/last-event-id:/i.test(head)) victim = true;
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      client.write(chunk);
      if (!victim || cut) return;
      pieces += (chunk.toString("utf8").match(/event: ?message/g) || []).length;
      if (pieces >= 2) {
        cut = true;
        client.destroy();
        upstream.destroy();
      }
    });
    const close = () => { client.destroy(); upstream.destroy(); };
    client.on("error", close); upstream.on("error", close);
    client.on("end", close); upstream.on("end", close);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({
    url: `http://127.0.0.1:${server.address().port}`,
    wasCut: () => cut,
    close: () => server.close(),
  })));
}

// The connection drops mid-reply: the page reconnects by itself and shows the whole reply
// once (compared with the reply the server stored).
async function runReconnect(context) {
  const slow = (process.env.CMZ_DEMO_SLOW_URL || "").replace(/\/+$/, "");
  if (!slow) { log("no CMZ_DEMO_SLOW_URL: the reconnect check is skipped"); return; }
  const proxy = await cuttingProxy(slow);
  const page = await context.newPage();
  try {
    await watchPolicy(page);
    log(`a reply cut mid-way, through a proxy to ${slow}`);
    await page.goto(`${proxy.url}/`, { waitUntil: "domcontentloaded" });
    await page.locator(tid("login-email")).fill("student1@cmz.org");
    await page.locator(tid("login-password")).fill("student123");
    await page.locator(tid("login-submit")).click();
    await page.locator(tid("logout")).waitFor({ state: "visible" });
    await page.waitForFunction((sel) => { const s = document.querySelector(sel); return s && s.options.length > 0 && s.value; }, tid("animal-select"));
    await page.locator(tid("message-input")).fill("Tell me about your day, please!");
    await page.locator(tid("send-button")).click();
    await page.waitForFunction((sel) => ["done", "error", "limited"].includes(document.querySelector(sel)?.textContent.trim()), tid("stream-status"), { timeout: 30_000 });
    const status = (await page.locator(tid("stream-status")).textContent()).trim();
    check(proxy.wasCut(), "the proxy never cut the stream");
    check(status === "done", `the cut reply did not finish (status "${status}")`);
    const shown = (await page.locator(tid("msg-assistant")).last().textContent()).trim();
    const token = await page.evaluate(() => JSON.parse(sessionStorage.getItem("cmz.demo")).token);
    const sessionId = await page.evaluate(() => JSON.parse(sessionStorage.getItem("cmz.demo")).sessionId);
    const history = await (await fetch(`${slow}/convo_history?sessionId=${sessionId}`, { headers: { authorization: `Bearer ${token}` } })).json();
    const stored = history.turns[history.turns.length - 1];
    check(stored.content.trim() === shown, `the page shows ${JSON.stringify(shown)}, the server stored ${JSON.stringify(stored.content)}`);
    check(history.turns.length === 2, `${history.turns.length} messages stored: a reconnect started another turn`);
    log(`  reconnected; the whole reply shown once (${shown.split(/\s+/).length} words)`);
  } finally {
    await page.close();
    proxy.close();
  }
}

async function streamText(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  console.log(`browser check of the demo chat page at ${BASE}`);
  let browser;
  let page;
  const consoleErrors = [];
  let ok = false;
  try {
    browser = await chromium.launch({
      executablePath: "/usr/bin/chromium",
      headless: true,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    const context = await browser.newContext({ viewport: { width: 1100, height: 760 }, acceptDownloads: true });
    context.setDefaultTimeout(TIMEOUT);
    context.setDefaultNavigationTimeout(TIMEOUT);
    page = await context.newPage();
    await watchPolicy(page);
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    page.on("pageerror", (e) => consoleErrors.push(`page error: ${e.message}`));
    await run(page);
    await runParent(page);
    await runBudget(context);
    await runReconnect(context);
    await screenshot(page);
    ok = true;
  } catch (e) {
    console.log(`FAILED: ${e instanceof CheckError ? e.message : e.stack || e}`);
    if (consoleErrors.length) {
      console.log("browser console errors:");
      for (const m of consoleErrors.slice(-10)) console.log(`  ${m}`);
    }
    await screenshot(page);
  } finally {
    if (browser) await browser.close().catch(() => {});
  }
  console.log(ok ? "1 passed, 0 failed" : "0 passed, 1 failed");
  process.exit(ok ? 0 : 1);
}

main();
