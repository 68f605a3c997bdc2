// The steering playground: a chat against this app's public endpoints only (GET /v1/models,
// POST /v1/chat/completions streamed, POST /v1/steer for best-of-n, POST /v1/score). The
// conversation, the sliders and the API key live in this tab's sessionStorage; nothing else is kept.
"use strict";

const STORE = "helpsteer-playground";
const API = new URL(".", window.location.href); // the app's root, wherever the page is served

const $ = (id) => document.getElementById(id);

const state = {
  model: null, // the entry of /v1/models
  names: [], // attribute names, schema order
  defaults: {}, // the profile's defaults
  range: [0, 4],
  conditioned: [], // what the model's attribute line carries; other sliders do nothing
  apm: [], // attributes the APM was trained on ([] without an APM)
  attributes: {}, // name -> value, or null when left out
  messages: [], // OpenAI messages of this conversation
  replies: {}, // index of an assistant message -> {requested, scores, levels, bestOf}
  busy: null, // AbortController of the request in flight
  connectedKey: null, // the API key the last successful /v1/models call was made with
};

function save() {
  const kept = { attributes: state.attributes, messages: state.messages, replies: state.replies };
  sessionStorage.setItem(STORE, JSON.stringify(kept));
  sessionStorage.setItem(`${STORE}-key`, $("key").value);
}

