"use strict";
// Leaderboard: the ratings of every vote so far, with their 95% bootstrap intervals.

async function load() {
  try {
    renderBoard($("board"), await getJSON("/web/leaderboard"));
    setStatus("");
  } catch (e) {
    setStatus(e.message, "error");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("refresh").addEventListener("click", load);
  load();
});
