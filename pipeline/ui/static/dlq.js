// A stage's dead letters: counts by class over time (live), a filtered page table, replays.
"use strict";
(() => {
  const root = document.getElementById("dlq");
  const stage = root.dataset.stage; const lane = root.dataset.lane; const pipeline = root.dataset.pipeline;
  const query = (extra) => {
    const q = new URLSearchParams(extra || {});
    if (lane) q.set("lane", lane);
    if (pipeline) q.set("pipeline", pipeline);
    return q;
  };
  const base = `/api/dlq/${encodeURIComponent(stage)}`;
  const form = document.getElementById("filters");
  const tbody = document.querySelector("#records tbody");
  const older = document.getElementById("older");
  const note = document.getElementById("page-note");
  const palette = ["#d92d20", "#f79009", "#2e6bd6", "#7a5af8", "#12b76a", "#ee46bc", "#667085"];
  const colours = {};
  const colour = (cls) => (colours[cls] ||= palette[Object.keys(colours).length % palette.length]);
  let cursor = null;
  let replayedSeen = null;

  const filters = () => {
    const f = new FormData(form); const out = {};
    for (const k of ["error_class", "key"]) if (f.get(k)) out[k] = f.get(k);
    for (const k of ["since", "until"]) if (f.get(k)) out[k] = String(new Date(f.get(k)).getTime());
    return out;
  };

  async function summary() {
    let s;
    try { s = await ui.get(`${base}/summary?${query()}`); } catch (e) { ui.showError(e); return; }
    document.getElementById("total").textContent = ui.fmt(s.total);
    document.getElementById("replayed").textContent = ui.fmt(s.replayed);
    if (replayedSeen !== null && s.replayed !== replayedSeen) load(true);  // mark the rows
    replayedSeen = s.replayed;
    document.getElementById("indexing").textContent = s.caught_up ? "counts are live"
      : `counting… ${ui.fmt(s.indexed)} of ${ui.fmt(s.backlog)}`;
    const chips = document.getElementById("classes"); chips.replaceChildren();
    const select = form.elements.error_class; const chosen = select.value;
    const known = new Set([...select.options].map((o) => o.value));
    for (const [cls, n] of Object.entries(s.by_class)) {
      const chip = ui.el("span", { class: "chip", "data-class": cls },
        ui.el("span", { class: "swatch", style: `background:${colour(cls)}` }), cls, ui.el("b", {}, ui.fmt(n)));
      chip.addEventListener("click", () => { select.value = cls; load(true); });
      chips.append(chip);
      if (!known.has(cls)) select.append(ui.el("option", { value: cls }, cls));
    }
    select.value = chosen;
    chart(s.series);
  }

  function chart(series) {
    const svg = document.getElementById("chart"); svg.replaceChildren();
    const width = svg.clientWidth || 800; const height = 120; const pad = 18;
    if (!series.length) return;
    const totals = series.map((b) => Object.values(b.by_class).reduce((a, c) => a + c, 0));
    const max = Math.max(1, ...totals); const bw = (width - 2 * pad) / series.length;
    const NS = "http://www.w3.org/2000/svg";
    series.forEach((b, i) => {
      let y = height - pad;
      for (const [cls, n] of Object.entries(b.by_class)) {
        const h = (n / max) * (height - 2 * pad);
        const r = document.createElementNS(NS, "rect");
        r.setAttribute("x", pad + i * bw + 1); r.setAttribute("width", Math.max(1, bw - 2));
        r.setAttribute("y", y - h); r.setAttribute("height", h); r.setAttribute("fill", colour(cls));
        const t = document.createElementNS(NS, "title");
        t.textContent = `${new Date(b.start_ms).toLocaleString()} (+${b.seconds} s): ${cls} ${n}`;
        r.append(t); svg.append(r); y -= h;
      }
    });
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", pad); label.setAttribute("y", 12); label.setAttribute("font-size", "11");
    const per = series[0].seconds; const unit = per % 3600 === 0 ? `${per / 3600} h` : per % 60 === 0 ? `${per / 60} min` : `${per} s`;
    label.textContent = `${new Date(series[0].start_ms).toLocaleString()} onwards, per ${unit}, highest ${ui.fmt(max)}`; svg.append(label);
  }

  function headers(all) {
    const list = ui.el("dl", { class: "headers" });
    for (const [k, v] of Object.entries(all)) list.append(ui.el("dt", {}, k), ui.el("dd", {}, v));
    return ui.el("details", {}, ui.el("summary", {}, `${Object.keys(all).length} headers`), list);
  }

  function row(r) {
    const value = typeof r.value === "string" ? r.value : JSON.stringify(r.value);
    const btn = ui.el("button", { type: "button", class: "replay-one", "data-at": r.at }, "Replay");
    if (document.body.dataset.unlocked !== "yes") btn.disabled = true;
    btn.addEventListener("click", () => ask({ at: r.at }, `dead letter ${r.at}`));
    const tr = ui.el("tr", { "data-at": r.at, "data-class": r.error_class },
      ui.el("td", {}, new Date(r.timestamp).toLocaleString()),
      ui.el("td", {}, r.key ?? "(none)"),
      ui.el("td", {}, r.error_class),
      ui.el("td", {}, r.error_message),
      ui.el("td", { class: "num" }, r.attempts),
      ui.el("td", {}, r.at),
      ui.el("td", { class: "value" }, value, headers(r.headers)),
      ui.el("td", {}, btn, r.replayed ? ui.el("span", { class: "tag" }, "replayed") : ""));
    return tr;
  }

  let generation = 0;  // a newer load wins: an older answer arriving late is dropped
  async function load(fresh) {
    const mine = ++generation;
    if (fresh) { cursor = null; tbody.replaceChildren(); }
    const q = query(filters()); if (cursor) q.set("cursor", cursor);
    note.textContent = "reading…";
    try {
      const page = await ui.get(`${base}/records?${q}`);
      if (mine !== generation) return;
      for (const r of page.rows) tbody.append(row(r));
      cursor = page.next; older.hidden = !cursor;
      note.textContent = `${ui.fmt(tbody.rows.length)} shown · read ${ui.fmt(page.scanned)} dead letters in ${page.took_ms} ms` +
        (page.complete ? "" : " (scan budget reached: 'Older' reads further back)");
      ui.showError(null);
    } catch (e) { note.textContent = ""; ui.showError(e); }
  }

  // Replays: a dry run counts what would go, the user confirms, then the replay runs.
  const box = document.getElementById("replay-box");
  const text = document.getElementById("replay-text");
  const bar = document.getElementById("replay-progress");
  const confirmBtn = document.getElementById("replay-confirm");
  let pending = null;
  async function follow(run) {
    for (;;) {
      const r = await ui.get(`/api/replays/${run.id}`);
      bar.max = Math.max(1, r.total); bar.value = r.read;
      if (r.state !== "running") return r;
      await new Promise((ok) => setTimeout(ok, 300));
    }
  }
  async function ask(where, what) {
    box.hidden = false; confirmBtn.hidden = true; pending = null;
    text.textContent = `Counting the dead letters that match ${what}…`;
    try {
      const run = await follow(await ui.post(`${base}/replay?${query()}`, { where, dry_run: true }));
      if (run.state === "failed") throw new Error(run.error);
      const n = run.report.replayed;
      text.textContent = n ? `${ui.fmt(n)} dead letter${n === 1 ? "" : "s"} will go back to ${run.report.topic} (${what}).`
        : `No dead letter matches ${what}.`;
      box.dataset.count = String(n);
      if (n) { pending = where; confirmBtn.hidden = false; }
    } catch (e) { text.textContent = `Refused: ${e.message}`; }
  }
  confirmBtn.addEventListener("click", async () => {
    if (!pending) return;
    confirmBtn.hidden = true; const where = pending; pending = null;
    text.textContent = "Replaying…";
    try {
      const run = await follow(await ui.post(`${base}/replay?${query()}`, { where }));
      if (run.state === "failed") throw new Error(run.error);
      text.textContent = `Replayed ${ui.fmt(run.report.replayed)} of ${ui.fmt(run.report.read)} dead letters read (replay ${run.id}).`;
      box.dataset.replayed = String(run.report.replayed);
      summary(); load(true);
    } catch (e) { text.textContent = `Replay failed: ${e.message}`; }
  });
  document.getElementById("replay-cancel").addEventListener("click", () => { box.hidden = true; pending = null; });
  document.getElementById("replay-matching").addEventListener("click", () => {
    const f = filters(); const where = {};
    if (f.error_class) where.error_class = f.error_class;
    if (f.key) where.key = f.key;
    const what = Object.entries(where).map(([k, v]) => `${k}=${v}`).join(" and ") || "all (no filter)";
    ask(where, what + (f.since || f.until ? " (the time range is not part of a replay)" : ""));
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); load(true); });
  older.addEventListener("click", () => load(false));
  summary(); load(true);
  let lastSummary = 0;
  ui.live(() => { if (Date.now() - lastSummary > 1500) { lastSummary = Date.now(); summary(); } });
})();