function restore() {
  $("key").value = sessionStorage.getItem(`${STORE}-key`) || "";
  try {
    const kept = JSON.parse(sessionStorage.getItem(STORE) || "{}");
    state.attributes = kept.attributes || {};
    state.messages = kept.messages || [];
    state.replies = kept.replies || {};
  } catch {
    sessionStorage.removeItem(STORE);
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  const banner = $("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

function status(text) {
  $("status").textContent = text;
}

// The error body is OpenAI's shape ({"error": {"message", ...}}); anything else is shown raw.
async function failure(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch {
    // not JSON
  }
  return `${response.status}: ${text || response.statusText}`;
}

async function call(path, body, signal) {
  const response = await fetch(new URL(path, API), {
    method: body === undefined ? "GET" : "POST",
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new Error(await failure(response));
  return response;
}

// --- attributes -------------------------------------------------------------------------------

function requested() {
  const chosen = {};
  for (const name of state.names) chosen[name] = state.attributes[name] ?? null;
  return chosen;
}

function resetAttributes() {
  state.attributes = {};
  for (const name of state.names) state.attributes[name] = state.defaults[name] ?? null;
}

function renderSliders() {
  const box = $("sliders");
  box.replaceChildren();
  const [low, high] = state.range;
  for (const name of state.names) {
    const value = state.attributes[name];
    const row = document.createElement("div");
    row.className = value === null ? "slider off" : "slider";
    row.dataset.attribute = name;
    const on = document.createElement("input");
    on.type = "checkbox";
    on.checked = value !== null;
    on.title = `send ${name}`;
    on.setAttribute("aria-label", `send ${name}`);
    const label = document.createElement("span");
    label.textContent = name;
    if (!state.conditioned.includes(name)) {
      row.classList.add("unconditioned");
      row.title = `the model was trained without ${name} in its attribute line: it is left out of the prompt`;
    }
    const slider = document.createElement("input");
    slider.type = "range";
    slider.name = name;
    slider.min = low;
    slider.max = high;
    slider.step = 1;
    slider.value = value ?? state.defaults[name] ?? Math.round((low + high) / 2);
    slider.disabled = value === null;
    slider.setAttribute("aria-label", name);
    const shown = document.createElement("output");
    shown.textContent = value === null ? "-" : String(value);
    slider.addEventListener("input", () => {
      state.attributes[name] = Number(slider.value);
      shown.textContent = slider.value;
      save();
    });
    on.addEventListener("change", () => {
      state.attributes[name] = on.checked ? Number(slider.value) : null;
      renderSliders();
      save();
    });
    row.append(on, label, slider, shown);
    box.append(row);
  }
}

// --- messages ---------------------------------------------------------------------------------

function drawScores(item, reply) {
  item.querySelector(".scores")?.remove();
  if (!reply.scores) return;
  const block = $("scores-template").content.firstElementChild.cloneNode(true);
  const rows = block.querySelector(".score-rows");
  const [low, high] = state.range;
  const at = (v) => `${(100 * (Math.min(Math.max(v, low), high) - low)) / (high - low)}%`;
  // The bar is where the APM's score falls on the model's own levels (a model trained on ranked
  // APM levels learnt level k from a band of scores, /v1/models `level_cuts`), which is what a
  // slider value asks for; the raw score is printed beside it when the two differ.
  const levels = reply.levels || reply.scores;
  for (const [name, score] of Object.entries(reply.scores)) {
    const want = reply.requested[name];
    const level = levels[name] ?? score;
    const row = document.createElement("div");
    row.className = "score-row";
    row.dataset.attribute = name;
    row.dataset.score = String(score);
    row.dataset.level = String(level);
    const label = document.createElement("span");
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = at(level);
    track.append(bar);
    if (want !== undefined && want !== null) {
      const tick = document.createElement("div");
      tick.className = "tick";
      tick.style.left = at(want);
      tick.title = `requested ${want}`;
      track.append(tick);
    }
    const figures = document.createElement("span");
    figures.className = "figures";
    const shown = level === score ? score.toFixed(2) : `level ${level} (APM ${score.toFixed(2)})`;
    figures.textContent = `${shown}${want === undefined || want === null ? "" : ` / ${want}`}`;
    row.append(label, track, figures);
    rows.append(row);
  }
  item.append(block);
}

function meta(reply) {
  const asked = Object.entries(reply.requested)
    .filter(([, v]) => v !== null)
    .map(([k, v]) => `${k} ${v}`)
    .join(", ");
  const how = reply.bestOf ? `best of ${reply.bestOf}, distance ${reply.distance}` : "streamed";
  return `${how}; asked: ${asked}`;
}

function addMessage(message, index) {
  const item = document.createElement("li");
  item.className = message.role;
  item.dataset.index = String(index);
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = message.content;
  item.append(text);
  const reply = state.replies[index];
  if (reply) {
    const line = document.createElement("div");
    line.className = "meta muted";
    line.textContent = meta(reply);
    item.append(line);
    drawScores(item, reply);
  }
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function renderMessages() {
  $("messages").replaceChildren();
  state.messages.forEach((message, index) => addMessage(message, index));
}

// --- asking -----------------------------------------------------------------------------------

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function decoding() {
  return {
    max_tokens: Number($("max-tokens").value) || undefined,
    temperature: Number($("temperature").value),
  };
}

async function streamed(history, attributes, text, signal) {
  const response = await call(
    "v1/chat/completions",
    { messages: history, attributes, stream: true, ...decoding() },
    signal,
  );
  let answer = "";
  for await (const chunk of events(response)) {
    if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        text.textContent = answer;
      }
    }
  }
  return { answer, reply: { requested: attributes } };
}

async function bestOf(history, attributes, text, signal) {
  const candidates = Number($("candidates").value) || 4;
  const response = await call(
    "v1/steer",
    { messages: history, attributes, candidates, ...decoding() },
    signal,
  );
  const body = await response.json();
  text.textContent = body.response;
  return {
    answer: body.response,
    reply: {
      requested: attributes,
      scores: body.scores,
      levels: body.levels,
      bestOf: candidates,
      distance: body.distance,
    },
  };
}

async function scoreOf(history, answer, signal) {
  if (!state.apm.length || !answer) return null;
  const response = await call("v1/score", { messages: history, responses: [answer] }, signal);
  const body = await response.json();
  return { scores: body.data[0].attributes, levels: body.data[0].levels };
}

async function ask(prompt) {
  showError("");
  const history = [...state.messages, { role: "user", content: prompt }];
  addMessage(history[history.length - 1], history.length - 1);
  const item = addMessage({ role: "assistant", content: "" }, history.length);
  const text = item.querySelector(".text");
  const attributes = Object.fromEntries(Object.entries(requested()).filter(([, v]) => v !== null));
  const controller = new AbortController();
  state.busy = controller;
  setBusy(true);
  const best = $("best-of").checked;
  status(best ? "sampling candidates and ranking them with the APM..." : "streaming...");
  try {
    const asked = best ? bestOf : streamed;
    const { answer, reply } = await asked(history, attributes, text, controller.signal);
    if (!reply.scores) {
      status("scoring the answer with the APM...");
      Object.assign(reply, await scoreOf(history, answer, controller.signal));
    }
    state.messages = [...history, { role: "assistant", content: answer }];
    state.replies[history.length] = reply;
    item.remove();
    addMessage(state.messages[history.length], history.length);
    save();
    status(state.apm.length ? "" : "this server has no APM: answers are not scored");
  } catch (error) {
    item.remove();
    $("messages").lastElementChild?.remove();
    $("prompt").value = prompt;
    showError(error.name === "AbortError" ? "stopped" : `request failed: ${error.message}`);
    status("");
  } finally {
    state.busy = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// --- start ------------------------------------------------------------------------------------

async function connect() {
  showError("");
  try {
    const body = await (await call("v1/models")).json();
    const model = body.data[0];
    state.model = model;
    state.names = model.attributes.names;
    state.defaults = model.attributes.defaults;
    state.range = model.attributes.range;
    state.conditioned = model.attributes.conditioned_on || state.names;
    state.apm = model.apm ? model.apm.trained_attributes : [];
    $("model").textContent = `model ${model.id}${model.apm ? ", with an APM" : ", no APM"}`;
    $("profile").textContent = `${model.attributes.profile} (${Object.entries(state.defaults)
      .map(([k, v]) => `${k} ${v}`)
      .join(", ")})`;
    if (!Object.keys(state.attributes).length) resetAttributes();
    $("best-of").disabled = !state.apm.length;
    const cap = model.max_tokens;
    $("max-tokens").max = cap;
    // Only the page's own default is lowered to the cap; a value the user typed is sent as typed,
    // and the server says why it refuses it.
    if (state.connectedKey === null && Number($("max-tokens").value) > cap) $("max-tokens").value = cap;
    state.connectedKey = $("key").value.trim();
    renderSliders();
    renderMessages();
    $("send").disabled = false;
    status("ready");
  } catch (error) {
    $("send").disabled = true;
    const needsKey = error.message.startsWith("401");
    showError(needsKey ? `This server needs an API key: enter it above. (${error.message})` : error.message);
    if (needsKey) $("key").focus();
  }
}

function start() {
  restore();
  $("send").disabled = true;
  $("key").addEventListener("change", () => {
    save();
    // The browser fires "change" again when the field loses focus; reconnect only for a new key.
    if ($("key").value.trim() !== state.connectedKey) connect();
  });
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.busy) return;
    $("prompt").value = "";
    ask(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.busy?.abort());
  $("clear").addEventListener("click", () => {
    state.messages = [];
    state.replies = {};
    save();
    renderMessages();
  });
  $("reset").addEventListener("click", () => {
    resetAttributes();
    renderSliders();
    save();
  });
  connect();
}

start();
