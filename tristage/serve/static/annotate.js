"use strict";
// Annotate: a prompt and two or more answers (from the served models or a file); pick the best, rate each answer
// on every attribute 1-5, write a reason; saved to the vote store.

let cfg = null;
let queue = [];   // items from a file: {prompt: messages, answers: [{text, model}], attribute_set, attributes}
let item = null;  // the item on screen
const SCALE = [1, 2, 3, 4, 5];

function pretty(attr) { return attr.replace(/_/g, " "); }

function attributes() {
  const set = $("attr-set").value;
  return set === "custom" ? item.attributes : cfg.attribute_sets[set];
}

function renderPrompt(messages) {
  $("item-prompt").replaceChildren(...messages.map(m => el("div", {class: `turn ${m.role}`},
    el("span", {class: "role", text: m.role}), el("div", {class: "text"}, m.content))));
}

function renderSets() {
  const sel = $("attr-set");
  sel.replaceChildren();
  for (const name of Object.keys(cfg.attribute_sets)) {
    sel.append(el("option", {value: name, text: `${name}: ${cfg.attribute_sets[name].map(pretty).join(", ")}`}));
  }
  if (item.attribute_set === "custom") {
    sel.append(el("option", {value: "custom", text: `this file's: ${item.attributes.map(pretty).join(", ")}`}));
  }
  sel.value = item.attribute_set || cfg.default_attributes;
}

// One card per answer: its text (streamed in when `live`), "best" radio, a 1-5 radio row per attribute.
function renderAnswers() {
  const attrs = attributes();
  $("answers").replaceChildren(...item.answers.map((a, i) => {
    const text = el("div", {class: "text answer"}, a.text);
    a.box = text;
    const rows = attrs.map(attr => el("tr", {},
      el("th", {text: pretty(attr)}),
      ...SCALE.map(v => el("td", {}, el("label", {}, el("input", {type: "radio", name: `r-${i}-${attr}`,
                                                                 value: String(v)}), String(v))))));
    return el("section", {class: "card"},
      el("h3", {text: `Answer ${i + 1}`}), text,
      el("label", {class: "best"}, el("input", {type: "radio", name: "best", value: String(i)}), "Best answer"),
      el("table", {class: "ratings"}, el("tbody", {}, ...rows)));
  }));
}

function show(next) {
  item = next;
  $("rationale").value = "";
  if (!item) {
    $("item").hidden = true;
    return;
  }
  renderPrompt(item.prompt);
  renderSets();
  renderAnswers();
  $("item").hidden = false;
}

function queueStatus() {
  $("queue").textContent = queue.length ? `${queue.length} more in the queue` : "";
}

async function ask(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  const models = [...$("models").querySelectorAll("input:checked")].map(c => c.value);
  const per = Math.max(1, Math.min(4, Number($("per-model").value) || 1));
  if (!text.trim()) return setStatus("Write a prompt first.", "error");
  if (models.length * per < 2) return setStatus("Two or more answers are needed: pick two models, or more " +
                                                "answers per model.", "error");
  const answers = [];
  for (const m of models) for (let k = 0; k < per; k++) answers.push({text: "", model: m, seed: per > 1 ? k : null});
  show({prompt: [{role: "user", content: text}], answers, attribute_set: cfg.default_attributes});
  $("ask").disabled = true;
  $("save").disabled = true;
  setStatus("The models are answering...");
  try {
    await Promise.all(answers.map(a => streamNDJSON("/web/chat", {model: a.model, messages: text, seed: a.seed},
                                                     d => { a.text += d; a.box.textContent = a.text; })));
    const blank = answers.filter(a => !a.text.trim()).length;
    setStatus(blank ? `${blank} answer(s) came back empty: ask again.` : "All answers are in.", blank ? "error" : "");
  } catch (e) {
    setStatus(e.message, "error");
  } finally {
    $("ask").disabled = false;
    $("save").disabled = false;
  }
}

async function load(ev) {
  ev.preventDefault();
  const files = [...$("file").files];
  if (!files.length) return setStatus("Choose a file first.", "error");
  try {
    const payload = await Promise.all(files.map(async f => ({name: f.name, text: await f.text()})));
    const r = await postJSON("/web/annotate/parse", {files: payload});
    queue = r.items;
    setStatus(`Loaded ${r.items.length} prompts` + (r.fewer ? ` (${r.fewer} with fewer than two answers left out)` : ""));
    show(queue.shift());
    queueStatus();
  } catch (e) {
    setStatus(e.message, "error");
  }
}

async function save() {
  const attrs = attributes();
  const best = document.querySelector("input[name=best]:checked");
  const ratings = item.answers.map((a, i) => Object.fromEntries(attrs.map(attr => {
    const c = document.querySelector(`input[name="r-${i}-${attr}"]:checked`);
    return [attr, c ? Number(c.value) : null];
  })));
  const missing = ratings.reduce((n, r) => n + Object.values(r).filter(v => v === null).length, 0);
  if (!best) return setStatus("Pick the best answer.", "error");
  if (missing) return setStatus(`Rate every answer on every attribute (${missing} ratings missing).`, "error");
  if (!$("rationale").value.trim()) return setStatus("Write a short reason.", "error");
  try {
    const r = await postJSON("/web/annotate", {
      prompt: item.prompt, answers: item.answers.map(a => ({text: a.text, model: a.model || null})),
      best: Number(best.value), attributes: attrs, ratings, rationale: $("rationale").value});
    setStatus(`Saved annotation #${r.id} (${r.counts.annotations} in all).`, "ok");
    show(queue.shift() || null);
    queueStatus();
  } catch (e) {
    setStatus(e.message, "error");
  }
}

async function init() {
  try {
    cfg = await getJSON("/web/config");
  } catch (e) {
    return setStatus(e.message, "error");
  }
  for (const m of cfg.models) {
    $("models").append(el("label", {}, el("input", {type: "checkbox", value: m, checked: true}), m));
  }
  $("ask-form").addEventListener("submit", ask);
  $("upload-form").addEventListener("submit", load);
  $("save").addEventListener("click", save);
  $("skip").addEventListener("click", () => { show(queue.shift() || null); queueStatus(); setStatus(""); });
  $("attr-set").addEventListener("change", renderAnswers);
}

document.addEventListener("DOMContentLoaded", init);
