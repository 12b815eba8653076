// The playground: one question asked of both models at once, each answer streamed in over the
// server's OpenAI-compatible SSE endpoint (fetch + ReadableStream), the passages of the `rag`
// answer with the answer's words marked, and the run's key metrics. No library, no network
// beyond this server. Text from the server is only ever set as textContent, never as HTML.
"use strict";

const KEY_STORE = "lmpipeline-api-key"; // sessionStorage: forgotten when the tab closes
// Words too common to be worth marking in a passage.
const COMMON = new Set(
  "a an and are as at be by for from has in is it its of on or that the this to was were with"
    .split(" "),
);
const WORD = /[\p{L}\p{N}][\p{L}\p{N}'-]*/gu;

const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function refusal(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// The `data:` payloads of a server-sent event stream, parsed, up to [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice("data: ".length);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function settings() {
  const body = { temperature: Number($("temperature").value || 0) };
  const max = $("max-tokens").value;
  if (max) body.max_tokens = Number(max);
  return body;
}

// Streams `model`'s answer to `question` into its box; resolves to the answer's text.
async function answer(model, question) {
  const box = $(`answer-${model}`);
  const text = box.querySelector(".text");
  const status = box.querySelector(".status");
  box.dataset.state = "streaming";
  text.textContent = "";
  status.textContent = "waiting for the model…";
  const started = performance.now();
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model,
        messages: [{ role: "user", content: question }],
        stream: true,
        ...settings(),
      }),
    });
    if (!response.ok) throw new Error(await refusal(response));
    let finish = null;
    let usage = null;
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.passages) showPassages(chunk.passages);
      const choice = chunk.choices[0];
      if (choice.delta.content) {
        text.textContent += choice.delta.content;
        status.textContent = "streaming…";
      }
      if (choice.finish_reason) [finish, usage] = [choice.finish_reason, chunk.usage];
    }
    if (finish === null) throw new Error("the stream ended before the answer did");
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    status.textContent = `${usage.completion_tokens} tokens in ${seconds} s (${finish})`;
    box.dataset.state = "done";
    return text.textContent;
  } catch (err) {
    status.textContent = `error: ${err.message}`;
    box.dataset.state = "error";
    return "";
  }
}

function showPassages(passages) {
  const list = $("passages");
  list.replaceChildren(
    ...passages.map((p) => {
      const item = document.createElement("li");
      item.dataset.testid = "passage";
      item.dataset.id = p.id;
      const id = document.createElement("span");
      id.className = "passage-id";
      id.textContent = p.id;
      const score = document.createElement("span");
      score.className = "score";
      score.dataset.testid = "score";
      score.textContent = p.score.toFixed(3);
      const body = document.createElement("p");
      body.className = "passage-text";
      body.textContent = p.text;
      item.append(id, score, body);
      return item;
    }),
  );
}

// Marks, in every passage shown, the words that the answer uses (common words aside).
function highlight(answerText) {
  const words = new Set(
    (answerText.toLowerCase().match(WORD) || []).filter((w) => !COMMON.has(w)),
  );
  for (const body of document.querySelectorAll("#passages .passage-text")) {
    const text = body.textContent;
    const parts = [];
    let at = 0;
    for (const match of text.matchAll(WORD)) {
      if (!words.has(match[0].toLowerCase())) continue;
      parts.push(text.slice(at, match.index));
      const mark = document.createElement("mark");
      mark.textContent = match[0];
      parts.push(mark);
      at = match.index + match[0].length;
    }
    parts.push(text.slice(at));
    body.replaceChildren(...parts);
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value;
  $("ask").disabled = true;
  $("passages").replaceChildren();
  if (!$("metrics").tBodies[0].rows.length) showMetrics(); // refused before a key was typed
  try {
    // Both at once: the server answers one after the other, the page shows whichever streams.
    const [, withPassages] = await Promise.all([answer("sft", question), answer("rag", question)]);
    highlight(withPassages);
  } finally {
    $("ask").disabled = false;
  }
}

async function showSystem() {
  try {
    const health = await (await fetch("health")).json();
    $("system").textContent = `${health.backend} system, ${health.retriever} retrieval`;
    if (health.api_key && !$("api-key").value) $("api-key").placeholder = "required";
  } catch {
    $("system").textContent = "server unreachable";
  }
}

async function showMetrics() {
  const note = $("metrics-note");
  const body = $("metrics").tBodies[0];
  body.replaceChildren();
  const response = await fetch("v1/metrics", { headers: headers() });
  if (!response.ok) {
    note.textContent = await refusal(response);
    return;
  }
  const rows = (await response.json()).data;
  note.textContent = rows.length ? "" : "no metrics found (run `make repro`)";
  for (const row of rows) {
    const tr = body.insertRow();
    for (const cell of [row.stage, row.metric, row.value]) tr.insertCell().textContent = cell;
  }
}

$("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("input", () => {
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
});
$("api-key").addEventListener("change", showMetrics);
$("ask-form").addEventListener("submit", ask);
showSystem();
showMetrics();
