// Shared by every page: JSON calls, the token for changing calls, the live stream.
"use strict";
const ui = {
  token() {
    const m = document.cookie.match(/(?:^|;\s*)pipeline_ui_token=([^;]+)/);
    return m ? decodeURIComponent(m[1]) : "";
  },
  async get(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" } });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  },
  async post(path, payload) {
    const r = await fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Pipeline-Token": ui.token() },
      body: JSON.stringify(payload),
    });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  },
  // Calls onStatus(snapshot) for each status the server sends (about once a second).
  live(onStatus) {
    const badge = document.getElementById("live");
    const source = new EventSource("/api/events");
    source.addEventListener("status", (e) => {
      const snap = JSON.parse(e.data);
      const at = snap.at ? new Date(snap.at).toLocaleTimeString() : "-";
      badge.textContent = snap.error ? `broker: ${snap.error}` : `live · ${at}`;
      badge.classList.toggle("down", Boolean(snap.error));
      badge.dataset.at = String(snap.at || 0);
      onStatus(snap);
    });
    source.onerror = () => { badge.textContent = "reconnecting…"; badge.classList.add("down"); };
    return source;
  },
  fmt(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); },
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  },
  showError(err) {
    const box = document.getElementById("error");
    if (!box) return;
    box.hidden = !err;
    box.textContent = err ? String(err.message || err) : "";
  },
  stageLink(stage, lane, pipeline) {
    const q = new URLSearchParams();
    if (lane) q.set("lane", lane);
    if (pipeline) q.set("pipeline", pipeline);
    const s = q.toString();
    return `/dlq/${encodeURIComponent(stage)}${s ? "?" + s : ""}`;
  },
};
