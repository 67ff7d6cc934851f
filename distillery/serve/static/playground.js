// distillery playground: Write, Fill-mask and Side by side, in plain JavaScript.
// Everything it needs comes from the server that serves it: the model list, TGI's streaming
// route for generation and the Inference API route for fill-mask.
"use strict";

// ---------------------------------------------------------------- the server's API

const api = {
  // [{name, task, maskToken}] for every served model.
  async models() {
    const body = await requestJson("/v1/models");
    return body.data.map((m) => ({
      name: m.id,
      task: m.task || "text-generation",
      maskToken: m.mask_token || null,
    }));
  },

  // TGI's /generate_stream: yields each event ({token, generated_text, details}) as it arrives.
  async *generateStream(model, inputs, parameters, signal) {
    const response = await fetch("/generate_stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ model, inputs, parameters }),
      signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of serverSentEvents(response.body)) {
      if (event.error) throw new Error(event.error);
      yield event;
    }
  },

  // The Inference API's fill-mask: one list of fillers per mask token in the text.
  async fillMask(model, text, topK) {
    const body = await requestJson(`/models/${encodeURIComponent(model)}`, {
      inputs: text,
      parameters: { top_k: topK },
    });
    return Array.isArray(body[0]) ? body : [body];
  },
};

async function requestJson(url, payload) {
  const init = payload === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  };
  const response = await fetch(url, init);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// One line from an error response in any of the server's dialects (TGI's {"error", "error_type"},
// the Inference API's {"error"}, OpenAI's {"error": {"message"}}).
async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error ?? body.detail ?? body;
    return typeof error === "string" ? error : error.message || JSON.stringify(error);
  } catch {
    return `${response.status} ${response.statusText}: ${text.slice(0, 200)}`;
  }
}

// Server-sent events from a fetch body (EventSource cannot POST): events are separated by a
// blank line, and an event's data is its `data:` lines joined by newlines.
async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line[5] === " " ? 6 : 5))
          .join("\n");
        if (data && data !== "[DONE]") yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// TGI's sampling parameters: temperature 0 means greedy (TGI refuses temperature 0 itself), and
// top_p must be below 1 to mean anything.
function generationParameters({ maxTokens, temperature, topP }) {
  const parameters = { max_new_tokens: maxTokens };
  if (temperature > 0) {
    parameters.do_sample = true;
    parameters.temperature = temperature;
    if (topP < 1) parameters.top_p = topP;
  }
  return parameters;
}

// Streams a generation, calling onToken(text) per visible token; resolves to
// {tokens, firstTokenMs, totalMs, lastTokenMs, stopped} where stopped says the time ran out.
async function streamGeneration(model, prompt, settings, onToken, signal, maxSeconds) {
  const controller = new AbortController();
  const abort = () => controller.abort();
  signal?.addEventListener("abort", abort);
  let timedOut = false;
  const timer = maxSeconds ? setTimeout(() => { timedOut = true; controller.abort(); }, maxSeconds * 1000) : null;
  const start = performance.now();
  const result = { tokens: 0, firstTokenMs: null, lastTokenMs: null, totalMs: 0, stopped: false };
  try {
    for await (const event of api.generateStream(model, prompt, generationParameters(settings), controller.signal)) {
      if (!event.token) continue;
      const now = performance.now() - start;
      result.tokens += 1;
      if (result.firstTokenMs === null) result.firstTokenMs = now;
      result.lastTokenMs = now;
      if (!event.token.special) onToken(event.token.text);
    }
  } catch (error) {
    if (!(error.name === "AbortError" && (timedOut || signal?.aborted))) throw error;
    result.stopped = timedOut;
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", abort);
    result.totalMs = performance.now() - start;
  }
  return result;
}

// ---------------------------------------------------------------- page plumbing

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);
let models = [];

