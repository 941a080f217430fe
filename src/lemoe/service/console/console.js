// The lemoe edit console: a static page over the editing service's HTTP API (served at /console/).
// Plain JavaScript, no build step, nothing loaded from elsewhere. Read top to bottom: the token,
// the API helper, the polled views (store, batches, edits), then the forms (edit, JSONL file,
// rollback, ask). Data from the service is only ever written with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "lemoe-token"; // sessionStorage: the token lasts as long as the browser tab
const POLL_MS = 1000;
const EDITS_SHOWN = 100; // GET /v1/edits?limit=...
const CHUNK = 64; // at most this many requests per POST /v1/edits

const $ = (id) => document.getElementById(id);

// -- the token ---------------------------------------------------------------------------------------
function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function showLogin(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  clearViews();
  $("console").hidden = true;
  $("forget-token").hidden = true;
  $("login").hidden = false;
  $("login-message").textContent = message;
  $("token-input").focus();
}

function showConsole() {
  clearViews(); // no message left over from before the token was asked again
  $("login").hidden = true;
  $("console").hidden = false;
  $("forget-token").hidden = false;
  startPolling();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-input").value = "";
  showConsole();
});

$("forget-token").addEventListener("click", () => showLogin("Token forgotten."));

// -- the API -----------------------------------------------------------------------------------------
// api("POST", "/edits", body) -> the parsed JSON answer, or throws an Error whose message is the
// service's {"error": {"message"}}. A 401 forgets the token and asks for it again.
async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${token()}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`../v1${path}`, init); // relative: works behind a path prefix too
  } catch (e) {
    throw new Error(`the request failed: ${e.message}`);
  }
  const data = await response.json().catch(() => null);
  if (response.status === 401) showLogin("The service refused the token; enter it again.");
  if (!response.ok) throw new Error(data?.error?.message ?? `HTTP ${response.status}`);
  return data;
}

// -- small DOM helpers -------------------------------------------------------------------------------
function el(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

function say(id, text, isError = false) {
  $(id).textContent = text;
  $(id).classList.toggle("error", isError);
}

function when(seconds) {
  return seconds === null || seconds === undefined ? "" : new Date(seconds * 1000).toLocaleString();
}

function statusCell(status) {
  return el("td", status.replace("_", " "), { class: `status status-${status}` });
}

// Re-render a table body only when its data changed, so polling keeps the focus and the selection.
const shown = new Map();
function renderRows(tbody, items, makeRow) {
  const signature = JSON.stringify(items);
  if (shown.get(tbody.id) === signature) return;
  shown.set(tbody.id, signature);
  tbody.replaceChildren(...items.map(makeRow));
}

function clearViews() {
  shown.clear();
  for (const id of ["store", "edits", "batches", "edited-version"]) $(id).replaceChildren();
  for (const id of ["answer-edited", "answer-base", "poll-message", "edit-message", "upload-message"]) say(id, "");
  say("rollback-message", "");
}

// -- the polled views: store summary, batches, edits ---------------------------------------------------
let polling = false;

function startPolling() {
  if (polling) return;
  polling = true;
  poll();
}

async function poll() {
  if (!token()) {
    polling = false;
    return;
  }
  await refresh();
  setTimeout(poll, POLL_MS);
}

async function refresh() {
  try {
    const [info, edits, batches] = await Promise.all([
      api("GET", "/store"),
      api("GET", `/edits?limit=${EDITS_SHOWN}&after=0`),
      api("GET", "/batches"),
    ]);
    renderStore(info);
    renderBatches(batches.batches);
    renderEdits(edits.edits, Object.values(info.edits).reduce((a, b) => a + b, 0));
    say("poll-message", "");
  } catch (e) {
    if (token()) say("poll-message", `Could not refresh: ${e.message}`, true);
  }
}

function renderStore(info) {
  const counts = Object.entries(info.edits)
    .map(([status, n]) => `${n} ${status.replace("_", " ")}`)
    .join(", ");
  let writer = info.writer_busy ? "applying a batch" : "idle";
  if (info.writer_error) writer += ` (last error: ${info.writer_error})`;
  const fields = [
    ["model", "Model", info.model],
    ["method", "Method", info.method + (info.supports_rollback ? "" : " (rolls back by replay only)")],
    ["edits", "Edits", counts],
    ["live_batches", "Live batches", info.live_batches],
    ["writer", "Writer", writer],
    ["state_version", "State version", info.state_version],
  ];
  $("store").replaceChildren(...fields.flatMap(([key, label, value]) => [el("dt", label), el("dd", value, { "data-field": key })]));
}

function renderBatches(batches) {
  renderRows($("batches"), batches, (b) => {
    const row = el("tr", null, { "data-testid": "batch-row", "data-batch": b.batch, "data-status": b.status });
    const action = el("td");
    if (b.status === "applied") {
      const button = el("button", "Roll back", { type: "button", "aria-label": `Roll back batch ${b.batch}` });
      button.addEventListener("click", () => rollBack(b.batch, button));
      action.append(button);
    }
    row.append(el("td", b.batch), statusCell(b.status), el("td", when(b.created_at)), el("td", when(b.applied_at)));
    row.append(el("td", when(b.rolled_back_at)), action);
    return row;
  });
}

function renderEdits(edits, total) {
  renderRows($("edits"), edits, (e) => {
    const row = el("tr", null, { "data-testid": "edit-row", "data-seq": e.seq, "data-status": e.status });
    const request = e.request ?? {};
    row.append(el("td", e.seq), statusCell(e.status), el("td", e.batch ?? ""));
    row.append(el("td", request.prompt), el("td", request.target_new), el("td", request.subject ?? ""));
    return row;
  });
  let note = "";
  if (!edits.length) note = "No edits yet.";
  else if (total > edits.length) note = `The first ${edits.length} of ${total} edits.`;
  $("edits-note").textContent = note;
}

// -- the forms ---------------------------------------------------------------------------------------
// Run `work` with the form's submit button disabled (no double submissions).
async function whileBusy(form, work) {
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  try {
    return await work();
  } finally {
    button.disabled = false;
  }
}

$("edit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  const request = { prompt: data.get("prompt"), target_new: data.get("target_new") };
  if (data.get("subject").trim()) request.subject = data.get("subject");
  whileBusy(form, async () => {
    try {
      const [edit] = (await api("POST", "/edits", { requests: [request] })).edits;
      say("edit-message", edit.duplicate ? `Already in the journal as edit ${edit.seq}.` : `Accepted as edit ${edit.seq}.`);
      form.reset();
    } catch (e) {
      say("edit-message", `Not accepted: ${e.message}`, true);
    }
    refresh();
  });
});

