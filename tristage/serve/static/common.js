"use strict";
// Shared by every page. Text from users and models only ever enters the page as text: `el` sets textContent and
// appends strings as Text nodes; nothing here (or in any page script) parses a string as HTML.

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, "");
    else if (v !== false && v != null) e.setAttribute(k, String(v));
  }
  for (const c of children) if (c != null) e.append(c);  // a string becomes a Text node
  return e;
}

function $(id) { return document.getElementById(id); }

async function errorOf(resp) {
  let msg = `${resp.status} ${resp.statusText}`;
  try {
    const j = await resp.json();
    msg = (j.error && (j.error.message || j.error)) || j.detail || msg;
  } catch (e) { /* not JSON: keep the status line */ }
  return typeof msg === "string" ? msg : JSON.stringify(msg);
}

// fetch, and where the server asks for its API key (tristage serve --api-key: a 401), ask the user once, keep it as
// the cookie the server reads on /web/* and try again.
async function keyed(url, opts) {
  let resp = await fetch(url, opts);
  if (resp.status === 401) {
    const key = window.prompt("This server asks for its API key (tristage serve --api-key):");
    if (key) {
      document.cookie = "tristage_key=" + encodeURIComponent(key) + "; path=/; SameSite=Strict";
      resp = await fetch(url, opts);
    }
  }
  return resp;
}

async function getJSON(url) {
  const resp = await keyed(url);
  if (!resp.ok) throw new Error(await errorOf(resp));
  return resp.json();
}

async function postJSON(url, body) {
  const resp = await keyed(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body)});
  if (!resp.ok) throw new Error(await errorOf(resp));
  return resp.json();
}

// POST `body` to `url` and read its NDJSON answer: onDelta(text) per {"delta"}, resolves on {"done"}, throws on
// {"error"} or an early end.
async function streamNDJSON(url, body, onDelta, signal) {
  const resp = await keyed(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body), signal});
  if (!resp.ok) throw new Error(await errorOf(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (!line.trim()) continue;
      const msg = JSON.parse(line);
      if (msg.delta !== undefined) onDelta(msg.delta);
      else if (msg.error !== undefined) throw new Error(msg.error);
      else if (msg.done) return;
    }
  }
  throw new Error("the answer stopped before its end");
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text || "";
  s.className = "status" + (kind ? " " + kind : "");
}

function buildNav() {
  const nav = $("nav");
  const page = nav.dataset.page;
  const links = [["chat", "/chat", "Chat"], ["arena", "/arena", "Arena"], ["leaderboard", "/leaderboard", "Leaderboard"],
                 ["annotate", "/annotate", "Annotate"]];
  nav.append(el("span", {class: "brand", text: "tristage"}));
  for (const [name, href, label] of links) {
    nav.append(el("a", {href, class: name === page ? "active" : "", text: label}));
  }
}

function bound(x, inf) { return x === null || x === undefined ? inf : Math.round(x).toString(); }

// The leaderboard rows of /web/leaderboard as a table.
function renderBoard(container, board) {
  container.replaceChildren();
  if (!board.rows.length) {
    container.append(el("p", {class: "empty", text: "No votes yet: vote in the arena."}));
    return;
  }
  const head = el("tr", {}, ...["rank", "model", "rating", "95% interval", "battles", "W / L / T"].map(
    h => el("th", {class: h === "model" ? "" : "num", text: h})));
  const body = board.rows.map(r => el("tr", {},
    el("td", {class: "num", text: String(r.rank)}), el("td", {class: "model", text: r.model}),
    el("td", {class: "num rating", text: bound(r.rating, "?")}),
    el("td", {class: "num", text: `${bound(r.lower, "−∞")} .. ${bound(r.upper, "+∞")}`}),
    el("td", {class: "num", text: String(r.battles)}),
    el("td", {class: "num", text: `${r.wins} / ${r.losses} / ${r.ties}`})));
  container.append(el("table", {class: "board"}, el("thead", {}, head), el("tbody", {}, ...body)),
                   el("p", {class: "caption", text: `Bradley-Terry ratings from ${board.battles} votes; ` +
                     `95% intervals from ${board.bootstrap} bootstrap rounds.`}));
  for (const note of board.notes) container.append(el("p", {class: "note", text: "note: " + note}));
}

document.addEventListener("DOMContentLoaded", buildNav);
