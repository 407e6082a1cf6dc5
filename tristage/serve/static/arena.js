"use strict";
// Arena: the server draws two anonymous models; both answers stream side by side; a vote reveals the names.

let battle = null;
const LABELS = {model_a: "A is better", model_b: "B is better", tie: "a tie", "tie (bothbad)": "both are bad"};

function voteButtons(on) {
  for (const b of $("vote").querySelectorAll("button")) b.disabled = !on;
}

function reset() {
  battle = null;
  for (const s of ["a", "b"]) {
    $(`answer-${s}`).replaceChildren();
    $(`answer-${s}`).classList.remove("streaming", "done");
    $(`name-${s}`).textContent = `Model ${s.toUpperCase()}`;
  }
  $("reveal").textContent = "";
  $("next").hidden = true;
  $("go").disabled = false;
  $("prompt").disabled = false;
  voteButtons(false);
}

async function side(id, s) {
  const box = $(`answer-${s}`);
  box.classList.add("streaming");
  let text = "";
  try {
    await streamNDJSON(`/web/arena/${id}/answer/${s}`, {}, d => { text += d; box.textContent = text; });
  } finally {
    box.classList.remove("streaming");
  }
  box.classList.add("done");
  if (!text) box.textContent = "(no answer)";
}

async function start(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || battle) return;
  reset();
  $("go").disabled = true;
  $("prompt").disabled = true;
  setStatus("");
  try {
    battle = (await postJSON("/web/arena/new", {messages: text})).battle;
    await Promise.all([side(battle, "a"), side(battle, "b")]);
    voteButtons(true);
    setStatus("Both answers are in: which is better?");
  } catch (e) {
    setStatus(e.message, "error");
    battle = null;
    $("go").disabled = false;
    $("prompt").disabled = false;
  }
}

async function vote(ev) {
  const winner = ev.currentTarget.dataset.winner;
  if (!battle) return;
  voteButtons(false);
  try {
    const r = await postJSON(`/web/arena/${battle}/vote`, {winner});
    $("name-a").textContent = `Model A: ${r.model_a}`;
    $("name-b").textContent = `Model B: ${r.model_b}`;
    $("reveal").textContent = `You voted: ${LABELS[winner]}. A was ${r.model_a}, B was ${r.model_b}.`;
    setStatus("");
    $("next").hidden = false;
    battle = null;
    renderBoard($("board"), await getJSON("/web/leaderboard"));
    $("board-wrap").hidden = false;
  } catch (e) {
    setStatus(e.message, "error");
    voteButtons(true);
  }
}

function init() {
  $("arena-form").addEventListener("submit", start);
  for (const b of $("vote").querySelectorAll("button")) b.addEventListener("click", vote);
  $("next").addEventListener("click", () => { reset(); $("prompt").value = ""; $("prompt").focus(); });
  $("prompt").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("arena-form").requestSubmit(); }
  });
}

document.addEventListener("DOMContentLoaded", init);