function showView(name) {
  for (const tab of document.querySelectorAll("nav [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== name;
  if (name !== "write") write.dismiss();
  if (name === "write") $("editor").focus();
  history.replaceState(null, "", `#${name}`);
}

function fillModelSelects() {
  for (const select of document.querySelectorAll("select[data-task]")) {
    const fitting = models.filter((m) => m.task === select.dataset.task);
    select.replaceChildren(...fitting.map((m) => new Option(m.name, m.name)));
    if (!fitting.length) select.append(new Option(`no ${select.dataset.task} model served`, ""));
    select.disabled = !fitting.length;
  }
  // A student is usually the smaller, distilled one: pick one by name, and a teacher apart from it.
  const generators = models.filter((m) => m.task === "text-generation").map((m) => m.name);
  const student = generators.find((n) => /distil|student|small|tiny/i.test(n)) ?? generators[1] ?? generators[0];
  const teacher = generators.find((n) => n !== student) ?? student;
  if (teacher) $("teacher-model").value = teacher;
  if (student) $("student-model").value = student;
}

function showRangeValues() {
  for (const output of document.querySelectorAll("output[data-for]")) {
    const input = $(output.dataset.for);
    const show = () => { output.textContent = input.value; };
    input.addEventListener("input", show);
    show();
  }
}

// ---------------------------------------------------------------- Write

const write = {
  controller: null,
  items: [],     // [{element, text}]
  selected: 0,
  anchor: 0,     // the cursor position the suggestions continue from

  settings() {
    return {
      model: $("write-model").value,
      temperature: Number($("write-temperature").value),
      topP: Number($("write-top-p").value),
      maxTokens: Number($("write-max-tokens").value),
      maxSeconds: Number($("write-max-time").value),
    };
  },

  // Tab: three continuations of the text before the cursor, each streamed into its own line (one
  // when greedy: the three would be the same).
  suggest() {
    this.dismiss();
    const editor = $("editor");
    const settings = this.settings();
    if (!settings.model) return;
    this.anchor = editor.selectionStart;
    const context = editor.value.slice(0, this.anchor);
    const list = $("suggestions");
    this.controller = new AbortController();
    const signal = this.controller.signal;
    const count = settings.temperature > 0 ? 3 : 1;
    this.items = Array.from({ length: count }, (_, i) => {
      const element = document.createElement("li");
      element.dataset.testid = "suggestion";
      element.className = "streaming";
      element.addEventListener("mousedown", (event) => {
        event.preventDefault();  // keep the editor's cursor where it is
        this.insert(i);
      });
      return { element, text: "" };
    });
    list.replaceChildren(...this.items.map((item) => item.element));
    list.hidden = false;
    this.select(0);
    for (const item of this.items) {
      streamGeneration(settings.model, context, settings, (piece) => {
        item.text += piece;
        item.element.textContent = item.text;
      }, signal, settings.maxSeconds)
        .then(() => { item.element.classList.remove("streaming"); item.element.dataset.done = "true"; })
        .catch((error) => {
          item.element.className = "failed";
          item.element.dataset.done = "true";
          item.element.textContent = error.message;
        });
    }
  },

  select(index) {
    if (!this.items.length) return;
    this.selected = (index + this.items.length) % this.items.length;
    this.items.forEach((item, i) => item.element.setAttribute("aria-selected", String(i === this.selected)));
  },

  insert(index) {
    const item = this.items[index];
    if (!item || item.element.classList.contains("failed")) return;
    const editor = $("editor");
    editor.setRangeText(item.text, this.anchor, this.anchor, "end");
    this.dismiss();
    editor.focus();
  },

  // Escape, typing or leaving: stop the streams (the server sees the clients go) and hide the list.
  dismiss() {
    this.controller?.abort();
    this.controller = null;
    this.items = [];
    const list = $("suggestions");
    list.hidden = true;
    list.replaceChildren();
  },

  onKey(event) {
    const open = this.items.length > 0;
    if (event.key === "Tab" && !event.shiftKey && !event.ctrlKey && !event.altKey && !event.metaKey) {
      event.preventDefault();
      this.suggest();
    } else if (open && event.key === "ArrowDown") {
      event.preventDefault();
      this.select(this.selected + 1);
    } else if (open && event.key === "ArrowUp") {
      event.preventDefault();
      this.select(this.selected - 1);
    } else if (open && event.key === "Enter") {
      event.preventDefault();
      this.insert(this.selected);
    } else if (open && (event.key === "Escape" || event.key.length === 1 || event.key === "Backspace")) {
      if (event.key === "Escape") event.preventDefault();
      this.dismiss();
    }
  },
};

// ---------------------------------------------------------------- Fill-mask

const fill = {
  debounce: null,
  generation: 0,     // answers to an older request are dropped
  shownMask: null,   // the mask token the text was written with

  maskToken() {
    const model = models.find((m) => m.name === $("fill-model").value);
    return model?.maskToken || "<mask>";
  },

  // A model's mask token replaces the one the text was written with (RoBERTa's <mask>, BERT's [MASK]).
  useModelMask() {
    const text = $("fill-text");
    const mask = this.maskToken();
    if (this.shownMask && this.shownMask !== mask) text.value = text.value.split(this.shownMask).join(mask);
    this.shownMask = mask;
  },

  async run() {
    const model = $("fill-model").value;
    const text = $("fill-text").value;
    const mask = this.maskToken();
    const hint = $("fill-hint");
    const results = $("fill-results");
    if (!model) return;
    if (!text.includes(mask)) {
      hint.textContent = `Put ${mask} where a word is missing.`;
      results.replaceChildren();
      return;
    }
    hint.textContent = `The top fillers of ${mask}, by the model's probability.`;
    const generation = ++this.generation;
    const topK = Math.max(1, Math.min(50, Number($("fill-top-k").value) || 5));
    $("fill-run").disabled = true;
    try {
      const masks = await api.fillMask(model, text, topK);
      if (generation !== this.generation) return;
      results.replaceChildren(...masks.map((fillers, i) => fillTable(fillers, masks.length > 1 ? i + 1 : null)));
    } catch (error) {
      if (generation !== this.generation) return;
      const message = document.createElement("p");
      message.className = "error";
      message.dataset.testid = "fill-error";
      message.textContent = error.message;
      results.replaceChildren(message);
    } finally {
      if (generation === this.generation) $("fill-run").disabled = false;
    }
  },

  runSoon() {
    clearTimeout(this.debounce);
    this.debounce = setTimeout(() => this.run(), 350);
  },
};

function fillTable(fillers, maskNumber) {
  const table = document.createElement("table");
  table.className = "fill-table";
  table.dataset.testid = "fill-table";
  if (maskNumber !== null) table.createCaption().textContent = `Mask ${maskNumber}`;
  const head = table.createTHead().insertRow();
  for (const title of ["Token", "Against the first", "Score"]) {
    const th = document.createElement("th");
    th.textContent = title;
    head.append(th);
  }
  const body = table.createTBody();
  const best = Math.max(...fillers.map((f) => f.score), 1e-9);
  for (const filler of fillers) {
    const row = body.insertRow();
    row.dataset.testid = "fill-row";
    row.title = filler.sequence;
    const token = row.insertCell();
    token.className = "token";
    token.textContent = filler.token_str;
    const bar = row.insertCell();
    bar.className = "bar";
    const track = document.createElement("div");
    track.className = "bar-track";
    const fillBar = document.createElement("div");
    fillBar.className = "bar-fill";
    // Bars are scaled to the best filler so that small probabilities stay visible; the number is exact.
    fillBar.style.width = `${(100 * filler.score) / best}%`;
    track.append(fillBar);
    bar.append(track);
    const score = row.insertCell();
    score.className = "score";
    // Four decimals, or a power of ten for the tiny scores an untrained model spreads over its vocabulary.
    score.textContent = filler.score >= 1e-4 ? filler.score.toFixed(4) : filler.score.toExponential(2);
  }
  return table;
}

// ---------------------------------------------------------------- Side by side

const compare = {
  controller: null,

  async run() {
    this.controller?.abort();
    this.controller = new AbortController();
    const signal = this.controller.signal;
    const prompt = $("compare-prompt").value;
    const settings = {
      maxTokens: Math.max(1, Number($("compare-max-tokens").value) || 48),
      temperature: Math.max(0, Number($("compare-temperature").value) || 0),
      topP: 1,
    };
    const panes = ["teacher", "student"].map((role) => ({ role, model: $(`${role}-model`).value }));
    const runPane = (pane) => this.runPane(pane, prompt, settings, signal);
    $("compare-run").disabled = true;
    $("compare-summary").textContent = "";
    for (const pane of panes) this.reset(pane, prompt);
    try {
      let results;
      if ($("compare-one-at-a-time").checked) {
        results = [];
        for (const pane of panes) results.push(await runPane(pane));
      } else {
        results = await Promise.all(panes.map(runPane));
      }
      const [teacher, student] = results.map((result) => result && decodingRate(result));
      if (!signal.aborted && teacher && student) {
        $("compare-summary").textContent =
          `The student decodes ${(student / teacher).toFixed(1)}× as many tokens per second as the teacher.`;
      }
    } finally {
      if (this.controller?.signal === signal) $("compare-run").disabled = false;
    }
  },

  reset({ role }, prompt) {
    const text = $(`${role}-text`);
    const promptSpan = document.createElement("span");
    promptSpan.className = "prompt";
    promptSpan.textContent = prompt;
    text.replaceChildren(promptSpan, document.createElement("span"));
    const stats = $(`${role}-stats`);
    stats.textContent = "waiting…";
    stats.classList.remove("error");
    delete stats.dataset.done;
  },

  async runPane({ role, model }, prompt, settings, signal) {
    const generated = $(`${role}-text`).lastChild;
    const stats = $(`${role}-stats`);
    stats.textContent = "generating…";
    const show = (result, running) => {
      stats.replaceChildren(...statsLine(result, running));
    };
    let tokens = 0;
    const start = performance.now();
    let first = null;
    try {
      const result = await streamGeneration(model, prompt, settings, (piece) => {
        generated.textContent += piece;
        tokens += 1;
        const now = performance.now() - start;
        first ??= now;
        show({ tokens, firstTokenMs: first, lastTokenMs: now }, true);
      }, signal);
      if (signal.aborted) return null;
      show(result, false);
      stats.dataset.done = "true";
      return result;
    } catch (error) {
      if (signal.aborted) return null;
      stats.textContent = error.message;
      stats.classList.add("error");
      stats.dataset.done = "true";
      return null;
    }
  },
};

// "48 tokens · 41.3 tokens/s · first token 52 ms": tokens/s counts the tokens after the first over
// the time after the first (the decoding rate, as TGI reports it); the first token's wait is the
// prompt's processing and stands apart.
function decodingRate({ tokens, firstTokenMs, lastTokenMs }) {
  return tokens >= 2 && lastTokenMs > firstTokenMs ? ((tokens - 1) * 1000) / (lastTokenMs - firstTokenMs) : null;
}

function statsLine(result, running) {
  const { tokens, firstTokenMs } = result;
  const parts = [];
  const strong = (text) => {
    const element = document.createElement("strong");
    element.textContent = text;
    return element;
  };
  parts.push(strong(`${tokens}`), ` token${tokens === 1 ? "" : "s"}`);
  const rate = decodingRate(result);
  if (rate !== null) parts.push(" · ", strong(rate.toFixed(1)), " tokens/s");
  if (firstTokenMs !== null) parts.push(` · first token ${Math.round(firstTokenMs)} ms`);
  if (running) parts.push(" …");
  return parts;
}

// ---------------------------------------------------------------- start

async function start() {
  for (const tab of document.querySelectorAll("nav [role=tab]")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  showRangeValues();
  const editor = $("editor");
  editor.addEventListener("keydown", (event) => write.onKey(event));
  editor.addEventListener("blur", () => write.dismiss());
  editor.addEventListener("mousedown", () => write.dismiss());

  $("fill-model").addEventListener("change", () => { fill.useModelMask(); fill.run(); });
  $("fill-form").addEventListener("submit", (event) => { event.preventDefault(); fill.run(); });
  $("fill-text").addEventListener("input", () => fill.runSoon());
  $("fill-top-k").addEventListener("change", () => fill.run());
  $("compare-form").addEventListener("submit", (event) => { event.preventDefault(); compare.run(); });

  try {
    models = await api.models();
    fillModelSelects();
    fill.shownMask = "<mask>";  // the example text's
    fill.useModelMask();
  } catch (error) {
    const banner = $("server-error");
    banner.textContent = `Could not list the served models: ${error.message}`;
    banner.hidden = false;
  }
  const initial = location.hash.slice(1);
  showView(["write", "fill-mask", "side-by-side"].includes(initial) ? initial : "write");
  document.body.dataset.ready = "true";
}

start();
