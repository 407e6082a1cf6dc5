"use strict";
// Chat: a multi-turn conversation with one served model, streamed. The history is kept here and sent whole.

const history = [];
let controller = null;

function bubble(role, who, text) {
  const body = el("div", {class: "text"}, text);
  $("messages").append(el("div", {class: `msg ${role}`}, el("div", {class: "role", text: who}), body));
  return body;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("model").disabled = on;
}

async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  const model = $("model").value;
  history.push({role: "user", content: text});
  const asked = bubble("user", "you", text);
  $("prompt").value = "";
  const out = bubble("assistant", model, "");
  out.parentElement.classList.add("streaming");
  controller = new AbortController();
  busy(true);
  setStatus("");
  let answer = "";
  let problem = null;
  try {
    await streamNDJSON("/web/chat", {model, messages: history, temperature: Number($("temperature").value),
                                     max_tokens: Number($("max-tokens").value)},
                       d => { answer += d; out.textContent = answer; out.scrollIntoView({block: "end"}); },
                       controller.signal);
  } catch (e) {
    problem = e.name === "AbortError" ? null : e.message;
  }
  out.parentElement.classList.remove("streaming");
  if (answer.trim()) {
    history.push({role: "assistant", content: answer});
  } else {  // nothing to continue from: the turn leaves the history
    history.pop();
    asked.parentElement.classList.add("dropped");
    out.textContent = problem ? "" : "(no answer)";
  }
  if (problem) setStatus(problem, "error");
  out.parentElement.classList.add("done");
  controller = null;
  busy(false);
  $("prompt").focus();
}

async function init() {
  try {
    const cfg = await getJSON("/web/config");
    for (const m of cfg.models) $("model").append(el("option", {value: m, text: m}));
  } catch (e) {
    setStatus(e.message, "error");
  }
  $("send-form").addEventListener("submit", send);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("messages").replaceChildren();
    setStatus("");
  });
  $("prompt").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("send-form").requestSubmit(); }
  });
}

document.addEventListener("DOMContentLoaded", init);
