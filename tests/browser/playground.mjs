// Drives the playground page in headless Chromium over the DevTools protocol (Node's WebSocket,
// no npm package): a prompt in prompt mode and two chat turns, each streamed into the page, checked
// against the same request made directly (same seed); the live figures filled in; a screenshot.
// usage: node --experimental-websocket playground.mjs BASE_URL DEVTOOLS_PORT [SCREENSHOT.png]
import { writeFileSync } from "node:fs";

const [base, devtoolsPort, screenshot] = process.argv.slice(2);
const fail = (msg) => { console.error("FAIL: " + msg); process.exit(1); };

// The page Chromium opened on the server's "/".
let target;
for (let i = 0; i < 600 && !target; i++) {  // a minute: a loaded machine starts chromium slowly
  try {
    const list = await (await fetch(`http://127.0.0.1:${devtoolsPort}/json/list`)).json();
    target = list.find((t) => t.type === "page" && t.url.startsWith(base));
  } catch {}
  if (!target) await new Promise((r) => setTimeout(r, 100));
}
if (!target) fail("no page on " + base);

const ws = new WebSocket(target.webSocketDebuggerUrl);
await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
let nextId = 1;
const pending = new Map();
ws.onmessage = (m) => {
  const msg = JSON.parse(m.data);
  if (msg.id && pending.has(msg.id)) {
    pending.get(msg.id)(msg);
    pending.delete(msg.id);
  }
};
const send = (method, params = {}) => new Promise((resolve) => {
  const id = nextId++;
  pending.set(id, resolve);
  ws.send(JSON.stringify({ id, method, params }));
});
async function evaluate(expression) {
  const r = await send("Runtime.evaluate", { expression, awaitPromise: true, returnByValue: true });
  if (r.result?.exceptionDetails) fail("page error: " + JSON.stringify(r.result.exceptionDetails));
  return r.result?.result?.value;
}
async function waitFor(expression, what, ms = 60000) {
  const t0 = Date.now();
  for (;;) {
    const v = await evaluate(expression);
    if (v) return v;
    if (Date.now() - t0 > ms)
      fail(`timed out waiting for ${what}; the page says "${await evaluate(`document.getElementById("status").textContent`)}"`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
async function direct(path, body) {
  const r = await fetch(base + path, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: false }),
  });
  return r.json();
}
const settings = { max_tokens: 24, temperature: 0.9, top_p: 0.95, top_k: 40, min_p: 0.05, seed: 11 };
const fill = Object.entries(settings).map(([k, v]) => `document.getElementById("${k}").value = "${v}";`).join("");

// Until the navigation commits, the target's document is the initial about:blank (also
// "complete", without the page's elements): waited through, not read.
await waitFor(`document.readyState === "complete" && document.getElementById("model")?.textContent.startsWith("model:")`, "the page");
// The page's sampling fields start as the server's defaults (/props: the model's recommendation;
// run_playground.sh's random model recommends a repetition penalty of 1.25). The fill below
// leaves repetition_penalty as it is, so the page and the direct call both get the default.
const params = (await (await fetch(base + "/props")).json()).default_generation_settings.params;
for (const [id, key] of [["temperature", "temperature"], ["top_p", "top_p"], ["top_k", "top_k"],
                         ["min_p", "min_p"], ["repetition_penalty", "repeat_penalty"]]) {
  const shown = await evaluate(`document.getElementById("${id}").value`);
  if (shown !== String(params[key])) fail(`the page's ${id} is ${shown}, the server's default ${params[key]}`);
}

// Prompt mode.
const prompt = "Once upon a time";
await evaluate(`${fill}
  document.getElementById("mode-prompt").click();
  document.getElementById("prompt").value = ${JSON.stringify(prompt)};
  document.getElementById("send").click(); true`);
await waitFor(`document.getElementById("status").textContent.startsWith("done")`, "the completion");
const shown = await evaluate(`document.getElementById("completion").textContent`);
const want = (await direct("/v1/completions", { ...settings, prompt })).choices[0].text;
if (!shown || shown !== want) fail(`prompt mode shows ${JSON.stringify(shown)}, the API gives ${JSON.stringify(want)}`);

// Chat mode: two turns, the second sent with the first in its history.
const messages = [];
for (const question of ["What does the license say?", "And who wrote it?"]) {
  await evaluate(`document.getElementById("mode-chat").click();
    document.getElementById("status").textContent = "";
    document.getElementById("prompt").value = ${JSON.stringify(question)};
    document.getElementById("send").click(); true`);
  await waitFor(`document.getElementById("status").textContent.startsWith("done")`, "the chat reply");
  messages.push({ role: "user", content: question });
  const reply = (await direct("/v1/chat/completions", { ...settings, messages })).choices[0].message.content;
  messages.push({ role: "assistant", content: reply });
  const turns = await evaluate(`[...document.querySelectorAll("#history .turn .text")].map((e) => e.textContent)`);
  if (JSON.stringify(turns) !== JSON.stringify(messages.map((m) => m.content)))
    fail(`chat shows ${JSON.stringify(turns)}, the API replies ${JSON.stringify(messages)}`);
}

// The live figures.
const figures = await evaluate(`({ tps: document.getElementById("tps").textContent,
  pos: document.getElementById("pos").textContent, state: document.getElementById("state").textContent })`);
if (!(Number(figures.tps) > 0) || !(Number(figures.pos.replace(/,/g, "")) > 0) || !/[0-9] (B|KiB|MiB)$/.test(figures.state))
  fail("figures not filled in: " + JSON.stringify(figures));

if (screenshot) {
  const shot = await send("Page.captureScreenshot", { format: "png" });
  writeFileSync(screenshot, Buffer.from(shot.result.data, "base64"));
}
console.log(JSON.stringify({ ok: true, prompt_mode: shown, chat: messages, figures }));
ws.close();
process.exit(0);