// A JSONL file: every non-blank line one request object. Lines that do not parse are reported with
// their numbers and nothing is sent; the rest goes in chunks, stopping at the first refused chunk.
function parseJsonl(text) {
  const requests = [];
  const errors = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim()) return;
    try {
      const value = JSON.parse(line);
      if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("not a JSON object");
      requests.push({ line: i + 1, request: value });
    } catch (e) {
      errors.push(`line ${i + 1}: ${e.message}`);
    }
  });
  return { requests, errors };
}

async function sendJsonl(file) {
  const { requests, errors } = parseJsonl(await file.text());
  if (errors.length) {
    const more = errors.length > 10 ? `; and ${errors.length - 10} more` : "";
    say("upload-message", `Nothing sent. ${errors.slice(0, 10).join("; ")}${more}`, true);
    return;
  }
  if (!requests.length) {
    say("upload-message", `Nothing sent: ${file.name} holds no requests.`, true);
    return;
  }
  let fresh = 0;
  let duplicates = 0;
  for (let start = 0; start < requests.length; start += CHUNK) {
    const chunk = requests.slice(start, start + CHUNK);
    const lines = `lines ${chunk[0].line}-${chunk[chunk.length - 1].line}`;
    say("upload-message", `Sending ${lines} of ${file.name}...`);
    try {
      const { edits } = await api("POST", "/edits", { requests: chunk.map((c) => c.request) });
      duplicates += edits.filter((e) => e.duplicate).length;
      fresh += edits.filter((e) => !e.duplicate).length;
    } catch (e) {
      say("upload-message", `Stopped at ${lines} (${fresh + duplicates} requests sent before them): ${e.message}`, true);
      return;
    }
  }
  say("upload-message", `Sent ${requests.length} requests from ${file.name}: ${fresh} new, ${duplicates} already in the journal.`);
}

$("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;
  whileBusy(event.target, async () => {
    await sendJsonl(file);
    refresh();
  });
});

async function rollBack(batch, button) {
  button.disabled = true;
  say("rollback-message", `Rolling back batch ${batch}...`);
  try {
    const done = await api("POST", "/rollback", { batch, replay: $("replay").checked });
    say("rollback-message", `Rolled back batch ${done.rolled_back.join(", ")}.`);
  } catch (e) {
    say("rollback-message", `Batch ${batch} not rolled back: ${e.message}`, true);
    button.disabled = false;
  }
  refresh();
}

// Ask the edited and the unedited model the same prompt, concurrently; each answer shows when it
// arrives, and the answers' aria-busy is "false" again once both are in.
async function ask(model, prompt, maxNewTokens) {
  const box = $(`answer-${model}`);
  say(box.id, "...");
  try {
    const answer = await api("POST", "/generate", { prompt, max_new_tokens: maxNewTokens, model });
    say(box.id, answer.text);
    if (model === "edited") $("edited-version").textContent = `(state ${answer.state_version})`;
  } catch (e) {
    say(box.id, e.message, true);
  }
}

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const data = new FormData(event.target);
  const prompt = data.get("prompt");
  const maxNewTokens = Number(data.get("max_new_tokens"));
  $("answers").setAttribute("aria-busy", "true");
  whileBusy(event.target, () => Promise.all(["edited", "base"].map((model) => ask(model, prompt, maxNewTokens)))).then(
    () => $("answers").setAttribute("aria-busy", "false"),
  );
});

// -- start -------------------------------------------------------------------------------------------
if (token()) showConsole();
else showLogin();
